/* test_quant.c - engine/quant.c's dequantizers match the gguf package's bit for bit, and the
 * block geometry (and so gguf_row_bytes) is GGUF's.
 *
 * The fixtures in tests/fixtures/quant/ are made by scripts/quant_fixtures.py: <TYPE>.bin
 * holds random valid blocks, <TYPE>.f32 the gguf package's float32 dequantization of them.
 * Paths are relative to the repository root, where the unit tests run. */
#include "../../base/err.h"
#include "../../engine/gguf.h"
#include "../../engine/quant.h"
#include "../../tools/quantize_model.h"
#include "helpers.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FIXTURE_DIR "tests/fixtures/quant/"

/* Dequantize <name>.bin and compare every float's bits with <name>.f32 (so NaNs, should a
 * fixture hold any, must match exactly too, and -0 is not +0). */
static void expect_matches_fixture(const char *name, uint32_t type) {
    char path[128];
    size_t n_raw, n_ref;
    snprintf(path, sizeof(path), FIXTURE_DIR "%s.bin", name);
    uint8_t *raw = test_slurp(path, &n_raw);
    snprintf(path, sizeof(path), FIXTURE_DIR "%s.f32", name);
    uint8_t *ref = test_slurp(path, &n_ref);

    size_t elems = eng_q_block_elems(type), bytes = eng_q_block_bytes(type);
    cr_assert(elems && bytes, "%s: no block geometry", name);
    cr_assert_eq(n_raw % bytes, 0, "%s.bin: %zu bytes is not whole %zu-byte blocks", name, n_raw,
                 bytes);
    size_t n = n_raw / bytes * elems;
    cr_assert_eq(n_ref, n * 4, "%s.f32: %zu bytes, expected %zu", name, n_ref, n * 4);
    cr_assert_eq(gguf_row_bytes(type, n), n_raw);

    float *out = malloc(n * sizeof(float));
    cr_assert(out);
    cr_assert_eq(eng_q_dequantize_row(type, raw, out, n), 0);
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t got, want;
        memcpy(&got, &out[i], 4);
        memcpy(&want, ref + 4 * i, 4); /* the fixture is little-endian, as is every target */
        if (got != want && bad++ < 5) {
            float w;
            memcpy(&w, &want, 4);
            cr_log_error("%s element %zu (block %zu): got %a (0x%08x), gguf %a (0x%08x)", name, i,
                         i / elems, (double)out[i], got, (double)w, want);
        }
    }
    cr_expect_eq(bad, 0, "%s: %zu of %zu elements differ from gguf's", name, bad, n);
    free(out);
    free(ref);
    free(raw);
}

#define FIXTURE_TEST(NAME)                                                                         \
    Test(quant, test_##NAME##_matches_gguf) {                                                      \
        expect_matches_fixture(#NAME, GGML_##NAME);                                                \
    }

FIXTURE_TEST(Q4_0)
FIXTURE_TEST(Q4_1)
FIXTURE_TEST(Q5_0)
FIXTURE_TEST(Q5_1)
FIXTURE_TEST(Q8_0)
FIXTURE_TEST(Q2_K)
FIXTURE_TEST(Q3_K)
FIXTURE_TEST(Q4_K)
FIXTURE_TEST(Q5_K)
FIXTURE_TEST(Q6_K)
FIXTURE_TEST(IQ4_NL)
FIXTURE_TEST(IQ4_XS)

/* Block geometry as GGUF defines it (gguf's GGML_QUANT_SIZES), and rows built from it. */
Test(quant, test_row_bytes_follow_gguf_block_geometry) {
    static const struct {
        uint32_t type;
        size_t elems, bytes;
    } geo[] = {
        {GGML_F32, 1, 4},      {GGML_F16, 1, 2},      {GGML_BF16, 1, 2},
        {GGML_Q4_0, 32, 18},   {GGML_Q4_1, 32, 20},   {GGML_Q5_0, 32, 22},
        {GGML_Q5_1, 32, 24},   {GGML_Q8_0, 32, 34},   {GGML_Q2_K, 256, 84},
        {GGML_Q3_K, 256, 110}, {GGML_Q4_K, 256, 144}, {GGML_Q5_K, 256, 176},
        {GGML_Q6_K, 256, 210}, {GGML_IQ4_NL, 32, 18}, {GGML_IQ4_XS, 256, 136},
    };
    for (size_t i = 0; i < sizeof(geo) / sizeof(geo[0]); i++) {
        const char *name = gguf_type_name(geo[i].type);
        cr_expect_eq(eng_q_block_elems(geo[i].type), geo[i].elems, "%s", name);
        cr_expect_eq(eng_q_block_bytes(geo[i].type), geo[i].bytes, "%s", name);
        cr_expect_eq(gguf_row_bytes(geo[i].type, 4096), 4096 / geo[i].elems * geo[i].bytes, "%s",
                     name);
        cr_expect_eq(gguf_row_bytes(geo[i].type, geo[i].elems), geo[i].bytes, "%s", name);
        if (geo[i].elems > 1) {
            cr_expect_eq(gguf_row_bytes(geo[i].type, geo[i].elems + 1), 0, "%s", name);
            cr_expect_eq(gguf_row_bytes(geo[i].type, geo[i].elems / 2), 0, "%s", name);
        }
    }
    cr_expect_eq(gguf_row_bytes(GGML_Q4_K, 4096), 2304);
    cr_expect_eq(gguf_row_bytes(GGML_Q6_K, 11008), 43 * 210);
    /* Types tidald does not know (Q8_1, IQ2_XXS, MXFP4, out of range) have no geometry. */
    const uint32_t unknown[] = {4, 5, 9, 15, 16, 39, 1000};
    for (size_t i = 0; i < sizeof(unknown) / sizeof(unknown[0]); i++) {
        cr_expect_eq(eng_q_block_elems(unknown[i]), 0, "type %u", unknown[i]);
        cr_expect_eq(eng_q_block_bytes(unknown[i]), 0, "type %u", unknown[i]);
        cr_expect_eq(gguf_row_bytes(unknown[i], 256), 0, "type %u", unknown[i]);
    }
    /* A row whose byte size does not fit in size_t is refused, not wrapped. */
    cr_expect_eq(gguf_row_bytes(GGML_F32, UINT64_MAX / 2), 0);
    cr_expect_eq(gguf_row_bytes(GGML_Q8_0, UINT64_MAX - 31), 0);
}

Test(quant, test_dequantize_row_refuses_bad_arguments) {
    uint8_t block[210] = {0};
    float out[256];
    out[0] = 42.0f;
    cr_expect_eq(eng_q_dequantize_row(GGML_Q4_0, block, out, 31), ENG_EINVAL);
    cr_expect_eq(eng_q_dequantize_row(GGML_Q6_K, block, out, 32), ENG_EINVAL);
    cr_expect_eq(eng_q_dequantize_row(9 /* Q8_1 */, block, out, 32), ENG_EUNSUPPORTED);
    cr_expect_eq(eng_q_dequantize_row(1000, block, out, 32), ENG_EUNSUPPORTED);
    cr_expect_eq(out[0], 42.0f, "a refused call leaves dst untouched");
    cr_expect_eq(eng_q_dequantize_row(GGML_Q6_K, block, out, 0), 0);
}

/* A hand-built block per layout family, so a failure names the maths, not just a fixture. */
Test(quant, test_hand_built_blocks_decode_as_documented) {
    float out[256];
    /* Q4_0: d = 0.5 (0x3800); byte 0 = 0xF0 gives element 0 q=0 -> -4, element 16 q=15 -> 3.5 */
    uint8_t q4[18] = {0x00, 0x38, 0xF0};
    cr_assert_eq(eng_q_dequantize_row(GGML_Q4_0, q4, out, 32), 0);
    cr_expect_eq(out[0], -4.0f);
    cr_expect_eq(out[16], 3.5f);
    cr_expect_eq(out[1], -4.0f); /* nibble 0 -> q - 8 = -8, times 0.5 */
    /* Q8_0: d = 2 (0x4000), q = -3 -> -6 */
    uint8_t q8[34] = {0x00, 0x40, 0xFD};
    cr_assert_eq(eng_q_dequantize_row(GGML_Q8_0, q8, out, 32), 0);
    cr_expect_eq(out[0], -6.0f);
    cr_expect_eq(out[1], 0.0f);
    /* Q5_0: d = 1, qh bit 17 set: element 17 = (0 | 16) - 16 = 0, element 16 = -16 */
    uint8_t q5[22] = {0x00, 0x3C, 0x00, 0x00, 0x02, 0x00};
    cr_assert_eq(eng_q_dequantize_row(GGML_Q5_0, q5, out, 32), 0);
    cr_expect_eq(out[16], -16.0f);
    cr_expect_eq(out[17], 0.0f);
    /* Q6_K: d = 1, every scale 1, ql/qh zero: q = -32 everywhere */
    uint8_t q6[210] = {0};
    memset(q6 + 192, 1, 16);
    q6[208] = 0x00;
    q6[209] = 0x3C;
    cr_assert_eq(eng_q_dequantize_row(GGML_Q6_K, q6, out, 256), 0);
    for (int i = 0; i < 256; i++) cr_expect_eq(out[i], -32.0f, "element %d", i);
}

/* ---- quantizers (engine/quantize.c) ---- */

/* Gaussian-ish values (sum of four uniforms) with a few outliers, as trained weights look. */
static void weights(float *x, size_t n, uint64_t seed) {
    for (size_t i = 0; i < n; i++) {
        float s = 0;
        for (int k = 0; k < 4; k++) s += frand(&seed);
        x[i] = s * 0.02f * (i % 97 == 5 ? 8.0f : 1.0f);
    }
}

/* Every type encodes rows that decode back near the input, within what its bits allow: the
 * relative RMS error of each type on 64 rows of 1,024 values, and blocks of zeros exactly 0. */
Test(quant, test_quantize_round_trips_every_type_within_its_precision) {
    static const struct {
        uint32_t type;
        double max_err;
    } cases[] = {{GGML_F16, 1e-3},  {GGML_BF16, 8e-3}, {GGML_Q8_0, 0.01},   {GGML_Q6_K, 0.03},
                 {GGML_Q5_0, 0.08}, {GGML_Q5_1, 0.06}, {GGML_Q5_K, 0.05},   {GGML_Q4_0, 0.16},
                 {GGML_Q4_1, 0.12}, {GGML_Q4_K, 0.10}, {GGML_IQ4_NL, 0.12}, {GGML_Q3_K, 0.22},
                 {GGML_Q2_K, 0.45}};
    enum { N = 1024, ROWS = 64 };
    static float x[N], y[N];
    static uint8_t q[N * 4];
    for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
        double se = 0, ss = 0;
        for (int r = 0; r < ROWS; r++) {
            weights(x, N, 100 + (uint64_t)r);
            cr_assert_eq(eng_q_quantize_row(cases[c].type, x, q, N), 0, "%s",
                         gguf_type_name(cases[c].type));
            cr_assert_eq(eng_q_dequantize_row(cases[c].type, q, y, N), 0);
            for (int i = 0; i < N; i++)
                se += (double)(y[i] - x[i]) * (y[i] - x[i]), ss += (double)x[i] * x[i];
        }
        double e = sqrt(se / ss);
        cr_expect_lt(e, cases[c].max_err, "%s: relative RMS error %.4f",
                     gguf_type_name(cases[c].type), e);
        memset(x, 0, sizeof(x));
        cr_assert_eq(eng_q_quantize_row(cases[c].type, x, q, N), 0);
        cr_assert_eq(eng_q_dequantize_row(cases[c].type, q, y, N), 0);
        for (int i = 0; i < N; i++)
            cr_expect_eq(y[i], 0.0f, "%s: zeros decode to %g", gguf_type_name(cases[c].type), y[i]);
    }
    cr_expect_eq(eng_q_quantize_row(GGML_Q4_K, x, q, 100), ENG_EINVAL, "partial block");
    cr_expect_eq(eng_q_quantize_row(GGML_IQ4_XS, x, q, 256), ENG_EUNSUPPORTED);
    cr_expect_eq(eng_q_quantize_row(99, x, q, 256), ENG_EUNSUPPORTED);
}

/* The mixtures choose each tensor's type as llama-quantize did for the real files: every
 * tensor of Gemma 3 270M Q4_K_M (Q6_K/Q4_K for ffn_down by layer, Q5_0 and Q8_0 where 640-wide
 * rows do not tile 256-wide blocks, Q8_0 for the tied embeddings) and of SmolLM2 Q4_1. */
static void expect_mixture_of(const char *file, const char *mixture) {
    const char *path = real_model_path(file);
    if (!path) cr_skip_test("%s not fetched (offline?): run `make models`; skipping", file);
    char msg[ENG_ERRMSG_LEN];
    gguf_t *g;
    cr_assert_eq(gguf_open(&g, path, msg), 0, "%s", msg);
    const eng_qmix_t *mix = eng_q_mix(mixture);
    cr_assert(mix);
    size_t n = 0;
    for (size_t i = 0; i < g->n_tensors; i++) {
        const gguf_tensor_t *t = &g->tensors[i];
        eng_qmix_tensor_t d;
        quantize_describe(g, t, &d); /* as tidald quantize describes it */
        /* what the tensor was before quantizing: F32 norms, float weights */
        d.type = t->n_dims < 2 ? GGML_F32 : GGML_F16;
        uint32_t want = t->type, got = eng_q_mix_type(mix, &d);
        cr_expect_eq(got, want, "%s %s: %s, the file has %s", mixture, t->name, gguf_type_name(got),
                     gguf_type_name(want));
        n++;
    }
    uint64_t ft = 0;
    cr_expect_eq(gguf_get_u64(g, "general.file_type", &ft, msg), 0);
    cr_expect_eq(mix->ftype, ft, "%s records file type %u", mixture, mix->ftype);
    fprintf(stderr, "quant: %zu tensors of %s typed as llama-quantize's %s typed them\n", n, file,
            mixture);
    gguf_close(g);
}

Test(quant, test_mixtures_type_tensors_as_llama_quantize_did) {
    expect_mixture_of(GEMMA3_GGUF, "Q4_K_M");
}

Test(quant, test_legacy_mixture_types_tensors_as_llama_quantize_did) {
    expect_mixture_of(SMOLLM2_GGUF, "Q4_1");
}
