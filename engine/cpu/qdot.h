/* qdot.h - private: integer dot products of quantized weight rows with 8-bit activations.
 *
 * A matmul over a quantized weight never expands the weight to floats. The step's
 * activations are quantized once per matmul into 8-bit blocks: 32-wide blocks (qdot_a32_t)
 * for the legacy types and IQ4_NL, 256-wide blocks with per-16 sums (qdot_ak_t) for the
 * K-quants and IQ4_XS. Each weight block is then unpacked to small unsigned integers and
 * multiplied against the activation bytes with integer dot products (AVX2 maddubs, or
 * AVX-512 VNNI / AVX-VNNI dpbusd where the CPU has them); offsets such as Q4_0's "- 8" and
 * the K-quants' minimums are folded in through the activation block sums. Every kernel has
 * a portable scalar version, which is the oracle for the vector ones.
 */
#ifndef TIDALD_CPU_QDOT_H
#define TIDALD_CPU_QDOT_H

#include <stddef.h>
#include <stdint.h>

#define QDOT_A32 32 /* elements per activation block for the legacy types */
#define QDOT_AK 256 /* elements per activation block for the K-quants */

/* 32 activations: x ~ d * q, with d and s (~ d * sum q, for the types with a minimum) rounded
 * through f16 as in llama.cpp's Q8_0/Q8_1 activation blocks, so both engines compute with the
 * same numbers. */
typedef struct {
    float d, s;
    int32_t sum; /* sum of q */
    int32_t pad;
    int8_t q[QDOT_A32];
} qdot_a32_t;

/* 256 activations: x ~ d * q, with the sum of each 16 q. */
typedef struct {
    float d;
    int16_t bsums[QDOT_AK / 16];
    int8_t q[QDOT_AK];
} qdot_ak_t;

typedef enum { QDOT_ACT_NONE = 0, QDOT_ACT_32, QDOT_ACT_K } qdot_act_t;

/* dot of one weight row of n elements (whole blocks) with n quantized activations */
typedef float (*qdot_fn)(const void *w, const void *xq, size_t n);
/* the same row against nt <= QDOT_NT tokens' activations (out[t]), each weight block unpacked
 * once for all of them; equal bit for bit to nt calls of the qdot_fn */
#define QDOT_NT 4
typedef void (*qdot_n_fn)(const void *w, const void *const *xq, int nt, size_t n, float *out);

/* The activation format a weight type multiplies with; QDOT_ACT_NONE if the type has no
 * integer kernel (F32, F16, BF16, unknown types). */
qdot_act_t qdot_act(uint32_t ggml_type);
/* Bytes of quantized activations for n elements (n a multiple of the block). */
size_t qdot_act_bytes(qdot_act_t act, size_t n);
/* Quantize n floats (a multiple of the activation block) into out. */
void qdot_quantize(qdot_act_t act, const float *x, void *out, size_t n);
/* The kernel for the type at the level chosen by qdot_select(); NULL if none. */
qdot_fn qdot_kernel(uint32_t ggml_type);
/* The multi-token kernel at the chosen level; NULL at the scalar level, where the caller loops
 * over tokens with qdot_kernel(). */
qdot_n_fn qdot_kernel_n(uint32_t ggml_type);
/* The scalar kernel, for tests. */
qdot_fn qdot_kernel_scalar(uint32_t ggml_type);

/* Weights repacked at load, eight rows interleaved (Q4_K at the AVX-512 VNNI level): one
 * 64-byte load holds four codes of eight rows for two sub-blocks, against the same activation
 * bytes broadcast, so each int32 lane is one row's sum and no horizontal add remains until the
 * end; the scales, minimums and f16 factors of the eight rows sit beside them, unpacked. */
#define QDOT_X8 8
/* Bytes of one group of 8 rows of n elements, or 0 if the type has no packed form at the
 * chosen level (then the kernel is NULL too). */
size_t qdot_x8_group_bytes(uint32_t ggml_type, size_t n);
/* Pack 8 rows of n elements (row_bytes apart) into one group. */
void qdot_x8_pack(uint32_t ggml_type, const void *rows, size_t row_bytes, size_t n, void *group);
/* One group against nt <= QDOT_NT tokens: out[t * 8 + r] for row r; a token's results do not
 * depend on nt. */
typedef void (*qdot_x8_fn)(const void *group, const void *const *xq, int nt, size_t n, float *out);
qdot_x8_fn qdot_kernel_x8(uint32_t ggml_type);
/* Row r (0-7) of a group back to floats, bit-exact with the type's dequantizer. */
void qdot_x8_row(uint32_t ggml_type, const void *group, int r, size_t n, float *dst);

/* Instruction-set levels of the vector kernels. */
enum { QDOT_SCALAR = 0, QDOT_AVX2 = 1, QDOT_AVXVNNI = 2, QDOT_AVX512VNNI = 3 };
/* Use the kernels of one level: 0, or -1 if this CPU lacks it (the level is unchanged). */
int qdot_select(int level);
/* The best level this CPU has, at most max_level; returns it. */
int qdot_init(int max_level);
const char *qdot_level_name(void);

#endif
