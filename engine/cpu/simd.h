/* simd.h - private: the CPU's vector kernels, chosen at run time.
 *
 * Each kernel has a portable scalar version and AVX2+FMA / AVX-512F versions
 * compiled with target attributes; simd_init() picks the widest the CPU has.
 */
#ifndef TIDALD_CPU_SIMD_H
#define TIDALD_CPU_SIMD_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    const char *name;
    /* y[r] = dot(rows + r*n, x) for r < 4: four rows share each load of x */
    void (*dot4)(const float *rows, size_t n, const float *x, float *y);
    float (*dot)(const float *a, const float *b, size_t n);
    /* y += a * x */
    void (*axpy)(float *y, float a, const float *x, size_t n);
    void (*f16_to_f32)(const uint16_t *src, float *dst, size_t n);
    /* y[r] = dot(f16 row r, x) for r < 4, rows `stride` halves apart: converts as it goes, for
     * steps with too few tokens to amortise a converted copy */
    void (*dot4_f16)(const uint16_t *rows, size_t stride, size_t n, const float *x, float *y);
    /* out[t*4 + r] = dot(rows + r*n, x[t]) for r < 4, t < 3: a 4x3 register tile, so each load
     * of a row or a token feeds three or four FMAs (prefill matmuls) */
    void (*tile4x3)(const float *rows, size_t n, const float *const x[3], float *out);
    /* F16 KV cache: dot(a, half b) and y += a * half x */
    float (*dot_f16)(const float *a, const uint16_t *b, size_t n);
    void (*axpy_f16)(float *y, float a, const uint16_t *x, size_t n);
    /* Prefill attention over a tile of R query rows (rows of q and o n floats, ld apart):
     * out[r * ldo + i] = dot(q + r * ldq, k + i * ldk) for i < nk, each computed as dot()
     * computes it; and o[r * ldo + d] += sum over i < nk of w[r * ldw + i] * v[i * ldv + d], in
     * the order axpy() adds them: each row of k or v is loaded once for several query rows. */
    void (*dots)(const float *q, size_t ldq, size_t R, const float *k, size_t ldk, size_t nk,
                 size_t n, float *out, size_t ldo);
    void (*wsum)(float *o, size_t ldo, size_t R, const float *w, size_t ldw, const float *v,
                 size_t ldv, size_t nk, size_t n);
} simd_ops_t;

extern simd_ops_t simd;

void simd_init(void);
int simd_select(const char *name); /* 0 ok, -1 unavailable */

#endif
