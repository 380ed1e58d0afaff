/* calibrate.c - `tidald calibrate`: choose TidalDecode's re-selection layer and budget for a
 * model on a text. Each setting runs the streaming teacher-forced pass of `perplexity
 * --attention tidal` (stream_eval: every position with full attention over the same cache
 * too), and the smallest budget whose top-1 agreement with full attention reaches the target
 * is recommended, with its best layer; as serve flags and, with --out, as a config file that
 * `tidald serve --config` reads. */
#include "../config/config.h"
#include "../engine/engine.h"
#include "cli.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { MAX_BUDGETS = 32, MAX_LAYERS = 256 };

typedef struct {
    eng_attn_params_t attn;
    stream_result_t res;
} setting_t;

static void print_layers(FILE *f, const eng_attn_params_t *a, const char *sep) {
    for (uint32_t k = 0; k < a->n_sel_layers; k++)
        fprintf(f, "%s%u", k ? sep : "", a->sel_layers[k]);
}

/* The settings to sweep: the default's first selection layer alone, then with each candidate
 * re-selection layer after it; each with every budget. */
static int plan(const cfg_generate_t *cfg, const eng_hparams_t *hp, setting_t **out, size_t *n) {
    char msg[CFG_ERRMSG_LEN], emsg[ENG_ERRMSG_LEN];
    uint32_t budgets[MAX_BUDGETS], layers[MAX_LAYERS], nb = 0, nl = 0;
    /* the budget list parses as a layer list does: comma-separated non-negative numbers */
    if (cfg_parse_layers(cfg->budgets, budgets, MAX_BUDGETS, &nb, msg) || !nb) {
        fprintf(stderr, "tidald calibrate: --budgets '%s': up to %d comma-separated budgets\n",
                cfg->budgets, MAX_BUDGETS);
        return -1;
    }
    eng_attn_params_t base = {ENG_ATTN_TIDAL, 1};
    eng_attn_defaults(hp, &base);
    base.force_sinks = cfg->force_sinks;
    base.per_group = cfg->per_group;
    uint32_t first = base.sel_layers[0];
    if (cfg->layers && *cfg->layers) {
        if (cfg_parse_layers(cfg->layers, layers, MAX_LAYERS, &nl, msg)) {
            fprintf(stderr, "tidald calibrate: --layers: %s\n", msg);
            return -1;
        }
    } else {
        for (uint32_t l = first + 1; l < hp->n_layer && nl < MAX_LAYERS; l++)
            if (!hp->swa_window || !eng_layer_is_swa(hp, l)) layers[nl++] = l;
    }
    *out = calloc((size_t)nb * (nl + 1), sizeof(setting_t));
    if (!*out) return -1;
    *n = 0;
    for (uint32_t b = 0; b < nb; b++)
        for (uint32_t i = 0; i <= nl; i++) {
            setting_t *s = &(*out)[*n];
            s->attn = base;
            s->attn.token_budget = budgets[b];
            s->attn.n_sel_layers = 1;
            s->attn.sel_layers[0] = first;
            if (i) {
                if (layers[i - 1] <= first) continue; /* not a re-selection layer */
                s->attn.sel_layers[s->attn.n_sel_layers++] = layers[i - 1];
            }
            if (eng_attn_check(hp, &s->attn, emsg)) {
                fprintf(stderr, "tidald calibrate: %s\n", emsg);
                free(*out);
                return -1;
            }
            (*n)++;
        }
    return 0;
}

/* The smallest budget at which some setting reaches the target agreement, and there the best
 * agreement (then the lowest KL); when none reaches it, the best agreement of all. */
static const setting_t *recommend(const setting_t *s, size_t n, double target, bool *reached) {
    const setting_t *best = NULL;
    *reached = false;
    for (size_t i = 0; i < n; i++) {
        const stream_result_t *r = &s[i].res;
        bool ok = r->agreement >= target;
        if (!best) {
            best = &s[i];
            *reached = ok;
            continue;
        }
        const stream_result_t *b = &best->res;
        bool better;
        if (ok != *reached)
            better = ok;
        else if (ok && s[i].attn.token_budget != best->attn.token_budget)
            better = s[i].attn.token_budget < best->attn.token_budget;
        else if (r->agreement != b->agreement)
            better = r->agreement > b->agreement;
        else
            better = r->mean_kl < b->mean_kl;
        if (better) best = &s[i], *reached = ok;
    }
    return best;
}

int cmd_calibrate(int argc, char **argv) {
    cfg_generate_t cfg;
    char msg[ENG_ERRMSG_LEN] = {0};
    if (cfg_calibrate_parse(&cfg, argc, argv, msg) != 0) {
        fprintf(stderr, "tidald calibrate: %s\n", msg);
        return 2;
    }
    if (cfg.help) {
        cfg_calibrate_help(stdout);
        return 0;
    }
    int status = 1;
    eng_model_t *model = NULL;
    eng_ctx_t *ctx = NULL;
    int32_t *toks = NULL;
    setting_t *set = NULL;
    size_t n = 0, n_set = 0;
    if (eval_open(&cfg, &model, &ctx)) goto done;
    const eng_hparams_t *hp = eng_model_hparams(model);
    if (eval_text_tokens(&cfg, "calibrate", model, &toks, &n)) goto done;
    if (plan(&cfg, hp, &set, &n_set)) goto done;
    fprintf(stderr, "tidald calibrate: %zu settings over %zu tokens, window %u\n", n_set, n,
            eng_ctx_n_ctx(ctx));
    fprintf(stderr, "%-18s %8s %10s %10s %10s %10s\n", "selection layers", "budget", "ppl",
            "ppl full", "top-1 agr", "mean KL");
    for (size_t i = 0; i < n_set; i++) {
        setting_t *s = &set[i];
        if (stream_eval(&cfg, ctx, model, toks, n, &s->attn, &s->res)) goto done;
        char lay[64] = "";
        for (uint32_t k = 0, w = 0; k < s->attn.n_sel_layers && w < sizeof(lay) - 12; k++)
            w += (uint32_t)snprintf(lay + w, sizeof(lay) - w, "%s%u", k ? "," : "",
                                    s->attn.sel_layers[k]);
        fprintf(stderr, "%-18s %8u %10.4f %10.4f %10.4f %10.4f\n", lay, s->attn.token_budget,
                s->res.ppl, s->res.ppl_full, s->res.agreement, s->res.mean_kl);
        printf("{\"selection_layers\":[");
        print_layers(stdout, &s->attn, ",");
        printf("],\"token_budget\":%u,\"tokens\":%llu,\"perplexity\":%.6f,\"perplexity_full\":%.6f,"
               "\"top1_agreement_vs_full\":%.6f,\"mean_kl_vs_full\":%.6f}\n",
               s->attn.token_budget, (unsigned long long)s->res.count, s->res.ppl, s->res.ppl_full,
               s->res.agreement, s->res.mean_kl);
        fflush(stdout);
    }
    bool reached;
    const setting_t *r = recommend(set, n_set, cfg.min_agreement, &reached);
    printf("{\"recommended\":{\"attention\":\"tidal\",\"selection_layers\":[");
    print_layers(stdout, &r->attn, ",");
    printf("],\"token_budget\":%u,\"top1_agreement_vs_full\":%.6f,\"min_agreement\":%.4f,"
           "\"reached\":%s}}\n",
           r->attn.token_budget, r->res.agreement, cfg.min_agreement, reached ? "true" : "false");
    fprintf(stderr, "tidald calibrate: %s: serve with --attention tidal --selection-layers ",
            reached ? "recommended" : "no setting reached the agreement asked for; the closest");
    print_layers(stderr, &r->attn, ",");
    fprintf(stderr, " --token-budget %u (top-1 agreement %.4f)\n", r->attn.token_budget,
            r->res.agreement);
    if (cfg.out) {
        FILE *f = fopen(cfg.out, "w");
        if (!f) {
            fprintf(stderr, "tidald calibrate: cannot write '%s'\n", cfg.out);
            goto done;
        }
        fprintf(f, "{\"attention\": \"tidal\", \"selection_layers\": \"");
        print_layers(f, &r->attn, ",");
        fprintf(f, "\", \"token_budget\": %u}\n", r->attn.token_budget);
        if (fclose(f)) {
            fprintf(stderr, "tidald calibrate: cannot write '%s'\n", cfg.out);
            goto done;
        }
    }
    status = 0;
done:
    free(set);
    free(toks);
    eng_ctx_free(ctx);
    eng_model_free(model);
    return status;
}
