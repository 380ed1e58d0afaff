/* backend.h - the compute backend interface (CPU now, CUDA behind the same table later).
 *
 * A backend is a static const table of operations plus a private context.
 * All activations are row-major float arrays of T rows (one per token of the
 * step). Weights are eng_tensor_t in their file type. Every op has a plain
 * scalar reference in tests/unit/ref_ops.c that is the oracle for each backend.
 */
#ifndef TIDALD_ENGINE_BACKEND_H
#define TIDALD_ENGINE_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../kvcache/kvcache.h"

/* A 2-D weight: `rows` rows of `cols` elements of ggml type `type`, row-major. */
typedef struct {
    uint32_t type;
    uint32_t rows, cols;
    size_t row_bytes;
    const void *data;
} eng_tensor_t;

/* How one sequence attends in one layer (TidalDecode, arXiv 2410.05076 sec. 3: dense layers,
 * selection layers that attend densely and pick each head's top-k positions, and sparse
 * layers that attend only to the positions the last selection layer picked). */
typedef enum { ENG_ATT_DENSE = 0, ENG_ATT_SELECT = 1, ENG_ATT_SPARSE = 2 } eng_att_kind_t;

/* One sequence's slice of a step for attention: its queries are rows
 * [q_start, q_start + n_q) of the step; query j sits at position pos0 + j and
 * attends causally to cached positions [0, pos0 + j]. SELECT and SPARSE apply to decode
 * slices (n_q == 1) only. */
typedef struct {
    const kv_seq_t *seq;
    uint32_t q_start, n_q;
    uint32_t pos0;
    eng_att_kind_t kind;
    uint32_t budget;  /* SELECT: positions kept per head, the current token included */
    bool force_sinks; /* SELECT: the first n_sinks positions are always kept */
    bool per_group;   /* SELECT: one selection per KV-head group (summed probabilities) */
    uint32_t n_sinks; /* sink tokens (for force_sinks and sink mass) */
    uint32_t *sel;    /* [n_head][budget] ascending positions: SELECT writes, SPARSE reads */
    uint32_t *n_sel;  /* [n_head] */
    float *entropy;   /* [n_head] out, bits (decode slices; may be NULL) */
    float *sink_mass; /* [n_head] out (may be NULL) */
    uint32_t *n_att;  /* [n_head] out: keys attended (may be NULL) */
} eng_attn_seq_t;

typedef struct {
    uint32_t n_head, n_head_kv, head_dim;
    float scale; /* 1/sqrt(head_dim) */
} eng_attn_shape_t;

typedef struct eng_backend eng_backend_t;

typedef struct {
    const char *name;
    /* size scratch for rows of up to max_cols, KV blocks of block_size, max_seqs per step and
     * sequences of up to n_ctx tokens */
    int (*reserve)(eng_backend_t *be, size_t max_cols, uint32_t block_size, uint32_t max_seqs,
                   uint32_t n_ctx);
    /* y[T][w.rows] = x[T][w.cols] . w^T */
    void (*matmul)(eng_backend_t *be, const eng_tensor_t *w, const float *x, float *y, uint32_t T);
    /* out[t] = x[t] / rms(x[t]) * weight, rows of n */
    void (*rmsnorm)(eng_backend_t *be, const float *x, const float *weight, float *out, uint32_t T,
                    uint32_t n, float eps);
    /* rotate adjacent pairs of the first n_rot dims of each head at pos[t] (llama.cpp NORM) */
    void (*rope)(eng_backend_t *be, float *x, const uint32_t *pos, uint32_t T, uint32_t n_heads,
                 uint32_t head_dim, uint32_t n_rot, float base, const float *freq_factors);
    /* out[t][h*hd..] = softmax(q.K^T * scale) . V over each sequence's block table, one layer;
     * per sequence dense, dense + top-k selection, or sparse over the selection, with entropy
     * and sink mass from the online-softmax accumulators (no second pass) */
    void (*attention)(eng_backend_t *be, const eng_attn_shape_t *shape, uint32_t layer,
                      const float *q, const eng_attn_seq_t *seqs, uint32_t n_seqs, float *out);
    /* K-shift: rotate the keys of positions [from, to) of every layer back by delta positions
     * (a pure rotation: RoPE(p) then this equals RoPE(p - delta)) */
    void (*k_shift)(eng_backend_t *be, kv_seq_t *seq, uint32_t from, uint32_t to, uint32_t delta,
                    uint32_t n_head_kv, uint32_t head_dim, uint32_t n_rot, float base,
                    const float *freq_factors);
    /* g[i] = silu(g[i]) * u[i] */
    void (*swiglu)(eng_backend_t *be, float *g, const float *u, size_t n);
    /* x[i] += y[i] */
    void (*add)(eng_backend_t *be, float *x, const float *y, size_t n);
    /* out[t] = dequantized row ids[t] of w */
    void (*get_rows)(eng_backend_t *be, const eng_tensor_t *w, const int32_t *ids, uint32_t T,
                     float *out);
    /* run fn(arg, i) for i < n on the backend's host threads (NULL: the caller loops) */
    void (*parallel_for)(eng_backend_t *be, void (*fn)(void *arg, size_t i), void *arg, size_t n);
    void (*destroy)(eng_backend_t *be); /* frees the backend and its context */
} eng_backend_ops_t;

struct eng_backend {
    const eng_backend_ops_t *ops;
    void *ctx;
};

/* CPU backend with n_threads workers (0: one per online CPU). */
int eng_cpu_backend_create(eng_backend_t **out, int n_threads, char *msg);

#endif
