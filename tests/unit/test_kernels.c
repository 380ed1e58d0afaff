/* test_kernels.c - every CPU backend op, on every SIMD path the CPU has, against ref_ops. */
#include "../../engine/backend.h"
#include "../../engine/engine.h"
#include "../../base/f16.h"
#include "../../engine/gguf.h"
#include "../../tools/gguf_writer.h"
#include "helpers.h"
#include "ref_ops.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static const char *const paths[] = {"scalar", "avx2", "avx512"};

static eng_backend_t *make_backend(int threads) {
    eng_backend_t *be = NULL;
    char msg[ENG_ERRMSG_LEN];
    cr_assert_eq(eng_cpu_backend_create(&be, threads, msg), 0, "%s", msg);
    cr_assert_eq(be->ops->reserve(be, 4096, 16, 64, 4096), 0);
    return be;
}

/* max |a-b| / max(1, max |b|) */
static double rel_err(const float *a, const float *b, size_t n) {
    double m = 0, e = 0;
    for (size_t i = 0; i < n; i++) {
        if (fabs(b[i]) > m) m = fabs(b[i]);
        if (fabs((double)a[i] - b[i]) > e) e = fabs((double)a[i] - b[i]);
    }
    return e / (m > 1 ? m : 1);
}

static void check_matmul(uint32_t type, uint32_t rows, uint32_t cols, uint32_t T, int threads) {
    uint64_t rng = 1234 + rows * 7 + cols + T;
    float *wf = malloc(sizeof(float) * rows * cols);
    for (size_t i = 0; i < (size_t)rows * cols; i++) wf[i] = frand(&rng);
    size_t rb = gw_type_bytes(type, cols);
    uint8_t *wd = malloc(rb * rows);
    for (uint32_t r = 0; r < rows; r++) gw_convert(type, wf + (size_t)r * cols, cols, wd + r * rb);
    eng_tensor_t w = {type, rows, cols, rb, wd};
    float *x = malloc(sizeof(float) * T * cols), *y = malloc(sizeof(float) * T * rows),
          *yr = malloc(sizeof(float) * T * rows);
    for (size_t i = 0; i < (size_t)T * cols; i++) x[i] = frand(&rng);
    ref_matmul(&w, x, yr, T);
    for (size_t p = 0; p < 3; p++) {
        if (!eng_cpu_force_simd(paths[p])) continue;
        eng_backend_t *be = make_backend(threads);
        memset(y, 0, sizeof(float) * T * rows);
        be->ops->matmul(be, &w, x, y, T);
        double e = rel_err(y, yr, (size_t)T * rows);
        cr_expect_lt(e, 1e-5, "matmul %s type %s %ux%u T=%u: rel err %g", paths[p],
                     gguf_type_name(type), rows, cols, T, e);
        be->ops->destroy(be);
    }
    free(wf), free(wd), free(x), free(y), free(yr);
}

Test(kernels, test_matmul_matches_reference_for_every_type_and_shape) {
    const uint32_t types[] = {GGML_F32, GGML_F16, GGML_BF16, GGML_Q8_0};
    const uint32_t shapes[][3] = {{1, 32, 1},    {5, 64, 3},  {37, 96, 17},
                                  {128, 256, 1}, {7, 160, 4}, {9, 72, 2}};
    for (int t = 0; t < 4; t++)
        for (int s = 0; s < 5; s++)
            check_matmul(types[t], shapes[s][0], shapes[s][1], shapes[s][2], 2);
}

Test(kernels, test_matmul_odd_columns_f32_and_f16) {
    /* columns that are not a multiple of the vector width exercise the scalar tails */
    check_matmul(GGML_F32, 9, 13, 5, 3);
    check_matmul(GGML_F16, 6, 27, 2, 1);
}

Test(kernels, test_rmsnorm_matches_reference) {
    uint64_t rng = 7;
    uint32_t T = 3, n = 70;
    float x[210], w[70], o[210], r[210];
    for (int i = 0; i < 210; i++) x[i] = frand(&rng) * 3;
    for (int i = 0; i < 70; i++) w[i] = frand(&rng);
    eng_backend_t *be = make_backend(1);
    be->ops->rmsnorm(be, x, w, o, T, n, 1e-5f);
    ref_rmsnorm(x, w, r, T, n, 1e-5f);
    cr_expect_lt(rel_err(o, r, 210), 1e-6);
    be->ops->destroy(be);
}

/* NORM and NEOX pairing, partial rotation, frequency factors and linear scaling. */
Test(kernels, test_rope_matches_reference_in_every_mode) {
    uint64_t rng = 9;
    uint32_t T = 4, H = 3, hd = 16, pos[4] = {0, 1, 77, 4095};
    float x[4 * 3 * 16], y[4 * 3 * 16], ff[8] = {1, 2, 4, 8, 1.5f, 3, 16, 40};
    for (int mode = 0; mode < 16; mode++) {
        bool partial = mode & 1, with_ff = mode & 2, neox = mode & 4, scaled = mode & 8;
        eng_rope_t r = {partial ? 8 : 16, neox ? 1e6f : 10000.0f, scaled ? 0.125f : 1.0f, neox,
                        with_ff ? ff : NULL};
        for (int i = 0; i < 192; i++) x[i] = y[i] = frand(&rng);
        eng_backend_t *be = make_backend(1);
        be->ops->rope(be, x, pos, T, H, hd, &r);
        ref_rope(y, pos, T, H, hd, &r);
        double e = rel_err(x, y, 192);
        cr_expect_lt(e, 2e-4, "mode %d: err %g", mode, e);
        if (partial) /* dims past n_rot stay: 8..15 in NORM, 8..15 in NEOX too */
            for (uint32_t h = 0; h < T * H; h++)
                cr_expect_eq(memcmp(x + h * hd + 8, y + h * hd + 8, 8 * sizeof(float)), 0);
        be->ops->destroy(be);
    }
}

Test(kernels, test_swiglu_and_add_match_reference) {
    uint64_t rng = 11;
    float g[100], g2[100], u[100], a[100], b[100];
    for (int i = 0; i < 100; i++)
        g[i] = g2[i] = frand(&rng) * 8, u[i] = frand(&rng), a[i] = b[i] = frand(&rng);
    eng_backend_t *be = make_backend(1);
    be->ops->swiglu(be, g, u, 100);
    ref_swiglu(g2, u, 100);
    cr_expect_lt(rel_err(g, g2, 100), 1e-6);
    be->ops->add(be, a, u, 100);
    for (int i = 0; i < 100; i++) b[i] += u[i];
    cr_expect_lt(rel_err(a, b, 100), 1e-7);
    be->ops->scale(be, a, 0.25f, 100);
    for (int i = 0; i < 100; i++) cr_expect_eq(a[i], b[i] * 0.25f);
    be->ops->add_bias(be, a, u, 4, 25); /* 4 rows of 25, the same bias on each */
    for (int i = 0; i < 100; i++) cr_expect_eq(a[i], b[i] * 0.25f + u[i % 25]);
    be->ops->destroy(be);
}

/* GeGLU as llama.cpp's CPU computes it, over its whole range: both clamps, the F16 rounding of
 * GELU's argument and result, and the values around zero. */
Test(kernels, test_geglu_matches_reference_with_f16_rounding) {
    enum { N = 4000 };
    static float g[N], g2[N], u[N];
    uint64_t rng = 12;
    for (int i = 0; i < N; i++) {
        g[i] = g2[i] = (float)(i - N / 2) * 0.0061f + frand(&rng) * 1e-3f; /* -12.2 .. 12.2 */
        u[i] = frand(&rng) * 3;
    }
    g[0] = g2[0] = -10.0f, g[1] = g2[1] = 10.0f, g[2] = g2[2] = 0.0f;
    eng_backend_t *be = make_backend(1);
    be->ops->geglu(be, g, u, N);
    ref_geglu(g2, u, N);
    for (int i = 0; i < N; i++)
        cr_expect(g[i] == g2[i], "x %g: %.9g vs %.9g", (i - N / 2) * 0.0061, g[i], g2[i]);
    cr_expect_eq(g[0], 0.0f);
    cr_expect_eq(g[1], 10.0f * u[1]);
    be->ops->destroy(be);
}

/* Paged attention for several sequences of different lengths and a block size that does not
 * divide them, against contiguous reference attention; and the prefill slices (5 and 30
 * queries: whole and partial tiles of 4 queries x 4 heads) bit for bit what the same backend
 * computes query by query (TIDALD_ATTN_TILES=0). */
static void paged_attention_case(uint32_t window) {
    const uint32_t n_head = 8, n_kv = 2, hd = 16, kvd = n_kv * hd, L = 2, layer = 1;
    const uint32_t lens[3] = {1, 23, 70}, nq[3] = {1, 5, 30}; /* last nq tokens are queries */
    eng_attn_shape_t sh = {n_head, n_kv, hd, 1.0f / sqrtf((float)hd), window};
    kv_pool_t pool;
    char msg[ENG_ERRMSG_LEN];
    cr_assert_eq(kv_pool_init(&pool, L, kvd, 4, 64, msg), 0, "%s", msg);
    kv_seq_t seq[3];
    float *k[3], *v[3];
    uint64_t rng = 3;
    uint32_t total_q = 0;
    for (int s = 0; s < 3; s++) {
        kv_seq_init(&seq[s], &pool);
        cr_assert_eq(kv_seq_reserve(&seq[s], lens[s]), 0);
        seq[s].n_tokens = lens[s];
        k[s] = malloc(sizeof(float) * lens[s] * kvd);
        v[s] = malloc(sizeof(float) * lens[s] * kvd);
        for (uint32_t p = 0; p < lens[s]; p++)
            for (uint32_t i = 0; i < kvd; i++) {
                k[s][p * kvd + i] = frand(&rng) * 2;
                v[s][p * kvd + i] = frand(&rng);
                kv_seq_k(&seq[s], layer, p)[i] = k[s][p * kvd + i];
                kv_seq_v(&seq[s], layer, p)[i] = v[s][p * kvd + i];
            }
        total_q += nq[s];
    }
    float *q = malloc(sizeof(float) * total_q * n_head * hd);
    float *out = malloc(sizeof(float) * total_q * n_head * hd);
    float *ref = malloc(sizeof(float) * n_head * hd);
    float *out1 = malloc(sizeof(float) * total_q * n_head * hd);
    for (size_t i = 0; i < (size_t)total_q * n_head * hd; i++) q[i] = frand(&rng);
    eng_attn_seq_t as[3];
    uint32_t row = 0;
    for (int s = 0; s < 3; s++) {
        as[s] = (eng_attn_seq_t){&seq[s], row, nq[s], lens[s] - nq[s]};
        row += nq[s];
    }
    for (size_t p = 0; p < 3; p++) {
        if (!eng_cpu_force_simd(paths[p])) continue;
        eng_backend_t *be = make_backend(2);
        be->ops->attention(be, &sh, layer, q, as, 3, out);
        for (int s = 0; s < 3; s++)
            for (uint32_t j = 0; j < nq[s]; j++) {
                size_t r = as[s].q_start + j;
                ref_attention(&sh, q + r * n_head * hd, k[s], v[s], as[s].pos0 + j, ref);
                double e = rel_err(out + r * n_head * hd, ref, n_head * hd);
                cr_expect_lt(e, 1e-5, "%s window %u seq %d query %u: err %g", paths[p], window, s,
                             j, e);
            }
        be->ops->destroy(be);
        setenv("TIDALD_ATTN_TILES", "0", 1);
        be = make_backend(2);
        unsetenv("TIDALD_ATTN_TILES");
        be->ops->attention(be, &sh, layer, q, as, 3, out1);
        cr_expect_eq(memcmp(out, out1, sizeof(float) * total_q * n_head * hd), 0,
                     "%s window %u: tiled prefill attention differs from query by query", paths[p],
                     window);
        be->ops->destroy(be);
    }
    for (int s = 0; s < 3; s++) {
        kv_seq_close(&seq[s]);
        free(k[s]), free(v[s]);
    }
    kv_pool_close(&pool);
    free(q), free(out), free(ref), free(out1);
}

Test(kernels, test_paged_attention_matches_contiguous_reference) {
    paged_attention_case(0);
}

/* Sliding-window layers: windows shorter than a block, not a multiple of the block size, and
 * wider than every sequence (the dense result). */
Test(kernels, test_sliding_window_attention_matches_reference) {
    const uint32_t windows[] = {1, 3, 7, 20, 64, 1000};
    for (size_t i = 0; i < sizeof(windows) / sizeof(windows[0]); i++)
        paged_attention_case(windows[i]);
}

Test(kernels, test_f16_and_bf16_conversions_round_trip) {
    const float vals[] = {0.0f,           -0.0f,          1.0f,  -2.5f,          65504.0f,
                          6.1035156e-05f, 5.9604645e-08f, 1e-9f, 0.333251953125f};
    for (size_t i = 0; i < sizeof(vals) / sizeof(vals[0]); i++) {
        float h = eng_f16_to_f32(eng_f32_to_f16(vals[i]));
        cr_expect(fabsf(h - vals[i]) <= fabsf(vals[i]) * 1e-3f + 6e-8f, "f16 %g -> %g", vals[i], h);
        float b = eng_bf16_to_f32(eng_f32_to_bf16(vals[i]));
        cr_expect(fabsf(b - vals[i]) <= fabsf(vals[i]) * 8e-3f, "bf16 %g -> %g", vals[i], b);
    }
    cr_expect(isinf(eng_f16_to_f32(eng_f32_to_f16(1e6f))));
    cr_expect(isnan(eng_f16_to_f32(eng_f32_to_f16(NAN))));
    /* every half converts back to itself */
    for (uint32_t h = 0; h < 0x10000; h++) {
        if ((h & 0x7c00) == 0x7c00 && (h & 0x3ff)) continue; /* NaN payloads */
        cr_assert_eq(eng_f32_to_f16(eng_f16_to_f32((uint16_t)h)), h, "half 0x%04x", h);
    }
}

/* The K-shift for any rotary width: keys rotated for positions p + delta and shifted by delta
 * equal keys rotated for p. A model file may declare a head far wider than real ones (here
 * 2,048 rotary dimensions); the shift once kept its angles in fixed 512-entry arrays. */
Test(kernels, test_k_shift_of_a_wide_head_equals_rope_at_the_new_positions) {
    enum { HD = 2048, NPOS = 8, DELTA = 5 };
    char msg[ENG_ERRMSG_LEN];
    kv_pool_t pool;
    cr_assert_eq(kv_pool_init(&pool, 1, HD, 4, 2, msg), 0, "%s", msg);
    kv_seq_t seq;
    kv_seq_init(&seq, &pool);
    cr_assert_eq(kv_seq_reserve(&seq, NPOS), 0);
    seq.n_tokens = NPOS;
    static float base[NPOS * HD], want[NPOS * HD];
    uint32_t shifted[NPOS], at[NPOS];
    uint64_t rng = 5;
    for (uint32_t p = 0; p < NPOS; p++) shifted[p] = p + DELTA, at[p] = p;
    eng_backend_t *be = make_backend(1);
    for (int neox = 0; neox < 2; neox++) {
        eng_rope_t r = {HD, 10000.0f, neox ? 0.5f : 1.0f, neox, NULL};
        for (int i = 0; i < NPOS * HD; i++) base[i] = want[i] = frand(&rng);
        ref_rope(base, shifted, NPOS, 1, HD, &r);
        ref_rope(want, at, NPOS, 1, HD, &r);
        for (uint32_t p = 0; p < NPOS; p++)
            memcpy(kv_seq_k(&seq, 0, p), base + p * HD, sizeof(float) * HD);
        be->ops->k_shift(be, &seq, 0, NPOS, DELTA, 1, HD, &r); /* the pool's one layer */
        for (uint32_t p = 0; p < NPOS; p++) {
            double e = rel_err(kv_seq_k(&seq, 0, p), want + p * HD, HD);
            cr_expect_lt(e, 1e-4, "neox %d position %u: err %g", neox, p, e);
        }
    }
    be->ops->destroy(be);
    kv_seq_close(&seq);
    kv_pool_close(&pool);
}
