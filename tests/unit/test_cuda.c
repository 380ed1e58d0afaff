/* test_cuda.c - the CUDA backend against the CPU backend (and through it the references in
 * ref_ops.c): every kernel on the same inputs, then whole models. Each test skips with the
 * reason when this machine has no usable GPU; scripts/gpu-check.sh runs them on one.
 *
 * Tolerances: projections with F32 weights and every element-wise op agree to 1e-5 relative
 * (summation order only); F16/BF16 weights see their activations rounded to the weight type
 * for cuBLAS, 4e-3 relative; attention outputs 1e-4 absolute, entropy 1e-3 bits and sink mass
 * 1e-4 (online-softmax order differs); selections and greedy tokens must be identical; end to
 * end over a model, the entropy of the last token within 1e-3 bits (1e-2 with an F16 cache).
 */
#include "../../engine/backend.h"
#include "../../engine/engine.h"
#include "../../base/f16.h"
#include "../../engine/gguf.h"
#include "../../engine/quant.h"
#include "../../tools/gguf_writer.h"
#include "helpers.h"
#include "ref_ops.h"

#include <criterion/criterion.h>
#include <dlfcn.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CUDA_LIB "build/libtidald-cuda.so"

/* The library itself: it loads, speaks this engine's ABI, and either starts on a GPU or says
 * why not. Runs wherever the library was built (nvcc present), GPU or not. */
Test(cuda, test_library_loads_and_reports_its_device) {
    const char *lib = getenv("TIDALD_CUDA_LIB") ? getenv("TIDALD_CUDA_LIB") : CUDA_LIB;
    if (access(lib, R_OK) != 0)
        cr_skip_test("%s not built (no nvcc at /usr/local/cuda); skipping", lib);
    void *h = dlopen(lib, RTLD_NOW | RTLD_LOCAL);
    cr_assert_not_null(h, "%s", dlerror());
    eng_cuda_abi_fn abi = (eng_cuda_abi_fn)dlsym(h, ENG_CUDA_ABI_SYMBOL);
    eng_cuda_create_fn create = (eng_cuda_create_fn)dlsym(h, ENG_CUDA_CREATE_SYMBOL);
    cr_assert(abi && create);
    cr_expect_eq(abi(), ENG_CUDA_ABI);
    eng_backend_t *be = NULL;
    char msg[ENG_ERRMSG_LEN] = "";
    int rc = create(&be, 0, msg, sizeof(msg));
    if (rc == 0) {
        cr_expect_str_eq(be->ops->name, "cuda");
        be->ops->destroy(be);
    } else {
        cr_expect_null(be);
        cr_expect_eq(rc, ENG_EUNSUPPORTED);
        cr_expect(strlen(msg) > 10, "a reason is given: '%s'", msg);
    }
}

/* ---- the two backends side by side ------------------------------------------------- */

typedef struct {
    eng_backend_t *cpu, *gpu;
} pair_t;

static void pair_open(pair_t *p) {
    char msg[ENG_ERRMSG_LEN];
    if (eng_backend_open(&p->gpu, ENG_DEVICE_CUDA, 1, msg) != 0)
        cr_skip_test("no CUDA GPU here (%s); the CUDA parity tests need one", msg);
    cr_assert_eq(eng_cpu_backend_create(&p->cpu, 2, msg), 0, "%s", msg);
    cr_assert_eq(p->cpu->ops->reserve(p->cpu, 4096, 16, 64, 4096), 0);
    cr_assert_eq(p->gpu->ops->reserve(p->gpu, 4096, 16, 64, 4096), 0);
}

static void pair_close(pair_t *p) {
    p->cpu->ops->destroy(p->cpu);
    p->gpu->ops->destroy(p->gpu);
}

/* A device copy of n floats. */
static float *dev_f(eng_backend_t *be, const float *src, size_t n) {
    float *d = be->ops->alloc(be, sizeof(float) * n);
    cr_assert_not_null(d);
    if (src) be->ops->upload(be, d, src, sizeof(float) * n);
    return d;
}

static void host_f(eng_backend_t *be, float *dst, const float *d, size_t n) {
    be->ops->download(be, dst, d, sizeof(float) * n);
}

static double rel_err(const float *a, const float *b, size_t n) {
    double m = 0, e = 0;
    for (size_t i = 0; i < n; i++) {
        m = fmax(m, fabs(b[i]));
        e = fmax(e, fabs((double)a[i] - b[i]));
    }
    return e / (m > 1 ? m : 1);
}

static double max_abs(const float *a, const float *b, size_t n) {
    double e = 0;
    for (size_t i = 0; i < n; i++) e = fmax(e, fabs((double)a[i] - b[i]));
    return e;
}

/* Run one step's worth of ops on the GPU: begin_step with the given plan, fn, end_step. */
typedef struct {
    const int32_t *ids;
    const uint32_t *pos;
    uint32_t T;
    const eng_attn_seq_t *seqs;
    uint32_t n_seqs;
    const uint8_t *kinds;
    uint32_t n_layer, n_head;
} plan_t;

static void gpu_begin(eng_backend_t *be, const plan_t *p) {
    char msg[ENG_ERRMSG_LEN];
    /* decode_only false: the ops given run once, as given (no graph recording) */
    eng_step_t st = {p->ids,     p->pos,    p->T,      p->seqs, p->n_seqs, p->kinds,
                     p->n_layer, p->n_head, p->n_head, 0,       false,     0};
    cr_assert_eq(be->ops->begin_step(be, &st, msg), 0, "%s", msg);
}

static void gpu_end(eng_backend_t *be) {
    char msg[ENG_ERRMSG_LEN];
    cr_assert_eq(be->ops->end_step(be, msg), 0, "%s", msg);
}

static void check_matmul(pair_t *p, uint32_t type, uint32_t rows, uint32_t cols, uint32_t T) {
    uint64_t rng = 99 + rows + cols * 3 + T;
    float *wf = malloc(sizeof(float) * rows * cols), *x = malloc(sizeof(float) * T * cols);
    float *yc = malloc(sizeof(float) * T * rows), *yg = malloc(sizeof(float) * T * rows);
    for (size_t i = 0; i < (size_t)rows * cols; i++) wf[i] = frand(&rng);
    for (size_t i = 0; i < (size_t)T * cols; i++) x[i] = frand(&rng);
    size_t rb = gw_type_bytes(type, cols);
    uint8_t *wd = malloc(rb * rows);
    for (uint32_t r = 0; r < rows; r++) gw_convert(type, wf + (size_t)r * cols, cols, wd + r * rb);
    eng_tensor_t w = {type, rows, cols, rb, wd}, wg;
    char msg[ENG_ERRMSG_LEN];
    cr_assert_eq(p->gpu->ops->load_weight(p->gpu, &w, &wg, msg), 0, "%s", msg);
    p->cpu->ops->matmul(p->cpu, &w, x, yc, T);
    float *dx = dev_f(p->gpu, x, (size_t)T * cols), *dy = dev_f(p->gpu, NULL, (size_t)T * rows);
    plan_t pl = {NULL, NULL, 0, NULL, 0, NULL, 1, 1};
    gpu_begin(p->gpu, &pl);
    p->gpu->ops->matmul(p->gpu, &wg, dx, dy, T);
    gpu_end(p->gpu);
    host_f(p->gpu, yg, dy, (size_t)T * rows);
    double e = rel_err(yg, yc, (size_t)T * rows), tol = type == GGML_F32 ? 1e-5 : 4e-3;
    cr_expect_lt(e, tol, "matmul %s %ux%u T=%u: rel err %g", gguf_type_name(type), rows, cols, T,
                 e);
    p->gpu->ops->free_weight(p->gpu, &wg);
    p->gpu->ops->release(p->gpu, dx);
    p->gpu->ops->release(p->gpu, dy);
    free(wf), free(x), free(yc), free(yg), free(wd);
}

Test(cuda, test_matmul_matches_cpu_for_every_type_and_batch) {
    pair_t p;
    pair_open(&p);
    const uint32_t types[] = {GGML_F32, GGML_F16, GGML_BF16};
    const uint32_t shapes[][2] = {{64, 64}, {172, 64}, {288, 768}, {1000, 256}};
    const uint32_t Ts[] = {1, 3, 8, 33};
    for (size_t a = 0; a < 3; a++)
        for (size_t s = 0; s < 4; s++)
            for (size_t t = 0; t < 4; t++)
                check_matmul(&p, types[a], shapes[s][0], shapes[s][1], Ts[t]);
    pair_close(&p);
}

/* ---- quantized weights ---- */

static const uint32_t q_types[] = {GGML_Q4_0, GGML_Q4_1, GGML_Q5_0,   GGML_Q5_1,
                                   GGML_Q8_0, GGML_Q2_K, GGML_Q3_K,   GGML_Q4_K,
                                   GGML_Q5_K, GGML_Q6_K, GGML_IQ4_NL, GGML_IQ4_XS};
#define N_QTYPES (sizeof(q_types) / sizeof(q_types[0]))

/* rows x cols of the type from random weights (IQ4_XS, which has no quantizer here: random
 * blocks with a sane scale) */
static uint8_t *q_weight(uint32_t type, uint32_t rows, uint32_t cols, uint64_t seed, size_t *rb) {
    *rb = eng_q_block_bytes(type) * (cols / eng_q_block_elems(type));
    uint8_t *wd = malloc(*rb * rows);
    float *wf = malloc(sizeof(float) * cols);
    uint64_t rng = seed;
    for (uint32_t r = 0; r < rows; r++) {
        uint8_t *row = wd + (size_t)r * *rb;
        if (type == GGML_IQ4_XS) {
            for (size_t i = 0; i < *rb; i++) row[i] = (uint8_t)(frand(&rng) * 128 + 128);
            for (size_t b = 0; b < *rb; b += eng_q_block_bytes(type)) {
                uint16_t d = eng_f32_to_f16(0.002f * (1.5f + frand(&rng)));
                memcpy(row + b, &d, 2);
            }
            continue;
        }
        for (uint32_t i = 0; i < cols; i++) wf[i] = frand(&rng);
        cr_assert_eq(eng_q_quantize_row(type, wf, row, cols), 0);
    }
    free(wf);
    return wd;
}

/* The GEMV's arithmetic on the host in double: each token's activations in 8 bits per 32 as
 * cu_quantize_q8 rounds them, times the dequantized weight. */
static void ref_matmul_q8(const eng_tensor_t *w, const float *x, float *y, uint32_t T) {
    float *row = malloc(sizeof(float) * w->cols), *xq = malloc(sizeof(float) * w->cols);
    float *xd = malloc(sizeof(float) * w->cols / 32);
    for (uint32_t t = 0; t < T; t++) {
        const float *xt = x + (size_t)t * w->cols;
        for (uint32_t b = 0; b < w->cols / 32; b++) {
            float amax = 0;
            for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(xt[32 * b + i]));
            float d = amax / 127.0f, id = d > 0 ? 1.0f / d : 0.0f;
            xd[b] = d;
            for (int i = 0; i < 32; i++) xq[32 * b + i] = nearbyintf(xt[32 * b + i] * id);
        }
        for (uint32_t r = 0; r < w->rows; r++) {
            eng_q_dequantize_row(w->type, (const uint8_t *)w->data + (size_t)r * w->row_bytes, row,
                                 w->cols);
            double acc = 0;
            for (uint32_t b = 0; b < w->cols / 32; b++) {
                double s = 0;
                for (int i = 0; i < 32; i++) s += (double)row[32 * b + i] * xq[32 * b + i];
                acc += s * xd[b];
            }
            y[(size_t)t * w->rows + r] = (float)acc;
        }
    }
    free(row), free(xq), free(xd);
}

/* The prefill path on the host in double: the dequantized weight and the activations each
 * rounded to F16. */
static void ref_matmul_f16(const eng_tensor_t *w, const float *x, float *y, uint32_t T) {
    float *row = malloc(sizeof(float) * w->cols);
    for (uint32_t r = 0; r < w->rows; r++) {
        eng_q_dequantize_row(w->type, (const uint8_t *)w->data + (size_t)r * w->row_bytes, row,
                             w->cols);
        for (uint32_t i = 0; i < w->cols; i++) row[i] = eng_f16_to_f32(eng_f32_to_f16(row[i]));
        for (uint32_t t = 0; t < T; t++) {
            double acc = 0;
            for (uint32_t i = 0; i < w->cols; i++)
                acc += (double)row[i] * eng_f16_to_f32(eng_f32_to_f16(x[(size_t)t * w->cols + i]));
            y[(size_t)t * w->rows + r] = (float)acc;
        }
    }
    free(row);
}

/* One quantized projection on the GPU: up to 32 tokens the GEMV, against its arithmetic on
 * the host (summation order only); past that the F16 tiles, against theirs; and either way
 * against the CPU backend, whose own 8-bit activations (per 256 for the K-quants) put it
 * within about a percent. */
static void check_qmatmul(pair_t *p, uint32_t type, uint32_t rows, uint32_t cols, uint32_t T) {
    uint64_t rng = 7 + rows + cols * 3 + T * 5 + type * 11;
    size_t rb;
    uint8_t *wd = q_weight(type, rows, cols, rng, &rb);
    float *x = malloc(sizeof(float) * T * cols), *yr = malloc(sizeof(float) * T * rows);
    float *yc = malloc(sizeof(float) * T * rows), *yg = malloc(sizeof(float) * T * rows);
    for (size_t i = 0; i < (size_t)T * cols; i++) x[i] = frand(&rng);
    eng_tensor_t w = {type, rows, cols, rb, wd}, wg;
    char msg[ENG_ERRMSG_LEN];
    cr_assert_eq(p->gpu->ops->load_weight(p->gpu, &w, &wg, msg), 0, "%s", msg);
    if (T <= 32)
        ref_matmul_q8(&w, x, yr, T);
    else
        ref_matmul_f16(&w, x, yr, T);
    p->cpu->ops->matmul(p->cpu, &w, x, yc, T);
    float *dx = dev_f(p->gpu, x, (size_t)T * cols), *dy = dev_f(p->gpu, NULL, (size_t)T * rows);
    static const int32_t ids[64];
    static const uint32_t pos[64];
    plan_t pl = {ids, pos, T, NULL, 0, NULL, 1, 1}; /* sized for T tokens */
    gpu_begin(p->gpu, &pl);
    p->gpu->ops->matmul(p->gpu, &wg, dx, dy, T);
    gpu_end(p->gpu);
    host_f(p->gpu, yg, dy, (size_t)T * rows);
    double e = rel_err(yg, yr, (size_t)T * rows), ec = rel_err(yg, yc, (size_t)T * rows);
    cr_expect_lt(e, 1e-5, "matmul %s %ux%u T=%u: rel err %g against the %s reference",
                 gguf_type_name(type), rows, cols, T, e, T <= 32 ? "8-bit" : "F16");
    cr_expect_lt(ec, 1.5e-2, "matmul %s %ux%u T=%u: rel err %g against the CPU",
                 gguf_type_name(type), rows, cols, T, ec);
    p->gpu->ops->free_weight(p->gpu, &wg);
    p->gpu->ops->release(p->gpu, dx);
    p->gpu->ops->release(p->gpu, dy);
    free(x), free(yr), free(yc), free(yg), free(wd);
}

Test(cuda, test_quantized_matmul_matches_references_for_every_type_and_batch) {
    pair_t p;
    pair_open(&p);
    /* rows not a multiple of the 4 rows of a GEMV block; 32-wide types also on 64 columns */
    const uint32_t shapes[][2] = {{64, 64}, {172, 64}, {290, 768}, {1000, 256}};
    const uint32_t Ts[] = {1, 3, 8, 12, 32, 33};
    for (size_t a = 0; a < N_QTYPES; a++)
        for (size_t s = 0; s < 4; s++) {
            if (shapes[s][1] % eng_q_block_elems(q_types[a])) continue;
            for (size_t t = 0; t < 6; t++)
                check_qmatmul(&p, q_types[a], shapes[s][0], shapes[s][1], Ts[t]);
        }
    pair_close(&p);
}

/* Quantized weights go to the device as they are (no F16 copy), their rows come back exactly
 * as engine/quant.c dequantizes them, and a type without kernels is refused by name. */
Test(cuda, test_quantized_weights_stay_quantized_and_rows_are_exact) {
    pair_t p;
    pair_open(&p);
    enum { R = 9, C = 512, T = 6 };
    int32_t ids[T] = {0, 8, 3, 3, 5, 1};
    uint32_t pos[T] = {0};
    plan_t pl = {ids, pos, T, NULL, 0, NULL, 1, 1};
    float *dy = dev_f(p.gpu, NULL, T * C), *yg = malloc(sizeof(float) * T * C);
    float *want = malloc(sizeof(float) * C);
    char msg[ENG_ERRMSG_LEN];
    for (size_t a = 0; a < N_QTYPES; a++) {
        size_t rb;
        uint8_t *wd = q_weight(q_types[a], R, C, 31 + a, &rb), *back = malloc(rb * R);
        eng_tensor_t w = {q_types[a], R, C, rb, wd}, wg;
        cr_assert_eq(p.gpu->ops->load_weight(p.gpu, &w, &wg, msg), 0, "%s", msg);
        const char *name = gguf_type_name(q_types[a]);
        cr_expect_eq(wg.type, q_types[a], "%s stays %s on the device", name, name);
        cr_expect_eq(wg.row_bytes, rb, "%s: %zu bytes a row on the device", name, wg.row_bytes);
        p.gpu->ops->download(p.gpu, back, wg.data, rb * R);
        cr_expect_eq(memcmp(back, wd, rb * R), 0, "%s: the device holds the file's blocks", name);
        gpu_begin(p.gpu, &pl);
        p.gpu->ops->get_rows(p.gpu, &wg, ids, T, dy);
        gpu_end(p.gpu);
        host_f(p.gpu, yg, dy, T * C);
        for (int t = 0; t < T; t++) {
            eng_q_dequantize_row(q_types[a], wd + (size_t)ids[t] * rb, want, C);
            cr_expect_eq(memcmp(yg + (size_t)t * C, want, sizeof(float) * C), 0,
                         "%s: row %d bit-exact with eng_q_dequantize_row", name, ids[t]);
        }
        p.gpu->ops->free_weight(p.gpu, &wg);
        free(wd), free(back);
    }
    uint8_t junk[64] = {0};
    eng_tensor_t bad = {16 /* IQ2_XXS */, 1, 256, 66, junk}, bg;
    cr_expect_eq(p.gpu->ops->load_weight(p.gpu, &bad, &bg, msg), ENG_EUNSUPPORTED);
    cr_expect(strstr(msg, "type 16"), "the type is named: %s", msg);
    p.gpu->ops->release(p.gpu, dy);
    free(yg), free(want);
    pair_close(&p);
}

Test(cuda, test_row_ops_match_cpu) {
    pair_t p;
    pair_open(&p);
    enum { T = 7, N = 288, H = 6, HD = 48 };
    uint64_t r = 5;
    float x[T * N], w[N], u[T * N], yc[T * N], yg[T * N], ff[HD / 2];
    for (int i = 0; i < T * N; i++) x[i] = frand(&r) * 3, u[i] = frand(&r);
    for (int i = 0; i < N; i++) w[i] = frand(&r);
    for (int i = 0; i < HD / 2; i++) ff[i] = 1.0f + (float)i / 8;
    int32_t ids[T] = {0, 5, 3, 7, 1, 1, 6};
    uint32_t pos[T] = {0, 1, 2, 100, 1000, 4095, 17};
    plan_t pl = {ids, pos, T, NULL, 0, NULL, 1, 1};
    float *dx = dev_f(p.gpu, x, T * N), *dw = dev_f(p.gpu, w, N), *du = dev_f(p.gpu, u, T * N);
    float *dy = dev_f(p.gpu, NULL, T * N), *dff = dev_f(p.gpu, ff, HD / 2);
    /* rmsnorm */
    p.cpu->ops->rmsnorm(p.cpu, x, w, yc, T, N, 1e-5f);
    gpu_begin(p.gpu, &pl);
    p.gpu->ops->rmsnorm(p.gpu, dx, dw, dy, T, N, 1e-5f);
    gpu_end(p.gpu);
    host_f(p.gpu, yg, dy, T * N);
    cr_expect_lt(rel_err(yg, yc, T * N), 1e-5, "rmsnorm");
    /* rope, with and without frequency factors, full and partial rotation, NORM and NEOX,
     * with linear scaling */
    for (int variant = 0; variant < 6; variant++) {
        uint32_t n_rot = variant == 2 || variant == 4 ? HD / 2 : HD;
        bool neox = variant >= 3;
        float fs = variant == 5 ? 0.25f : 1.0f;
        eng_rope_t rh = {n_rot, neox ? 1e6f : 10000.0f, fs, neox, variant == 1 ? ff : NULL};
        eng_rope_t rd = rh;
        rd.freq_factors = variant == 1 ? dff : NULL;
        memcpy(yc, x, sizeof(x));
        p.cpu->ops->rope(p.cpu, yc, pos, T, H, HD, &rh);
        p.gpu->ops->upload(p.gpu, dy, x, sizeof(x));
        gpu_begin(p.gpu, &pl);
        p.gpu->ops->rope(p.gpu, dy, pos, T, H, HD, &rd);
        gpu_end(p.gpu);
        host_f(p.gpu, yg, dy, T * N);
        cr_expect_lt(rel_err(yg, yc, T * N), 2e-5, "rope variant %d: %g", variant,
                     rel_err(yg, yc, T * N));
    }
    /* swiglu and add */
    memcpy(yc, x, sizeof(x));
    p.cpu->ops->swiglu(p.cpu, yc, u, T * N);
    p.cpu->ops->add(p.cpu, yc, u, T * N);
    p.gpu->ops->upload(p.gpu, dy, x, sizeof(x));
    gpu_begin(p.gpu, &pl);
    p.gpu->ops->swiglu(p.gpu, dy, du, T * N);
    p.gpu->ops->add(p.gpu, dy, du, T * N);
    gpu_end(p.gpu);
    host_f(p.gpu, yg, dy, T * N);
    cr_expect_lt(rel_err(yg, yc, T * N), 1e-5, "swiglu + add");
    /* geglu (F16-rounded GELU) and scale */
    for (int i = 0; i < T * N; i++) yc[i] = x[i] * 4;
    p.gpu->ops->upload(p.gpu, dy, yc, sizeof(x));
    p.cpu->ops->geglu(p.cpu, yc, u, T * N);
    p.cpu->ops->scale(p.cpu, yc, 25.3f, T * N);
    p.cpu->ops->add_bias(p.cpu, yc, w, T, N);
    gpu_begin(p.gpu, &pl);
    p.gpu->ops->geglu(p.gpu, dy, du, T * N);
    p.gpu->ops->scale(p.gpu, dy, 25.3f, T * N);
    p.gpu->ops->add_bias(p.gpu, dy, dw, T, N);
    gpu_end(p.gpu);
    host_f(p.gpu, yg, dy, T * N);
    cr_expect_lt(rel_err(yg, yc, T * N), 1e-6, "geglu + scale + add_bias");
    /* embedding rows from each weight type */
    const uint32_t types[] = {GGML_F32, GGML_F16, GGML_BF16, GGML_Q8_0};
    for (int a = 0; a < 4; a++) {
        float emb[8 * 64];
        for (int i = 0; i < 8 * 64; i++) emb[i] = frand(&r);
        size_t rb = gw_type_bytes(types[a], 64);
        uint8_t wd[8 * 64 * 4];
        for (int row = 0; row < 8; row++) gw_convert(types[a], emb + row * 64, 64, wd + row * rb);
        eng_tensor_t wt = {types[a], 8, 64, rb, wd}, wg;
        char msg[ENG_ERRMSG_LEN];
        cr_assert_eq(p.gpu->ops->load_weight(p.gpu, &wt, &wg, msg), 0, "%s", msg);
        p.cpu->ops->get_rows(p.cpu, &wt, ids, T, yc);
        gpu_begin(p.gpu, &pl);
        p.gpu->ops->get_rows(p.gpu, &wg, ids, T, dy);
        gpu_end(p.gpu);
        host_f(p.gpu, yg, dy, T * 64);
        cr_expect_eq(max_abs(yg, yc, T * 64), 0, "get_rows %s", gguf_type_name(types[a]));
        p.gpu->ops->free_weight(p.gpu, &wg);
    }
    float *bufs[] = {dx, dw, du, dy, dff};
    for (int i = 0; i < 5; i++) p.gpu->ops->release(p.gpu, bufs[i]);
    pair_close(&p);
}

/* ---- attention on twin caches ------------------------------------------------------ */

enum { NS = 3, LAYERS = 2, BS = 16 };

typedef struct {
    pair_t be;
    bool f16;
    uint32_t nh, nkv, hd, kvd;
    kv_pool_t hp, dp; /* the CPU's pool and the GPU's, same layout and block ids */
    void *ddata;
    kv_seq_t hs[NS], ds[NS];
    eng_attn_shape_t sh;
} twin_t;

static void twin_open_window(twin_t *t, uint32_t nh, uint32_t nkv, uint32_t hd, bool f16,
                             const uint32_t *len, uint32_t window) {
    pair_open(&t->be);
    t->f16 = f16;
    t->nh = nh, t->nkv = nkv, t->hd = hd, t->kvd = nkv * hd;
    t->sh = (eng_attn_shape_t){nh, nkv, hd, 1.0f / sqrtf((float)hd), window};
    char msg[ENG_ERRMSG_LEN];
    uint32_t nb = 0;
    for (int i = 0; i < NS; i++) nb += (len[i] + BS - 1) / BS + 1;
    cr_assert_eq(kv_pool_init_typed(&t->hp, LAYERS, t->kvd, BS, nb, f16, msg), 0, "%s", msg);
    size_t bytes = kv_pool_bytes(LAYERS, t->kvd, BS, nb, f16);
    t->ddata = t->be.gpu->ops->alloc(t->be.gpu, bytes);
    cr_assert_not_null(t->ddata);
    cr_assert_eq(kv_pool_init_over(&t->dp, LAYERS, t->kvd, BS, nb, f16, t->ddata, msg), 0);
    uint64_t r = 77;
    if (f16) {
        uint16_t *h = t->hp.data;
        for (size_t i = 0; i < bytes / 2; i++) h[i] = eng_f32_to_f16(frand(&r) * 2);
    } else {
        float *h = t->hp.data;
        for (size_t i = 0; i < bytes / 4; i++) h[i] = frand(&r) * 2;
    }
    t->be.gpu->ops->upload(t->be.gpu, t->ddata, t->hp.data, bytes);
    for (int i = 0; i < NS; i++) {
        kv_seq_init(&t->hs[i], &t->hp);
        kv_seq_init(&t->ds[i], &t->dp);
        cr_assert_eq(kv_seq_reserve(&t->hs[i], len[i]), 0);
        cr_assert_eq(kv_seq_reserve(&t->ds[i], len[i]), 0);
        cr_assert_eq(memcmp(t->hs[i].blocks, t->ds[i].blocks, 4 * t->hs[i].n_blocks), 0);
        t->hs[i].n_tokens = t->ds[i].n_tokens = len[i];
    }
}

static void twin_open(twin_t *t, uint32_t nh, uint32_t nkv, uint32_t hd, bool f16,
                      const uint32_t *len) {
    twin_open_window(t, nh, nkv, hd, f16, len, 0);
}

static void twin_close(twin_t *t) {
    for (int i = 0; i < NS; i++) kv_seq_close(&t->hs[i]), kv_seq_close(&t->ds[i]);
    kv_pool_close(&t->hp);
    kv_pool_close(&t->dp);
    t->be.gpu->ops->release(t->be.gpu, t->ddata);
    pair_close(&t->be);
}

/* Per side: the slices, their selection buffers and telemetry. */
typedef struct {
    eng_attn_seq_t a[NS];
    uint32_t *sel, *n_sel; /* backend memory */
    float ent[NS][64], sink[NS][64];
    uint32_t natt[NS][64];
} side_t;

static void side_init(side_t *s, eng_backend_t *be, const kv_seq_t *seqs, const uint32_t *n_q,
                      uint32_t nh, uint32_t budget, bool force, bool group) {
    memset(s, 0, sizeof(*s));
    size_t nsel = (size_t)NS * nh * (budget ? budget : 1);
    s->sel = be->ops->alloc(be, 4 * nsel);
    s->n_sel = be->ops->alloc(be, 4 * NS * nh);
    uint32_t q = 0;
    for (int i = 0; i < NS; i++) {
        uint32_t n = seqs[i].n_tokens;
        s->a[i] = (eng_attn_seq_t){.seq = &seqs[i],
                                   .q_start = q,
                                   .n_q = n_q[i],
                                   .pos0 = n - n_q[i],
                                   .budget = budget,
                                   .force_sinks = force,
                                   .per_group = group,
                                   .n_sinks = 4,
                                   .sel = budget ? s->sel + (size_t)i * nh * budget : NULL,
                                   .n_sel = budget ? s->n_sel + (size_t)i * nh : NULL,
                                   .entropy = s->ent[i],
                                   .sink_mass = s->sink[i],
                                   .n_att = s->natt[i]};
        q += n_q[i];
    }
}

/* Attention over the twins for a sequence of layers with the given kinds; compares outputs,
 * telemetry and selections after each layer. */
static void check_attention(twin_t *t, const uint32_t *n_q, const uint8_t *kinds, uint32_t budget,
                            bool force, bool group) {
    uint32_t T = 0;
    for (int i = 0; i < NS; i++) T += n_q[i];
    size_t qn = (size_t)T * t->nh * t->hd;
    float *q = malloc(sizeof(float) * qn), *oc = malloc(sizeof(float) * qn),
          *og = malloc(sizeof(float) * qn);
    uint64_t r = 11;
    for (size_t i = 0; i < qn; i++) q[i] = frand(&r) * 2;
    float *dq = dev_f(t->be.gpu, q, qn), *dout = dev_f(t->be.gpu, NULL, qn);
    side_t c, g;
    side_init(&c, t->be.cpu, t->hs, n_q, t->nh, budget, force, group);
    side_init(&g, t->be.gpu, t->ds, n_q, t->nh, budget, force, group);
    uint32_t *pos = calloc(T, 4);
    int32_t *ids = calloc(T, 4);
    plan_t pl = {ids, pos, T, g.a, NS, kinds, LAYERS, t->nh};
    gpu_begin(t->be.gpu, &pl);
    for (uint32_t l = 0; l < LAYERS; l++) {
        for (int i = 0; i < NS; i++) c.a[i].kind = g.a[i].kind = (eng_att_kind_t)kinds[l * NS + i];
        t->be.cpu->ops->attention(t->be.cpu, &t->sh, l, q, c.a, NS, oc);
        t->be.gpu->ops->attention(t->be.gpu, &t->sh, l, dq, g.a, NS, dout);
        host_f(t->be.gpu, og, dout, qn);
        double e = max_abs(og, oc, qn);
        cr_expect_lt(e, 1e-4, "layer %u: attention output differs by %g", l, e);
        if (budget) { /* selections of this layer, as sets in ascending order */
            size_t nsel = (size_t)NS * t->nh * budget;
            uint32_t *gs = malloc(4 * nsel), gn[NS * 64];
            t->be.gpu->ops->download(t->be.gpu, gs, g.sel, 4 * nsel);
            t->be.gpu->ops->download(t->be.gpu, gn, g.n_sel, 4 * NS * t->nh);
            for (int i = 0; i < NS; i++) {
                if (kinds[l * NS + i] != ENG_ATT_SELECT || n_q[i] != 1) continue;
                for (uint32_t h = 0; h < t->nh; h++) {
                    uint32_t m = c.n_sel[i * t->nh + h];
                    cr_assert_eq(gn[i * t->nh + h], m, "slice %d head %u: %u vs %u selected", i, h,
                                 gn[i * t->nh + h], m);
                    const uint32_t *a = c.sel + ((size_t)i * t->nh + h) * budget,
                                   *b = gs + ((size_t)i * t->nh + h) * budget;
                    cr_expect_eq(memcmp(a, b, 4 * m), 0, "slice %d head %u: selections differ", i,
                                 h);
                }
            }
            free(gs);
        }
    }
    gpu_end(t->be.gpu); /* telemetry of the last layer is in the host slots now */
    for (int i = 0; i < NS; i++) {
        if (n_q[i] != 1) continue;
        for (uint32_t h = 0; h < t->nh; h++) {
            cr_expect_lt(fabs(g.ent[i][h] - c.ent[i][h]), 1e-3, "entropy %d/%u: %g vs %g", i, h,
                         g.ent[i][h], c.ent[i][h]);
            cr_expect_lt(fabs(g.sink[i][h] - c.sink[i][h]), 1e-4, "sink mass %d/%u", i, h);
            cr_expect_eq(g.natt[i][h], c.natt[i][h], "keys attended %d/%u", i, h);
        }
    }
    t->be.cpu->ops->release(t->be.cpu, c.sel);
    t->be.cpu->ops->release(t->be.cpu, c.n_sel);
    t->be.gpu->ops->release(t->be.gpu, g.sel);
    t->be.gpu->ops->release(t->be.gpu, g.n_sel);
    t->be.gpu->ops->release(t->be.gpu, dq);
    t->be.gpu->ops->release(t->be.gpu, dout);
    free(q), free(oc), free(og), free(pos), free(ids);
}

Test(cuda, test_dense_decode_and_prefill_attention_match_cpu) {
    const uint32_t len[NS] = {1, 300, 1500}, dec[NS] = {1, 1, 1}, pre[NS] = {1, 37, 90};
    const uint8_t dense[LAYERS * NS] = {0};
    const uint32_t hds[] = {16, 64, 128};
    for (int f16 = 0; f16 < 2; f16++)
        for (int k = 0; k < 3; k++) {
            twin_t t;
            twin_open(&t, 8, 2, hds[k], f16, len);
            check_attention(&t, dec, dense, 0, false, false);
            check_attention(&t, pre, dense, 0, false, false);
            twin_close(&t);
        }
}

/* Sliding-window layers (Gemma 3's local layers): windows inside one split, across splits and
 * prefill tiles, and wider than the sequences; head size 256 as Gemma's. */
Test(cuda, test_sliding_window_attention_matches_cpu) {
    const uint32_t len[NS] = {1, 300, 1500}, dec[NS] = {1, 1, 1}, pre[NS] = {1, 37, 90};
    const uint8_t dense[LAYERS * NS] = {0};
    const uint32_t windows[] = {5, 33, 512, 4096};
    for (int k = 0; k < 4; k++) {
        twin_t t;
        twin_open_window(&t, 4, 1, k == 2 ? 256 : 64, k & 1, len, windows[k]);
        check_attention(&t, dec, dense, 0, false, false);
        check_attention(&t, pre, dense, 0, false, false);
        twin_close(&t);
    }
}

Test(cuda, test_tidal_selection_and_sparse_attention_match_cpu) {
    const uint32_t len[NS] = {20, 300, 2100}, dec[NS] = {1, 1, 1};
    /* layer 0 selects, layer 1 attends sparsely over that selection */
    const uint8_t plan[LAYERS * NS] = {ENG_ATT_SELECT, ENG_ATT_SELECT, ENG_ATT_SELECT,
                                       ENG_ATT_SPARSE, ENG_ATT_SPARSE, ENG_ATT_SPARSE};
    for (int f16 = 0; f16 < 2; f16++)
        for (int variant = 0; variant < 4; variant++) {
            twin_t t;
            twin_open(&t, 8, 2, 64, f16, len);
            check_attention(&t, dec, plan, variant == 3 ? 256 : 32, variant == 1, variant == 2);
            twin_close(&t);
        }
}

Test(cuda, test_kv_store_and_k_shift_match_cpu) {
    const uint32_t len[NS] = {40, 100, 64};
    for (int f16 = 0; f16 < 2; f16++) {
        twin_t t;
        twin_open(&t, 4, 2, 64, f16, len);
        /* store 5 new rows for each slice at its last positions */
        const uint32_t n_q[NS] = {5, 5, 5};
        side_t c, g;
        side_init(&c, t.be.cpu, t.hs, n_q, t.nh, 0, false, false);
        side_init(&g, t.be.gpu, t.ds, n_q, t.nh, 0, false, false);
        enum { T = 15 };
        float k[T * 128], v[T * 128];
        uint64_t r = 3;
        for (int i = 0; i < T * 128; i++) k[i] = frand(&r), v[i] = frand(&r);
        float *dk = dev_f(t.be.gpu, k, T * t.kvd), *dv = dev_f(t.be.gpu, v, T * t.kvd);
        uint32_t pos[T];
        int32_t ids[T] = {0};
        for (int i = 0, x = 0; i < NS; i++)
            for (uint32_t j = 0; j < 5; j++) pos[x++] = c.a[i].pos0 + j;
        uint8_t kinds[LAYERS * NS] = {0};
        plan_t pl = {ids, pos, T, g.a, NS, kinds, LAYERS, t.nh};
        t.be.cpu->ops->kv_store(t.be.cpu, 1, c.a, NS, k, v);
        gpu_begin(t.be.gpu, &pl);
        t.be.gpu->ops->kv_store(t.be.gpu, 1, g.a, NS, dk, dv);
        gpu_end(t.be.gpu);
        /* K-shift the middle of slice 1 back by 32 positions: layer 0 in NORM mode, layer 1
         * in NEOX mode with another base (Gemma 3's local and global layers) */
        const eng_rope_t rope[LAYERS] = {{64, 10000.0f, 1.0f, false, NULL},
                                         {64, 1e6f, 1.0f, true, NULL}};
        t.be.cpu->ops->k_shift(t.be.cpu, &t.hs[1], 16, 100, 32, 2, 64, rope);
        t.be.gpu->ops->k_shift(t.be.gpu, &t.ds[1], 16, 100, 32, 2, 64, rope);
        size_t bytes = kv_pool_bytes(LAYERS, t.kvd, BS, t.hp.n_blocks, f16);
        uint8_t *back = malloc(bytes);
        t.be.gpu->ops->download(t.be.gpu, back, t.ddata, bytes);
        size_t n = bytes / t.hp.elem;
        double e = 0;
        for (size_t i = 0; i < n; i++) {
            float a = f16 ? eng_f16_to_f32(((uint16_t *)back)[i]) : ((float *)back)[i];
            float b = f16 ? eng_f16_to_f32(((uint16_t *)t.hp.data)[i]) : ((float *)t.hp.data)[i];
            e = fmax(e, fabs((double)a - b));
        }
        cr_expect_lt(e, f16 ? 2e-3 : 1e-5, "pools differ by %g after kv_store and K-shift", e);
        free(back);
        t.be.gpu->ops->release(t.be.gpu, dk);
        t.be.gpu->ops->release(t.be.gpu, dv);
        t.be.gpu->ops->release(t.be.gpu, g.sel);
        t.be.gpu->ops->release(t.be.gpu, g.n_sel);
        t.be.cpu->ops->release(t.be.cpu, c.sel);
        t.be.cpu->ops->release(t.be.cpu, c.n_sel);
        twin_close(&t);
    }
}

/* ---- whole models ------------------------------------------------------------------ */

typedef struct {
    eng_device_t dev;
    bool kv_f16;
    uint32_t window; /* evict past it (0: never) */
    const eng_attn_params_t *attn;
    bool argmax; /* decode with argmax items (the greedy id computed by the backend) */
} run_cfg_t;

/* A context for the model-level runs: one device, a 64 MiB KV pool. */
static eng_ctx_t *model_ctx(eng_model_t *m, eng_device_t dev, uint32_t max_seqs, uint32_t n_ctx,
                            bool kv_f16) {
    char msg[ENG_ERRMSG_LEN];
    eng_ctx_params_t p;
    eng_ctx_params_default(&p);
    p.device = dev;
    p.max_seqs = max_seqs;
    p.n_ctx = n_ctx;
    p.kv_f16 = kv_f16;
    p.kv_mem_bytes = 64u << 20;
    eng_ctx_t *c;
    cr_assert_eq(eng_ctx_create(&c, m, &p, msg), 0, "%s", msg);
    return c;
}

/* Greedy ids for n tokens after BOS + "Once upon a time", and the entropy of every layer and
 * head of the last token. */
static void greedy_run(eng_model_t *m, const run_cfg_t *rc, uint32_t n, int32_t *out,
                       float *last_entropy) {
    char msg[ENG_ERRMSG_LEN];
    const eng_hparams_t *hp = eng_model_hparams(m);
    eng_ctx_t *c = model_ctx(m, rc->dev, 1, 512, rc->kv_f16);
    kv_seq_t s;
    kv_seq_init(&s, eng_ctx_kv_pool(c));
    float *logits = malloc(sizeof(float) * hp->n_vocab);
    size_t LH = (size_t)hp->n_layer * hp->n_head;
    float *tb = calloc(3 * LH + hp->n_layer, sizeof(float));
    eng_attn_tele_t tele = {tb, tb + LH, (uint32_t *)(tb + 2 * LH), (uint8_t *)(tb + 3 * LH)};
    int32_t prompt[5] = {1, 403, 407, 261, 378};
    eng_batch_item_t it = {&s, prompt, 5, logits};
    cr_assert_eq(eng_forward(c, &it, 1, msg), 0, "%s", msg);
    int32_t next = 0;
    for (uint32_t i = 0; i < n; i++) {
        out[i] = rc->argmax && i ? next : test_argmax(logits, hp->n_vocab);
        if (rc->window) eng_seq_make_room(c, &s, rc->window, 1, 0);
        eng_batch_item_t d = {&s,    &out[i],  1,     rc->argmax ? NULL : logits,
                              false, rc->attn, &tele, &next};
        cr_assert_eq(eng_forward(c, &d, 1, msg), 0, "%s", msg);
    }
    memcpy(last_entropy, tele.entropy, sizeof(float) * LH);
    free(tb);
    free(logits);
    kv_seq_close(&s);
    eng_ctx_free(c);
}

/* stories260K, when there are both a GPU and the model (the test skips otherwise). */
static eng_model_t *stories_for_gpu(void) {
    char msg[ENG_ERRMSG_LEN];
    need_cuda_gpu();
    if (!have_stories()) cr_skip_test("%s not present; skipping", STORIES_PATH);
    eng_model_t *m;
    cr_assert_eq(eng_model_load(&m, STORIES_PATH, msg), 0, "%s", msg);
    return m;
}

static void check_parity_on(eng_model_t *m, const run_cfg_t *base, uint32_t n) {
    const eng_hparams_t *hp = eng_model_hparams(m);
    size_t LH = (size_t)hp->n_layer * hp->n_head;
    int32_t *a = malloc(4 * n), *b = malloc(4 * n);
    float *ea = malloc(4 * LH), *eb = malloc(4 * LH);
    run_cfg_t cpu = *base, gpu = *base;
    cpu.dev = ENG_DEVICE_CPU;
    gpu.dev = ENG_DEVICE_CUDA;
    greedy_run(m, &cpu, n, a, ea);
    greedy_run(m, &gpu, n, b, eb);
    for (uint32_t i = 0; i < n; i++)
        cr_assert_eq(a[i], b[i], "token %u: CPU %d, CUDA %d", i, a[i], b[i]);
    /* end to end the hidden states drift at rounding level; an F16 cache turns some of that
     * into whole F16 steps of a key or value */
    double tol = base->kv_f16 ? 1e-2 : 1e-3;
    for (size_t i = 0; i < LH; i++)
        cr_expect_lt(fabs(ea[i] - eb[i]), tol, "entropy of layer %zu head %zu: %g vs %g",
                     i / hp->n_head, i % hp->n_head, ea[i], eb[i]);
    free(a), free(b), free(ea), free(eb);
}

static void check_model_parity(const run_cfg_t *base, uint32_t n) {
    eng_model_t *m = stories_for_gpu();
    check_parity_on(m, base, n);
    eng_model_free(m);
}

Test(cuda, test_greedy_text_on_stories260k_equals_cpu_over_64_tokens) {
    run_cfg_t f32 = {ENG_DEVICE_CPU, false, 0, NULL}, f16 = {ENG_DEVICE_CPU, true, 0, NULL};
    check_model_parity(&f32, 64);
    check_model_parity(&f16, 64);
    run_cfg_t am = {ENG_DEVICE_CPU, false, 0, NULL, true}; /* the argmax kernel's ids */
    check_model_parity(&am, 64);
}

Test(cuda, test_tidal_decode_and_eviction_equal_cpu_on_stories260k) {
    eng_model_t *m;
    char msg[ENG_ERRMSG_LEN];
    if (!have_stories()) cr_skip_test("%s not present; skipping", STORIES_PATH);
    cr_assert_eq(eng_model_load(&m, STORIES_PATH, msg), 0, "%s", msg);
    eng_attn_params_t tidal = {ENG_ATTN_TIDAL, 16};
    eng_attn_defaults(eng_model_hparams(m), &tidal);
    eng_model_free(m);
    run_cfg_t sparse = {ENG_DEVICE_CPU, false, 0, &tidal};
    check_model_parity(&sparse, 64);
    run_cfg_t evict = {ENG_DEVICE_CPU, false, 48, &tidal}; /* past a 48-token window */
    check_model_parity(&evict, 96);
    run_cfg_t evict_full = {ENG_DEVICE_CPU, true, 48, NULL};
    check_model_parity(&evict_full, 96);
}

/* The gemma3 architecture end to end (synthetic weights): GeGLU, QK-norm, sandwich norms,
 * scaled embeddings, NEOX RoPE with two bases and 16-token windows on ten layers of twelve, over
 * 64 greedy tokens (past the window), densely, with TidalDecode on the global layers, and with
 * eviction (K-shift of local and global layers with their own bases). */
Test(cuda, test_gemma3_architecture_equals_cpu) {
    need_cuda_gpu();
    eng_model_t *m;
    char msg[ENG_ERRMSG_LEN];
    cr_assert_eq(eng_model_load(&m, synth_path("gemma-f32"), msg), 0, "%s", msg);
    eng_attn_params_t tidal = {ENG_ATTN_TIDAL, 8};
    eng_attn_defaults(eng_model_hparams(m), &tidal);
    cr_assert_eq(tidal.sel_layers[0], 5, "the first global layer selects");
    run_cfg_t dense = {ENG_DEVICE_CPU, false, 0, NULL}, sparse = {ENG_DEVICE_CPU, true, 0, &tidal};
    run_cfg_t evict = {ENG_DEVICE_CPU, false, 40, &tidal};
    check_parity_on(m, &dense, 64);
    check_parity_on(m, &sparse, 64);
    check_parity_on(m, &evict, 80);
    eng_model_free(m);
}

/* Three sequences of different lengths decoding in one batch (the replayed graph's shape),
 * one of them tidal: the same greedy ids as the CPU, step after step. */
static void batched_run(eng_model_t *m, eng_device_t dev, const eng_attn_params_t *tidal,
                        uint32_t n, int32_t out[3][48]) {
    char msg[ENG_ERRMSG_LEN];
    const eng_hparams_t *hp = eng_model_hparams(m);
    eng_ctx_t *c = model_ctx(m, dev, 3, 512, false);
    kv_seq_t s[3];
    float *logits = malloc(sizeof(float) * hp->n_vocab * 3);
    const int32_t prompts[3][6] = {
        {1, 403, 407, 261, 378}, {1, 378, 261}, {1, 403, 407, 261, 378, 432}};
    const uint32_t lens[3] = {5, 3, 6};
    for (int i = 0; i < 3; i++) {
        kv_seq_init(&s[i], eng_ctx_kv_pool(c));
        eng_batch_item_t it = {&s[i], prompts[i], lens[i], logits + (size_t)i * hp->n_vocab};
        cr_assert_eq(eng_forward(c, &it, 1, msg), 0, "%s", msg);
    }
    for (uint32_t step = 0; step < n; step++) {
        eng_batch_item_t items[3];
        for (int i = 0; i < 3; i++) {
            out[i][step] = test_argmax(logits + (size_t)i * hp->n_vocab, hp->n_vocab);
            items[i] =
                (eng_batch_item_t){&s[i], &out[i][step],        1, logits + (size_t)i * hp->n_vocab,
                                   false, i == 2 ? tidal : NULL};
        }
        cr_assert_eq(eng_forward(c, items, 3, msg), 0, "%s", msg);
    }
    for (int i = 0; i < 3; i++) kv_seq_close(&s[i]);
    free(logits);
    eng_ctx_free(c);
}

Test(cuda, test_batched_decode_equals_cpu_on_stories260k) {
    eng_model_t *m = stories_for_gpu();
    eng_attn_params_t tidal = {ENG_ATTN_TIDAL, 16};
    eng_attn_defaults(eng_model_hparams(m), &tidal);
    int32_t a[3][48], b[3][48];
    batched_run(m, ENG_DEVICE_CPU, &tidal, 48, a);
    batched_run(m, ENG_DEVICE_CUDA, &tidal, 48, b);
    for (int i = 0; i < 3; i++)
        for (int t = 0; t < 48; t++)
            cr_assert_eq(a[i][t], b[i][t], "sequence %d token %d: CPU %d, CUDA %d", i, t, a[i][t],
                         b[i][t]);
    eng_model_free(m);
}

/* Ties: keys repeat five prototype vectors, so scores tie in classes. The selection must take
 * the best classes and, in the class at the budget's edge, the lowest positions, ascending,
 * plus the current token: both backends, checked against that rule computed on the host. */
Test(cuda, test_selection_ties_go_to_the_lowest_positions) {
    const uint32_t len[NS] = {20, 300, 700}, dec[NS] = {1, 1, 1};
    enum { K = 32, PROTO = 5 };
    twin_t t;
    twin_open(&t, 8, 2, 64, false, len);
    for (int i = 0; i < NS; i++)
        for (uint32_t p = PROTO; p < len[i]; p++)
            memcpy(kv_seq_kp(&t.hs[i], 0, p), kv_seq_kp(&t.hs[i], 0, p % PROTO),
                   sizeof(float) * t.kvd);
    size_t bytes = kv_pool_bytes(LAYERS, t.kvd, BS, t.hp.n_blocks, false);
    t.be.gpu->ops->upload(t.be.gpu, t.ddata, t.hp.data, bytes);
    size_t qn = (size_t)NS * t.nh * t.hd;
    float *q = malloc(sizeof(float) * qn);
    uint64_t r = 5;
    for (size_t i = 0; i < qn; i++) q[i] = frand(&r);
    float *dq = dev_f(t.be.gpu, q, qn), *dout = dev_f(t.be.gpu, NULL, qn);
    side_t g;
    side_init(&g, t.be.gpu, t.ds, dec, t.nh, K, false, false);
    uint8_t kinds[LAYERS * NS] = {ENG_ATT_SELECT, ENG_ATT_SELECT, ENG_ATT_SELECT, 0, 0, 0};
    side_t c; /* the CPU backend on the same cache must choose the same positions */
    side_init(&c, t.be.cpu, t.hs, dec, t.nh, K, false, false);
    for (int i = 0; i < NS; i++) g.a[i].kind = c.a[i].kind = ENG_ATT_SELECT;
    float *cpu_out = malloc(sizeof(float) * qn);
    t.be.cpu->ops->attention(t.be.cpu, &t.sh, 0, q, c.a, NS, cpu_out);
    free(cpu_out);
    uint32_t pos[NS] = {0};
    int32_t ids[NS] = {0};
    plan_t pl = {ids, pos, NS, g.a, NS, kinds, LAYERS, t.nh};
    gpu_begin(t.be.gpu, &pl);
    t.be.gpu->ops->attention(t.be.gpu, &t.sh, 0, dq, g.a, NS, dout);
    gpu_end(t.be.gpu);
    uint32_t *sel = malloc(4 * NS * t.nh * K), nsel[NS * 8];
    t.be.gpu->ops->download(t.be.gpu, sel, g.sel, 4 * NS * t.nh * K);
    t.be.gpu->ops->download(t.be.gpu, nsel, g.n_sel, 4 * NS * t.nh);
    for (int i = 0; i < NS; i++) {
        uint32_t n = len[i];
        for (uint32_t h = 0; h < t.nh; h++) {
            const uint32_t *got = sel + ((size_t)i * t.nh + h) * K;
            uint32_t m = nsel[i * t.nh + h], want[K], w = 0;
            if (n <= K) {
                cr_expect_eq(m, n);
                for (uint32_t p = 0; p < m; p++) cr_expect_eq(got[p], p);
                continue;
            }
            /* class scores on the host, then the rule: classes by score, positions ascending */
            double cs[PROTO];
            uint32_t kvh = h / (t.nh / t.nkv);
            for (int pc = 0; pc < PROTO; pc++) {
                const float *k = (const float *)kv_seq_kp(&t.hs[i], 0, (uint32_t)pc);
                cs[pc] = 0;
                for (uint32_t d = 0; d < t.hd; d++)
                    cs[pc] += (double)q[((size_t)i * t.nh + h) * t.hd + d] * k[kvh * t.hd + d];
            }
            int order[PROTO] = {0, 1, 2, 3, 4};
            for (int a = 0; a < PROTO; a++)
                for (int b = a + 1; b < PROTO; b++)
                    if (cs[order[b]] > cs[order[a]]) {
                        int x = order[a];
                        order[a] = order[b];
                        order[b] = x;
                    }
            bool take[1024] = {false};
            for (int oc = 0; oc < PROTO && w < K - 1; oc++)
                for (uint32_t p = 0; p + 1 < n && w < K - 1; p++)
                    if ((int)(p % PROTO) == order[oc]) take[p] = true, w++;
            take[n - 1] = true;
            w = 0;
            for (uint32_t p = 0; p < n; p++)
                if (take[p]) want[w++] = p;
            cr_assert_eq(m, K, "slice %d head %u: %u selected", i, h, m);
            cr_assert_eq(c.n_sel[i * t.nh + h], K);
            const uint32_t *cpu = c.sel + ((size_t)i * t.nh + h) * K;
            for (uint32_t k = 0; k < K; k++) {
                cr_expect_eq(got[k], want[k], "slice %d head %u entry %u: %u, want %u", i, h, k,
                             got[k], want[k]);
                cr_expect_eq(cpu[k], want[k], "CPU: slice %d head %u entry %u: %u, want %u", i, h,
                             k, cpu[k], want[k]);
            }
        }
    }
    free(sel);
    free(q);
    t.be.cpu->ops->release(t.be.cpu, c.sel);
    t.be.cpu->ops->release(t.be.cpu, c.n_sel);
    t.be.gpu->ops->release(t.be.gpu, g.sel);
    t.be.gpu->ops->release(t.be.gpu, g.n_sel);
    t.be.gpu->ops->release(t.be.gpu, dq);
    t.be.gpu->ops->release(t.be.gpu, dout);
    twin_close(&t);
}

/* Decode steps whose cache grows across the 1024-key length bucket of the recorded graphs (and
 * across prefill chunks): the same greedy ids as the CPU. */
static void long_run(eng_model_t *m, eng_device_t dev, int32_t *out, uint32_t n) {
    char msg[ENG_ERRMSG_LEN];
    const eng_hparams_t *hp = eng_model_hparams(m);
    eng_ctx_t *c = model_ctx(m, dev, 1, 2048, false);
    kv_seq_t s;
    kv_seq_init(&s, eng_ctx_kv_pool(c));
    enum { PROMPT = 1010 };
    int32_t prompt[PROMPT];
    prompt[0] = 1;
    for (int i = 1; i < PROMPT; i++) prompt[i] = 3 + (i * 37) % 500;
    float *logits = malloc(sizeof(float) * hp->n_vocab);
    for (uint32_t done = 0; done < PROMPT;) { /* prefill in chunks of 512 */
        uint32_t k = PROMPT - done < 512 ? PROMPT - done : 512;
        eng_batch_item_t it = {&s, prompt + done, k, logits};
        cr_assert_eq(eng_forward(c, &it, 1, msg), 0, "%s", msg);
        done += k;
    }
    out[0] = test_argmax(logits, hp->n_vocab);
    for (uint32_t i = 1; i < n; i++) {
        eng_batch_item_t d = {&s, &out[i - 1], 1, NULL, false, NULL, NULL, &out[i]};
        cr_assert_eq(eng_forward(c, &d, 1, msg), 0, "%s", msg);
    }
    free(logits);
    kv_seq_close(&s);
    eng_ctx_free(c);
}

Test(cuda, test_decode_across_length_buckets_equals_cpu) {
    eng_model_t *m = stories_for_gpu();
    int32_t a[40], b[40];
    long_run(m, ENG_DEVICE_CPU, a, 40);
    long_run(m, ENG_DEVICE_CUDA, b, 40);
    for (int i = 0; i < 40; i++)
        cr_assert_eq(a[i], b[i], "token %d: CPU %d, CUDA %d", i, a[i], b[i]);
    eng_model_free(m);
}
