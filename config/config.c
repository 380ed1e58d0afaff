/* config.c - flag tables, strict parsing and --help for the subcommands. */
#include "config.h"

#include <errno.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

int cfg_parse_int(const char *s, long long lo, long long hi, long long *out) {
    if (!s || !*s) return -1;
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || *end || v < lo || v > hi) return -1;
    *out = v;
    return 0;
}

int cfg_parse_float(const char *s, double lo, double hi, double *out) {
    if (!s || !*s) return -1;
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || *end || !isfinite(v) || v < lo || v > hi) return -1;
    *out = v;
    return 0;
}

typedef enum { F_STR, F_INT, F_FLOAT, F_U64, F_BOOL } ftype_t;

typedef struct {
    const char *flag;
    ftype_t type;
    double lo, hi;
    size_t off;
    const char *arg, *help;
} flag_t;

#define OFF(f) offsetof(cfg_generate_t, f)
static const flag_t gen_flags[] = {
    {"--model", F_STR, 0, 0, OFF(model), "PATH", "GGUF model file (required)"},
    {"--prompt", F_STR, 0, 0, OFF(prompt), "TEXT", "prompt text (required)"},
    {"--max-tokens", F_INT, 0, 1 << 24, OFF(max_tokens), "N", "tokens to generate (default 128)"},
    {"--temperature", F_FLOAT, 0, 100, OFF(temperature), "T",
     "sampling temperature; 0 decodes greedily (default 0.8)"},
    {"--top-p", F_FLOAT, 1e-9, 1, OFF(top_p), "P", "nucleus sampling mass, 1 = off (default 0.95)"},
    {"--top-k", F_INT, 0, 1 << 24, OFF(top_k), "K",
     "keep the K most likely tokens, 0 = off (default 40)"},
    {"--min-p", F_FLOAT, 0, 1, OFF(min_p), "P",
     "drop tokens below P x the top probability, 0 = off (default 0.05)"},
    {"--repeat-penalty", F_FLOAT, 1e-6, 100, OFF(repeat_penalty), "R",
     "repetition penalty, 1 = off (default 1)"},
    {"--presence-penalty", F_FLOAT, -2, 2, OFF(presence_penalty), "X",
     "presence penalty (default 0)"},
    {"--frequency-penalty", F_FLOAT, -2, 2, OFF(frequency_penalty), "X",
     "frequency penalty (default 0)"},
    {"--repeat-last-n", F_INT, 0, 1 << 20, OFF(repeat_last_n), "N",
     "tokens the penalties look back over (default 64)"},
    {"--seed", F_U64, 0, 0, OFF(seed), "S", "sampling seed (default: from the clock, printed)"},
    {"--threads", F_INT, 0, 256, OFF(threads), "N", "CPU worker threads, 0 = all CPUs (default 0)"},
    {"--ctx-size", F_INT, 0, 1 << 24, OFF(ctx_size), "N",
     "context window, 0 = the model's (default 0)"},
    {"--batch-size", F_INT, 1, 65536, OFF(batch_size), "N",
     "prompt tokens per forward pass (default 512)"},
    {"--verbose", F_BOOL, 0, 0, OFF(verbose), "", "print model and timing details to stderr"},
    {"--help", F_BOOL, 0, 0, OFF(help), "", "show this help"},
};

void cfg_generate_help(FILE *f) {
    fprintf(f, "usage: tidald generate --model PATH --prompt TEXT [options]\n\n"
               "Generate text from a prompt and stream it to stdout; diagnostics go to stderr.\n\n"
               "options:\n");
    for (size_t i = 0; i < sizeof(gen_flags) / sizeof(gen_flags[0]); i++)
        fprintf(f, "  %-20s %-5s %s\n", gen_flags[i].flag, gen_flags[i].arg, gen_flags[i].help);
}

int cfg_generate_parse(cfg_generate_t *c, int argc, char **argv, char *msg) {
    memset(c, 0, sizeof(*c));
    c->max_tokens = 128;
    c->temperature = 0.8f;
    c->top_p = 0.95f;
    c->top_k = 40;
    c->min_p = 0.05f;
    c->repeat_penalty = 1.0f;
    c->repeat_last_n = 64;
    c->batch_size = 512;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *val = NULL;
        size_t alen = strcspn(a, "=");
        const flag_t *f = NULL;
        for (size_t k = 0; k < sizeof(gen_flags) / sizeof(gen_flags[0]); k++)
            if (strlen(gen_flags[k].flag) == alen && strncmp(a, gen_flags[k].flag, alen) == 0)
                f = &gen_flags[k];
        if (!f) {
            snprintf(msg, CFG_ERRMSG_LEN, "unknown option '%s' (see tidald generate --help)", a);
            return -1;
        }
        char *base = (char *)c + f->off;
        if (f->type == F_BOOL) {
            *(bool *)base = true;
            continue;
        }
        if (a[alen] == '=')
            val = a + alen + 1;
        else if (i + 1 < argc)
            val = argv[++i];
        else {
            snprintf(msg, CFG_ERRMSG_LEN, "%s needs a value (%s)", f->flag, f->arg);
            return -1;
        }
        long long iv;
        double dv;
        switch (f->type) {
        case F_STR:
            *(const char **)base = val;
            break;
        case F_INT:
            if (cfg_parse_int(val, (long long)f->lo, (long long)f->hi, &iv)) goto bad;
            *(int32_t *)base = (int32_t)iv;
            break;
        case F_FLOAT:
            if (cfg_parse_float(val, f->lo, f->hi, &dv)) goto bad;
            *(float *)base = (float)dv;
            break;
        case F_U64: {
            char *end;
            errno = 0;
            if (!*val || *val == '-') goto bad;
            unsigned long long u = strtoull(val, &end, 10);
            if (errno || *end) goto bad;
            *(uint64_t *)base = u;
            c->seed_set = true;
            break;
        }
        case F_BOOL:
            break;
        }
        continue;
    bad:
        if (f->type == F_U64)
            snprintf(msg, CFG_ERRMSG_LEN, "%s: '%s' is not an unsigned integer", f->flag, val);
        else
            snprintf(msg, CFG_ERRMSG_LEN, "%s: '%s' is not a number in [%g, %g]", f->flag, val,
                     f->lo, f->hi);
        return -1;
    }
    if (c->help) return 0;
    if (!c->model) {
        snprintf(msg, CFG_ERRMSG_LEN, "--model is required");
        return -1;
    }
    if (!c->prompt) {
        snprintf(msg, CFG_ERRMSG_LEN, "--prompt is required");
        return -1;
    }
    return 0;
}
