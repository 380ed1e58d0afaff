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

/* Strict number parsing: the whole string must be a finite number in [lo, hi]. */
int cfg_parse_int(const char *s, long long lo, long long hi, long long *out);
int cfg_parse_float(const char *s, double lo, double hi, double *out);

#endif
