/* cpu_backend.c - the CPU implementation of the backend interface.
 *
 * Matmuls are split over output rows across the worker pool; each worker
 * converts four weight rows to f32 at a time (F16/BF16/Q8_0) and multiplies
 * them against every token of the step, so the weights are read once per step
 * whatever the batch size. Attention is split over (sequence, query, head).
 */
#include "../backend.h"
#include "../engine.h"
#include "../err.h"
#include "../f16.h"
#include "../gguf.h"
#include "simd.h"
#include "threadpool.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct {
    pool_t *pool;
    int n_threads;
    float **scratch; /* per worker */
    size_t scratch_len;
    size_t *task0; /* attention: first task of each sequence */
    size_t task0_len;
} cpu_ctx_t;

static cpu_ctx_t *ctx_of(eng_backend_t *be) {
    return be->ctx;
}

/* Make every worker's scratch hold at least n floats (engine thread only). */
static int ensure_scratch(cpu_ctx_t *c, size_t n) {
    if (n <= c->scratch_len) return 0;
    for (int i = 0; i < c->n_threads; i++) {
        float *s = realloc(c->scratch[i], n * sizeof(float));
        if (!s) return ENG_ENOMEM;
        c->scratch[i] = s;
    }
    c->scratch_len = n;
    return 0;
}

/* Dequantize/convert one row of w into dst (cols floats). */
static void row_to_f32(const eng_tensor_t *w, uint32_t r, float *dst) {
    const uint8_t *src = (const uint8_t *)w->data + (size_t)r * w->row_bytes;
    switch (w->type) {
    case GGML_F32:
        memcpy(dst, src, (size_t)w->cols * 4);
        break;
    case GGML_F16:
        simd.f16_to_f32((const uint16_t *)src, dst, w->cols);
        break;
    case GGML_BF16:
        for (uint32_t i = 0; i < w->cols; i++) {
            uint16_t b;
            memcpy(&b, src + 2 * i, 2);
            dst[i] = eng_bf16_to_f32(b);
        }
        break;
    case GGML_Q8_0:
        for (uint32_t blk = 0; blk < w->cols / QK8_0; blk++) {
            const uint8_t *bp = src + (size_t)blk * (2 + QK8_0);
            uint16_t dh;
            memcpy(&dh, bp, 2);
            float d = eng_f16_to_f32(dh);
            const int8_t *q = (const int8_t *)(bp + 2);
            for (int i = 0; i < QK8_0; i++) dst[blk * QK8_0 + i] = d * (float)q[i];
        }
        break;
    }
}

/* Up to this many tokens a step multiplies F16 rows directly; beyond it, converting four rows
 * once and reusing them for every token is cheaper. */
#define FUSED_F16_MAX_T 2

typedef struct {
    cpu_ctx_t *c;
    const eng_tensor_t *w;
    const float *x;
    float *y;
    uint32_t T;
} matmul_job_t;

static void matmul_range(void *arg, size_t b, size_t e, int worker) {
    matmul_job_t *j = arg;
    const eng_tensor_t *w = j->w;
    size_t n = w->cols;
    float *buf = j->c->scratch[worker];
    for (size_t blk = b; blk < e; blk++) {
        uint32_t r0 = (uint32_t)blk * 4;
        uint32_t nr = w->rows - r0 < 4 ? w->rows - r0 : 4;
        const float *rows;
        if (w->type == GGML_F16 && nr == 4 && j->T <= FUSED_F16_MAX_T) {
            const uint16_t *h =
                (const uint16_t *)((const uint8_t *)w->data + (size_t)r0 * w->row_bytes);
            for (uint32_t t = 0; t < j->T; t++)
                simd.dot4_f16(h, n, n, j->x + (size_t)t * n, j->y + (size_t)t * w->rows + r0);
            continue;
        }
        if (w->type == GGML_F32) {
            rows = (const float *)((const uint8_t *)w->data + (size_t)r0 * w->row_bytes);
        } else {
            for (uint32_t r = 0; r < nr; r++) row_to_f32(w, r0 + r, buf + r * n);
            rows = buf;
        }
        for (uint32_t t = 0; t < j->T; t++) {
            const float *x = j->x + (size_t)t * n;
            float *y = j->y + (size_t)t * w->rows + r0;
            if (nr == 4) {
                simd.dot4(rows, n, x, y);
            } else {
                for (uint32_t r = 0; r < nr; r++) y[r] = simd.dot(rows + r * n, x, n);
            }
        }
    }
}

static void cpu_matmul(eng_backend_t *be, const eng_tensor_t *w, const float *x, float *y,
                       uint32_t T) {
    cpu_ctx_t *c = ctx_of(be);
    /* scratch was sized by cpu_reserve() for the model's widest row */
    matmul_job_t j = {c, w, x, y, T};
    size_t blocks = (w->rows + 3) / 4;
    size_t chunk = blocks / ((size_t)c->n_threads * 8);
    pool_run(c->pool, matmul_range, &j, blocks, chunk ? chunk : 1);
}

static void cpu_rmsnorm(eng_backend_t *be, const float *x, const float *weight, float *out,
                        uint32_t T, uint32_t n, float eps) {
    (void)be;
    for (uint32_t t = 0; t < T; t++) {
        const float *xr = x + (size_t)t * n;
        float *o = out + (size_t)t * n;
        double ss = 0;
        for (uint32_t i = 0; i < n; i++) ss += (double)xr[i] * xr[i];
        float scale = 1.0f / sqrtf((float)(ss / n) + eps);
        for (uint32_t i = 0; i < n; i++) o[i] = xr[i] * scale * weight[i];
    }
}

static void cpu_rope(eng_backend_t *be, float *x, const uint32_t *pos, uint32_t T, uint32_t n_heads,
                     uint32_t head_dim, uint32_t n_rot, float base, const float *freq_factors) {
    (void)be;
    float theta_scale = powf(base, -2.0f / (float)n_rot);
    for (uint32_t t = 0; t < T; t++) {
        for (uint32_t h = 0; h < n_heads; h++) {
            float *v = x + ((size_t)t * n_heads + h) * head_dim;
            float theta = (float)pos[t];
            for (uint32_t i = 0; i < n_rot; i += 2) {
                float th = freq_factors ? theta / freq_factors[i / 2] : theta;
                float cs = cosf(th), sn = sinf(th);
                float a = v[i], b = v[i + 1];
                v[i] = a * cs - b * sn;
                v[i + 1] = a * sn + b * cs;
                theta *= theta_scale;
            }
        }
    }
}

typedef struct {
    cpu_ctx_t *c;
    const eng_attn_shape_t *sh;
    uint32_t layer;
    const float *q;
    const eng_attn_seq_t *seqs;
    uint32_t n_seqs;
    const size_t *task0; /* first task index of each sequence */
    float *out;
} attn_job_t;

/* One (query, head): online softmax over the sequence's blocks, one rescale per block. */
static void attend_one(const attn_job_t *j, const eng_attn_seq_t *s, uint32_t qi, uint32_t h,
                       float *scores) {
    const eng_attn_shape_t *sh = j->sh;
    uint32_t hd = sh->head_dim, group = sh->n_head / sh->n_head_kv, kvh = h / group;
    size_t row = (size_t)(s->q_start + qi);
    const float *q = j->q + (row * sh->n_head + h) * hd;
    float *o = j->out + (row * sh->n_head + h) * hd;
    uint32_t n_keys = s->pos0 + qi + 1;
    uint32_t bs = s->seq->pool->block_size;
    float m = -INFINITY, l = 0;
    memset(o, 0, hd * sizeof(float));
    for (uint32_t p0 = 0; p0 < n_keys; p0 += bs) {
        uint32_t nk = n_keys - p0 < bs ? n_keys - p0 : bs;
        const float *k = kv_seq_k(s->seq, j->layer, p0) + (size_t)kvh * hd;
        const float *v = kv_seq_v(s->seq, j->layer, p0) + (size_t)kvh * hd;
        size_t stride = s->seq->pool->kv_dim;
        float bm = -INFINITY;
        for (uint32_t i = 0; i < nk; i++) {
            scores[i] = simd.dot(q, k + i * stride, hd) * sh->scale;
            if (scores[i] > bm) bm = scores[i];
        }
        if (bm > m) {
            float r = expf(m - bm); /* 0 on the first block */
            for (uint32_t d = 0; d < hd; d++) o[d] *= r;
            l *= r;
            m = bm;
        }
        for (uint32_t i = 0; i < nk; i++) {
            float w = expf(scores[i] - m);
            l += w;
            simd.axpy(o, w, v + i * stride, hd);
        }
    }
    float inv = 1.0f / l;
    for (uint32_t d = 0; d < hd; d++) o[d] *= inv;
}

static void attn_range(void *arg, size_t b, size_t e, int worker) {
    attn_job_t *j = arg;
    float *scores = j->c->scratch[worker];
    uint32_t s = 0;
    for (size_t t = b; t < e; t++) {
        while (s + 1 < j->n_seqs && j->task0[s + 1] <= t) s++;
        size_t local = t - j->task0[s];
        attend_one(j, &j->seqs[s], (uint32_t)(local / j->sh->n_head),
                   (uint32_t)(local % j->sh->n_head), scores);
    }
}

static void cpu_attention(eng_backend_t *be, const eng_attn_shape_t *sh, uint32_t layer,
                          const float *q, const eng_attn_seq_t *seqs, uint32_t n_seqs, float *out) {
    cpu_ctx_t *c = ctx_of(be);
    if (!n_seqs) return;
    size_t *task0 = c->task0; /* sized by cpu_reserve() for the maximum batch */
    size_t n = 0;
    for (uint32_t i = 0; i < n_seqs; i++) {
        task0[i] = n;
        n += (size_t)seqs[i].n_q * sh->n_head;
    }
    attn_job_t j = {c, sh, layer, q, seqs, n_seqs, task0, out};
    pool_run(c->pool, attn_range, &j, n, 1);
}

static void cpu_swiglu(eng_backend_t *be, float *g, const float *u, size_t n) {
    (void)be;
    for (size_t i = 0; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

static void cpu_add(eng_backend_t *be, float *x, const float *y, size_t n) {
    (void)be;
    for (size_t i = 0; i < n; i++) x[i] += y[i];
}

static void cpu_get_rows(eng_backend_t *be, const eng_tensor_t *w, const int32_t *ids, uint32_t T,
                         float *out) {
    (void)be;
    for (uint32_t t = 0; t < T; t++) row_to_f32(w, (uint32_t)ids[t], out + (size_t)t * w->cols);
}

static int cpu_reserve(eng_backend_t *be, size_t max_cols, uint32_t block_size, uint32_t max_seqs) {
    cpu_ctx_t *c = ctx_of(be);
    size_t need = 4 * max_cols > block_size ? 4 * max_cols : block_size;
    if (ensure_scratch(c, need) != 0) return ENG_ENOMEM;
    if (max_seqs > c->task0_len) {
        size_t *t = realloc(c->task0, sizeof(size_t) * max_seqs);
        if (!t) return ENG_ENOMEM;
        c->task0 = t;
        c->task0_len = max_seqs;
    }
    return 0;
}

static void cpu_destroy(eng_backend_t *be) {
    if (!be) return;
    cpu_ctx_t *c = ctx_of(be);
    if (c) {
        pool_destroy(c->pool);
        for (int i = 0; c->scratch && i < c->n_threads; i++) free(c->scratch[i]);
        free(c->scratch);
        free(c->task0);
        free(c);
    }
    free(be);
}

static const eng_backend_ops_t cpu_ops = {
    .name = "cpu",
    .reserve = cpu_reserve,
    .matmul = cpu_matmul,
    .rmsnorm = cpu_rmsnorm,
    .rope = cpu_rope,
    .attention = cpu_attention,
    .swiglu = cpu_swiglu,
    .add = cpu_add,
    .get_rows = cpu_get_rows,
    .destroy = cpu_destroy,
};

static int simd_ready;

const char *eng_cpu_simd_name(void) {
    if (!simd_ready) {
        simd_init();
        simd_ready = 1;
    }
    return simd.name;
}

bool eng_cpu_force_simd(const char *name) {
    simd_ready = 1;
    return simd_select(name) == 0;
}

int eng_cpu_backend_create(eng_backend_t **out, int n_threads, char *msg) {
    *out = NULL;
    eng_cpu_simd_name();
    if (n_threads <= 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads = n > 0 ? (int)n : 1;
    }
    if (n_threads > 256) return eng_fail(msg, ENG_EINVAL, "at most 256 threads");
    eng_backend_t *be = calloc(1, sizeof(*be));
    cpu_ctx_t *c = calloc(1, sizeof(*c));
    if (!be || !c) goto oom;
    be->ops = &cpu_ops;
    be->ctx = c;
    c->n_threads = n_threads;
    c->scratch = calloc((size_t)n_threads, sizeof(float *));
    c->pool = pool_create(n_threads);
    if (!c->scratch || !c->pool) goto oom;
    *out = be;
    return 0;
oom:
    if (be && !be->ctx) free(c);
    cpu_destroy(be);
    return eng_fail(msg, ENG_ENOMEM, "cannot create the CPU backend");
}
