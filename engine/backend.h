/* backend.h - the compute backend interface: the CPU backend (engine/cpu/) and the CUDA
 * backend (engine/cuda/, a shared library loaded at run time) implement the same table.
 *
 * A backend is a static const table of operations plus a private context.
 * All activations are row-major float arrays of T rows (one per token of the
 * step) in the backend's memory: buffers come from alloc(), so they are host memory on
 * the CPU and device memory on a GPU, and pointer arithmetic on them is fine. Weights are
 * eng_tensor_t as load_weight() returned them. Small per-step metadata (token ids,
 * positions, the sequences' block tables) stays in host memory; a device backend copies it
 * once per step in begin_step(). Every op has a plain scalar reference in
 * tests/unit/ref_ops.c that is the oracle for each backend.
 */
#ifndef TIDALD_ENGINE_BACKEND_H
#define TIDALD_ENGINE_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../kvcache/kvcache.h"
#include "engine.h"

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
    uint32_t *sel;    /* [n_head][budget] ascending positions: SELECT writes, SPARSE reads
                         (backend memory) */
    uint32_t *n_sel;  /* [n_head] (backend memory) */
    float *entropy;   /* [n_head] out, bits (decode slices; may be NULL; host memory) */
    float *sink_mass; /* [n_head] out (may be NULL; host memory) */
    uint32_t *n_att;  /* [n_head] out: keys attended (may be NULL; host memory) */
} eng_attn_seq_t;

typedef struct {
    uint32_t n_head, n_head_kv, head_dim;
    float scale;     /* the query-key scale, 1/sqrt(head_dim) for most models */
    uint32_t window; /* sliding-window layer: query at p sees keys (p - window, p]; 0: all keys */
} eng_attn_shape_t;

/* The rotary embedding of one layer, as llama.cpp computes it: pair i of a head turns by
 * pos * freq_scale * base^(-2i/n_rot) / freq_factors[i]. NORM pairs dims (2i, 2i+1) (Llama),
 * NEOX pairs (i, i + n_rot/2) (Gemma, Qwen); dims past n_rot stay. */
typedef struct {
    uint32_t n_rot;            /* even, <= head_dim */
    float base;                /* frequency base */
    float freq_scale;          /* linear position scaling; 1: none */
    bool neox;                 /* NEOX pairing */
    const float *freq_factors; /* [n_rot/2] divisors or NULL (backend memory) */
} eng_rope_t;

typedef struct eng_backend eng_backend_t;

/* What one forward step runs, announced before its first op: the host arrays the step's ops
 * will be given (ids, pos, the sequences) and the model's shape, so a device backend can copy
 * them in one go and size its per-step buffers. */
typedef struct {
    const int32_t *ids;  /* [T] token ids (get_rows) */
    const uint32_t *pos; /* [T] positions (rope) */
    uint32_t T;
    const eng_attn_seq_t *seqs; /* the attention slices; block tables as of this step */
    uint32_t n_seqs;
    const uint8_t *kinds; /* [n_layer][n_seqs] eng_att_kind_t of each slice in each layer */
    uint32_t n_layer, n_head, n_head_kv, head_dim;
    /* The op sequence of a decode step (every slice one token, all wanting their last-token
     * logits or all only its argmax) is a function of n_seqs, kinds and n_argmax_rows alone:
     * a device backend may record it once and replay it (CUDA graphs). */
    bool decode_only;
    uint32_t n_logit_rows;  /* rows that go through the output projection */
    uint32_t n_argmax_rows; /* of those, rows that only want their argmax */
} eng_step_t;

typedef struct {
    const char *name;
    /* ---- memory: host memory on the CPU, device memory on a GPU ---- */
    void *(*alloc)(eng_backend_t *be, size_t bytes); /* zero-filled; NULL when out of memory */
    void (*release)(eng_backend_t *be, void *p);
    void (*upload)(eng_backend_t *be, void *dst, const void *host_src, size_t bytes);
    void (*download)(eng_backend_t *be, void *host_dst, const void *src, size_t bytes);
    /* Bytes a KV pool may take by default after the weights and scratch are in (a GPU's free
     * memory less a margin); 0: the engine's host policy. NULL means 0. */
    size_t (*kv_budget)(eng_backend_t *be);
    /* A weight in the form this backend computes with (out may alias nothing in w); NULL op:
     * the backend uses the file's tensor as is. */
    int (*load_weight)(eng_backend_t *be, const eng_tensor_t *w, eng_tensor_t *out, char *msg);
    void (*free_weight)(eng_backend_t *be, eng_tensor_t *w);
    /* device name, memory and nominal bandwidth (NULL: host memory, filled by the engine) */
    void (*device_info)(eng_backend_t *be, eng_device_info_t *out);
    /* measured read bandwidth in GB/s, for benchmarks (NULL: none) */
    double (*measure_bandwidth)(eng_backend_t *be);
    /* ---- one step: begin_step, the ops, end_step (NULL: nothing to do) ---- */
    int (*begin_step)(eng_backend_t *be, const eng_step_t *st, char *msg);
    /* Wait for the step's work; afterwards the telemetry slots named in the step's
     * eng_attn_seq_t (host memory) hold their values. A device error in any op of the step is
     * reported here (ENG_EIO, msg filled). */
    int (*end_step)(eng_backend_t *be, char *msg);
    /* size scratch for rows of up to max_cols, KV blocks of block_size, max_seqs per step and
     * sequences of up to n_ctx tokens */
    int (*reserve)(eng_backend_t *be, size_t max_cols, uint32_t block_size, uint32_t max_seqs,
                   uint32_t n_ctx);
    /* y[T][w.rows] = x[T][w.cols] . w^T */
    void (*matmul)(eng_backend_t *be, const eng_tensor_t *w, const float *x, float *y, uint32_t T);
    /* out[t] = x[t] / rms(x[t]) * weight, rows of n */
    void (*rmsnorm)(eng_backend_t *be, const float *x, const float *weight, float *out, uint32_t T,
                    uint32_t n, float eps);
    /* rotate each head of row t to position pos[t] */
    void (*rope)(eng_backend_t *be, float *x, const uint32_t *pos, uint32_t T, uint32_t n_heads,
                 uint32_t head_dim, const eng_rope_t *r);
    /* out[t][h*hd..] = softmax(q.K^T * scale) . V over each sequence's block table, one layer;
     * per sequence dense, dense + top-k selection, or sparse over the selection, with entropy
     * and sink mass from the online-softmax accumulators (no second pass) */
    void (*attention)(eng_backend_t *be, const eng_attn_shape_t *shape, uint32_t layer,
                      const float *q, const eng_attn_seq_t *seqs, uint32_t n_seqs, float *out);
    /* store each slice's new keys and values (rows q_start.. of k and v, kv_dim wide) at
     * positions pos0.. of `layer` through its block table, in the pool's value type */
    void (*kv_store)(eng_backend_t *be, uint32_t layer, const eng_attn_seq_t *seqs, uint32_t n_seqs,
                     const float *k, const float *v);
    /* K-shift: rotate the keys of positions [from, to) of every layer back by delta positions
     * (a pure rotation: RoPE(p) then this equals RoPE(p - delta)), layer l with rope[l] (host
     * array of the pool's n_layer) */
    void (*k_shift)(eng_backend_t *be, kv_seq_t *seq, uint32_t from, uint32_t to, uint32_t delta,
                    uint32_t n_head_kv, uint32_t head_dim, const eng_rope_t *rope);
    /* out[r] = the index of the largest of rows[r][0..n) (the lowest index on ties), for R
     * rows; out in backend memory. NULL: the engine does it on the host. */
    void (*argmax)(eng_backend_t *be, const float *rows, uint32_t R, uint32_t n, int32_t *out);
    /* g[i] = silu(g[i]) * u[i] */
    void (*swiglu)(eng_backend_t *be, float *g, const float *u, size_t n);
    /* g[i] = gelu(g[i]) * u[i], GELU's tanh form as llama.cpp's CPU computes it: looked up at
     * g rounded to F16, the result rounded to F16 (0 at or below -10, g itself from 10) */
    void (*geglu)(eng_backend_t *be, float *g, const float *u, size_t n);
    /* x[t][i] += b[i] for T rows of n (projection biases) */
    void (*add_bias)(eng_backend_t *be, float *x, const float *b, uint32_t T, uint32_t n);
    /* x[i] *= s */
    void (*scale)(eng_backend_t *be, float *x, float s, size_t n);
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

/* The entry point the CUDA backend's shared library exports (engine/cuda/). */
typedef int (*eng_cuda_create_fn)(eng_backend_t **out, int device, char *msg, size_t msg_len);
#define ENG_CUDA_CREATE_SYMBOL "tidald_cuda_backend_create"
#define ENG_CUDA_ABI 7 /* bumped whenever this table (or the KV structures it reads) changes */
typedef int (*eng_cuda_abi_fn)(void);
#define ENG_CUDA_ABI_SYMBOL "tidald_cuda_backend_abi"

/* Create the backend for a device: CPU, CUDA (its library is loaded with dlopen, so a
 * machine without the CUDA runtime or driver still runs the CPU path), or AUTO: CUDA when a
 * GPU is present, else the CPU. ENG_EUNSUPPORTED with the reason when CUDA was asked for and
 * cannot be had. */
int eng_backend_open(eng_backend_t **out, eng_device_t dev, int n_threads, char *msg);

#endif
