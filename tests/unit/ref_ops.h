/* ref_ops.h - plain scalar reference implementations of every backend op: the oracle. */
#ifndef TIDALD_TESTS_REF_OPS_H
#define TIDALD_TESTS_REF_OPS_H

#include "../../engine/backend.h"

void ref_row(const eng_tensor_t *w, uint32_t r, float *dst);
/* y = x . w^T as the CPU computes it: a Q8_0 weight meets its input rounded to 8-bit blocks */
void ref_matmul(const eng_tensor_t *w, const float *x, float *y, uint32_t T);
/* the same product with the input unrounded (a backend that computes in floating point) */
void ref_matmul_float(const eng_tensor_t *w, const float *x, float *y, uint32_t T);
void ref_rmsnorm(const float *x, const float *w, float *out, uint32_t T, uint32_t n, float eps);
void ref_rope(float *x, const uint32_t *pos, uint32_t T, uint32_t n_heads, uint32_t hd,
              const eng_rope_t *r);
/* attention over contiguous keys/values k[p][kv_dim], v[p][kv_dim] for one query at position
 * pos (attends to 0..pos, or to its last sh->window positions), all heads */
void ref_attention(const eng_attn_shape_t *sh, const float *q, const float *k, const float *v,
                   uint32_t pos, float *out);
void ref_swiglu(float *g, const float *u, size_t n);
/* g = gelu_tanh(g) * u with llama.cpp's F16 rounding of GELU's argument and result */
void ref_geglu(float *g, const float *u, size_t n);

/* one head h attending to the listed positions of contiguous k/v; also the entropy (bits,
 * explicit -sum p log2 p), the mass on positions < n_sinks, and the probabilities */
void ref_attention_subset(const eng_attn_shape_t *sh, uint32_t h, const float *q, const float *k,
                          const float *v, const uint32_t *pos, uint32_t n, uint32_t n_sinks,
                          float *out, double *entropy_bits, double *sink_mass, double *probs);
#endif
