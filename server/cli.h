/* cli.h - what the command-line subcommands (main.c: serve, generate; perplexity.c;
 * vocab_cmd.c) share:
 * opening a model and context from flags, attention settings from flags, and the perplexity
 * entry point. Private to server/. */
#ifndef TIDALD_CLI_H
#define TIDALD_CLI_H

#include "../config/config.h"
#include "../engine/engine.h"

/* Load the model and a one-sequence context from the command line; 0, or -1 with a message on
 * stderr (what was created is left for the caller to free). A --ctx-size past the model's
 * training context is clamped to it, with a warning on stderr. */
int eval_open(const cfg_generate_t *cfg, eng_model_t **model, eng_ctx_t **ctx);
/* Attention settings from the command line; 0 or -1 with a message on stderr. */
int eval_attn_params(const cfg_generate_t *cfg, const eng_hparams_t *hp, eng_attn_params_t *a);
/* cfg->file's text as tokens, at most --eval-tokens, at least 2 (perplexity.c); 0, or 1 with
 * the error on stderr under the command's name. */
int eval_text_tokens(const cfg_generate_t *cfg, const char *cmd, const eng_model_t *model,
                     int32_t **toks, size_t *n);
/* The whole file, malloc'd (*len bytes), or NULL. */
char *cli_read_file(const char *path, size_t *len);
/* What one streaming pass over a text measured (stream_eval). */
typedef struct {
    uint64_t count, evicted; /* positions scored, tokens evicted */
    double ppl;              /* of the attention asked for */
    double ppl_full;         /* TidalDecode: full attention over the same caches */
    double agreement;        /* TidalDecode: top-1 agreement with full attention */
    double mean_kl;          /* TidalDecode: mean KL(full || tidal), nats */
    double tok_s;
} stream_result_t;
/* Teacher-forced perplexity of toks[0..n) as a streaming model sees it (perplexity.c); 0, or 1
 * with the error on stderr. */
int stream_eval(const cfg_generate_t *cfg, eng_ctx_t *ctx, const eng_model_t *model,
                const int32_t *toks, size_t n, const eng_attn_params_t *attn, stream_result_t *out);
/* `tidald perplexity`, `calibrate`, `convert-tokenizer`, `tokenize` (argv[0] is the
 * subcommand); the process exit code. */
int cmd_perplexity(int argc, char **argv);
int cmd_calibrate(int argc, char **argv);
int cmd_convert_tokenizer(int argc, char **argv);
int cmd_tokenize(int argc, char **argv);

#endif
