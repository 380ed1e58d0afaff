/* kernels.h - the CUDA backend's kernels, as C-callable launchers (kernels.cu).
 *
 * Every launcher queues work on the given stream and returns at once. Pointers are device
 * memory unless a comment says otherwise. The layouts match the CPU backend's: activations are
 * row-major float rows, the KV pool is the one kvcache.h describes.
 */
#ifndef TIDALD_CUDA_KERNELS_H
#define TIDALD_CUDA_KERNELS_H

#include <cuda_runtime_api.h>
#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The KV pool as the kernels see it (kvcache.h's layout). A split cache has two: `local` marks
 * the sliding-window layers' pool, read through each slice's local table. */
typedef struct {
    void *data;
    uint32_t n_layer, kv_dim, block_size, elem; /* elem: 2 (F16) or 4 (F32) */
    uint32_t local;
} cu_pool_t;

/* One attention slice of a step (eng_attn_seq_t without the host pointers). */
typedef struct {
    uint32_t q_start, n_q, pos0, table_off; /* table_off: first entry in the step's tables */
    uint32_t local_off; /* a split cache: the first entry of the slice's local table */
    uint32_t n_sinks, budget, force_sinks, per_group;
    uint32_t *sel, *n_sel;   /* [n_head][budget], [n_head] */
    uint32_t kv_sinks, skip; /* the cache's slot of position p: p below kv_sinks, else p + skip */
} cu_seq_t;

/* Per-(slice, head) results of one layer's decode attention. */
typedef struct {
    float *entropy, *sink_mass, *n_att; /* [n_seqs][n_head] each, this layer's slot */
    float *m, *l;                       /* [n_seqs][n_head]: the softmax max and sum */
} cu_tele_t;

enum { CU_W_F32 = 0, CU_W_F16 = 1, CU_W_BF16 = 30 }; /* ggml type ids */

/* Rows ids[0..T) of a weight of any type cu_q_supported takes (or F32/F16/BF16) as floats;
 * quantized rows bit-exact with eng_q_dequantize_row. */
void cu_get_rows(cudaStream_t st, uint32_t type, const void *w, size_t row_bytes, uint32_t cols,
                 const int32_t *ids, uint32_t T, float *out);

/* ---- quantized weights, kept in their GGUF blocks ---- */

/* Whether the kernels take the ggml type: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K ... Q6_K, IQ4_NL,
 * IQ4_XS. */
bool cu_q_supported(uint32_t type);
/* 8-bit activations: per 32 values d = max|x| / 127, q = x * (1 / d) rounded to nearest even
 * (0 where d is 0), and the sums of q over each half. */
typedef struct {
    int8_t q[32];
    float d;
    int16_t s[2];
} cu_q8_t;
/* x (n floats, n a multiple of 32) to n / 32 blocks. */
void cu_quantize_q8(cudaStream_t st, const float *x, size_t n, cu_q8_t *out);
/* Decode batches: y[t][r] = row r of w . x[t] for T tokens (xq: T rows of cols / 32 blocks),
 * integer dot products per 16 weights, scaled per group and block. Reads the weight once per 8
 * tokens. */
void cu_qmatvec(cudaStream_t st, uint32_t type, const void *w, size_t row_bytes, uint32_t rows,
                uint32_t cols, const cu_q8_t *xq, uint32_t T, float *y);
/* rows rows of w to F16 (row-major, cols wide), each element the F16 rounding of
 * eng_q_dequantize_row's: the tiles prefill multiplies with cuBLAS. */
void cu_dequant_f16(cudaStream_t st, uint32_t type, const void *w, size_t row_bytes, uint32_t cols,
                    uint32_t rows, void *out);
void cu_rmsnorm(cudaStream_t st, const float *x, const float *w, float *out, uint32_t T, uint32_t n,
                float eps);
/* eng_rope_t's rotation: NORM or NEOX pairs, linear freq_scale, optional frequency factors */
void cu_rope(cudaStream_t st, float *x, const uint32_t *pos, uint32_t T, uint32_t n_heads,
             uint32_t head_dim, uint32_t n_rot, float base, float freq_scale, bool neox,
             const float *freq_factors);
void cu_swiglu(cudaStream_t st, float *g, const float *u, size_t n);
/* g = gelu(g) * u as the CPU backend computes it (F16-rounded GELU) */
void cu_geglu(cudaStream_t st, float *g, const float *u, size_t n);
void cu_scale(cudaStream_t st, float *x, float s, size_t n);
/* x[t][i] += b[i], T rows of n */
void cu_add_bias(cudaStream_t st, float *x, const float *b, uint32_t T, uint32_t n);
void cu_add(cudaStream_t st, float *x, const float *y, size_t n);
/* f32 -> f16 (type CU_W_F16) or bf16 (CU_W_BF16), n values */
void cu_convert(cudaStream_t st, uint32_t type, const float *x, void *out, size_t n);

/* Store row t of k and v at position pos[t] of slice row_seq[t], for T rows. */
void cu_kv_store(cudaStream_t st, cu_pool_t pool, uint32_t layer, const float *k, const float *v,
                 const uint32_t *pos, const uint32_t *row_seq, const cu_seq_t *seqs,
                 const uint32_t *tables, uint32_t T);
/* Rotate the keys of positions [from, to) of one layer back by delta (K-shift); position p
 * sits in slot p below `sinks`, else p + skip (kv_seq_slot); blocks whose table entry is
 * 0xFFFFFFFF (out of a local layer's window) are skipped. */
void cu_k_shift(cudaStream_t st, cu_pool_t pool, const uint32_t *table, uint32_t sinks,
                uint32_t skip, uint32_t layer, uint32_t from, uint32_t to, uint32_t delta,
                uint32_t n_head_kv, uint32_t head_dim, uint32_t n_rot, float base, float freq_scale,
                bool neox, const float *freq_factors);

typedef struct {
    uint32_t n_head, n_head_kv, head_dim;
    float scale;
    uint32_t window; /* sliding window (keys (p - window, p]); 0: none */
} cu_shape_t;

/* Decode attention (slices with n_q == 1) of one layer: dense over the block table, dense with
 * every score kept for selection (kind SELECT: scores[i][h][0..pos0]), or sparse over the
 * slice's selection; flash-decoding split over the key range, partials in part, merged into out
 * and the telemetry. kinds[i] per slice (eng_att_kind_t); max_keys bounds the keys of any
 * slice; part holds n_seqs * n_head * n_split(max_keys) * (head_dim + 4) floats. */
void cu_attn_decode(cudaStream_t st, cu_shape_t sh, cu_pool_t pool, uint32_t layer, const float *q,
                    const cu_seq_t *seqs, const uint8_t *kinds, const uint32_t *tables,
                    uint32_t n_seqs, uint32_t max_keys, float *part, float *scores,
                    uint32_t score_stride, float *out, cu_tele_t tele);
/* Floats of partials cu_attn_decode needs. */
size_t cu_attn_part_floats(uint32_t n_seqs, uint32_t n_head, uint32_t head_dim, uint32_t max_keys);
/* TidalDecode selection for the SELECT slices from their scores: per head (or per KV-head
 * group, summing each head's probabilities), the current token, the sinks when forced and the
 * top-scoring others up to the budget, ascending, into the slice's sel / n_sel. */
void cu_attn_select(cudaStream_t st, cu_shape_t sh, const cu_seq_t *seqs, const uint8_t *kinds,
                    uint32_t n_seqs, const float *scores, uint32_t score_stride, cu_tele_t tele,
                    float *gsum);
/* Causal prefill attention (slices with n_q > 1), tiled over queries and keys. */
void cu_attn_prefill(cudaStream_t st, cu_shape_t sh, cu_pool_t pool, uint32_t layer, const float *q,
                     const cu_seq_t *seqs, const uint32_t *tables, uint32_t n_seqs, uint32_t max_q,
                     float *out);

/* out[r] = index of the largest of rows[r][0..n), the lowest index on ties (the sampler's
 * greedy choice), for R rows. */
void cu_argmax(cudaStream_t st, const float *rows, uint32_t R, uint32_t n, int32_t *out);
/* Sum n float4s into out[blockIdx] (a pure streaming read: the bandwidth probe). */
void cu_read_probe(cudaStream_t st, const void *p, size_t n4, float *out, unsigned blocks);

#ifdef __cplusplus
}
#endif

#endif
