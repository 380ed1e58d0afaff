/* perplexity.c - `tidald perplexity`: teacher-forced evaluation as a streaming model sees a
 * text: one token at a time, sink-aware eviction when the window fills.
 *
 * In tidal mode each position runs twice over the same cache: first with full attention
 * (the reference distribution; its K/V slot is then rolled back), then with TidalDecode,
 * whose K/V stay. So both distributions condition on exactly the same cache, and the
 * comparison (top-1 agreement, KL(full || tidal)) isolates the sparse attention's effect.
 */
#include "../config/config.h"
#include "../engine/engine.h"
#include "cli.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

char *cli_read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 1 << 16, n = 0;
    char *b = malloc(cap);
    size_t r;
    while (b && (r = fread(b + n, 1, cap - n, f)) > 0) {
        n += r;
        if (n == cap) {
            char *nb = realloc(b, cap *= 2);
            if (!nb) {
                free(b);
                b = NULL;
            }
            b = nb;
        }
    }
    fclose(f);
    if (b) *len = n;
    return b;
}

/* log-softmax facts of logits: log Z and the argmax */
static double log_z(const float *l, uint32_t V, int32_t *arg) {
    float mx = l[0];
    int32_t a = 0;
    for (uint32_t i = 1; i < V; i++)
        if (l[i] > mx) mx = l[i], a = (int32_t)i;
    double z = 0;
    for (uint32_t i = 0; i < V; i++) z += exp((double)l[i] - mx);
    *arg = a;
    return mx + log(z);
}

/* llama-perplexity's method (eng_perplexity_chunks): the same number llama-perplexity prints
 * for the same file and -c. One chunk per call, so --verbose can report each. */
static int chunked(const cfg_generate_t *cfg, eng_ctx_t *ctx, const eng_model_t *model,
                   int32_t *toks, size_t n) {
    uint32_t len = cfg->ctx_size > 0 ? (uint32_t)cfg->ctx_size : 512;
    size_t chunks = n / len;
    if (len < 2 || chunks == 0) {
        fprintf(stderr, "tidald perplexity: the text has fewer than %u tokens, one chunk\n", len);
        return 1;
    }
    char msg[ENG_ERRMSG_LEN];
    double nll = 0;
    uint64_t count = 0;
    for (size_t c = 0; c < chunks; c++) {
        if (eng_perplexity_chunks(ctx, model, toks + c * len, len, len, &nll, &count, msg)) {
            fprintf(stderr, "tidald perplexity: %s\n", msg);
            return 1;
        }
        if (cfg->verbose)
            fprintf(stderr, "tidald perplexity: chunk %zu/%zu, ppl %.4f\n", c + 1, chunks,
                    exp(nll / (double)count));
    }
    double ppl = exp(nll / (double)count);
    fprintf(stderr, "tidald perplexity: %zu chunks of %u, %llu tokens scored: perplexity %.4f\n",
            chunks, len, (unsigned long long)count, ppl);
    printf("{\"method\":\"chunked\",\"chunks\":%zu,\"ctx_size\":%u,\"tokens\":%llu,"
           "\"perplexity\":%.6f}\n",
           chunks, len, (unsigned long long)count, ppl);
    return 0;
}

/* The sliding window with re-computation (StreamingLLM's baseline): for every `stride` positions
 * i (each predicting toks[i + 1]), a fresh sequence computes toks[s .. last] from scratch, s
 * chosen so the last of them sees exactly `window` tokens (itself included), and scores those
 * positions: each sees between window - stride + 1 and window tokens, all computed with that
 * context, where the streaming cache keeps keys computed in older contexts. */
static int recompute(const cfg_generate_t *cfg, eng_ctx_t *ctx, const eng_model_t *model,
                     const int32_t *toks, size_t n) {
    uint32_t window = eng_ctx_n_ctx(ctx), stride = (uint32_t)cfg->recompute, sub = 64;
    uint32_t V = eng_model_hparams(model)->n_vocab;
    if (stride > window) stride = window;
    float *logits = malloc(sizeof(float) * V * sub);
    if (!logits) return 1;
    char msg[ENG_ERRMSG_LEN];
    double nll = 0;
    uint64_t count = 0;
    int rc = 0;
    for (size_t b = 0; b + 1 < n && !rc; b += stride) {
        size_t end = b + stride < n - 1 ? b + stride : n - 1; /* positions [b, end) scored */
        size_t s = end > window ? end - window : 0;
        kv_seq_t seq;
        kv_seq_init(&seq, eng_ctx_kv_pool(ctx));
        for (size_t at = s; at < end && !rc; at += sub) {
            uint32_t k = end - at < sub ? (uint32_t)(end - at) : sub;
            bool scored = at + k > b;
            eng_batch_item_t it = {&seq, toks + at, k, scored ? logits : NULL, scored};
            if ((rc = eng_forward(ctx, &it, 1, msg)) || !scored) continue;
            for (uint32_t j = 0; j < k; j++) {
                if (at + j < b) continue;
                int32_t arg;
                nll += log_z(logits + (size_t)j * V, V, &arg) -
                       logits[(size_t)j * V + toks[at + j + 1]];
                count++;
            }
        }
        kv_seq_close(&seq);
        if (cfg->verbose && b / stride % 50 == 0 && count)
            fprintf(stderr, "tidald perplexity: %llu tokens, ppl %.4f\n", (unsigned long long)count,
                    exp(nll / (double)count));
    }
    free(logits);
    if (rc) {
        fprintf(stderr, "tidald perplexity: %s\n", msg);
        return 1;
    }
    double ppl = exp(nll / (double)count);
    fprintf(stderr,
            "tidald perplexity: %llu tokens, window %u re-computed every %u: perplexity %.4f\n",
            (unsigned long long)count, window, stride, ppl);
    printf("{\"method\":\"recompute\",\"tokens\":%llu,\"perplexity\":%.6f,\"ctx_size\":%u,"
           "\"recompute_stride\":%u}\n",
           (unsigned long long)count, ppl, window, stride);
    return 0;
}

/* One teacher-forced pass as a streaming model sees the text: one token at a time, evicting
 * when the window (the context's) fills unless cfg->no_eviction. With TidalDecode each position
 * runs with full attention first (its K/V slot then rolled back) and then with `attn`, whose
 * K/V stay, so both distributions condition on the same cache. 0, or 1 with the error printed. */
int stream_eval(const cfg_generate_t *cfg, eng_ctx_t *ctx, const eng_model_t *model,
                const int32_t *toks, size_t n, const eng_attn_params_t *attn,
                stream_result_t *out) {
    const eng_hparams_t *hp = eng_model_hparams(model);
    bool tidal = attn->mode == ENG_ATTN_TIDAL;
    uint32_t V = hp->n_vocab, window = eng_ctx_n_ctx(ctx);
    char msg[ENG_ERRMSG_LEN];
    memset(out, 0, sizeof(*out));
    float *lf = malloc(sizeof(float) * V), *lt = malloc(sizeof(float) * V);
    if (!lf || !lt) {
        free(lf), free(lt);
        fprintf(stderr, "tidald: out of memory\n");
        return 1;
    }
    kv_seq_t seq;
    kv_seq_init(&seq, eng_ctx_kv_pool(ctx));
    seq.n_sinks = (uint32_t)cfg->sinks;
    double nll = 0, nll_full = 0, kl = 0;
    uint64_t agree = 0, count = 0;
    int rc = 0;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (size_t i = 0; i + 1 < n && !rc; i++) {
        if (!cfg->no_eviction) eng_seq_make_room(ctx, &seq, window, 1, (uint32_t)cfg->evict_chunk);
        if (seq.n_tokens + 1 > window) break; /* --no-eviction: the window is the limit */
        eng_batch_item_t it = {&seq, &toks[i], 1, lf};
        if ((rc = eng_forward(ctx, &it, 1, msg))) break;
        int32_t af, at;
        double zf = log_z(lf, V, &af);
        nll_full += zf - lf[toks[i + 1]];
        if (tidal) {
            seq.n_tokens--; /* roll the full-attention slot back; the tidal pass rewrites it */
            it.logits = lt;
            it.attn = attn;
            if ((rc = eng_forward(ctx, &it, 1, msg))) break;
            double zt = log_z(lt, V, &at);
            nll += zt - lt[toks[i + 1]];
            agree += af == at;
            double k = 0; /* KL(full || tidal) */
            for (uint32_t v = 0; v < V; v++) {
                double lpf = lf[v] - zf, lpt = lt[v] - zt;
                k += exp(lpf) * (lpf - lpt);
            }
            kl += k;
        } else {
            nll += zf - lf[toks[i + 1]];
        }
        count++;
        if (cfg->verbose && count % 500 == 0)
            fprintf(stderr, "tidald: %llu tokens, ppl %.4f\n", (unsigned long long)count,
                    exp(nll / count));
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double secs = (double)(t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9;
    out->count = count;
    out->evicted = seq.n_evicted;
    if (count) {
        out->ppl = exp(nll / (double)count);
        out->ppl_full = exp(nll_full / (double)count);
        out->agreement = (double)agree / (double)count;
        out->mean_kl = kl / (double)count;
    }
    out->tok_s = count / (secs + 1e-12);
    kv_seq_close(&seq);
    free(lf), free(lt);
    if (rc) fprintf(stderr, "tidald: %s\n", msg);
    return rc ? 1 : 0;
}

/* The evaluation text of cfg->file as tokens (special-token texts such as <s> between
 * documents become those tokens), at most --eval-tokens of them; 0, or 1 with the error on
 * stderr under the command's name. */
int eval_text_tokens(const cfg_generate_t *cfg, const char *cmd, const eng_model_t *model,
                     int32_t **toks, size_t *n) {
    size_t len = 0;
    char msg[ENG_ERRMSG_LEN];
    char *text = cli_read_file(cfg->file, &len);
    if (!text) {
        fprintf(stderr, "tidald %s: cannot read '%s'\n", cmd, cfg->file);
        return 1;
    }
    const eng_tokenizer_t *tok = eng_model_tokenizer(model);
    int rc = eng_tokenize_ex(tok, text, len, eng_tok_add_bos(tok), true, toks, n, msg);
    free(text);
    if (rc) {
        fprintf(stderr, "tidald %s: %s: %s\n", cmd, cfg->file, msg);
        return 1;
    }
    if (cfg->eval_tokens > 0 && *n > (size_t)cfg->eval_tokens) *n = (size_t)cfg->eval_tokens;
    if (*n < 2) {
        fprintf(stderr, "tidald %s: the text has fewer than 2 tokens\n", cmd);
        return 1;
    }
    return 0;
}

int cmd_perplexity(int argc, char **argv) {
    cfg_generate_t cfg;
    char msg[ENG_ERRMSG_LEN] = {0};
    if (cfg_perplexity_parse(&cfg, argc, argv, msg) != 0) {
        fprintf(stderr, "tidald perplexity: %s\n", msg);
        return 2;
    }
    if (cfg.help) {
        cfg_perplexity_help(stdout);
        return 0;
    }
    int status = 1;
    eng_model_t *model = NULL;
    eng_ctx_t *ctx = NULL;
    int32_t *toks = NULL;
    size_t n = 0;
    if (eval_open(&cfg, &model, &ctx)) goto done;
    const eng_hparams_t *hp = eng_model_hparams(model);
    eng_attn_params_t attn;
    if (eval_attn_params(&cfg, hp, &attn)) goto done;
    bool tidal = attn.mode == ENG_ATTN_TIDAL;
    if (eval_text_tokens(&cfg, "perplexity", model, &toks, &n)) goto done;
    if (cfg.chunked) {
        status = chunked(&cfg, ctx, model, toks, n);
        goto done;
    }
    if (cfg.recompute) {
        status = recompute(&cfg, ctx, model, toks, n);
        goto done;
    }
    stream_result_t res;
    if (stream_eval(&cfg, ctx, model, toks, n, &attn, &res)) goto done;
    fprintf(stderr,
            "tidald perplexity: %llu tokens, window %u, sinks %u, %s: perplexity %.4f "
            "(%.1f tok/s)\n",
            (unsigned long long)res.count, eng_ctx_n_ctx(ctx), (uint32_t)cfg.sinks, cfg.attention,
            res.ppl, res.tok_s);
    printf("{\"tokens\":%llu,\"perplexity\":%.6f,\"attention\":\"%s\",\"ctx_size\":%u,"
           "\"sinks\":%u,\"evicted_tokens\":%llu",
           (unsigned long long)res.count, res.ppl, cfg.attention, eng_ctx_n_ctx(ctx),
           (uint32_t)cfg.sinks, (unsigned long long)res.evicted);
    if (tidal) {
        printf(",\"token_budget\":%u,\"selection_layers\":[", attn.token_budget);
        for (uint32_t k = 0; k < attn.n_sel_layers; k++)
            printf("%s%u", k ? "," : "", attn.sel_layers[k]);
        printf("],\"force_sinks\":%s,\"per_group\":%s,\"perplexity_full\":%.6f,"
               "\"top1_agreement_vs_full\":%.6f,\"mean_kl_vs_full\":%.6f",
               attn.force_sinks ? "true" : "false", attn.per_group ? "true" : "false", res.ppl_full,
               res.agreement, res.mean_kl);
    }
    printf("}\n");
    status = 0;
done:
    free(toks);
    eng_ctx_free(ctx);
    eng_model_free(model);
    return status;
}
