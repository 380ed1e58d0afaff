/* model.h - private: the loaded model's weights and the tokenizer's internals. */
#ifndef TIDALD_ENGINE_MODEL_H
#define TIDALD_ENGINE_MODEL_H

#include "backend.h"
#include "engine.h"
#include "gguf.h"

typedef struct {
    const float *attn_norm, *ffn_norm;
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
/* Split valid UTF-8 text into pre-tokenizer words (Llama-3 pattern, or GPT-2's): *ends gets the
 * byte offset where each word ends (malloc'd). For tests. */
int eng__pretokenize(const char *text, size_t len, bool gpt2, size_t **ends, size_t *n);
bool eng__utf8_valid(const char *s, size_t n);

#endif
