/* engine.h - the engine's public API: model loading, tokenizer, batched
 * forward pass over paged KV sequences, and the sampler.
 *
 * The engine never touches sockets or libuv. One thread (the engine thread)
 * drives a context; the CPU backend parallelises inside each call.
 */
#ifndef TIDALD_ENGINE_H
#define TIDALD_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../kvcache/kvcache.h"
#include "err.h"

/* ===== model ========================================================== */

typedef struct {
    char arch[32];
    char name[128];
    uint32_t n_vocab, n_ctx_train, n_embd, n_layer, n_ff;
    uint32_t n_head, n_head_kv, head_dim, n_rot;
    float rms_eps, rope_base;
    bool tied_output;     /* output projection shares token_embd */
    uint32_t weight_type; /* ggml type of the attention weights (for display) */
} eng_hparams_t;

typedef struct eng_model eng_model_t;
typedef struct eng_tokenizer eng_tokenizer_t;

/* Load and validate a GGUF Llama-family model (memory-mapped). */
int eng_model_load(eng_model_t **out, const char *path, char *msg);
void eng_model_free(eng_model_t *m);
const eng_hparams_t *eng_model_hparams(const eng_model_t *m);
const eng_tokenizer_t *eng_model_tokenizer(const eng_model_t *m);

/* ===== tokenizer ====================================================== */

typedef enum { ENG_TOK_SPM = 1, ENG_TOK_BPE = 2 } eng_tok_kind_t;

eng_tok_kind_t eng_tok_kind(const eng_tokenizer_t *t);
uint32_t eng_tok_n_vocab(const eng_tokenizer_t *t);
int32_t eng_tok_bos(const eng_tokenizer_t *t);
int32_t eng_tok_eos(const eng_tokenizer_t *t);
bool eng_tok_add_bos(const eng_tokenizer_t *t);
/* True for end-of-generation tokens (EOS, EOT, <|eot_id|>, ...). */
bool eng_tok_is_eog(const eng_tokenizer_t *t, int32_t id);

/* Tokenize len bytes of text (must be valid UTF-8; ENG_EINVAL otherwise). Prepends BOS when
 * add_bos. *out is malloc'd; the caller frees it. */
int eng_tokenize(const eng_tokenizer_t *t, const char *text, size_t len, bool add_bos,
                 int32_t **out, size_t *n_out, char *msg);
/* The bytes a token stands for (control tokens: none). Returns the byte count written, at most
 * cap; *needed (if not NULL) gets the full length. */
size_t eng_token_bytes(const eng_tokenizer_t *t, int32_t id, char *buf, size_t cap, size_t *needed);

/* Streaming detokenizer: collects token bytes and releases only whole UTF-8 sequences. */
typedef struct {
    const eng_tokenizer_t *tok;
    char pending[8];
    size_t n_pending;
} eng_detok_t;

void eng_detok_init(eng_detok_t *d, const eng_tokenizer_t *t);
/* Append the text of `id` to out (cap bytes, >= 64 recommended); returns bytes written.
 * Bytes of an incomplete UTF-8 sequence are held back until it completes; a sequence that can
 * never complete is replaced by U+FFFD. */
size_t eng_detok_push(eng_detok_t *d, int32_t id, char *out, size_t cap);
/* Flush whatever is held back (as U+FFFD); returns bytes written. */
size_t eng_detok_flush(eng_detok_t *d, char *out, size_t cap);

/* ===== context and forward pass ======================================= */

typedef struct {
    int n_threads;             /* 0: all online CPUs */
    uint32_t block_size;       /* KV tokens per block (default 16) */
    size_t kv_mem_bytes;       /* KV pool budget; 0: enough for max_seqs * n_ctx */
    uint32_t n_ctx;            /* per-sequence context; 0: the model's training context */
    uint32_t max_batch_tokens; /* tokens per forward call (default 512) */
    uint32_t max_seqs;         /* sequences per forward call (default 16) */
} eng_ctx_params_t;

typedef struct eng_ctx eng_ctx_t;

void eng_ctx_params_default(eng_ctx_params_t *p);
int eng_ctx_create(eng_ctx_t **out, const eng_model_t *m, const eng_ctx_params_t *p, char *msg);
void eng_ctx_free(eng_ctx_t *c);
kv_pool_t *eng_ctx_kv_pool(eng_ctx_t *c);
uint32_t eng_ctx_n_ctx(const eng_ctx_t *c);
const char *eng_ctx_backend_name(const eng_ctx_t *c);
/* Which SIMD path the CPU kernels use: "avx512", "avx2" or "scalar" (chosen at run time). */
const char *eng_cpu_simd_name(void);
/* Force a SIMD path ("scalar", "avx2", "avx512") for tests and benchmarks; false if the CPU
 * lacks it. Process-wide: call only while no forward pass runs. */
bool eng_cpu_force_simd(const char *name);

/* One sequence's part of a step: n_tokens new tokens appended after seq->n_tokens. */
typedef struct {
    kv_seq_t *seq;
    const int32_t *tokens;
    uint32_t n_tokens;
    float *logits;   /* n_vocab floats for the last token (or n_tokens*n_vocab), or NULL */
    bool all_logits; /* logits for every token of the item, not only the last */
} eng_batch_item_t;

/* Run one batched forward pass. Every item's KV is appended and seq->n_tokens advanced.
 * ENG_ERANGE if a sequence would exceed n_ctx or a token id is invalid; ENG_ENOSPACE if the
 * pool has no free block (no state is changed in either case). */
int eng_forward(eng_ctx_t *c, eng_batch_item_t *items, uint32_t n_items, char *msg);

/* ===== sampler ======================================================== */

typedef struct {
    float temperature;        /* 0: greedy */
    int32_t top_k;            /* <= 0: off */
    float top_p;              /* 1: off */
    float min_p;              /* 0: off */
    float repetition_penalty; /* 1: off (llama.cpp's repeat_penalty) */
    float presence_penalty;   /* 0: off */
    float frequency_penalty;  /* 0: off */
    uint32_t penalty_last_n;  /* window of recent tokens the penalties see (default 64) */
    uint64_t seed;
} eng_sampler_params_t;

typedef struct eng_sampler eng_sampler_t;

void eng_sampler_params_default(eng_sampler_params_t *p);
/* Validate ranges; ENG_EINVAL with a message naming the field. */
int eng_sampler_params_check(const eng_sampler_params_t *p, char *msg);
int eng_sampler_create(eng_sampler_t **out, const eng_sampler_params_t *p, uint32_t n_vocab);
void eng_sampler_free(eng_sampler_t *s);
/* Record a token that is now part of the context (prompt or generated) for the penalties. */
void eng_sampler_accept(eng_sampler_t *s, int32_t id);
/* Choose the next token from logits (modified in place). */
int32_t eng_sampler_sample(eng_sampler_t *s, float *logits);

#endif
