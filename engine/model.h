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

#endif
