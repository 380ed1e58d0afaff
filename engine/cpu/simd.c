/* simd.c - scalar, AVX2+FMA and AVX-512F kernels and their run-time dispatch. */
#include "simd.h"
#include "qdot.h"
#include "../../base/f16.h"

#include <immintrin.h>
#include <string.h>

/* ---- scalar ---------------------------------------------------------- */

static float dot_scalar(const float *a, const float *b, size_t n) {
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    size_t i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += a[i] * b[i];
        s1 += a[i + 1] * b[i + 1];
        s2 += a[i + 2] * b[i + 2];
        s3 += a[i + 3] * b[i + 3];
    }
    for (; i < n; i++) s0 += a[i] * b[i];
    return (s0 + s1) + (s2 + s3);
}

static void dot4_scalar(const float *rows, size_t n, const float *x, float *y) {
    for (int r = 0; r < 4; r++) y[r] = dot_scalar(rows + (size_t)r * n, x, n);
}

static void axpy_scalar(float *y, float a, const float *x, size_t n) {
    for (size_t i = 0; i < n; i++) y[i] += a * x[i];
}

static void f16_scalar(const uint16_t *src, float *dst, size_t n) {
    for (size_t i = 0; i < n; i++) dst[i] = eng_f16_to_f32(src[i]);
}

static void dot4_f16_scalar(const uint16_t *rows, size_t stride, size_t n, const float *x,
                            float *y) {
    for (int r = 0; r < 4; r++) {
        const uint16_t *w = rows + (size_t)r * stride;
        float s = 0;
        for (size_t i = 0; i < n; i++) s += eng_f16_to_f32(w[i]) * x[i];
        y[r] = s;
    }
}

static void tile4x3_scalar(const float *rows, size_t n, const float *const x[3], float *out) {
    for (int t = 0; t < 3; t++)
        for (int r = 0; r < 4; r++) out[t * 4 + r] = dot_scalar(rows + (size_t)r * n, x[t], n);
}

static float dot_f16_scalar(const float *a, const uint16_t *b, size_t n) {
    float s = 0;
    for (size_t i = 0; i < n; i++) s += a[i] * eng_f16_to_f32(b[i]);
    return s;
}

static void axpy_f16_scalar(float *y, float a, const uint16_t *x, size_t n) {
    for (size_t i = 0; i < n; i++) y[i] += a * eng_f16_to_f32(x[i]);
}

static void dots_scalar(const float *q, size_t ldq, size_t R, const float *k, size_t ldk, size_t nk,
                        size_t n, float *out, size_t ldo) {
    for (size_t r = 0; r < R; r++)
        for (size_t i = 0; i < nk; i++) out[r * ldo + i] = dot_scalar(q + r * ldq, k + i * ldk, n);
}

static void wsum_scalar(float *o, size_t ldo, size_t R, const float *w, size_t ldw, const float *v,
                        size_t ldv, size_t nk, size_t n) {
    for (size_t r = 0; r < R; r++)
        for (size_t i = 0; i < nk; i++) axpy_scalar(o + r * ldo, w[r * ldw + i], v + i * ldv, n);
}

/* ---- AVX2 + FMA ------------------------------------------------------ */

#define AVX2 __attribute__((target("avx2,fma,f16c")))

AVX2 static inline float hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

AVX2 static float dot_avx2(const float *a, const float *b, size_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i + 8 <= n; i += 8)
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    float s = hsum256(_mm256_add_ps(s0, s1));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

AVX2 static void dot4_avx2(const float *rows, size_t n, const float *x, float *y) {
    const float *r0 = rows, *r1 = rows + n, *r2 = rows + 2 * n, *r3 = rows + 3 * n;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 xv = _mm256_loadu_ps(x + i);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(r0 + i), xv, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(r1 + i), xv, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(r2 + i), xv, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(r3 + i), xv, a3);
    }
    float s[4] = {hsum256(a0), hsum256(a1), hsum256(a2), hsum256(a3)};
    for (; i < n; i++) {
        s[0] += r0[i] * x[i];
        s[1] += r1[i] * x[i];
        s[2] += r2[i] * x[i];
        s[3] += r3[i] * x[i];
    }
    memcpy(y, s, sizeof(s));
}

AVX2 static void axpy_avx2(float *y, float a, const float *x, size_t n) {
    __m256 av = _mm256_set1_ps(a);
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i,
                         _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * x[i];
}

AVX2 static void f16_avx2(const uint16_t *src, float *dst, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; i++) dst[i] = eng_f16_to_f32(src[i]);
}

AVX2 static void dot4_f16_avx2(const uint16_t *rows, size_t stride, size_t n, const float *x,
                               float *y) {
    const uint16_t *r0 = rows, *r1 = rows + stride, *r2 = rows + 2 * stride,
                   *r3 = rows + 3 * stride;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    size_t i = 0;
#define LD(r) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((r) + i)))
    for (; i + 8 <= n; i += 8) {
        __m256 xv = _mm256_loadu_ps(x + i);
        a0 = _mm256_fmadd_ps(LD(r0), xv, a0);
        a1 = _mm256_fmadd_ps(LD(r1), xv, a1);
        a2 = _mm256_fmadd_ps(LD(r2), xv, a2);
        a3 = _mm256_fmadd_ps(LD(r3), xv, a3);
    }
#undef LD
    float s[4] = {hsum256(a0), hsum256(a1), hsum256(a2), hsum256(a3)};
    for (; i < n; i++) {
        s[0] += eng_f16_to_f32(r0[i]) * x[i];
        s[1] += eng_f16_to_f32(r1[i]) * x[i];
        s[2] += eng_f16_to_f32(r2[i]) * x[i];
        s[3] += eng_f16_to_f32(r3[i]) * x[i];
    }
    memcpy(y, s, sizeof(s));
}

AVX2 static void tile4x3_avx2(const float *rows, size_t n, const float *const x[3], float *out) {
    const float *r0 = rows, *r1 = rows + n, *r2 = rows + 2 * n, *r3 = rows + 3 * n;
    const float *x0 = x[0], *x1 = x[1], *x2 = x[2];
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
    __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    __m256 a20 = a00, a21 = a00, a22 = a00, a23 = a00;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 w0 = _mm256_loadu_ps(r0 + i), w1 = _mm256_loadu_ps(r1 + i);
        __m256 w2 = _mm256_loadu_ps(r2 + i), w3 = _mm256_loadu_ps(r3 + i);
        __m256 v = _mm256_loadu_ps(x0 + i);
        a00 = _mm256_fmadd_ps(w0, v, a00);
        a01 = _mm256_fmadd_ps(w1, v, a01);
        a02 = _mm256_fmadd_ps(w2, v, a02);
        a03 = _mm256_fmadd_ps(w3, v, a03);
        v = _mm256_loadu_ps(x1 + i);
        a10 = _mm256_fmadd_ps(w0, v, a10);
        a11 = _mm256_fmadd_ps(w1, v, a11);
        a12 = _mm256_fmadd_ps(w2, v, a12);
        a13 = _mm256_fmadd_ps(w3, v, a13);
        v = _mm256_loadu_ps(x2 + i);
        a20 = _mm256_fmadd_ps(w0, v, a20);
        a21 = _mm256_fmadd_ps(w1, v, a21);
        a22 = _mm256_fmadd_ps(w2, v, a22);
        a23 = _mm256_fmadd_ps(w3, v, a23);
    }
    float s[12] = {hsum256(a00), hsum256(a01), hsum256(a02), hsum256(a03),
                   hsum256(a10), hsum256(a11), hsum256(a12), hsum256(a13),
                   hsum256(a20), hsum256(a21), hsum256(a22), hsum256(a23)};
    for (; i < n; i++)
        for (int t = 0; t < 3; t++)
            for (int r = 0; r < 4; r++) s[t * 4 + r] += rows[(size_t)r * n + i] * x[t][i];
    memcpy(out, s, sizeof(s));
}

AVX2 static float dot_f16_avx2(const float *a, const uint16_t *b, size_t n) {
    __m256 s0 = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i),
                             _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + i))), s0);
    float s = hsum256(s0);
    for (; i < n; i++) s += a[i] * eng_f16_to_f32(b[i]);
    return s;
}

AVX2 static void axpy_f16_avx2(float *y, float a, const uint16_t *x, size_t n) {
    __m256 av = _mm256_set1_ps(a);
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(
            y + i, _mm256_fmadd_ps(av, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i))),
                                   _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * eng_f16_to_f32(x[i]);
}

/* ---- AVX-512F -------------------------------------------------------- */

/* dot_avx2's arithmetic for four query rows against one key: two accumulators per row */
AVX2 static void dots_avx2(const float *q, size_t ldq, size_t R, const float *k, size_t ldk,
                           size_t nk, size_t n, float *out, size_t ldo) {
    size_t r = 0;
    for (; r + 4 <= R; r += 4)
        for (size_t j = 0; j < nk; j++) {
            const float *kj = k + j * ldk;
            __m256 s0[4], s1[4];
            for (int a = 0; a < 4; a++) s0[a] = _mm256_setzero_ps(), s1[a] = _mm256_setzero_ps();
            size_t i = 0;
            for (; i + 16 <= n; i += 16) {
                __m256 k0 = _mm256_loadu_ps(kj + i), k1 = _mm256_loadu_ps(kj + i + 8);
                for (int a = 0; a < 4; a++) {
                    const float *qa = q + (r + a) * ldq;
                    s0[a] = _mm256_fmadd_ps(_mm256_loadu_ps(qa + i), k0, s0[a]);
                    s1[a] = _mm256_fmadd_ps(_mm256_loadu_ps(qa + i + 8), k1, s1[a]);
                }
            }
            for (; i + 8 <= n; i += 8) {
                __m256 k0 = _mm256_loadu_ps(kj + i);
                for (int a = 0; a < 4; a++)
                    s0[a] = _mm256_fmadd_ps(_mm256_loadu_ps(q + (r + a) * ldq + i), k0, s0[a]);
            }
            for (int a = 0; a < 4; a++) {
                const float *qa = q + (r + a) * ldq;
                float s = hsum256(_mm256_add_ps(s0[a], s1[a]));
                for (size_t t = i; t < n; t++) s += qa[t] * kj[t];
                out[(r + a) * ldo + j] = s;
            }
        }
    for (; r < R; r++)
        for (size_t j = 0; j < nk; j++) out[r * ldo + j] = dot_avx2(q + r * ldq, k + j * ldk, n);
}

/* four query rows' 8-wide slices of o in registers while the keys go by */
AVX2 static void wsum_avx2(float *o, size_t ldo, size_t R, const float *w, size_t ldw,
                           const float *v, size_t ldv, size_t nk, size_t n) {
    size_t r = 0;
    for (; r + 4 <= R; r += 4) {
        size_t d = 0;
        for (; d + 8 <= n; d += 8) {
            __m256 acc[4];
            for (int a = 0; a < 4; a++) acc[a] = _mm256_loadu_ps(o + (r + a) * ldo + d);
            for (size_t i = 0; i < nk; i++) {
                __m256 vv = _mm256_loadu_ps(v + i * ldv + d);
                for (int a = 0; a < 4; a++)
                    acc[a] = _mm256_fmadd_ps(_mm256_set1_ps(w[(r + a) * ldw + i]), vv, acc[a]);
            }
            for (int a = 0; a < 4; a++) _mm256_storeu_ps(o + (r + a) * ldo + d, acc[a]);
        }
        for (int a = 0; a < 4; a++)
            for (size_t i = 0; i < nk; i++)
                for (size_t t = d; t < n; t++)
                    o[(r + a) * ldo + t] += w[(r + a) * ldw + i] * v[i * ldv + t];
    }
    for (; r < R; r++)
        for (size_t i = 0; i < nk; i++) axpy_avx2(o + r * ldo, w[r * ldw + i], v + i * ldv, n);
}

#define AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))

AVX512 static float dot_avx512(const float *a, const float *b, size_t n) {
    __m512 s0 = _mm512_setzero_ps();
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    float s = _mm512_reduce_add_ps(s0);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

AVX512 static void dot4_avx512(const float *rows, size_t n, const float *x, float *y) {
    const float *r0 = rows, *r1 = rows + n, *r2 = rows + 2 * n, *r3 = rows + 3 * n;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 xv = _mm512_loadu_ps(x + i);
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(r0 + i), xv, a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(r1 + i), xv, a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(r2 + i), xv, a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(r3 + i), xv, a3);
    }
    float s[4] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1), _mm512_reduce_add_ps(a2),
                  _mm512_reduce_add_ps(a3)};
    for (; i < n; i++) {
        s[0] += r0[i] * x[i];
        s[1] += r1[i] * x[i];
        s[2] += r2[i] * x[i];
        s[3] += r3[i] * x[i];
    }
    memcpy(y, s, sizeof(s));
}

AVX512 static void axpy_avx512(float *y, float a, const float *x, size_t n) {
    __m512 av = _mm512_set1_ps(a);
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(y + i,
                         _mm512_fmadd_ps(av, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * x[i];
}

AVX512 static void f16_avx512(const uint16_t *src, float *dst, size_t n) {
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + i))));
    for (; i < n; i++) dst[i] = eng_f16_to_f32(src[i]);
}

AVX512 static void dot4_f16_avx512(const uint16_t *rows, size_t stride, size_t n, const float *x,
                                   float *y) {
    const uint16_t *r0 = rows, *r1 = rows + stride, *r2 = rows + 2 * stride,
                   *r3 = rows + 3 * stride;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    size_t i = 0;
#define LD(r) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((r) + i)))
    for (; i + 16 <= n; i += 16) {
        __m512 xv = _mm512_loadu_ps(x + i);
        a0 = _mm512_fmadd_ps(LD(r0), xv, a0);
        a1 = _mm512_fmadd_ps(LD(r1), xv, a1);
        a2 = _mm512_fmadd_ps(LD(r2), xv, a2);
        a3 = _mm512_fmadd_ps(LD(r3), xv, a3);
    }
#undef LD
    float s[4] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1), _mm512_reduce_add_ps(a2),
                  _mm512_reduce_add_ps(a3)};
    for (; i < n; i++) {
        s[0] += eng_f16_to_f32(r0[i]) * x[i];
        s[1] += eng_f16_to_f32(r1[i]) * x[i];
        s[2] += eng_f16_to_f32(r2[i]) * x[i];
        s[3] += eng_f16_to_f32(r3[i]) * x[i];
    }
    memcpy(y, s, sizeof(s));
}

AVX512 static void tile4x3_avx512(const float *rows, size_t n, const float *const x[3],
                                  float *out) {
    __m512 acc[3][4];
    for (int t = 0; t < 3; t++)
        for (int r = 0; r < 4; r++) acc[t][r] = _mm512_setzero_ps();
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 w[4];
        for (int r = 0; r < 4; r++) w[r] = _mm512_loadu_ps(rows + (size_t)r * n + i);
        for (int t = 0; t < 3; t++) {
            __m512 v = _mm512_loadu_ps(x[t] + i);
            for (int r = 0; r < 4; r++) acc[t][r] = _mm512_fmadd_ps(w[r], v, acc[t][r]);
        }
    }
    float s[12];
    for (int t = 0; t < 3; t++)
        for (int r = 0; r < 4; r++) s[t * 4 + r] = _mm512_reduce_add_ps(acc[t][r]);
    for (; i < n; i++)
        for (int t = 0; t < 3; t++)
            for (int r = 0; r < 4; r++) s[t * 4 + r] += rows[(size_t)r * n + i] * x[t][i];
    memcpy(out, s, sizeof(s));
}

/* dot_avx512's arithmetic for four query rows against one key */
AVX512 static void dots_avx512(const float *q, size_t ldq, size_t R, const float *k, size_t ldk,
                               size_t nk, size_t n, float *out, size_t ldo) {
    size_t r = 0;
    for (; r + 4 <= R; r += 4)
        for (size_t j = 0; j < nk; j++) {
            const float *kj = k + j * ldk;
            __m512 s0[4];
            for (int a = 0; a < 4; a++) s0[a] = _mm512_setzero_ps();
            size_t i = 0;
            for (; i + 16 <= n; i += 16) {
                __m512 kv = _mm512_loadu_ps(kj + i);
                for (int a = 0; a < 4; a++)
                    s0[a] = _mm512_fmadd_ps(_mm512_loadu_ps(q + (r + a) * ldq + i), kv, s0[a]);
            }
            for (int a = 0; a < 4; a++) {
                const float *qa = q + (r + a) * ldq;
                float s = _mm512_reduce_add_ps(s0[a]);
                for (size_t t = i; t < n; t++) s += qa[t] * kj[t];
                out[(r + a) * ldo + j] = s;
            }
        }
    for (; r < R; r++)
        for (size_t j = 0; j < nk; j++) out[r * ldo + j] = dot_avx512(q + r * ldq, k + j * ldk, n);
}

/* four query rows' 16-wide slices of o in registers while the keys go by */
AVX512 static void wsum_avx512(float *o, size_t ldo, size_t R, const float *w, size_t ldw,
                               const float *v, size_t ldv, size_t nk, size_t n) {
    size_t r = 0;
    for (; r + 4 <= R; r += 4) {
        size_t d = 0;
        for (; d + 16 <= n; d += 16) {
            __m512 acc[4];
            for (int a = 0; a < 4; a++) acc[a] = _mm512_loadu_ps(o + (r + a) * ldo + d);
            for (size_t i = 0; i < nk; i++) {
                __m512 vv = _mm512_loadu_ps(v + i * ldv + d);
                for (int a = 0; a < 4; a++)
                    acc[a] = _mm512_fmadd_ps(_mm512_set1_ps(w[(r + a) * ldw + i]), vv, acc[a]);
            }
            for (int a = 0; a < 4; a++) _mm512_storeu_ps(o + (r + a) * ldo + d, acc[a]);
        }
        for (int a = 0; a < 4; a++)
            for (size_t i = 0; i < nk; i++)
                for (size_t t = d; t < n; t++)
                    o[(r + a) * ldo + t] += w[(r + a) * ldw + i] * v[i * ldv + t];
    }
    for (; r < R; r++)
        for (size_t i = 0; i < nk; i++) axpy_avx512(o + r * ldo, w[r * ldw + i], v + i * ldv, n);
}

/* ---- dispatch -------------------------------------------------------- */

/* AVX-512 reuses the AVX2 F16 KV kernels: head sizes are small, the halves a 256-bit load */
static const simd_ops_t ops_scalar = {
    "scalar",       dot4_scalar,    dot_scalar,      axpy_scalar, f16_scalar, dot4_f16_scalar,
    tile4x3_scalar, dot_f16_scalar, axpy_f16_scalar, dots_scalar, wsum_scalar};
static const simd_ops_t ops_avx2 = {"avx2",        dot4_avx2,     dot_avx2,     axpy_avx2,
                                    f16_avx2,      dot4_f16_avx2, tile4x3_avx2, dot_f16_avx2,
                                    axpy_f16_avx2, dots_avx2,     wsum_avx2};
static const simd_ops_t ops_avx512 = {"avx512",      dot4_avx512,     dot_avx512,     axpy_avx512,
                                      f16_avx512,    dot4_f16_avx512, tile4x3_avx512, dot_f16_avx2,
                                      axpy_f16_avx2, dots_avx512,     wsum_avx512};

simd_ops_t simd; /* set by simd_init() / simd_select() before any kernel runs */

static int have(const char *name) {
    __builtin_cpu_init();
    if (strcmp(name, "scalar") == 0) return 1;
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (strcmp(name, "avx2") == 0) return avx2;
    if (strcmp(name, "avx512") == 0) return avx2 && __builtin_cpu_supports("avx512f");
    return 0;
}

int simd_select(const char *name) {
    if (!have(name)) return -1;
    if (strcmp(name, "avx512") == 0) {
        simd = ops_avx512;
        qdot_init(QDOT_AVX512VNNI);
    } else if (strcmp(name, "avx2") == 0) {
        simd = ops_avx2;
        qdot_init(QDOT_AVX2);
    } else {
        simd = ops_scalar;
        qdot_init(QDOT_SCALAR);
    }
    return 0;
}

void simd_init(void) {
    if (simd_select("avx512") != 0 && simd_select("avx2") != 0) simd_select("scalar");
    qdot_init(QDOT_AVX512VNNI); /* AVX-VNNI on CPUs with AVX2 but no AVX-512 */
}
