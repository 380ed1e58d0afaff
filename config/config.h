/* config.h - command-line configuration.
 *
 * Every value has a default, is validated at parse time with a message naming
 * the flag, and is listed by --help. (The server issue extends this module with
 * the JSON config file and TIDALD_* environment layers.)
 */
#ifndef TIDALD_CONFIG_H
#define TIDALD_CONFIG_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#define CFG_ERRMSG_LEN 256

typedef struct {
    const char *model;
    const char *prompt;
    int32_t max_tokens;
    float temperature;
    float top_p;
    int32_t top_k;
    float min_p;
    float repeat_penalty;
    float presence_penalty;
    float frequency_penalty;
    int32_t repeat_last_n;
    uint64_t seed;
    bool seed_set;
    int32_t threads;
    const char *device; /* auto, cpu or cuda */
    int32_t ctx_size;
    int32_t batch_size;
    /* streaming past the window and attention (shared with `perplexity`) */
    const char *file;    /* perplexity: the text to evaluate */
    int32_t eval_tokens; /* perplexity: evaluate only the first N tokens, 0 = all */
    int32_t sinks;       /* attention-sink tokens kept by eviction */
    int32_t block_size;  /* KV cache tokens per block */
    const char *kv_type; /* f16 or f32 */
    bool swa_full;       /* sliding-window models: keep every position of the local layers */
    int32_t evict_chunk; /* tokens evicted at a time, 0 = window/8 */
    bool no_eviction;    /* stop at a full window instead of evicting */
    bool chunked;        /* perplexity as llama-perplexity computes it: --ctx-size chunks, halves */
    int32_t recompute;   /* perplexity: sliding window re-computed from scratch every N tokens */
    const char *budgets; /* calibrate: TidalDecode budgets to sweep, comma-separated */
    const char *layers;  /* calibrate: re-selection layers to sweep, comma-separated; "" = all */
    float min_agreement; /* calibrate: top-1 agreement with full attention to recommend */
    const char *out;     /* calibrate: write the recommendation as a serve --config file */
    const char *attention;        /* full or tidal */
    int32_t token_budget;         /* TidalDecode K, 0 = the default */
    const char *selection_layers; /* comma-separated, empty = the default */
    bool force_sinks;
    bool per_group;
    bool verbose;
    bool help;
} cfg_generate_t;

/* Parse `generate` flags (argv[0] is the subcommand name). Returns 0, or -1 with msg filled. */
int cfg_generate_parse(cfg_generate_t *c, int argc, char **argv, char *msg);
void cfg_generate_help(FILE *f);
/* Parse `perplexity` flags: the same table, --file instead of --prompt. */
int cfg_perplexity_parse(cfg_generate_t *c, int argc, char **argv, char *msg);
void cfg_perplexity_help(FILE *f);
int cfg_calibrate_parse(cfg_generate_t *c, int argc, char **argv, char *msg);
void cfg_calibrate_help(FILE *f);
/* "2,6" -> layers; -1 with msg on a bad list. */
int cfg_parse_layers(const char *s, uint32_t *out, uint32_t max, uint32_t *n, char *msg);

/* ---- serve: one struct, flag > TIDALD_* environment > JSON file (--config) > default ---- */

typedef struct {
    char *host;
    int64_t port;
    char *model;
    char *model_alias; /* the "model" name the API reports; default: the file's general.name */
    int64_t threads;
    char *device; /* auto, cpu or cuda */
    int64_t ctx_size;
    int64_t max_running; /* sequences decoding at once */
    int64_t max_waiting; /* bounded queue; 429 past it */
    int64_t step_tokens; /* token budget per engine step */
    int64_t kv_block_size;
    int64_t kv_mem_mb; /* 0: enough for max_running full contexts */
    char *kv_type;     /* f16 or f32 */
    int64_t default_max_tokens;
    int64_t max_nonstream_tokens; /* largest max_tokens without stream (the reply is held whole) */
    double request_timeout_s;     /* per-request deadline; 0: none */
    int64_t max_header_bytes;
    int64_t max_body_bytes;
    double header_timeout_s;
    double idle_timeout_s;
    double write_timeout_s; /* unsent bytes the client leaves unread this long: cut off */
    int64_t max_connections;
    int64_t max_stream_buffer_kb; /* a slower reader is cancelled */
    double drain_timeout_s;
    char *api_keys;     /* comma-separated */
    char *api_key_file; /* one key per line */
    bool auth_health;   /* require a key for /health, /livez, /readyz and /metrics too */
    char *log_level;    /* debug, info, warn, error */
    /* attention: eviction and TidalDecode defaults, entropy-collapse detection */
    int64_t sinks;
    bool kv_eviction;
    bool swa_full;
    char *kv_pressure; /* evict or preempt */
    char *attention;   /* full or tidal */
    int64_t token_budget;
    char *selection_layers;
    bool force_sinks;
    bool per_group;
    double telemetry_sample; /* share of tokens measured for the histograms without telemetry */
    double entropy_collapse_threshold;
    int64_t entropy_collapse_tokens;
    char *config; /* the JSON file these came from, if any */
    bool help;
} cfg_t;

/* Fill c from defaults, the JSON file, the environment (envp, NULL-terminated) and argv
 * (argv[0] is the subcommand). Returns 0, or -1 with msg naming the value and its source. */
int cfg_load(cfg_t *c, int argc, char **argv, char **envp, char *msg);
void cfg_free(cfg_t *c);
void cfg_help(FILE *f);

/* True for a device name the engine knows: auto, cpu or cuda. */
bool cfg_device_valid(const char *s);

/* Strict number parsing: the whole string must be a finite number in [lo, hi]. */
int cfg_parse_int(const char *s, long long lo, long long hi, long long *out);
int cfg_parse_float(const char *s, double lo, double hi, double *out);

#endif
