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
/* The whole file, malloc'd (*len bytes), or NULL. */
char *cli_read_file(const char *path, size_t *len);
/* `tidald perplexity`, `convert-tokenizer`, `tokenize` (argv[0] is the subcommand); the process
 * exit code. */
int cmd_perplexity(int argc, char **argv);
int cmd_convert_tokenizer(int argc, char **argv);
int cmd_tokenize(int argc, char **argv);

#endif
