/* test_qdot.c - the CPU's integer dot kernels (engine/cpu/qdot.c) against plain arithmetic.
 *
 * The oracle for a kernel is the double-precision sum of the gguf-exact dequantized weights
 * (engine/quant.c, itself checked bit for bit against the gguf package) times the
 * dequantized activations d * q. The scalar kernel must match it to float rounding, and every
 * vector level this CPU has must match the scalar kernel. Weight rows are the random blocks of
 * tests/fixtures/quant/ (run from the repository root). */
#include "../../engine/cpu/qdot.h"
#include "../../engine/gguf.h"
#include "../../engine/quant.h"
#include "helpers.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint8_t *load_fixture(const char *name, size_t *len) {
    char path[128];
    snprintf(path, sizeof(path), "tests/fixtures/quant/%s.bin", name);
    return test_slurp(path, len);
}

/* The activations as the kernels see them: d * q per element. */
static void dequant_act(qdot_act_t act, const void *xq, size_t n, double *out) {
    if (act == QDOT_ACT_32) {
        const qdot_a32_t *b = xq;
        for (size_t i = 0; i < n; i++) out[i] = (double)b[i / 32].d * b[i / 32].q[i % 32];
    } else {
        const qdot_ak_t *b = xq;
        for (size_t i = 0; i < n; i++) out[i] = (double)b[i / 256].d * b[i / 256].q[i % 256];
    }
}

static void check_type(const char *name, uint32_t type) {
    size_t len;
    uint8_t *w = load_fixture(name, &len);
    size_t n = len / eng_q_block_bytes(type) * eng_q_block_elems(type);
    qdot_act_t act = qdot_act(type);
    cr_assert_neq(act, QDOT_ACT_NONE, "%s has no integer kernel", name);
    float *wf = malloc(n * sizeof(float)), *x = malloc(n * sizeof(float));
    double *xd = malloc(n * sizeof(double));
    void *xq = malloc(qdot_act_bytes(act, n));
    cr_assert_eq(eng_q_dequantize_row(type, w, wf, n), 0);
    uint64_t rng = 1234 + type;
    for (int trial = 0; trial < 4; trial++) {
        /* trial 3: all-zero activations, where the scale is 0 */
        for (size_t i = 0; i < n; i++) x[i] = trial == 3 ? 0.0f : frand(&rng) * (1 + trial * 10);
        qdot_quantize(act, x, xq, n);
        dequant_act(act, xq, n, xd);
        /* every row length the fixture allows: one block, two, ..., all */
        size_t blk = eng_q_block_elems(type);
        for (size_t m = blk; m <= n; m += blk) {
            double ref = 0, mag = 0;
            for (size_t i = 0; i < m; i++) ref += (double)wf[i] * xd[i], mag += fabs(wf[i] * xd[i]);
            if (type == GGML_Q4_1 || type == GGML_Q5_1) /* the minimum meets s, not d * sum */
                for (size_t k = 0; k < m / 32; k++) {
                    const qdot_a32_t *a = (const qdot_a32_t *)xq + k;
                    float mn;
                    cr_assert_eq(
                        eng_q_dequantize_row(GGML_F16, w + k * eng_q_block_bytes(type) + 2, &mn, 1),
                        0);
                    ref += (double)mn * ((double)a->s - (double)a->d * a->sum);
                }
            float s = qdot_kernel_scalar(type)(w, xq, m);
            double tol = 1e-5 * mag + 1e-30;
            cr_expect_leq(fabs(s - ref), tol, "%s scalar, %zu elements: %.9g vs %.9g", name, m,
                          (double)s, ref);
            for (int lvl = QDOT_AVX2; lvl <= QDOT_AVX512VNNI; lvl++) {
                if (qdot_select(lvl) != 0) continue;
                float v = qdot_kernel(type)(w, xq, m);
                cr_expect_leq(fabs(v - s), tol, "%s %s, %zu elements: %.9g vs scalar %.9g", name,
                              qdot_level_name(), m, (double)v, (double)s);
            }
            qdot_select(QDOT_SCALAR);
        }
    }
    qdot_init(QDOT_AVX512VNNI);
    free(w), free(wf), free(x), free(xd), free(xq);
}

#define QDOT_TEST(NAME)                                                                            \
    Test(qdot, test_##NAME##_kernels_match_dequantized_dot) {                                      \
        check_type(#NAME, GGML_##NAME);                                                            \
    }

/* The multi-token kernels give, for each of up to QDOT_NT tokens, exactly what the single-token
 * kernel gives that token: a token's result never depends on how many share its step. */
static void check_multi(const char *name, uint32_t type) {
    size_t len;
    uint8_t *w = load_fixture(name, &len);
    size_t n = len / eng_q_block_bytes(type) * eng_q_block_elems(type);
    qdot_act_t act = qdot_act(type);
    size_t row = qdot_act_bytes(act, n);
    float *x = malloc(n * sizeof(float));
    uint8_t *xq = malloc(row * QDOT_NT);
    uint64_t rng = 77 + type;
    const void *xs[QDOT_NT];
    for (int t = 0; t < QDOT_NT; t++) {
        for (size_t i = 0; i < n; i++) x[i] = frand(&rng) * (float)(t + 1);
        qdot_quantize(act, x, xq + t * row, n);
        xs[t] = xq + t * row;
    }
    int levels = 0;
    for (int lvl = QDOT_AVX2; lvl <= QDOT_AVX512VNNI; lvl++) {
        if (qdot_select(lvl) != 0) continue;
        qdot_n_fn fn = qdot_kernel_n(type);
        cr_assert(fn, "%s has no multi-token kernel at %s", name, qdot_level_name());
        levels++;
        for (int nt = 1; nt <= QDOT_NT; nt++) {
            float out[QDOT_NT];
            fn(w, xs, nt, n, out);
            for (int t = 0; t < nt; t++) {
                float one = qdot_kernel(type)(w, xs[t], n);
                cr_expect(memcmp(&one, &out[t], sizeof(float)) == 0,
                          "%s %s: token %d of %d: %.9g, alone %.9g", name, qdot_level_name(), t, nt,
                          (double)out[t], (double)one);
            }
        }
    }
    qdot_init(QDOT_AVX512VNNI);
    if (!levels) cr_skip_test("this CPU has no AVX2: only the scalar kernels run here");
    free(w), free(x), free(xq);
}

#define MULTI_TEST(NAME)                                                                           \
    Test(qdot, test_##NAME##_multi_token_kernel_equals_single) {                                   \
        check_multi(#NAME, GGML_##NAME);                                                           \
    }

MULTI_TEST(Q4_0)
MULTI_TEST(Q4_1)
MULTI_TEST(Q5_0)
MULTI_TEST(Q5_1)
MULTI_TEST(Q8_0)
MULTI_TEST(IQ4_NL)
MULTI_TEST(Q4_K)
MULTI_TEST(Q5_K)
MULTI_TEST(Q6_K)
MULTI_TEST(Q2_K)
MULTI_TEST(Q3_K)
MULTI_TEST(IQ4_XS)

QDOT_TEST(Q4_0)
QDOT_TEST(Q4_1)
QDOT_TEST(Q5_0)
QDOT_TEST(Q5_1)
QDOT_TEST(Q8_0)
QDOT_TEST(IQ4_NL)
QDOT_TEST(Q2_K)
QDOT_TEST(Q3_K)
QDOT_TEST(Q4_K)
QDOT_TEST(Q5_K)
QDOT_TEST(Q6_K)
QDOT_TEST(IQ4_XS)

Test(qdot, test_unquantized_types_have_no_integer_kernel) {
    cr_expect_eq(qdot_act(GGML_F32), QDOT_ACT_NONE);
    cr_expect_eq(qdot_act(GGML_F16), QDOT_ACT_NONE);
    cr_expect_eq(qdot_act(GGML_BF16), QDOT_ACT_NONE);
    cr_expect_eq(qdot_act(999), QDOT_ACT_NONE);
    cr_expect_null(qdot_kernel(GGML_BF16));
}

/* The 32-wide activation blocks: |q| <= 127, the largest element maps to +-127, d and s are
 * f16 values, sum is the sum of q, and d * q is within d / 2 of x. */
Test(qdot, test_a32_activation_blocks) {
    float x[64];
    uint64_t rng = 5;
    for (int i = 0; i < 64; i++) x[i] = frand(&rng) * 3;
    x[7] = -4.5f;
    qdot_a32_t b[2];
    qdot_quantize(QDOT_ACT_32, x, b, 64);
    cr_expect_eq(b[0].q[7], -127);
    for (int k = 0; k < 2; k++) {
        int32_t sum = 0;
        for (int i = 0; i < 32; i++) {
            sum += b[k].q[i];
            cr_expect_leq(fabs(b[k].d * b[k].q[i] - x[k * 32 + i]), b[k].d * 0.5 + 1e-3);
        }
        cr_expect_eq(b[k].sum, sum);
        cr_expect_float_eq(b[k].s, b[k].d * (float)sum, fabsf(b[k].s) * 2e-3f + 1e-6f);
    }
}

/* The 256-wide blocks: the element of largest magnitude maps to -127 (sign in d), the block
 * sums are the sums of each 16 codes, and an all-zero block is all zero. */
Test(qdot, test_k_activation_blocks) {
    float x[512];
    uint64_t rng = 6;
    for (int i = 0; i < 256; i++) x[i] = frand(&rng);
    for (int i = 256; i < 512; i++) x[i] = 0;
    x[100] = 2.0f;
    qdot_ak_t b[2];
    qdot_quantize(QDOT_ACT_K, x, b, 512);
    cr_expect_eq(b[0].q[100], -127);
    cr_expect_float_eq(b[0].d, -2.0f / 127.0f, 1e-7f);
    for (int g = 0; g < 16; g++) {
        int s = 0;
        for (int i = 0; i < 16; i++) s += b[0].q[g * 16 + i];
        cr_expect_eq(b[0].bsums[g], s);
        cr_expect_eq(b[1].bsums[g], 0);
    }
    cr_expect_eq(b[1].d, 0.0f);
    for (int i = 0; i < 256; i++) cr_expect_leq(fabs(b[0].d * b[0].q[i] - x[i]), fabs(b[0].d));
}

/* Q4_K, Q6_K and the legacy types repacked eight rows to a group (the CPU backend's layout at the
 * AVX-512 VNNI level): each row unpacks bit for bit to the file's dequantized row, the group kernel
 * gives each row's scalar-kernel dot to float rounding, and a token's results do not depend on how
 * many tokens share the call. */
static void check_x8(uint32_t type) {
    qdot_init(QDOT_AVX512VNNI);
    if (!qdot_kernel_x8(type))
        cr_skip_test("the eight-row kernels need AVX-512 VNNI (this CPU: %s)", qdot_level_name());
    const size_t bb = eng_q_block_bytes(type), be = eng_q_block_elems(type), n = 1024,
                 rb = bb * (n / be);
    uint8_t *rows = malloc(rb * 8), *group = malloc(qdot_x8_group_bytes(type, n));
    float *wf = malloc(sizeof(float) * n), *got = malloc(sizeof(float) * n);
    uint64_t rng = 4242;
    for (int r = 0; r < 8; r++) { /* random blocks: every scale, minimum and code reachable */
        for (size_t i = 0; i < rb; i++) rows[r * rb + i] = (uint8_t)(frand(&rng) * 128 + 128);
        for (size_t b = 0; b < n / be; b++) { /* finite, moderate f16 factors */
            uint8_t *blk = rows + r * rb + b * bb;
            size_t at = type == GGML_Q6_K ? 208 : 0;
            blk[at] = (uint8_t)(frand(&rng) * 100 + 100), blk[at + 1] = 0x1c;
            if (type == GGML_Q4_K || type == GGML_Q4_1 || type == GGML_Q5_1)
                blk[2] = (uint8_t)(frand(&rng) * 100 + 100), blk[3] = 0x18;
        }
    }
    qdot_x8_pack(type, rows, rb, n, group);
    for (int r = 0; r < 8; r++) {
        cr_assert_eq(eng_q_dequantize_row(type, rows + r * rb, wf, n), 0);
        qdot_x8_row(type, group, r, n, got);
        cr_expect(memcmp(wf, got, sizeof(float) * n) == 0, "row %d unpacks to the file's row", r);
    }
    qdot_act_t act = qdot_act(type);
    size_t row = qdot_act_bytes(act, n);
    uint8_t *xq = malloc(row * QDOT_NT);
    float *x = malloc(sizeof(float) * n);
    const void *xs[QDOT_NT];
    for (int t = 0; t < QDOT_NT; t++) {
        for (size_t i = 0; i < n; i++) x[i] = frand(&rng) * (float)(t + 1);
        qdot_quantize(act, x, xq + t * row, n);
        xs[t] = xq + t * row;
    }
    qdot_fn scalar = qdot_kernel_scalar(type);
    float alone[QDOT_NT][QDOT_X8];
    for (int t = 0; t < QDOT_NT; t++) {
        qdot_kernel_x8(type)(group, &xs[t], 1, n, alone[t]);
        for (int r = 0; r < 8; r++) {
            float ref = scalar(rows + r * rb, xs[t], n);
            cr_expect_leq(fabsf(alone[t][r] - ref), 1e-4f * (fabsf(ref) + 1),
                          "token %d row %d: %.9g, scalar %.9g", t, r, (double)alone[t][r],
                          (double)ref);
        }
    }
    for (int nt = 2; nt <= QDOT_NT; nt++) {
        float out[QDOT_NT * QDOT_X8];
        qdot_kernel_x8(type)(group, xs, nt, n, out);
        for (int t = 0; t < nt; t++)
            cr_expect(memcmp(out + 8 * t, alone[t], sizeof(alone[t])) == 0,
                      "token %d of %d equals the token alone", t, nt);
    }
    free(rows), free(group), free(wf), free(got), free(xq), free(x);
}

Test(qdot, test_q4_k_eight_row_groups_match_the_rows) {
    check_x8(GGML_Q4_K);
}

Test(qdot, test_q6_k_eight_row_groups_match_the_rows) {
    check_x8(GGML_Q6_K);
}

Test(qdot, test_legacy_eight_row_groups_match_the_rows) {
    const uint32_t types[] = {GGML_Q4_0, GGML_Q4_1, GGML_Q5_0, GGML_Q5_1, GGML_Q8_0, GGML_IQ4_NL};
    for (size_t k = 0; k < sizeof(types) / sizeof(types[0]); k++) check_x8(types[k]);
}
