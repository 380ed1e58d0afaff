/* cpu_backend.c - the CPU implementation of the backend interface.
 *
 * Matmuls are split over output rows across the worker pool, four rows at a time, each
 * multiplied against every token of the step, so the weights are read once per step
 * whatever the batch size. F16 and BF16 rows are converted to f32 (F16 directly in the dot
 * for one or two tokens); quantized rows are never expanded: the step's activations are
 * quantized once per matmul and multiplied with integer dot products (qdot.h). Attention is
 * split over (sequence, query, head).
 */
#include "../backend.h"
#include "../engine.h"
#include "../../base/err.h"
#include "../../base/f16.h"
#include "../gguf.h"
#include "../quant.h"
#include "qdot.h"
#include "simd.h"
#include "../threadpool.h"

#include <math.h>
#include <pthread.h>
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
    float **big; /* per worker: 2 * n_ctx floats + n_ctx positions (TidalDecode selection) */
    uint32_t n_ctx;
    uint8_t *xq; /* the step's activations quantized for the current matmul */
    size_t xq_len;
    bool no_tiles; /* TIDALD_ATTN_TILES=0: prefill attention query by query (for comparison) */
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

/* A weight this backend repacked at load (cpu_load_weight): qdot_x8 groups of eight rows of
 * the ggml type in the low bits. row_bytes stays the file's, for the bandwidth figures. */
#define CPU_X8 0x40000000u

static size_t x8_group_bytes(const eng_tensor_t *w) {
    return qdot_x8_group_bytes(w->type & ~CPU_X8, w->cols);
}

/* Dequantize/convert one row of w into dst (cols floats). */
static void row_to_f32(const eng_tensor_t *w, uint32_t r, float *dst) {
    const uint8_t *src = (const uint8_t *)w->data + (size_t)r * w->row_bytes;
    if (w->type & CPU_X8) {
        qdot_x8_row(w->type & ~CPU_X8, (const uint8_t *)w->data + (r / QDOT_X8) * x8_group_bytes(w),
                    (int)(r % QDOT_X8), w->cols, dst);
        return;
    }
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
    default: /* quantized: the loader admits only types eng_q_dequantize_row knows */
        eng_q_dequantize_row(w->type, src, dst, w->cols);
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
        uint32_t t = 0;
        if (nr == 4) /* three tokens at a time through the 4x3 register tile */
            for (; t + 3 <= j->T; t += 3) {
                const float *xs[3] = {j->x + (size_t)t * n, j->x + (size_t)(t + 1) * n,
                                      j->x + (size_t)(t + 2) * n};
                float out[12];
                simd.tile4x3(rows, n, xs, out);
                for (int k = 0; k < 3; k++)
                    memcpy(j->y + (size_t)(t + k) * w->rows + r0, out + 4 * k, 4 * sizeof(float));
            }
        for (; t < j->T; t++) {
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

/* Split a matmul's output rows, four at a time, over the pool: about eight chunks a worker. */
static void run_row_blocks(cpu_ctx_t *c, const eng_tensor_t *w, pool_fn_t fn, void *job) {
    size_t blocks = (w->rows + 3) / 4;
    size_t chunk = blocks / ((size_t)c->n_threads * 8);
    pool_run(c->pool, fn, job, blocks, chunk ? chunk : 1);
}

typedef struct {
    const eng_tensor_t *w;
    qdot_fn dot;
    qdot_n_fn dot_n; /* NULL: one token at a time */
    qdot_act_t act;
    const float *x;
    uint8_t *xq;
    size_t xq_row; /* bytes of one token's quantized activations */
    float *y;
    uint32_t T;
} qmatmul_job_t;

static void quantize_range(void *arg, size_t b, size_t e, int worker) {
    (void)worker;
    qmatmul_job_t *j = arg;
    for (size_t t = b; t < e; t++)
        qdot_quantize(j->act, j->x + t * j->w->cols, j->xq + t * j->xq_row, j->w->cols);
}

/* Four weight rows at a time against every token: the rows stay in L1 while the tokens'
 * quantized activations stream past them. */
static void qmatmul_range(void *arg, size_t b, size_t e, int worker) {
    (void)worker;
    qmatmul_job_t *j = arg;
    const eng_tensor_t *w = j->w;
    for (size_t blk = b; blk < e; blk++) {
        uint32_t r0 = (uint32_t)blk * 4, nr = w->rows - r0 < 4 ? w->rows - r0 : 4;
        const uint8_t *rows = (const uint8_t *)w->data + (size_t)r0 * w->row_bytes;
        uint32_t t = 0;
        if (j->dot_n) /* QDOT_NT tokens per unpacked weight block */
            for (; t + 1 < j->T; t += QDOT_NT) {
                int nt = j->T - t < QDOT_NT ? (int)(j->T - t) : QDOT_NT;
                const void *xs[QDOT_NT];
                for (int k = 0; k < nt; k++) xs[k] = j->xq + (size_t)(t + k) * j->xq_row;
                for (uint32_t r = 0; r < nr; r++) {
                    float out[QDOT_NT];
                    j->dot_n(rows + r * w->row_bytes, xs, nt, w->cols, out);
                    for (int k = 0; k < nt; k++) j->y[(size_t)(t + k) * w->rows + r0 + r] = out[k];
                }
            }
        for (; t < j->T; t++) {
            const uint8_t *xq = j->xq + (size_t)t * j->xq_row;
            float *yt = j->y + (size_t)t * w->rows + r0;
            for (uint32_t r = 0; r < nr; r++) yt[r] = j->dot(rows + r * w->row_bytes, xq, w->cols);
        }
    }
}

/* Eight interleaved rows at a time against every token, QDOT_NT tokens per unpacked group. */
static void qmatmul_x8_range(void *arg, size_t b, size_t e, int worker) {
    (void)worker;
    qmatmul_job_t *j = arg;
    const eng_tensor_t *w = j->w;
    qdot_x8_fn fn = qdot_kernel_x8(w->type & ~CPU_X8);
    size_t gb = x8_group_bytes(w);
    for (size_t grp = b; grp < e; grp++) {
        const uint8_t *g = (const uint8_t *)w->data + grp * gb;
        for (uint32_t t = 0; t < j->T; t += QDOT_NT) {
            int nt = j->T - t < QDOT_NT ? (int)(j->T - t) : QDOT_NT;
            const void *xs[QDOT_NT];
            float out[QDOT_NT * QDOT_X8];
            for (int k = 0; k < nt; k++) xs[k] = j->xq + (size_t)(t + k) * j->xq_row;
            fn(g, xs, nt, w->cols, out);
            for (int k = 0; k < nt; k++)
                memcpy(j->y + (size_t)(t + k) * w->rows + grp * QDOT_X8, out + QDOT_X8 * k,
                       sizeof(float) * QDOT_X8);
        }
    }
}

/* The quantized path; false when the type has no integer kernel (or memory ran out, in which
 * case the float path still computes the product). */
static bool cpu_qmatmul(cpu_ctx_t *c, const eng_tensor_t *w, const float *x, float *y, uint32_t T) {
    uint32_t type = w->type & ~CPU_X8;
    qdot_act_t act = qdot_act(type);
    qdot_fn dot = qdot_kernel(type);
    if (act == QDOT_ACT_NONE || !dot) return false;
    size_t row = qdot_act_bytes(act, w->cols), need = row * T;
    if (need > c->xq_len) {
        uint8_t *p = realloc(c->xq, need);
        if (!p) return false;
        c->xq = p;
        c->xq_len = need;
    }
    qmatmul_job_t j = {w, dot, qdot_kernel_n(type), act, x, c->xq, row, y, T};
    if (T >= 8)
        pool_run(c->pool, quantize_range, &j, T, 1);
    else
        quantize_range(&j, 0, T, 0);
    if (w->type & CPU_X8) {
        size_t groups = w->rows / QDOT_X8, chunk = groups / ((size_t)c->n_threads * 8);
        pool_run(c->pool, qmatmul_x8_range, &j, groups, chunk ? chunk : 1);
    } else {
        run_row_blocks(c, w, qmatmul_range, &j);
    }
    return true;
}

static void cpu_matmul(eng_backend_t *be, const eng_tensor_t *w, const float *x, float *y,
                       uint32_t T) {
    cpu_ctx_t *c = ctx_of(be);
    if (cpu_qmatmul(c, w, x, y, T)) return;
    /* scratch was sized by cpu_reserve() for the model's widest row */
    matmul_job_t j = {c, w, x, y, T};
    run_row_blocks(c, w, matmul_range, &j);
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

/* The angle of pair i, from theta = pos * base^(-2i/n_rot) built up by the caller. */
static inline float rope_angle(const eng_rope_t *r, float theta, uint32_t i) {
    return (r->freq_factors ? theta / r->freq_factors[i] : theta) * r->freq_scale;
}

/* The dims pair i of a head turns: (2i, 2i+1) in NORM mode, (i, i + n_rot/2) in NEOX. */
static inline void rope_pair(const eng_rope_t *r, uint32_t i, size_t *a, size_t *b) {
    *a = r->neox ? i : 2 * (size_t)i;
    *b = r->neox ? i + r->n_rot / 2 : 2 * (size_t)i + 1;
}

static void cpu_rope(eng_backend_t *be, float *x, const uint32_t *pos, uint32_t T, uint32_t n_heads,
                     uint32_t head_dim, const eng_rope_t *r) {
    (void)be;
    float theta_scale = powf(r->base, -2.0f / (float)r->n_rot);
    for (uint32_t t = 0; t < T; t++) {
        for (uint32_t h = 0; h < n_heads; h++) {
            float *v = x + ((size_t)t * n_heads + h) * head_dim;
            float theta = (float)pos[t];
            for (uint32_t i = 0; i < r->n_rot / 2; i++) {
                float th = rope_angle(r, theta, i);
                float cs = cosf(th), sn = sinf(th);
                size_t ia, ib;
                rope_pair(r, i, &ia, &ib);
                float a = v[ia], b = v[ib];
                v[ia] = a * cs - b * sn;
                v[ib] = a * sn + b * cs;
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
    bool tiles; /* prefill slices run as tiles (attend_tile) */
} attn_job_t;

/* Online-softmax state of one (query, head): running max m, sum l = sum w_i, the weighted
 * logit sum t = sum w_i (s_i - m) and the sink weight, all rescaled together when m grows.
 * Entropy then follows with no second pass: H = ln l - t / l (nats). */
typedef struct {
    float m, l, t, sink;
} acc_t;

/* Fold nk keys into acc and o: contiguous from kbase (stride floats apart) when pos is NULL,
 * else the listed positions. all (if not NULL) receives every raw score by position. */
static inline void fold(const float *q, const kv_seq_t *seq, uint32_t layer, size_t kvoff,
                        uint32_t hd, float scale, const void *kbase, const void *vbase, uint32_t p0,
                        const uint32_t *pos, uint32_t nk, uint32_t n_sinks, float *sc, float *o,
                        acc_t *a, float *all, bool stats) {
    const kv_pool_t *pool = seq->pool;
    size_t stride = (size_t)pool->kv_dim * pool->elem, off = kvoff * pool->elem;
    bool f16 = pool->elem == 2;
    float bm = -INFINITY;
    for (uint32_t i = 0; i < nk; i++) {
        const char *k = pos ? (const char *)kv_seq_kp(seq, layer, pos[i]) + off
                            : (const char *)kbase + i * stride;
        sc[i] =
            (f16 ? simd.dot_f16(q, (const uint16_t *)k, hd) : simd.dot(q, (const float *)k, hd)) *
            scale;
        if (all) all[pos ? pos[i] : p0 + i] = sc[i];
        if (sc[i] > bm) bm = sc[i];
    }
    if (bm > a->m) {
        float r = expf(a->m - bm); /* 0 on the first chunk */
        for (uint32_t d = 0; d < hd; d++) o[d] *= r;
        a->t = a->l > 0 ? r * (a->t - a->l * (bm - a->m)) : 0;
        a->l *= r;
        a->sink *= r;
        a->m = bm;
    }
    for (uint32_t i = 0; i < nk; i++) {
        float d = sc[i] - a->m, w = expf(d);
        a->l += w;
        if (stats) { /* the telemetry accumulators: one FMA and one compare per key */
            uint32_t p = pos ? pos[i] : p0 + i;
            a->t += w * d;
            if (p < n_sinks) a->sink += w;
        }
        const char *v = pos ? (const char *)kv_seq_vp(seq, layer, pos[i]) + off
                            : (const char *)vbase + i * stride;
        if (f16)
            simd.axpy_f16(o, w, (const uint16_t *)v, hd);
        else
            simd.axpy(o, w, (const float *)v, hd);
    }
}

typedef struct {
    float *chunk;  /* block_size scores */
    float *all;    /* n_ctx scores (SELECT) */
    float *gsum;   /* n_ctx group probabilities (SELECT per group) */
    uint32_t *idx; /* n_ctx candidate positions */
} scratch_t;

/* Attend one (query, head) over all n keys or over a sorted position list; writes o and the
 * telemetry slots of head h. */
static void attend(const attn_job_t *j, const eng_attn_seq_t *s, uint32_t qi, uint32_t h,
                   const uint32_t *sel, uint32_t n_sel, scratch_t *w, float *all) {
    const eng_attn_shape_t *sh = j->sh;
    uint32_t hd = sh->head_dim, kvh = h / (sh->n_head / sh->n_head_kv);
    size_t row = (size_t)(s->q_start + qi), kvoff = (size_t)kvh * hd;
    const float *q = j->q + (row * sh->n_head + h) * hd;
    float *o = j->out + (row * sh->n_head + h) * hd;
    uint32_t n_keys = s->pos0 + qi + 1;
    acc_t a = {-INFINITY, 0, 0, 0};
    bool stats = s->entropy || s->sink_mass;
    memset(o, 0, hd * sizeof(float));
    if (!sel) {
        /* a sliding-window layer sees the last `window` keys; chunks stay within blocks */
        uint32_t lo = sh->window && n_keys > sh->window ? n_keys - sh->window : 0;
        for (uint32_t p0 = lo; p0 < n_keys;) {
            uint32_t end = kv_seq_run_end(s->seq, p0), nk = (end < n_keys ? end : n_keys) - p0;
            size_t off = kvoff * s->seq->pool->elem;
            fold(q, s->seq, j->layer, kvoff, hd, sh->scale,
                 (const char *)kv_seq_kp(s->seq, j->layer, p0) + off,
                 (const char *)kv_seq_vp(s->seq, j->layer, p0) + off, p0, NULL, nk, s->n_sinks,
                 w->chunk, o, &a, all, stats);
            p0 += nk;
        }
        n_keys -= lo;
    } else {
        /* chunk the sorted positions by block, as the dense path does, so a selection of every
         * position computes exactly what dense attention computes */
        for (uint32_t i = 0; i < n_sel;) {
            uint32_t end = kv_seq_run_end(s->seq, sel[i]), e = i;
            while (e < n_sel && sel[e] < end) e++;
            fold(q, s->seq, j->layer, kvoff, hd, sh->scale, NULL, NULL, 0, sel + i, e - i,
                 s->n_sinks, w->chunk, o, &a, NULL, stats);
            i = e;
        }
        n_keys = n_sel;
    }
    float inv = 1.0f / a.l;
    for (uint32_t d = 0; d < hd; d++) o[d] *= inv;
    if (qi + 1 == s->n_q) { /* telemetry describes the slice's last token */
        if (s->entropy) s->entropy[h] = (logf(a.l) - a.t * inv) / (float)M_LN2;
        if (s->sink_mass) s->sink_mass[h] = a.sink * inv;
        if (s->n_att) s->n_att[h] = n_keys;
    }
}

/* Move the k highest-scoring candidates to idx[0..k) (quickselect, O(n) on average). */
static void top_k_positions(uint32_t *idx, uint32_t n, uint32_t k, const float *score) {
    if (k == 0 || k >= n) return;
    long lo = 0, hi = (long)n - 1, want = (long)k - 1;
    while (lo < hi) {
        float pv = score[idx[lo + (hi - lo) / 2]];
        long i = lo, jj = hi;
        while (i <= jj) {
            while (score[idx[i]] > pv) i++;
            while (score[idx[jj]] < pv) jj--;
            if (i <= jj) {
                uint32_t t = idx[i];
                idx[i++] = idx[jj];
                idx[jj--] = t;
            }
        }
        if (want <= jj)
            hi = jj;
        else if (want >= i)
            lo = i;
        else
            break;
    }
}

/* TidalDecode selection for n keys: the current token (n-1), the sinks when forced, then the
 * best-scoring others up to the budget; ascending. Every position when n <= budget. */
static uint32_t select_positions(const eng_attn_seq_t *s, uint32_t n, const float *score,
                                 uint32_t *idx, uint32_t *out) {
    uint32_t K = s->budget;
    if (n <= K) {
        for (uint32_t p = 0; p < n; p++) out[p] = p;
        return n;
    }
    uint32_t m = 0, first = 0;
    if (s->force_sinks) {
        first = s->n_sinks < K - 1 ? s->n_sinks : K - 1;
        for (uint32_t p = 0; p < first; p++) out[m++] = p;
    }
    uint32_t nc = 0;
    for (uint32_t p = first; p + 1 < n; p++) idx[nc++] = p;
    uint32_t want = K - 1 - m;
    top_k_positions(idx, nc, want, score);
    /* the want-th best score, then every candidate above it and, of those equal to it, the
     * lowest positions: ascending, and the same choice among ties as the CUDA kernel */
    if (want) {
        float kth = score[idx[0]];
        for (uint32_t i = 1; i < want; i++) kth = score[idx[i]] < kth ? score[idx[i]] : kth;
        uint32_t above = 0;
        for (uint32_t i = 0; i < want; i++) above += score[idx[i]] > kth;
        uint32_t ties = want - above;
        for (uint32_t p = first; p + 1 < n; p++)
            if (score[p] > kth || (score[p] == kth && ties && ties--)) out[m++] = p;
    }
    out[m++] = n - 1;
    return m;
}

/* Prefill tiles: the queries of a dense slice but its last (which carries the telemetry) go
 * TILE_Q at a time with every head of one KV-head group, TILE_ROWS query rows or more, so each
 * key and value row is read once for all of them (simd.dots, simd.wsum) instead of once per
 * query and head. The arithmetic per (query, head) is attend()'s: the same chunks, the same
 * online-softmax rescaling, the same order of additions. */
#define TILE_ROWS 16
static uint32_t tile_q(const eng_attn_shape_t *sh) {
    uint32_t g = sh->n_head / sh->n_head_kv;
    return g >= TILE_ROWS ? 1 : TILE_ROWS / g;
}
static bool tiled(const eng_attn_seq_t *s) {
    return s->kind == ENG_ATT_DENSE && s->n_q > 1;
}
static size_t n_tiles(const eng_attn_seq_t *s, const eng_attn_shape_t *sh) {
    return (size_t)((s->n_q - 1 + tile_q(sh) - 1) / tile_q(sh)) * sh->n_head_kv;
}
/* scratch floats one tile needs */
static size_t tile_floats(const eng_attn_shape_t *sh, uint32_t block_size) {
    size_t R = (size_t)tile_q(sh) * (sh->n_head / sh->n_head_kv), hd = sh->head_dim;
    return 2 * R * hd + R * block_size + 2 * (size_t)block_size * hd + 2 * R;
}

static void attend_tile(const attn_job_t *j, const eng_attn_seq_t *s, uint32_t q0, uint32_t g,
                        float *buf) {
    const eng_attn_shape_t *sh = j->sh;
    const kv_seq_t *seq = s->seq;
    const kv_pool_t *pool = seq->pool;
    uint32_t G = sh->n_head / sh->n_head_kv, hd = sh->head_dim, bs = pool->block_size;
    uint32_t nq = s->n_q - 1 - q0 < tile_q(sh) ? s->n_q - 1 - q0 : tile_q(sh), R = nq * G;
    float *Q = buf, *O = Q + (size_t)R * hd, *P = O + (size_t)R * hd, *Kf = P + (size_t)R * bs;
    float *Vf = Kf + (size_t)bs * hd, *m = Vf + (size_t)bs * hd, *l = m + R;
    for (uint32_t qq = 0; qq < nq; qq++) /* the tile's rows: query-major, heads of the group */
        memcpy(Q + (size_t)qq * G * hd,
               j->q + (((size_t)s->q_start + q0 + qq) * sh->n_head + (size_t)g * G) * hd,
               sizeof(float) * G * hd);
    memset(O, 0, sizeof(float) * R * hd);
    for (uint32_t r = 0; r < R; r++) m[r] = -INFINITY, l[r] = 0;
    /* query q0 + qq at position pos0 + q0 + qq sees keys [lo, pos]: lo from the window */
    uint32_t first = s->pos0 + q0, last = first + nq - 1;
    uint32_t lo0 = sh->window && first + 1 > sh->window ? first + 1 - sh->window : 0;
    size_t off = (size_t)g * hd * pool->elem, stride = (size_t)pool->kv_dim;
    bool f16 = pool->elem == 2;
    for (uint32_t p0 = lo0; p0 <= last;) {
        uint32_t end = kv_seq_run_end(seq, p0), nk = (end < last + 1 ? end : last + 1) - p0;
        const char *kb = (const char *)kv_seq_kp(seq, j->layer, p0) + off;
        const char *vb = (const char *)kv_seq_vp(seq, j->layer, p0) + off;
        const float *K = (const float *)kb, *V = (const float *)vb;
        size_t ld = stride;
        if (f16) { /* converted once for every row of the tile */
            for (uint32_t i = 0; i < nk; i++) {
                simd.f16_to_f32((const uint16_t *)kb + i * stride, Kf + (size_t)i * hd, hd);
                simd.f16_to_f32((const uint16_t *)vb + i * stride, Vf + (size_t)i * hd, hd);
            }
            K = Kf, V = Vf, ld = hd;
        }
        simd.dots(Q, hd, R, K, ld, nk, hd, P, bs);
        for (uint32_t r = 0; r < R; r++) {
            uint32_t pos = first + r / G,
                     lo = sh->window && pos + 1 > sh->window ? pos + 1 - sh->window : 0;
            float *pr = P + (size_t)r * bs, bm = -INFINITY;
            for (uint32_t i = 0; i < nk; i++) {
                uint32_t p = p0 + i;
                pr[i] = p < lo || p > pos ? -INFINITY : pr[i] * sh->scale;
                if (pr[i] > bm) bm = pr[i];
            }
            if (bm > m[r]) {
                float rs = expf(m[r] - bm), *o = O + (size_t)r * hd;
                for (uint32_t d = 0; d < hd; d++) o[d] *= rs;
                l[r] *= rs;
                m[r] = bm;
            }
            for (uint32_t i = 0; i < nk; i++) {
                float w = pr[i] == -INFINITY ? 0.0f : expf(pr[i] - m[r]);
                if (pr[i] != -INFINITY) l[r] += w;
                pr[i] = w;
            }
        }
        simd.wsum(O, hd, R, P, bs, V, ld, nk, hd);
        p0 += nk;
    }
    for (uint32_t r = 0; r < R; r++) {
        float inv = 1.0f / l[r], *o = O + (size_t)r * hd;
        float *dst = j->out + (((size_t)s->q_start + q0 + r / G) * sh->n_head + g * G + r % G) * hd;
        for (uint32_t d = 0; d < hd; d++) dst[d] = o[d] * inv;
    }
}

/* One task: a (query, head), or for a per-group selection a (query, KV head). */
static void attn_task(const attn_job_t *j, const eng_attn_seq_t *s, size_t local, scratch_t *w) {
    const eng_attn_shape_t *sh = j->sh;
    uint32_t group = sh->n_head / sh->n_head_kv;
    if (s->kind == ENG_ATT_SPARSE) {
        uint32_t h = (uint32_t)local;
        attend(j, s, 0, h, s->sel + (size_t)h * s->budget, s->n_sel[h], w, NULL);
    } else if (s->kind == ENG_ATT_SELECT && s->per_group) {
        uint32_t g = (uint32_t)local, n = s->pos0 + 1;
        for (uint32_t p = 0; p < n; p++) w->gsum[p] = 0;
        for (uint32_t h = g * group; h < (g + 1) * group; h++) {
            attend(j, s, 0, h, NULL, 0, w, w->all);
            float mx = -INFINITY;
            double z = 0;
            for (uint32_t p = 0; p < n; p++) mx = w->all[p] > mx ? w->all[p] : mx;
            for (uint32_t p = 0; p < n; p++) z += expf(w->all[p] - mx);
            for (uint32_t p = 0; p < n; p++) w->gsum[p] += (float)(expf(w->all[p] - mx) / z);
        }
        uint32_t *out = s->sel + (size_t)g * group * s->budget;
        uint32_t m = select_positions(s, n, w->gsum, w->idx, out);
        for (uint32_t h = g * group; h < (g + 1) * group; h++) {
            if (h != g * group) memcpy(s->sel + (size_t)h * s->budget, out, sizeof(uint32_t) * m);
            s->n_sel[h] = m;
        }
    } else if (s->kind == ENG_ATT_SELECT) {
        uint32_t h = (uint32_t)local;
        attend(j, s, 0, h, NULL, 0, w, w->all);
        s->n_sel[h] =
            select_positions(s, s->pos0 + 1, w->all, w->idx, s->sel + (size_t)h * s->budget);
    } else if (j->tiles && tiled(s)) { /* the tiles, then the last query head by head */
        size_t nt = n_tiles(s, sh);
        if (local < nt)
            attend_tile(j, s, (uint32_t)(local / sh->n_head_kv) * tile_q(sh),
                        (uint32_t)(local % sh->n_head_kv), w->chunk);
        else
            attend(j, s, s->n_q - 1, (uint32_t)(local - nt), NULL, 0, w, NULL);
    } else {
        attend(j, s, (uint32_t)(local / sh->n_head), (uint32_t)(local % sh->n_head), NULL, 0, w,
               NULL);
    }
}

static size_t tasks_of(const eng_attn_seq_t *s, const eng_attn_shape_t *sh, bool tiles) {
    if (s->kind == ENG_ATT_SELECT && s->per_group) return sh->n_head_kv;
    if (tiles && tiled(s)) return n_tiles(s, sh) + sh->n_head;
    return (size_t)s->n_q * sh->n_head;
}

static void attn_range(void *arg, size_t b, size_t e, int worker) {
    attn_job_t *j = arg;
    scratch_t w = {j->c->scratch[worker], j->c->big[worker], j->c->big[worker] + j->c->n_ctx,
                   (uint32_t *)(j->c->big[worker] + 2 * (size_t)j->c->n_ctx)};
    uint32_t s = 0;
    for (size_t t = b; t < e; t++) {
        while (s + 1 < j->n_seqs && j->task0[s + 1] <= t) s++;
        attn_task(j, &j->seqs[s], t - j->task0[s], &w);
    }
}

static void cpu_attention(eng_backend_t *be, const eng_attn_shape_t *sh, uint32_t layer,
                          const float *q, const eng_attn_seq_t *seqs, uint32_t n_seqs, float *out) {
    cpu_ctx_t *c = ctx_of(be);
    if (!n_seqs) return;
    size_t *task0 = c->task0; /* sized by cpu_reserve() for the maximum batch */
    size_t n = 0;
    /* tiles where some slice is a prefill and every worker's scratch can hold one */
    bool tiles = false;
    for (uint32_t i = 0; i < n_seqs && !tiles; i++) tiles = tiled(&seqs[i]);
    if (tiles && !c->no_tiles)
        tiles = ensure_scratch(c, tile_floats(sh, seqs[0].seq->pool->block_size)) == 0;
    else
        tiles = false;
    for (uint32_t i = 0; i < n_seqs; i++) {
        task0[i] = n;
        n += tasks_of(&seqs[i], sh, tiles);
    }
    attn_job_t j = {c, sh, layer, q, seqs, n_seqs, task0, out, tiles};
    pool_run(c->pool, attn_range, &j, n, 1);
}

/* The K-shift of one layer. */
static void k_shift_layer(kv_seq_t *seq, uint32_t layer, uint32_t from, uint32_t to, uint32_t delta,
                          uint32_t n_head_kv, uint32_t head_dim, const eng_rope_t *r) {
    /* the rotation by -delta: the same angles as RoPE at position delta, negated. The angles
     * of up to KS_PAIRS dimension pairs at a time live on the stack, so any n_rot works. */
    enum { KS_PAIRS = 256 };
    float theta_scale = powf(r->base, -2.0f / (float)r->n_rot);
    float cs[KS_PAIRS], sn[KS_PAIRS];
    float theta = (float)delta;
    bool f16 = seq->pool->elem == 2;
    for (uint32_t p0 = 0; p0 < r->n_rot / 2; p0 += KS_PAIRS) {
        uint32_t np = r->n_rot / 2 - p0 < KS_PAIRS ? r->n_rot / 2 - p0 : KS_PAIRS;
        for (uint32_t j = 0; j < np; j++) {
            float th = rope_angle(r, theta, p0 + j);
            cs[j] = cosf(th);
            sn[j] = -sinf(th);
            theta *= theta_scale;
        }
        for (uint32_t p = from; p < to; p++) {
            if (!kv_seq_has(seq, layer, p)) continue; /* a local layer's key out of the window */
            void *kp = kv_seq_kp(seq, layer, p);
            for (uint32_t h = 0; h < n_head_kv; h++)
                for (uint32_t j = 0; j < np; j++) {
                    size_t ia, ib;
                    rope_pair(r, p0 + j, &ia, &ib);
                    ia += (size_t)h * head_dim;
                    ib += (size_t)h * head_dim;
                    float a, b;
                    if (f16) {
                        a = eng_f16_to_f32(((uint16_t *)kp)[ia]);
                        b = eng_f16_to_f32(((uint16_t *)kp)[ib]);
                    } else {
                        a = ((float *)kp)[ia];
                        b = ((float *)kp)[ib];
                    }
                    float ra = a * cs[j] - b * sn[j], rb = a * sn[j] + b * cs[j];
                    if (f16) {
                        ((uint16_t *)kp)[ia] = eng_f32_to_f16(ra);
                        ((uint16_t *)kp)[ib] = eng_f32_to_f16(rb);
                    } else {
                        ((float *)kp)[ia] = ra;
                        ((float *)kp)[ib] = rb;
                    }
                }
        }
    }
}

static void cpu_k_shift(eng_backend_t *be, kv_seq_t *seq, uint32_t from, uint32_t to,
                        uint32_t delta, uint32_t n_head_kv, uint32_t head_dim,
                        const eng_rope_t *rope) {
    (void)be;
    for (uint32_t l = 0; l < kv_pool_layers(seq->pool); l++)
        k_shift_layer(seq, l, from, to, delta, n_head_kv, head_dim, &rope[l]);
}

static void cpu_swiglu(eng_backend_t *be, float *g, const float *u, size_t n) {
    (void)be;
    for (size_t i = 0; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* GELU (tanh form) at every F16 value, rounded to F16: llama.cpp's CPU table, built once. */
static float gelu_table[65536];
static pthread_once_t gelu_once = PTHREAD_ONCE_INIT;

static void gelu_table_init(void) {
    for (uint32_t i = 0; i < 65536; i++) {
        float x = eng_f16_to_f32((uint16_t)i);
        float y =
            0.5f * x * (1.0f + tanhf(0.79788456080286535588f * x * (1.0f + 0.044715f * x * x)));
        gelu_table[i] = eng_f16_to_f32(eng_f32_to_f16(y));
    }
}

static void cpu_geglu(eng_backend_t *be, float *g, const float *u, size_t n) {
    (void)be;
    pthread_once(&gelu_once, gelu_table_init);
    for (size_t i = 0; i < n; i++) {
        float x = g[i];
        g[i] = x <= -10.0f ? 0.0f : x >= 10.0f ? x * u[i] : gelu_table[eng_f32_to_f16(x)] * u[i];
    }
}

static void cpu_add_bias(eng_backend_t *be, float *x, const float *b, uint32_t T, uint32_t n) {
    (void)be;
    for (uint32_t t = 0; t < T; t++)
        for (uint32_t i = 0; i < n; i++) x[(size_t)t * n + i] += b[i];
}

static void cpu_scale(eng_backend_t *be, float *x, float s, size_t n) {
    (void)be;
    for (size_t i = 0; i < n; i++) x[i] *= s;
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

typedef struct {
    const eng_tensor_t *w;
    uint8_t *dst;
    size_t gb;
} pack_job_t;

static void pack_range(void *arg, size_t b, size_t e, int worker) {
    (void)worker;
    pack_job_t *p = arg;
    for (size_t g = b; g < e; g++)
        qdot_x8_pack(p->w->type, (const uint8_t *)p->w->data + g * QDOT_X8 * p->w->row_bytes,
                     p->w->row_bytes, p->w->cols, p->dst + g * p->gb);
}

/* Weights of a type with an interleaved form at this CPU's level (Q4_K with AVX-512 VNNI) are
 * repacked, eight rows to a group (qdot.h); every other weight is used from the file as is.
 * Without memory for the copy the file's layout serves. */
static int cpu_load_weight(eng_backend_t *be, const eng_tensor_t *w, eng_tensor_t *out, char *msg) {
    (void)msg;
    cpu_ctx_t *c = ctx_of(be);
    *out = *w;
    size_t gb = qdot_x8_group_bytes(w->type, w->cols);
    if (!gb || !w->data || w->rows % QDOT_X8) return 0;
    size_t bytes = gb * (w->rows / QDOT_X8);
    uint8_t *p = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!p) return 0;
    pack_job_t j = {w, p, gb};
    pool_run(c->pool, pack_range, &j, w->rows / QDOT_X8, 16);
    out->data = p;
    out->type = w->type | CPU_X8;
    return 0;
}

static void cpu_free_weight(eng_backend_t *be, eng_tensor_t *w) {
    (void)be;
    if (w->type & CPU_X8) free((void *)w->data);
    w->data = NULL;
}

static int cpu_reserve(eng_backend_t *be, size_t max_cols, uint32_t block_size, uint32_t max_seqs,
                       uint32_t n_ctx) {
    cpu_ctx_t *c = ctx_of(be);
    if (n_ctx > c->n_ctx) {
        for (int i = 0; i < c->n_threads; i++) {
            float *b = realloc(c->big[i], sizeof(float) * 3 * (size_t)n_ctx);
            if (!b) return ENG_ENOMEM;
            c->big[i] = b;
        }
        c->n_ctx = n_ctx;
    }
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

typedef struct {
    void (*fn)(void *arg, size_t i);
    void *arg;
} pfor_t;

static void pfor_range(void *arg, size_t b, size_t e, int worker) {
    (void)worker;
    pfor_t *p = arg;
    for (size_t i = b; i < e; i++) p->fn(p->arg, i);
}

static void cpu_parallel_for(eng_backend_t *be, void (*fn)(void *arg, size_t i), void *arg,
                             size_t n) {
    pfor_t p = {fn, arg};
    pool_run(ctx_of(be)->pool, pfor_range, &p, n, 1);
}

static void cpu_destroy(eng_backend_t *be) {
    if (!be) return;
    cpu_ctx_t *c = ctx_of(be);
    if (c) {
        pool_destroy(c->pool);
        for (int i = 0; c->scratch && i < c->n_threads; i++) free(c->scratch[i]);
        free(c->scratch);
        for (int i = 0; c->big && i < c->n_threads; i++) free(c->big[i]);
        free(c->big);
        free(c->task0);
        free(c->xq);
        free(c);
    }
    free(be);
}

static void *cpu_alloc(eng_backend_t *be, size_t bytes) {
    (void)be;
    return calloc(1, bytes ? bytes : 1);
}

static void cpu_release(eng_backend_t *be, void *p) {
    (void)be;
    free(p);
}

static void cpu_copy(eng_backend_t *be, void *dst, const void *src, size_t bytes) {
    (void)be;
    if (bytes) memcpy(dst, src, bytes);
}

/* Write one key or value vector into the cache in its value type. */
static void store_kv(void *dst, const float *src, uint32_t n, uint32_t elem) {
    if (elem == 4) {
        memcpy(dst, src, sizeof(float) * n);
        return;
    }
    uint16_t *h = dst;
    for (uint32_t i = 0; i < n; i++) h[i] = eng_f32_to_f16(src[i]);
}

static void cpu_kv_store(eng_backend_t *be, uint32_t layer, const eng_attn_seq_t *seqs,
                         uint32_t n_seqs, const float *k, const float *v) {
    (void)be;
    for (uint32_t i = 0; i < n_seqs; i++) {
        const eng_attn_seq_t *a = &seqs[i];
        const kv_pool_t *p = a->seq->pool;
        for (uint32_t j = 0; j < a->n_q; j++) {
            size_t row = (size_t)(a->q_start + j) * p->kv_dim;
            store_kv(kv_seq_kp(a->seq, layer, a->pos0 + j), k + row, p->kv_dim, p->elem);
            store_kv(kv_seq_vp(a->seq, layer, a->pos0 + j), v + row, p->kv_dim, p->elem);
        }
    }
}

static const eng_backend_ops_t cpu_ops = {
    .name = "cpu",
    .alloc = cpu_alloc,
    .release = cpu_release,
    .upload = cpu_copy,
    .download = cpu_copy,
    .kv_store = cpu_kv_store,
    .reserve = cpu_reserve,
    .matmul = cpu_matmul,
    .load_weight = cpu_load_weight,
    .free_weight = cpu_free_weight,
    .rmsnorm = cpu_rmsnorm,
    .rope = cpu_rope,
    .k_shift = cpu_k_shift,
    .attention = cpu_attention,
    .swiglu = cpu_swiglu,
    .geglu = cpu_geglu,
    .scale = cpu_scale,
    .add_bias = cpu_add_bias,
    .add = cpu_add,
    .get_rows = cpu_get_rows,
    .parallel_for = cpu_parallel_for,
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
    const char *tiles = getenv("TIDALD_ATTN_TILES");
    c->no_tiles = tiles && strcmp(tiles, "0") == 0;
    c->scratch = calloc((size_t)n_threads, sizeof(float *));
    c->big = calloc((size_t)n_threads, sizeof(float *));
    c->pool = pool_create(n_threads);
    if (!c->scratch || !c->big || !c->pool) goto oom;
    *out = be;
    return 0;
oom:
    if (be && !be->ctx) free(c);
    cpu_destroy(be);
    return eng_fail(msg, ENG_ENOMEM, "cannot create the CPU backend");
}
