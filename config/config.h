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
    int32_t ctx_size;
    int32_t batch_size;
    bool verbose;
    bool help;
} cfg_generate_t;

/* Parse `generate` flags (argv[0] is the subcommand name). Returns 0, or -1 with msg filled. */
int cfg_generate_parse(cfg_generate_t *c, int argc, char **argv, char *msg);
void cfg_generate_help(FILE *f);

/* ---- serve: one struct, flag > TIDALD_* environment > JSON file (--config) > default ---- */

typedef struct {
    char *host;
    int64_t port;
    char *model;
    char *model_alias; /* the "model" name the API reports; default: the file's general.name */
    int64_t threads;
    int64_t ctx_size;
    int64_t max_running; /* sequences decoding at once */
    int64_t max_waiting; /* bounded queue; 429 past it */
    int64_t step_tokens; /* token budget per engine step */
    int64_t kv_block_size;
    int64_t kv_mem_mb; /* 0: enough for max_running full contexts */
    int64_t default_max_tokens;
    double request_timeout_s; /* per-request deadline; 0: none */
    int64_t max_header_bytes;
    int64_t max_body_bytes;
    double header_timeout_s;
    double idle_timeout_s;
    int64_t max_connections;
    int64_t max_stream_buffer_kb; /* a slower reader is cancelled */
    double drain_timeout_s;
    char *api_keys;     /* comma-separated */
    char *api_key_file; /* one key per line */
    bool auth_health;   /* require a key for /health, /livez, /readyz and /metrics too */
    char *log_level;    /* debug, info, warn, error */
    char *config;       /* the JSON file these came from, if any */
    bool help;
} cfg_t;

/* Fill c from defaults, the JSON file, the environment (envp, NULL-terminated) and argv
 * (argv[0] is the subcommand). Returns 0, or -1 with msg naming the value and its source. */
int cfg_load(cfg_t *c, int argc, char **argv, char **envp, char *msg);
void cfg_free(cfg_t *c);
void cfg_help(FILE *f);

/* Strict number parsing: the whole string must be a finite number in [lo, hi]. */
int cfg_parse_int(const char *s, long long lo, long long hi, long long *out);
int cfg_parse_float(const char *s, double lo, double hi, double *out);

#endif
