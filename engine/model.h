/* model.h - private: the loaded model's weights and the tokenizer's internals. */
#ifndef TIDALD_ENGINE_MODEL_H
#define TIDALD_ENGINE_MODEL_H

#include "backend.h"
#include "engine.h"
#include "gguf.h"

typedef struct {
    const float *attn_norm, *ffn_norm;
    const float *q_norm, *k_norm;                /* [head_dim] per-head RMSNorm (or NULL) */
    const float *post_attn_norm, *post_ffn_norm; /* [n_embd] sandwich norms (or NULL) */
    const float *bq, *bk, *bv;                   /* projection biases (Qwen2; or NULL) */
    eng_tensor_t wq, wk, wv, wo, w_gate, w_up, w_down;
} eng_layer_t;

struct eng_model {
    gguf_t *gguf;
    eng_hparams_t hp;
    eng_tensor_t tok_embd, output;
    const float *output_norm;
    const float *rope_freqs; /* optional per-dimension-pair divisors (Llama 3.1) */
    eng_layer_t *layers;
    eng_tokenizer_t *tok;
};

/* Build the tokenizer from GGUF metadata. */
int eng__tokenizer_load(eng_tokenizer_t **out, const gguf_t *g, uint32_t n_vocab, char *msg);
void eng__tokenizer_free(eng_tokenizer_t *t);
/* The BPE pre-tokenizers (`tokenizer.ggml.pre`), each the split pattern of the tokenizer.json
 * its models were trained with:
 *   LLAMA3 ("llama-bpe", "llama3", ...): contractions any case, [^\r\n\p{L}\p{N}]?\p{L}+,
 *     \p{N}{1,3}, punctuation runs with trailing newlines, newline-ended space runs;
 *   QWEN2 ("qwen2"): the same with \p{N} one digit at a time;
 *   GPT2 ("gpt2"): lower-case contractions, ' ?\p{L}+', ' ?\p{N}+', ' ?punctuation+';
 *   SMOLLM ("smollm", also StarCoder's "starcoder", "refact", "codeshell"): every digit its
 *     own word first, then GPT-2's pattern on the text between digits. */
enum { ENG_PRE_LLAMA3 = 0, ENG_PRE_GPT2 = 1, ENG_PRE_QWEN2 = 2, ENG_PRE_SMOLLM = 3 };
/* The pre-tokenizer a `tokenizer.ggml.pre` name selects; -1 if tidald does not know it. */
int eng__pre_from_name(const char *name);
/* Split valid UTF-8 text into pre-tokenizer words of pattern `pre` (ENG_PRE_*): *ends gets the
 * byte offset where each word ends (malloc'd). For tests. */
int eng__pretokenize(const char *text, size_t len, int pre, size_t **ends, size_t *n);
bool eng__utf8_valid(const char *s, size_t n);

#endif
