/* engine.h - the engine's public API: model loading, tokenizer, batched
 * forward pass over paged KV sequences, and the sampler.
 *
 * The engine never touches sockets or libuv. One thread (the engine thread)
 * drives a context; the CPU backend parallelises inside each call. Scheduling
 * (which requests run in a step) is sched/'s; the engine runs one batch.
 */
#ifndef TIDALD_ENGINE_H
#define TIDALD_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../kvcache/kvcache.h"
#include "../base/err.h"

/* ===== model ========================================================== */

typedef struct {
    char arch[32];
    char name[128];
    uint32_t n_vocab, n_ctx_train, n_embd, n_layer, n_ff;
    uint32_t n_head, n_head_kv, head_dim, n_rot;
    float rms_eps, rope_base;
    uint32_t n_embd_q;     /* n_head * head_dim: the attention's width (Gemma 3: not n_embd) */
    bool rope_neox;        /* RoPE pairs dims (i, i + n_rot/2) (Gemma, Qwen), else (2i, 2i+1) */
    float rope_freq_scale; /* linear RoPE scaling of the global layers; 1: none */
    /* sliding-window attention (Gemma 3): layer l is local when swa_pattern and
     * l % swa_pattern < swa_pattern - 1; local layers see the last swa_window positions and
     * turn with rope_base_swa. swa_window 0: every layer global. */
    uint32_t swa_window, swa_pattern;
    float rope_base_swa;
    float embd_scale; /* token embeddings are multiplied by this (Gemma: sqrt(n_embd)); 1: none */
    float attn_scale; /* query-key scale (1/sqrt(head_dim) unless the model says otherwise) */
    bool gelu_ffn;    /* FFN is GeGLU (gelu(gate) * up), else SwiGLU */
    bool tied_output; /* output projection shares token_embd */
    uint32_t weight_type; /* ggml type of the attention weights (for display) */
} eng_hparams_t;

typedef struct eng_model eng_model_t;
typedef struct eng_tokenizer eng_tokenizer_t;

/* True if layer l of the model attends through a sliding window. */
bool eng_layer_is_swa(const eng_hparams_t *hp, uint32_t l);

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
/* True if n bytes at s (NULL allowed when n is 0) are well-formed UTF-8. */
bool eng_utf8_valid(const char *s, size_t n);
/* As eng_tokenize; with parse_special, control and user-defined token texts in the input
 * (e.g. "<|eot_id|>") become those tokens instead of being spelled out. */
int eng_tokenize_ex(const eng_tokenizer_t *t, const char *text, size_t len, bool add_bos,
                    bool parse_special, int32_t **out, size_t *n_out, char *msg);
/* The GGUF tokenizer.chat_template text, or NULL. */
const char *eng_tok_chat_template(const eng_tokenizer_t *t);
/* True if tidald splits text as the byte-level pre-tokenizer `name` (tokenizer.ggml.pre) does:
 * smollm, llama-bpe, qwen2, gpt2 and their aliases. */
bool eng_tok_pre_supported(const char *name);
/* Load only the vocabulary of a GGUF file: a model, or a vocabulary-only file as
 * `tidald convert-tokenizer` writes. Free with eng_vocab_free. */
int eng_vocab_load(eng_tokenizer_t **out, const char *path, char *msg);
void eng_vocab_free(eng_tokenizer_t *t);
/* The id of the token whose text is exactly `piece`, or -1. */
int32_t eng_tok_find(const eng_tokenizer_t *t, const char *piece);
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

/* Where the engine computes. AUTO: a CUDA GPU when one is present, else the CPU. */
typedef enum { ENG_DEVICE_AUTO = 0, ENG_DEVICE_CPU = 1, ENG_DEVICE_CUDA = 2 } eng_device_t;
/* Parse "auto", "cpu" or "cuda"; -1 otherwise. */
int eng_device_parse(const char *s);

typedef struct {
    eng_device_t device;       /* default AUTO */
    int n_threads;             /* 0: all online CPUs */
    uint32_t block_size;       /* KV tokens per block (default 16) */
    size_t kv_mem_bytes;       /* KV pool budget; 0: enough for max_seqs * n_ctx */
    uint32_t n_ctx;            /* per-sequence context; 0: the model's training context */
    uint32_t max_batch_tokens; /* tokens per forward call (default 512) */
    uint32_t max_seqs;         /* sequences per forward call (default 16) */
    bool kv_f16;               /* store keys and values as F16 (half the memory and reads) */
    /* Sliding-window models: keep every position of the local layers too (llama.cpp's
     * --swa-full). Off: the local layers' keys live in a pool of their own and return to it
     * once out of the window, so they hold about window tokens per sequence. */
    bool swa_full;
    uint32_t sinks; /* sink tokens a sequence keeps (kv_seq_t.n_sinks, default 4): the split
                       cache keeps their blocks in the local layers too */
} eng_ctx_params_t;

typedef struct eng_ctx eng_ctx_t;

void eng_ctx_params_default(eng_ctx_params_t *p);
int eng_ctx_create(eng_ctx_t **out, const eng_model_t *m, const eng_ctx_params_t *p, char *msg);
void eng_ctx_free(eng_ctx_t *c);
kv_pool_t *eng_ctx_kv_pool(eng_ctx_t *c);
uint32_t eng_ctx_n_ctx(const eng_ctx_t *c);
const char *eng_ctx_backend_name(const eng_ctx_t *c);
/* What the context computes on. */
typedef struct {
    char name[128];   /* e.g. "NVIDIA H200 (sm_90)" or "cpu (avx2, 16 threads)" */
    size_t mem_bytes; /* device memory (0 for host memory) */
    double peak_gbps; /* nominal memory bandwidth, GB/s (0: unknown) */
} eng_device_info_t;
void eng_ctx_device_info(const eng_ctx_t *c, eng_device_info_t *out);
/* Measure the read bandwidth of the backend's memory (GB/s) with a streaming kernel: the
 * roofline for memory-bound decode. 0 when the backend has no such measurement. */
double eng_ctx_measure_bandwidth(eng_ctx_t *c);
/* Copy bytes of the KV pool's value storage (kvcache.h's layout) from or to host memory, at a
 * byte offset: for tools and tests that build or inspect a cache directly, wherever the
 * backend keeps it. ENG_ERANGE past the pool's end. A split cache (sliding-window models)
 * exposes its main pool, the global layers', here. */
int eng_ctx_kv_upload(eng_ctx_t *c, size_t offset, const void *src, size_t bytes);
int eng_ctx_kv_download(eng_ctx_t *c, size_t offset, void *dst, size_t bytes);
/* Run fn(arg, i) for i < n on the context's host worker threads (serially if it has none). */
void eng_ctx_parallel_for(eng_ctx_t *c, void (*fn)(void *arg, size_t i), void *arg, size_t n);
/* Which SIMD path the CPU kernels use: "avx512", "avx2" or "scalar" (chosen at run time). */
const char *eng_cpu_simd_name(void);
/* Force a SIMD path ("scalar", "avx2", "avx512") for tests and benchmarks; false if the CPU
 * lacks it. Process-wide: call only while no forward pass runs. */
bool eng_cpu_force_simd(const char *name);

/* ---- attention modes (TidalDecode, arXiv 2410.05076) ---- */

typedef enum { ENG_ATTN_FULL = 0, ENG_ATTN_TIDAL = 1 } eng_attn_mode_t;
#define ENG_MAX_SEL_LAYERS 8

typedef struct {
    eng_attn_mode_t mode;
    uint32_t token_budget; /* K: positions kept per head, the current token included */
    uint32_t n_sel_layers; /* 0: the defaults (eng_attn_defaults) */
    uint32_t sel_layers[ENG_MAX_SEL_LAYERS]; /* ascending; layers before the first are dense */
    bool force_sinks;                        /* the sink tokens are in every selection */
    bool per_group;                          /* one selection per KV-head group */
} eng_attn_params_t;

/* Selection layers by default: layer 2, and a re-selection layer near 40% of the depth when
 * the model is deep enough to leave sparse layers between them. */
void eng_attn_defaults(const eng_hparams_t *hp, eng_attn_params_t *a);
/* Validate (layers in range and ascending, budget >= 1); ENG_EINVAL naming the field. */
int eng_attn_check(const eng_hparams_t *hp, const eng_attn_params_t *a, char *msg);

/* Per-token attention telemetry of a decode item: n_layer * n_head values each. */
typedef struct {
    float *entropy;   /* bits, per layer and head */
    float *sink_mass; /* attention mass on the sink tokens */
    uint32_t *n_att;  /* keys attended */
    uint8_t *sparse;  /* per layer: 1 if it attended only to selected positions */
} eng_attn_tele_t;

/* One sequence's part of a step: n_tokens new tokens appended after seq->n_tokens. */
typedef struct {
    kv_seq_t *seq;
    const int32_t *tokens;
    uint32_t n_tokens;
    float *logits;   /* n_vocab floats for the last token (or n_tokens*n_vocab), or NULL */
    bool all_logits; /* logits for every token of the item, not only the last */
    const eng_attn_params_t *attn; /* NULL or FULL: dense; TIDAL applies to decode items */
    eng_attn_tele_t *tele;         /* decode items: filled when not NULL */
    /* With logits NULL: the greedy choice alone, the index of the largest last-token logit
     * (the lowest on ties, as the sampler picks at temperature 0). A GPU computes it where
     * the logits are and copies one id instead of the vocabulary's logits. */
    int32_t *argmax;
} eng_batch_item_t;

/* Evict the n oldest tokens after the sinks (fewer if fewer are there; kv_seq_evict) and
 * K-shift the keys after them so positions stay contiguous and correctly rotated. Returns the
 * tokens evicted. */
uint32_t eng_seq_evict(eng_ctx_t *c, kv_seq_t *seq, uint32_t n);
/* Before appending `need` tokens to a sequence limited to `window`: evict the overflow, at
 * least `chunk` tokens at a time (0: window / 8). Returns the tokens evicted; the caller checks
 * seq->n_tokens + need <= window afterwards (only sinks left: nothing more to evict). */
uint32_t eng_seq_make_room(eng_ctx_t *c, kv_seq_t *seq, uint32_t window, uint32_t need,
                           uint32_t chunk);

/* Run one batched forward pass. Every item's KV is appended and seq->n_tokens advanced.
 * ENG_ERANGE if a sequence would exceed n_ctx or a token id is invalid; ENG_ENOSPACE if the
 * pool has no free block (no state is changed in either case). */
int eng_forward(eng_ctx_t *c, eng_batch_item_t *items, uint32_t n_items, char *msg);

/* Perplexity's terms as llama-perplexity computes them: toks[0..n) in whole chunks of `chunk`
 * tokens, each evaluated in a sequence of its own (its first token the BOS for tokenizers that
 * add one; toks is left as it was), adding the next-token loss (nats) of every position of each
 * chunk's second half to *nll and the positions to *count. */
int eng_perplexity_chunks(eng_ctx_t *c, const eng_model_t *m, int32_t *toks, size_t n,
                          uint32_t chunk, double *nll, uint64_t *count, char *msg);

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
/* The index of the largest of x[0..n), the lowest on ties: the sampler's greedy choice, and
 * what argmax batch items get. -1 when the logits are not usable: a NaN or +infinity among
 * them, or nothing above -infinity (a broken model). */
int32_t eng_argmax(const float *x, uint32_t n);
/* Choose the next token from logits (modified in place); -1 as eng_argmax when no logit is
 * finite. */
int32_t eng_sampler_sample(eng_sampler_t *s, float *logits);

#endif
