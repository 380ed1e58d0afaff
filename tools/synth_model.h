/* synth_model.h - synthetic GGUF models: random weights from a fixed seed, full llama (or
 * gemma3) metadata and a SentencePiece-style vocabulary, so that llama.cpp could load them
 * too.
 *
 * A model is named SHAPE-TYPE, e.g. "tiny-f32", "m100-f16", "long-f16", where
 * TYPE is f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, q4_k, q5_k, q6_k or iq4_nl
 * (the type of every 2-D weight, written by the engine's quantizers; norms stay F32).
 */
#ifndef TIDALD_TOOLS_SYNTH_MODEL_H
#define TIDALD_TOOLS_SYNTH_MODEL_H

#include <stdint.h>

typedef struct {
    const char *name;
    uint32_t n_vocab, n_embd, n_layer, n_head, n_head_kv, n_ff, n_ctx;
    int tied; /* output shares token_embd */
    const char *about;
    const char *arch;    /* NULL: llama; "gemma3": QK-norm, sandwich norms, GeGLU, windows */
    uint32_t head_dim;   /* 0: n_embd / n_head */
    uint32_t swa_window; /* gemma3: the local layers' window */
} synth_shape_t;

/* The named shapes, NULL-terminated. */
extern const synth_shape_t synth_shapes[];

/* Write model `name` (SHAPE-TYPE) to path. 0 or -1 with msg (256 bytes) filled. */
int synth_write(const char *name, const char *path, uint64_t seed, char *msg);

#endif
