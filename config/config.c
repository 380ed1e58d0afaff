/* config.c - flag tables, strict parsing and --help for the subcommands. A leaf module: it
 * includes nothing of the others, so values such as the device name are validated here. */
#include "config.h"

#include <errno.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

/* The device names the engine knows ("auto", "cpu", "cuda"); eng_device_parse maps them. */
bool cfg_device_valid(const char *s) {
    return s && (!strcmp(s, "auto") || !strcmp(s, "cpu") || !strcmp(s, "cuda"));
}

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
    {"--prompt", F_STR, 0, 0, OFF(prompt), "TEXT", "prompt text (generate: required)"},
    {"--file", F_STR, 0, 0, OFF(file), "PATH", "text to evaluate (perplexity: required)"},
    {"--eval-tokens", F_INT, 0, 1 << 30, OFF(eval_tokens), "N",
     "perplexity: only the first N tokens of the text, 0 = all (default 0)"},
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
    {"--device", F_STR, 0, 0, OFF(device), "DEV",
     "auto (a CUDA GPU if present), cpu or cuda (default auto)"},
    {"--ctx-size", F_INT, 0, 1 << 24, OFF(ctx_size), "N",
     "context window, 0 = the model's (default 0)"},
    {"--batch-size", F_INT, 1, 65536, OFF(batch_size), "N",
     "prompt tokens per forward pass (default 512)"},
    {"--sinks", F_INT, 0, 1 << 20, OFF(sinks), "S",
     "attention-sink tokens eviction keeps (default 4)"},
    {"--kv-block-size", F_INT, 1, 4096, OFF(block_size), "N",
     "KV cache tokens per block (default 16)"},
    {"--kv-type", F_STR, 0, 0, OFF(kv_type), "TYPE", "KV cache values: f16 or f32 (default f16)"},
    {"--swa-full", F_BOOL, 0, 0, OFF(swa_full), "",
     "sliding-window models: keep every position of the local layers too"},
    {"--evict-chunk", F_INT, 0, 1 << 24, OFF(evict_chunk), "N",
     "tokens evicted when the window fills (default window/8)"},
    {"--no-eviction", F_BOOL, 0, 0, OFF(no_eviction), "",
     "stop at a full window instead of evicting"},
    {"--chunked", F_BOOL, 0, 0, OFF(chunked), "",
     "perplexity as llama-perplexity computes it: the text in --ctx-size chunks (512 if 0), "
     "each evaluated alone, the second half of each scored"},
    {"--recompute-stride", F_INT, 0, 1 << 24, OFF(recompute), "N",
     "perplexity: the sliding window with re-computation (StreamingLLM's baseline): every N "
     "tokens a fresh sequence computes the last --ctx-size tokens from scratch and scores its "
     "last N (1: every token; 0 = off, the default)"},
    {"--attention", F_STR, 0, 0, OFF(attention), "MODE",
     "full or tidal (TidalDecode) (default full)"},
    {"--token-budget", F_INT, 0, 1 << 24, OFF(token_budget), "K",
     "TidalDecode positions per head, current token included (default 256)"},
    {"--selection-layers", F_STR, 0, 0, OFF(selection_layers), "L,L",
     "TidalDecode selection layers (default 2 and ~40% of depth)"},
    {"--force-sinks", F_BOOL, 0, 0, OFF(force_sinks), "", "keep the sinks in every selection"},
    {"--per-group", F_BOOL, 0, 0, OFF(per_group), "", "select once per KV-head group"},
    {"--budgets", F_STR, 0, 0, OFF(budgets), "K,K",
     "calibrate: budgets to sweep (default 64,128,256,512,1024)"},
    {"--layers", F_STR, 0, 0, OFF(layers), "L,L",
     "calibrate: re-selection layers to sweep (default every layer after the first selection "
     "layer)"},
    {"--min-agreement", F_FLOAT, 0, 1, OFF(min_agreement), "P",
     "calibrate: top-1 agreement with full attention the recommendation keeps (default 0.95)"},
    {"--out", F_STR, 0, 0, OFF(out), "PATH",
     "calibrate: write the recommended settings as a JSON file for `tidald serve --config`"},
    {"--verbose", F_BOOL, 0, 0, OFF(verbose), "", "print model and timing details to stderr"},
    {"--help", F_BOOL, 0, 0, OFF(help), "", "show this help"},
};

static void flags_help(FILE *f) {
    for (size_t i = 0; i < sizeof(gen_flags) / sizeof(gen_flags[0]); i++)
        fprintf(f, "  %-20s %-5s %s\n", gen_flags[i].flag, gen_flags[i].arg, gen_flags[i].help);
}

void cfg_generate_help(FILE *f) {
    fprintf(f, "usage: tidald generate --model PATH --prompt TEXT [options]\n\n"
               "Generate text from a prompt and stream it to stdout; diagnostics go to stderr.\n"
               "When the context window fills, the oldest non-sink tokens are evicted and\n"
               "generation goes on (StreamingLLM), unless --no-eviction.\n\noptions:\n");
    flags_help(f);
}

void cfg_perplexity_help(FILE *f) {
    fprintf(
        f,
        "usage: tidald perplexity --model PATH --file TEXT [options]\n\n"
        "Run the text through the model with teacher forcing, one token at a time as a\n"
        "streaming model sees it, evicting when the window (--ctx-size) fills. In tidal\n"
        "mode every position is also run with full attention over the same cache, to\n"
        "compare the next-token distributions. Special-token texts in the file (such as\n"
        "<s> between documents) become those tokens. The last stdout line is a JSON object with\n"
        "tokens, perplexity and, in tidal mode, top1_agreement_vs_full and\n"
        "mean_kl_vs_full.\n\noptions (sampling flags are ignored):\n");
    flags_help(f);
}

void cfg_calibrate_help(FILE *f) {
    fprintf(f, "usage: tidald calibrate --model PATH --file TEXT [options]\n\n"
               "Choose TidalDecode's settings for a model on a text: for every re-selection layer\n"
               "(the first selection layer stays the default's) and every budget, run the text as\n"
               "`perplexity --attention tidal` does and compare each position with full attention\n"
               "over the same cache. Prints the table on stderr, one JSON line per setting, and\n"
               "last the recommendation: the smallest budget, and at it the layer, whose top-1\n"
               "agreement reaches --min-agreement (else the best agreement seen), as JSON and as\n"
               "serve flags; --out writes it as a config file for `tidald serve --config`. Use\n"
               "--ctx-size and --eval-tokens so the cache grows past the budgets.\n\noptions:\n");
    flags_help(f);
}

int cfg_calibrate_parse(cfg_generate_t *c, int argc, char **argv, char *msg) {
    if (cfg_perplexity_parse(c, argc, argv, msg)) return -1;
    if (c->help) return 0;
    if (c->chunked || c->recompute) {
        snprintf(msg, CFG_ERRMSG_LEN,
                 "calibrate runs the streaming pass: not --chunked or "
                 "--recompute-stride");
        return -1;
    }
    return 0;
}

int cfg_parse_layers(const char *s, uint32_t *out, uint32_t max, uint32_t *n, char *msg) {
    *n = 0;
    while (s && *s) {
        char *end;
        errno = 0;
        long v = strtol(s, &end, 10);
        if (end == s || errno || v < 0 || v > 4096 || *n >= max || (*end && *end != ',')) {
            snprintf(msg, CFG_ERRMSG_LEN,
                     "selection layers '%s' must be up to %u comma-separated "
                     "layer numbers",
                     s, max);
            return -1;
        }
        out[(*n)++] = (uint32_t)v;
        s = *end ? end + 1 : end;
    }
    return 0;
}

static int parse_eval_flags(cfg_generate_t *c, int argc, char **argv, char *msg);

int cfg_generate_parse(cfg_generate_t *c, int argc, char **argv, char *msg) {
    if (parse_eval_flags(c, argc, argv, msg)) return -1;
    if (c->help) return 0;
    if (!c->prompt) {
        snprintf(msg, CFG_ERRMSG_LEN, "--prompt is required");
        return -1;
    }
    return 0;
}

int cfg_perplexity_parse(cfg_generate_t *c, int argc, char **argv, char *msg) {
    if (parse_eval_flags(c, argc, argv, msg)) return -1;
    if (c->help) return 0;
    if (!c->file) {
        snprintf(msg, CFG_ERRMSG_LEN, "--file is required");
        return -1;
    }
    if (c->recompute && (c->chunked || strcmp(c->attention, "full"))) {
        snprintf(msg, CFG_ERRMSG_LEN,
                 "--recompute-stride is a method of its own with full attention: not with "
                 "--chunked or --attention %s",
                 c->chunked ? "(any)" : c->attention);
        return -1;
    }
    return 0;
}

static int parse_eval_flags(cfg_generate_t *c, int argc, char **argv, char *msg) {
    memset(c, 0, sizeof(*c));
    c->max_tokens = 128;
    c->temperature = 0.8f;
    c->top_p = 0.95f;
    c->top_k = 40;
    c->min_p = 0.05f;
    c->repeat_penalty = 1.0f;
    c->repeat_last_n = 64;
    c->batch_size = 512;
    c->sinks = 4;
    c->block_size = 16;
    c->kv_type = "f16";
    c->device = "auto";
    c->attention = "full";
    c->token_budget = 256;
    c->budgets = "64,128,256,512,1024";
    c->layers = "";
    c->min_agreement = 0.95f;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *val = NULL;
        size_t alen = strcspn(a, "=");
        const flag_t *f = NULL;
        for (size_t k = 0; k < sizeof(gen_flags) / sizeof(gen_flags[0]); k++)
            if (strlen(gen_flags[k].flag) == alen && strncmp(a, gen_flags[k].flag, alen) == 0)
                f = &gen_flags[k];
        if (!f) {
            snprintf(msg, CFG_ERRMSG_LEN, "unknown option '%s' (see --help)", a);
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
        else if (f->type == F_INT) /* integer limits as integers, not %g's 1.67772e+07 */
            snprintf(msg, CFG_ERRMSG_LEN, "%s: '%s' is not an integer in [%.0f, %.0f]", f->flag,
                     val, f->lo, f->hi);
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
    if (strcmp(c->attention, "full") != 0 && strcmp(c->attention, "tidal") != 0) {
        snprintf(msg, CFG_ERRMSG_LEN, "--attention: '%s' must be full or tidal", c->attention);
        return -1;
    }
    if (strcmp(c->kv_type, "f16") != 0 && strcmp(c->kv_type, "f32") != 0) {
        snprintf(msg, CFG_ERRMSG_LEN, "--kv-type: '%s' must be f16 or f32", c->kv_type);
        return -1;
    }
    if (!cfg_device_valid(c->device)) {
        snprintf(msg, CFG_ERRMSG_LEN, "--device: '%s' must be auto, cpu or cuda", c->device);
        return -1;
    }
    if (c->token_budget < 1) {
        snprintf(msg, CFG_ERRMSG_LEN, "--token-budget must be at least 1");
        return -1;
    }
    uint32_t layers[16], n;
    if (c->selection_layers && cfg_parse_layers(c->selection_layers, layers, 8, &n, msg)) return -1;
    return 0;
}

/* ===== serve configuration ============================================ */

#include <cjson/cJSON.h>

typedef enum { V_STR, V_INT, V_NUM, V_BOOL } vtype_t;

typedef struct {
    const char *name; /* JSON key; flag is --name with '_' -> '-'; env TIDALD_NAME */
    vtype_t type;
    size_t off;
    const char *def;
    double lo, hi;
    const char *help;
} opt_t;

#define COFF(f) offsetof(cfg_t, f)
static const opt_t opts[] = {
    {"host", V_STR, COFF(host), "127.0.0.1", 0, 0, "address to listen on"},
    {"port", V_INT, COFF(port), "8080", 0, 65535, "TCP port (0: any free port, logged)"},
    {"model", V_STR, COFF(model), "", 0, 0, "GGUF model file (required)"},
    {"model_alias", V_STR, COFF(model_alias), "", 0, 0,
     "model name reported by the API; empty = the file's general.name"},
    {"threads", V_INT, COFF(threads), "0", 0, 256, "CPU worker threads, 0 = all CPUs"},
    {"device", V_STR, COFF(device), "auto", 0, 0,
     "auto (a CUDA GPU when one is present, else the CPU), cpu or cuda"},
    {"ctx_size", V_INT, COFF(ctx_size), "0", 0, 1 << 24, "context window, 0 = the model's"},
    {"max_running", V_INT, COFF(max_running), "16", 1, 1024, "sequences decoding at once"},
    {"max_waiting", V_INT, COFF(max_waiting), "64", 1, 1 << 20,
     "waiting-queue bound; past it requests get 429"},
    {"step_tokens", V_INT, COFF(step_tokens), "256", 1, 65536,
     "token budget of one engine step (prefill chunk size)"},
    {"kv_block_size", V_INT, COFF(kv_block_size), "16", 1, 4096, "KV cache tokens per block"},
    {"kv_type", V_STR, COFF(kv_type), "f16", 0, 0,
     "KV cache values: f16 (half the memory and attention reads) or f32"},
    {"kv_mem_mb", V_INT, COFF(kv_mem_mb), "0", 0, 1 << 24,
     "KV cache budget in MiB, 0 = max_running full contexts (at most half the RAM)"},
    {"swa_full", V_BOOL, COFF(swa_full), "false", 0, 0,
     "sliding-window models: keep every position of the local layers too (default: they hold "
     "their window, in a pool of their own)"},
    {"default_max_tokens", V_INT, COFF(default_max_tokens), "256", 1, 1 << 24,
     "max_tokens when a request gives none"},
    {"max_nonstream_tokens", V_INT, COFF(max_nonstream_tokens), "16384", 1, 1 << 24,
     "largest max_tokens of a request without stream:true (its text is held until the end; "
     "longer generations must stream)"},
    {"request_timeout_s", V_NUM, COFF(request_timeout_s), "600", 0, 1e7,
     "deadline of a request (queue + generation), 0 = none"},
    {"max_header_bytes", V_INT, COFF(max_header_bytes), "16384", 256, 1 << 24,
     "largest request head (431 past it)"},
    {"max_body_bytes", V_INT, COFF(max_body_bytes), "4194304", 64, 1 << 30,
     "largest request body (413 past it)"},
    {"header_timeout_s", V_NUM, COFF(header_timeout_s), "10", 0.01, 3600,
     "time allowed to send a request (slowloris guard)"},
    {"idle_timeout_s", V_NUM, COFF(idle_timeout_s), "60", 0.01, 86400,
     "idle keep-alive connection timeout"},
    {"write_timeout_s", V_NUM, COFF(write_timeout_s), "30", 0.01, 86400,
     "a client that reads none of the unsent response for this long is cut off"},
    {"max_connections", V_INT, COFF(max_connections), "1024", 1, 1 << 20,
     "open connections at most; more are closed at once"},
    {"max_stream_buffer_kb", V_INT, COFF(max_stream_buffer_kb), "1024", 1, 1 << 20,
     "unsent bytes a slow reader may accumulate before it is cancelled"},
    {"drain_timeout_s", V_NUM, COFF(drain_timeout_s), "30", 0, 3600,
     "on SIGTERM, how long in-flight requests may finish"},
    {"api_keys", V_STR, COFF(api_keys), "", 0, 0, "comma-separated API keys (empty: no auth)"},
    {"api_key_file", V_STR, COFF(api_key_file), "", 0, 0, "file with one API key per line"},
    {"auth_health", V_BOOL, COFF(auth_health), "false", 0, 0,
     "require a key for /health, /livez, /readyz and /metrics too"},
    {"log_level", V_STR, COFF(log_level), "info", 0, 0, "debug, info, warn or error"},
    {"sinks", V_INT, COFF(sinks), "4", 0, 1 << 20, "attention-sink tokens eviction always keeps"},
    {"kv_eviction", V_BOOL, COFF(kv_eviction), "false", 0, 0,
     "let requests run past their context window with sink-aware eviction"},
    {"kv_pressure", V_STR, COFF(kv_pressure), "preempt", 0, 0,
     "when the KV pool runs out: preempt (requeue the newest request) or evict (drop the oldest "
     "non-sink tokens of the longest sequence)"},
    {"attention", V_STR, COFF(attention), "full", 0, 0,
     "default attention for decoding: full or tidal (TidalDecode)"},
    {"token_budget", V_INT, COFF(token_budget), "256", 1, 1 << 24,
     "TidalDecode positions per head, the current token included"},
    {"selection_layers", V_STR, COFF(selection_layers), "", 0, 0,
     "TidalDecode selection layers, comma-separated; empty = 2 and ~40% of depth"},
    {"force_sinks", V_BOOL, COFF(force_sinks), "false", 0, 0,
     "TidalDecode: keep the sink tokens in every selection"},
    {"per_group", V_BOOL, COFF(per_group), "false", 0, 0,
     "TidalDecode: select once per KV-head group"},
    {"telemetry_sample", V_NUM, COFF(telemetry_sample), "0.0625", 0, 1,
     "share of generated tokens measured (sampling and attention entropy, sink mass) for the "
     "Prometheus histograms when the request did not ask for telemetry; the rest compute none"},
    {"entropy_collapse_threshold", V_NUM, COFF(entropy_collapse_threshold), "0.05", 0, 1,
     "normalised attention entropy under which a layer counts as collapsed"},
    {"entropy_collapse_tokens", V_INT, COFF(entropy_collapse_tokens), "32", 1, 1 << 20,
     "consecutive collapsed tokens that fire the entropy-collapse counter"},
};
#define N_OPTS (sizeof(opts) / sizeof(opts[0]))

static void flag_name(const opt_t *o, char *buf, size_t n) {
    snprintf(buf, n, "--%s", o->name);
    for (char *p = buf + 2; *p; p++)
        if (*p == '_') *p = '-';
}

static void env_name(const opt_t *o, char *buf, size_t n) {
    snprintf(buf, n, "TIDALD_%s", o->name);
    for (char *p = buf + 7; *p; p++)
        if (*p >= 'a' && *p <= 'z') *p = (char)(*p - 'a' + 'A');
}

/* Set option o from text; src names where it came from for the message. */
static int set_opt(cfg_t *c, const opt_t *o, const char *val, const char *src, char *msg) {
    char *base = (char *)c + o->off;
    long long iv;
    double dv;
    switch (o->type) {
    case V_STR: {
        char *d = strdup(val);
        if (!d) {
            snprintf(msg, CFG_ERRMSG_LEN, "out of memory");
            return -1;
        }
        free(*(char **)base);
        *(char **)base = d;
        return 0;
    }
    case V_INT:
        if (cfg_parse_int(val, (long long)o->lo, (long long)o->hi, &iv)) break;
        *(int64_t *)base = iv;
        return 0;
    case V_NUM:
        if (cfg_parse_float(val, o->lo, o->hi, &dv)) break;
        *(double *)base = dv;
        return 0;
    case V_BOOL:
        if (strcmp(val, "true") == 0 || strcmp(val, "1") == 0)
            *(bool *)base = true;
        else if (strcmp(val, "false") == 0 || strcmp(val, "0") == 0)
            *(bool *)base = false;
        else
            break;
        return 0;
    }
    if (o->type == V_BOOL)
        snprintf(msg, CFG_ERRMSG_LEN, "%s: '%s' must be true or false", src, val);
    else if (o->type == V_INT) /* integer limits as integers, not %g's 1.67772e+07 */
        snprintf(msg, CFG_ERRMSG_LEN, "%s: '%s' is not an integer in [%.0f, %.0f]", src, val, o->lo,
                 o->hi);
    else
        snprintf(msg, CFG_ERRMSG_LEN, "%s: '%s' is not a number in [%g, %g]", src, val, o->lo,
                 o->hi);
    return -1;
}

static int load_json(cfg_t *c, const char *path, char *msg) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(msg, CFG_ERRMSG_LEN, "--config: cannot open '%s'", path);
        return -1;
    }
    char *buf = NULL;
    size_t len = 0, cap = 0, n;
    char chunk[4096];
    while ((n = fread(chunk, 1, sizeof(chunk), f)) > 0) {
        if (len + n + 1 > cap) {
            cap = (len + n + 1) * 2;
            char *nb = realloc(buf, cap);
            if (!nb) {
                free(buf);
                fclose(f);
                snprintf(msg, CFG_ERRMSG_LEN, "out of memory");
                return -1;
            }
            buf = nb;
        }
        memcpy(buf + len, chunk, n);
        len += n;
        if (len > (1 << 20)) break;
    }
    fclose(f);
    cJSON *root = buf ? cJSON_ParseWithLength(buf, len) : NULL;
    free(buf);
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        snprintf(msg, CFG_ERRMSG_LEN, "%s: not a JSON object", path);
        return -1;
    }
    int rc = 0;
    for (cJSON *it = root->child; it && !rc; it = it->next) {
        const opt_t *o = NULL;
        for (size_t i = 0; i < N_OPTS; i++)
            if (strcmp(opts[i].name, it->string) == 0) o = &opts[i];
        char src[160], val[64];
        snprintf(src, sizeof(src), "%s: \"%s\"", path, it->string);
        if (!o) {
            snprintf(msg, CFG_ERRMSG_LEN, "%s is not a known setting", src);
            rc = -1;
        } else if (o->type == V_STR && cJSON_IsString(it)) {
            rc = set_opt(c, o, it->valuestring, src, msg);
        } else if (o->type == V_BOOL && cJSON_IsBool(it)) {
            rc = set_opt(c, o, cJSON_IsTrue(it) ? "true" : "false", src, msg);
        } else if ((o->type == V_INT || o->type == V_NUM) && cJSON_IsNumber(it)) {
            if (o->type == V_INT && it->valuedouble != (double)(long long)it->valuedouble) {
                snprintf(msg, CFG_ERRMSG_LEN, "%s must be an integer", src);
                rc = -1;
            } else {
                snprintf(val, sizeof(val), o->type == V_INT ? "%.0f" : "%.17g", it->valuedouble);
                rc = set_opt(c, o, val, src, msg);
            }
        } else {
            snprintf(msg, CFG_ERRMSG_LEN, "%s has the wrong type (want %s)", src,
                     o->type == V_STR    ? "a string"
                     : o->type == V_BOOL ? "a boolean"
                                         : "a number");
            rc = -1;
        }
    }
    cJSON_Delete(root);
    return rc;
}

void cfg_free(cfg_t *c) {
    for (size_t i = 0; i < N_OPTS; i++)
        if (opts[i].type == V_STR) {
            char **p = (char **)((char *)c + opts[i].off);
            free(*p);
            *p = NULL;
        }
    free(c->config);
    c->config = NULL;
}

static const char *env_get(char **envp, const char *name) {
    size_t n = strlen(name);
    for (char **e = envp; e && *e; e++)
        if (strncmp(*e, name, n) == 0 && (*e)[n] == '=') return *e + n + 1;
    return NULL;
}

int cfg_load(cfg_t *c, int argc, char **argv, char **envp, char *msg) {
    memset(c, 0, sizeof(*c));
    for (size_t i = 0; i < N_OPTS; i++)
        if (set_opt(c, &opts[i], opts[i].def, "default", msg)) goto fail;
    /* the config file: --config wins over TIDALD_CONFIG */
    const char *path = env_get(envp, "TIDALD_CONFIG");
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--config") == 0 && i + 1 < argc)
            path = argv[i + 1];
        else if (strncmp(argv[i], "--config=", 9) == 0)
            path = argv[i] + 9;
    }
    if (path && *path) {
        c->config = strdup(path);
        if (load_json(c, path, msg)) goto fail;
    }
    for (size_t i = 0; i < N_OPTS; i++) {
        char name[64];
        env_name(&opts[i], name, sizeof(name));
        const char *v = env_get(envp, name);
        if (v && set_opt(c, &opts[i], v, name, msg)) goto fail;
    }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            c->help = true;
            continue;
        }
        size_t alen = strcspn(a, "=");
        if (alen == 8 && strncmp(a, "--config", 8) == 0) {
            if (!a[alen]) i++;
            continue;
        }
        const opt_t *o = NULL;
        char fl[64];
        for (size_t k = 0; k < N_OPTS; k++) {
            flag_name(&opts[k], fl, sizeof(fl));
            if (strlen(fl) == alen && strncmp(a, fl, alen) == 0) o = &opts[k];
        }
        if (!o) {
            snprintf(msg, CFG_ERRMSG_LEN, "unknown option '%s' (see tidald serve --help)", a);
            goto fail;
        }
        flag_name(o, fl, sizeof(fl));
        const char *v;
        if (a[alen] == '=')
            v = a + alen + 1;
        else if (o->type == V_BOOL)
            v = "true";
        else if (i + 1 < argc)
            v = argv[++i];
        else {
            snprintf(msg, CFG_ERRMSG_LEN, "%s needs a value", fl);
            goto fail;
        }
        if (set_opt(c, o, v, fl, msg)) goto fail;
    }
    if (c->help) return 0;
    if (!*c->model) {
        snprintf(msg, CFG_ERRMSG_LEN,
                 "model: a GGUF file is required (--model, TIDALD_MODEL or "
                 "\"model\" in the config file)");
        goto fail;
    }
    if (strcmp(c->attention, "full") && strcmp(c->attention, "tidal")) {
        snprintf(msg, CFG_ERRMSG_LEN, "attention: '%s' must be full or tidal", c->attention);
        goto fail;
    }
    if (strcmp(c->kv_type, "f16") && strcmp(c->kv_type, "f32")) {
        snprintf(msg, CFG_ERRMSG_LEN, "kv_type: '%s' must be f16 or f32", c->kv_type);
        goto fail;
    }
    if (!cfg_device_valid(c->device)) {
        snprintf(msg, CFG_ERRMSG_LEN, "device: '%s' must be auto, cpu or cuda", c->device);
        goto fail;
    }
    if (strcmp(c->kv_pressure, "evict") && strcmp(c->kv_pressure, "preempt")) {
        snprintf(msg, CFG_ERRMSG_LEN, "kv_pressure: '%s' must be evict or preempt", c->kv_pressure);
        goto fail;
    }
    uint32_t layers[8], nl;
    if (cfg_parse_layers(c->selection_layers, layers, 8, &nl, msg)) goto fail;
    const char *levels[] = {"debug", "info", "warn", "error"};
    bool ok = false;
    for (int i = 0; i < 4; i++) ok |= strcmp(c->log_level, levels[i]) == 0;
    if (!ok) {
        snprintf(msg, CFG_ERRMSG_LEN, "log_level: '%s' must be debug, info, warn or error",
                 c->log_level);
        goto fail;
    }
    return 0;
fail:
    cfg_free(c);
    return -1;
}

void cfg_help(FILE *f) {
    fprintf(f, "usage: tidald [serve] --model PATH [options]\n\n"
               "Serve the OpenAI-compatible HTTP API. Each value comes from, in order of\n"
               "precedence: its flag, its TIDALD_* environment variable, the JSON file given by\n"
               "--config (or TIDALD_CONFIG), and its default.\n\n");
    fprintf(f, "  %-26s %-30s %s\n", "--config PATH", "TIDALD_CONFIG", "JSON config file");
    for (size_t i = 0; i < N_OPTS; i++) {
        char fl[64], env[64];
        flag_name(&opts[i], fl, sizeof(fl));
        env_name(&opts[i], env, sizeof(env));
        fprintf(f, "  %-26s %-30s %s (default: %s)\n", fl, env, opts[i].help,
                *opts[i].def ? opts[i].def : "none");
    }
}
