/* test_attention.c - TidalDecode selection and sparse attention, the fused entropy and sink
 * mass, and sink-aware eviction with its K-shift, each against a plain reference. */
#define _GNU_SOURCE /* qsort_r */
#include "../../engine/backend.h"
#include "../../engine/engine.h"
#include "../../base/f16.h"
#include "helpers.h"
#include "ref_ops.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

enum { NH = 8, NKV = 2, HD = 16, KVD = NKV * HD, N = 70, LAYERS = 3 };

static uint32_t all_pos[N]; /* 0..N-1 */

typedef struct {
    kv_pool_t pool;
    kv_seq_t seq;
    float k[LAYERS][N * KVD], v[LAYERS][N * KVD];
    float q[NH * HD];
    eng_backend_t *be;
    eng_attn_shape_t sh;
} fx_t;

static bool g_f16; /* run the fixtures on an F16 cache */

/* Store one cache value (rounded to F16 on an F16 cache) and return what the cache holds. */
static float put(void *slot, uint32_t i, float v) {
    if (!g_f16) return ((float *)slot)[i] = v;
    ((uint16_t *)slot)[i] = eng_f32_to_f16(v);
    return eng_f16_to_f32(((uint16_t *)slot)[i]);
}

static void fx_open(fx_t *f, uint32_t n, uint64_t seed) {
    char msg[ENG_ERRMSG_LEN];
    for (uint32_t p = 0; p < N; p++) all_pos[p] = p;
    cr_assert_eq(kv_pool_init_typed(&f->pool, LAYERS, KVD, 4, 64, g_f16, msg), 0);
    kv_seq_init(&f->seq, &f->pool);
    cr_assert_eq(kv_seq_reserve(&f->seq, n), 0);
    f->seq.n_tokens = n;
    f->seq.n_sinks = 4;
    uint64_t r = seed;
    for (uint32_t l = 0; l < LAYERS; l++)
        for (uint32_t p = 0; p < n; p++)
            for (uint32_t i = 0; i < KVD; i++) {
                f->k[l][p * KVD + i] = put(kv_seq_kp(&f->seq, l, p), i, frand(&r) * 2);
                f->v[l][p * KVD + i] = put(kv_seq_vp(&f->seq, l, p), i, frand(&r));
            }
    for (int i = 0; i < NH * HD; i++) f->q[i] = frand(&r) * 2;
    cr_assert_eq(eng_cpu_backend_create(&f->be, 2, msg), 0);
    cr_assert_eq(f->be->ops->reserve(f->be, 4096, 4, 4, 4096), 0);
    f->sh = (eng_attn_shape_t){NH, NKV, HD, 1.0f / sqrtf(HD)};
}

static void fx_close(fx_t *f) {
    kv_seq_close(&f->seq);
    kv_pool_close(&f->pool);
    f->be->ops->destroy(f->be);
}

typedef struct {
    uint32_t sel[NH * 64], n_sel[NH], n_att[NH];
    float ent[NH], sink[NH], out[NH * HD];
} run_t;

static void run(fx_t *f, uint32_t layer, eng_att_kind_t kind, uint32_t budget, bool force,
                bool group, run_t *r) {
    eng_attn_seq_t s = {.seq = &f->seq,
                        .q_start = 0,
                        .n_q = 1,
                        .pos0 = f->seq.n_tokens - 1,
                        .kind = kind,
                        .budget = budget,
                        .force_sinks = force,
                        .per_group = group,
                        .n_sinks = f->seq.n_sinks,
                        .sel = r->sel,
                        .n_sel = r->n_sel,
                        .entropy = r->ent,
                        .sink_mass = r->sink,
                        .n_att = r->n_att};
    f->be->ops->attention(f->be, &f->sh, layer, f->q, &s, 1, r->out);
}

static int cmp_desc_d(const void *a, const void *b, void *ctx) {
    const double *s = ctx;
    double x = s[*(const uint32_t *)a], y = s[*(const uint32_t *)b];
    return (x < y) - (x > y);
}

/* Brute force: the current token, forced sinks, then the best others by score; ascending. */
static uint32_t brute_select(const double *score, uint32_t n, uint32_t K, uint32_t sinks,
                             bool force, uint32_t *out) {
    if (n <= K) {
        for (uint32_t p = 0; p < n; p++) out[p] = p;
        return n;
    }
    uint32_t m = 0, first = force ? (sinks < K - 1 ? sinks : K - 1) : 0;
    for (uint32_t p = 0; p < first; p++) out[m++] = p;
    uint32_t idx[N];
    uint32_t nc = 0;
    for (uint32_t p = first; p + 1 < n; p++) idx[nc++] = p;
    qsort_r(idx, nc, sizeof(uint32_t), cmp_desc_d, (void *)score);
    for (uint32_t i = 0; i < K - 1 - first; i++) out[m++] = idx[i];
    out[m++] = n - 1;
    for (uint32_t i = 1; i < m; i++) /* insertion sort ascending */
        for (uint32_t j = i; j > 0 && out[j - 1] > out[j]; j--) {
            uint32_t t = out[j];
            out[j] = out[j - 1];
            out[j - 1] = t;
        }
    return m;
}

static void check_dense(void) {
    fx_t f;
    fx_open(&f, N, 5);
    run_t r;
    run(&f, 1, ENG_ATT_DENSE, 0, false, false, &r);
    for (uint32_t h = 0; h < NH; h++) {
        float ref[HD];
        double ent, sink;
        ref_attention_subset(&f.sh, h, f.q + h * HD, f.k[1], f.v[1], all_pos, N, 4, ref, &ent,
                             &sink, NULL);
        for (int x = 0; x < HD; x++) cr_expect(fabsf(r.out[h * HD + x] - ref[x]) < 1e-5f);
        cr_expect(fabs(r.ent[h] - ent) < 1e-4, "head %u entropy %g, explicit %g", h, r.ent[h], ent);
        cr_expect(fabs(r.sink[h] - sink) < 1e-5, "head %u sink mass %g, explicit %g", h, r.sink[h],
                  sink);
        cr_expect_eq(r.n_att[h], N);
    }
    fx_close(&f);
}

Test(attention, test_dense_entropy_and_sink_mass_match_explicit_sums) {
    check_dense();
}

Test(attention, test_f16_cache_dense_entropy_matches_explicit_sums) {
    g_f16 = true;
    check_dense();
}

static void check_selection(bool force, bool group) {
    fx_t f;
    fx_open(&f, N, 7 + force + 2 * group);
    const uint32_t K = 16;
    run_t r;
    run(&f, 0, ENG_ATT_SELECT, K, force, group, &r);
    /* selection layers attend densely */
    run_t d;
    run(&f, 0, ENG_ATT_DENSE, 0, false, false, &d);
    cr_expect(memcmp(r.out, d.out, sizeof(r.out)) == 0, "a selection layer must attend densely");
    for (uint32_t h = 0; h < NH; h++) {
        double score[N], probs[N], gsum[N] = {0};
        uint32_t group_sz = NH / NKV, g = h / group_sz;
        for (uint32_t hh = group ? g * group_sz : h; hh < (group ? (g + 1) * group_sz : h + 1);
             hh++) {
            float o[HD];
            double e, s;
            ref_attention_subset(&f.sh, hh, f.q + hh * HD, f.k[0], f.v[0], all_pos, N, 4, o, &e, &s,
                                 probs);
            for (uint32_t p = 0; p < N; p++) gsum[p] += probs[p];
        }
        for (uint32_t p = 0; p < N; p++) score[p] = gsum[p];
        uint32_t want[64];
        uint32_t m = brute_select(score, N, K, 4, force, want);
        cr_assert_eq(r.n_sel[h], m, "head %u selected %u, want %u", h, r.n_sel[h], m);
        for (uint32_t i = 0; i < m; i++)
            cr_expect_eq(r.sel[h * K + i], want[i], "head %u slot %u: %u, want %u", h, i,
                         r.sel[h * K + i], want[i]);
    }
    /* a sparse layer attends to exactly the selected positions */
    run_t sp;
    memcpy(sp.sel, r.sel, sizeof(r.sel));
    memcpy(sp.n_sel, r.n_sel, sizeof(r.n_sel));
    run(&f, 2, ENG_ATT_SPARSE, K, force, group, &sp);
    for (uint32_t h = 0; h < NH; h++) {
        float ref[HD];
        double ent, sink;
        ref_attention_subset(&f.sh, h, f.q + h * HD, f.k[2], f.v[2], r.sel + h * K, r.n_sel[h], 4,
                             ref, &ent, &sink, NULL);
        for (int x = 0; x < HD; x++)
            cr_expect(fabsf(sp.out[h * HD + x] - ref[x]) < 1e-5f, "head %u", h);
        cr_expect(fabs(sp.ent[h] - ent) < 1e-4, "sparse head %u entropy %g, explicit %g", h,
                  sp.ent[h], ent);
        cr_expect(fabs(sp.sink[h] - sink) < 1e-5);
        cr_expect_eq(sp.n_att[h], K);
    }
    fx_close(&f);
}

Test(attention, test_selection_keeps_top_k_per_head_and_sparse_layers_use_it) {
    check_selection(false, false);
}
Test(attention, test_forced_sinks_are_always_selected) {
    check_selection(true, false);
}
Test(attention, test_per_group_selection_sums_the_group_probabilities) {
    check_selection(false, true);
}

Test(attention, test_tidal_is_exactly_full_when_the_cache_fits_the_budget) {
    fx_t f;
    fx_open(&f, 37, 11);
    run_t sel, sp, dense;
    run(&f, 0, ENG_ATT_SELECT, 64, false, false, &sel);
    memcpy(sp.sel, sel.sel, sizeof(sel.sel));
    memcpy(sp.n_sel, sel.n_sel, sizeof(sel.n_sel));
    run(&f, 2, ENG_ATT_SPARSE, 64, false, false, &sp);
    run(&f, 2, ENG_ATT_DENSE, 0, false, false, &dense);
    cr_expect(memcmp(sp.out, dense.out, sizeof(sp.out)) == 0,
              "not bit-identical to full attention");
    cr_expect(memcmp(sp.ent, dense.ent, sizeof(sp.ent)) == 0);
    fx_close(&f);
}

/* The model-level statement: with a budget covering the context, tidal decoding produces the
 * same logits as full attention, token after token. */
Test(attention, test_tidal_decode_equals_full_within_budget_on_a_model) {
    const char *path = have_stories() ? STORIES_PATH : synth_path("tiny-f32");
    eng_model_t *m;
    eng_ctx_t *c;
    char msg[ENG_ERRMSG_LEN];
    cr_assert_eq(eng_model_load(&m, path, msg), 0, "%s", msg);
    eng_ctx_params_t p;
    eng_ctx_params_default(&p);
    p.device = ENG_DEVICE_CPU; /* the CPU backend under test; GPU parity is in test_cuda.c */
    p.n_ctx = 256;
    p.max_seqs = 2;
    cr_assert_eq(eng_ctx_create(&c, m, &p, msg), 0);
    const eng_hparams_t *hp = eng_model_hparams(m);
    eng_attn_params_t tidal = {ENG_ATTN_TIDAL, 64};
    eng_attn_defaults(hp, &tidal);
    kv_seq_t a, b;
    kv_seq_init(&a, eng_ctx_kv_pool(c));
    kv_seq_init(&b, eng_ctx_kv_pool(c));
    float *la = malloc(sizeof(float) * hp->n_vocab), *lb = malloc(sizeof(float) * hp->n_vocab);
    int32_t prompt[5] = {1, 403 % hp->n_vocab, 407 % hp->n_vocab, 261, 378};
    eng_batch_item_t ia = {&a, prompt, 5, la}, ib = {&b, prompt, 5, lb};
    cr_assert_eq(eng_forward(c, &ia, 1, msg), 0);
    cr_assert_eq(eng_forward(c, &ib, 1, msg), 0);
    for (int step = 0; step < 40; step++) {
        int32_t t = 0;
        for (uint32_t i = 1; i < hp->n_vocab; i++) t = la[i] > la[t] ? (int32_t)i : t;
        eng_batch_item_t items[2] = {{&a, &t, 1, la}, {&b, &t, 1, lb, false, &tidal}};
        cr_assert_eq(eng_forward(c, items, 2, msg), 0, "%s", msg);
        cr_assert(memcmp(la, lb, sizeof(float) * hp->n_vocab) == 0, "step %d differs", step);
    }
    /* past the budget it is sparse: different logits, same shape */
    eng_attn_params_t small = tidal;
    small.token_budget = 8;
    int32_t t = 5;
    eng_batch_item_t items[2] = {{&a, &t, 1, la}, {&b, &t, 1, lb, false, &small}};
    cr_assert_eq(eng_forward(c, items, 2, msg), 0);
    cr_expect(memcmp(la, lb, sizeof(float) * hp->n_vocab) != 0);
    kv_seq_close(&a);
    kv_seq_close(&b);
    free(la), free(lb);
    eng_ctx_free(c);
    eng_model_free(m);
}

/* Attention of one query over every position of s (dense, and sparse over a selection of every
 * position) against a plain attention over the window rebuilt from scratch: keys k and values v,
 * [pos][kvd] floats. */
static void check_window_attention(eng_backend_t *be, const eng_hparams_t *hp, kv_seq_t *s,
                                   const float *k, const float *v, uint64_t seed) {
    uint32_t n = s->n_tokens, nh = hp->n_head, hd = hp->head_dim;
    eng_attn_shape_t sh = {nh, hp->n_head_kv, hd, 1.0f / sqrtf((float)hd)};
    float *q = malloc(sizeof(float) * nh * hd), *out = malloc(sizeof(float) * nh * hd);
    uint32_t *sel = malloc(sizeof(uint32_t) * nh * n), *pos = malloc(sizeof(uint32_t) * n);
    uint32_t n_sel[64], n_att[64];
    float ent[64], sink[64];
    for (uint32_t i = 0; i < nh * hd; i++) q[i] = frand(&seed) * 2;
    for (uint32_t p = 0; p < n; p++) pos[p] = p;
    for (uint32_t h = 0; h < nh; h++) {
        memcpy(sel + (size_t)h * n, pos, sizeof(uint32_t) * n);
        n_sel[h] = n;
    }
    for (int sparse = 0; sparse < 2; sparse++) {
        eng_attn_seq_t a = {.seq = s,
                            .n_q = 1,
                            .pos0 = n - 1,
                            .kind = sparse ? ENG_ATT_SPARSE : ENG_ATT_DENSE,
                            .budget = n,
                            .n_sinks = s->n_sinks,
                            .sel = sel,
                            .n_sel = n_sel,
                            .entropy = ent,
                            .sink_mass = sink,
                            .n_att = n_att};
        be->ops->attention(be, &sh, 1, q, &a, 1, out);
        for (uint32_t h = 0; h < nh; h++) {
            float ref[256];
            double e, sm;
            ref_attention_subset(&sh, h, q + h * hd, k, v, pos, n, s->n_sinks, ref, &e, &sm, NULL);
            for (uint32_t x = 0; x < hd; x++)
                cr_assert(fabsf(out[h * hd + x] - ref[x]) < 1e-5f, "%s head %u dim %u: %g vs %g",
                          sparse ? "sparse" : "dense", h, x, out[h * hd + x], ref[x]);
            cr_assert(fabs(sink[h] - sm) < 1e-5, "head %u sink mass %g, from scratch %g", h,
                      sink[h], sm);
            cr_assert_eq(n_att[h], n);
        }
    }
    free(q), free(out), free(sel), free(pos);
}

/* Exact eviction with the K-shift against the same window rebuilt from scratch: after each of
 * several evictions (most not multiples of the block size), the cache holds exactly the n_sinks
 * sinks and the newest tokens, each key equal to RoPE of its own unrotated key at its new
 * position, each value unchanged; the blocks only evicted tokens held are back in the pool; and
 * attention over the cache (dense and sparse, sink mass included) equals a plain attention
 * over the rebuilt window. */
static void check_eviction(bool f16) {
    eng_model_t *m;
    eng_ctx_t *c;
    eng_backend_t *be;
    char msg[ENG_ERRMSG_LEN];
    cr_assert_eq(eng_model_load(&m, synth_path("tiny-f32"), msg), 0, "%s", msg);
    const eng_hparams_t *hp = eng_model_hparams(m);
    eng_ctx_params_t p;
    eng_ctx_params_default(&p);
    p.device = ENG_DEVICE_CPU; /* the CPU backend under test; GPU parity is in test_cuda.c */
    p.block_size = 4;
    p.n_ctx = 64;
    p.max_seqs = 1;
    p.kv_f16 = f16;
    g_f16 = f16;
    cr_assert_eq(eng_ctx_create(&c, m, &p, msg), 0);
    cr_assert_eq(eng_cpu_backend_create(&be, 2, msg), 0);
    cr_assert_eq(be->ops->reserve(be, 4096, 4, 4, 4096), 0);
    kv_pool_t *pool = eng_ctx_kv_pool(c);
    uint32_t kvd = hp->n_head_kv * hp->head_dim, n = 50, free0 = pool->n_free, S = 6;
    kv_seq_t s;
    kv_seq_init(&s, pool);
    s.n_sinks = S; /* a block and a half of sinks */
    cr_assert_eq(kv_seq_reserve(&s, n), 0);
    s.n_tokens = n;
    float *pre = malloc(sizeof(float) * n * kvd * hp->n_layer),
          *vv = malloc(sizeof(float) * n * kvd * hp->n_layer),
          *wk = malloc(sizeof(float) * n * kvd), *wv = malloc(sizeof(float) * n * kvd);
    uint64_t r = 3;
    for (uint32_t i = 0; i < n * kvd * hp->n_layer; i++) pre[i] = frand(&r), vv[i] = frand(&r);
    /* keys stored rotated at their positions, as the forward pass stores them */
    eng_rope_t rope = {hp->n_rot, hp->rope_base, hp->rope_freq_scale, hp->rope_neox, NULL};
    for (uint32_t l = 0; l < hp->n_layer; l++)
        for (uint32_t q = 0; q < n; q++) {
            float k[256];
            memcpy(k, pre + ((size_t)l * n + q) * kvd, sizeof(float) * kvd);
            ref_rope(k, &q, 1, hp->n_head_kv, hp->head_dim, &rope);
            for (uint32_t i = 0; i < kvd; i++) {
                put(kv_seq_kp(&s, l, q), i, k[i]);
                vv[((size_t)l * n + q) * kvd + i] =
                    put(kv_seq_vp(&s, l, q), i, vv[((size_t)l * n + q) * kvd + i]);
            }
        }
    uint32_t orig[64]; /* the token each position holds now */
    for (uint32_t q = 0; q < n; q++) orig[q] = q;
    const uint32_t steps[] = {10, 3, 1, 7, 2, 40};
    uint64_t evicted = 0;
    for (size_t st = 0; st < sizeof(steps) / sizeof(steps[0]); st++) {
        uint32_t before = s.n_tokens, want = steps[st] < before - S ? steps[st] : before - S;
        uint32_t gone = eng_seq_evict(c, &s, steps[st]);
        cr_assert_eq(gone, want, "step %zu: evicted %u, want %u", st, gone, want);
        memmove(orig + S, orig + S + gone, sizeof(uint32_t) * (before - S - gone));
        evicted += gone;
        cr_assert_eq(s.n_tokens, before - gone);
        cr_assert_eq(s.n_evicted, evicted);
        /* the sinks cost S slots: nothing but evicted slots is left unused, and every block
         * holding only those went back */
        cr_assert_leq(s.skip, kv_skip_max(4, S));
        cr_assert_eq(s.n_blocks, kv_seq_blocks_for(&s, n - (uint32_t)evicted));
        cr_assert_eq(pool->n_free, free0 - s.n_blocks);
        for (uint32_t l = 0; l < hp->n_layer; l++)
            for (uint32_t q = 0; q < s.n_tokens; q++) {
                float want_k[256];
                memcpy(want_k, pre + ((size_t)l * n + orig[q]) * kvd, sizeof(float) * kvd);
                ref_rope(want_k, &q, 1, hp->n_head_kv, hp->head_dim, &rope);
                for (uint32_t i = 0; i < kvd; i++) {
                    float k = f16 ? eng_f16_to_f32(((uint16_t *)kv_seq_kp(&s, l, q))[i])
                                  : kv_seq_k(&s, l, q)[i];
                    float v = f16 ? eng_f16_to_f32(((uint16_t *)kv_seq_vp(&s, l, q))[i])
                                  : kv_seq_v(&s, l, q)[i];
                    /* F16 rounds before and after each rotation */
                    float tol = f16 ? 4e-3f * (float)(st + 1) : 2e-4f;
                    cr_assert(fabsf(k - want_k[i]) < tol,
                              "step %zu layer %u pos %u (token %u) dim %u: %g vs %g", st, l, q,
                              orig[q], i, k, want_k[i]);
                    cr_assert_eq(v, vv[((size_t)l * n + orig[q]) * kvd + i]);
                    if (l == 1) wk[(size_t)q * kvd + i] = k, wv[(size_t)q * kvd + i] = v;
                }
            }
        check_window_attention(be, hp, &s, wk, wv, 11 + st);
    }
    cr_assert_eq(s.n_tokens, S); /* the last step took every token after the sinks */
    cr_assert_eq(eng_seq_evict(c, &s, 4), 0);
    free(pre), free(vv), free(wk), free(wv);
    kv_seq_close(&s);
    be->ops->destroy(be);
    eng_ctx_free(c);
    eng_model_free(m);
}

Test(attention, test_exact_eviction_keeps_sinks_and_equals_the_window_rebuilt_from_scratch) {
    check_eviction(false);
}

Test(attention, test_f16_cache_exact_eviction_equals_the_window_rebuilt_from_scratch) {
    check_eviction(true);
}

/* The same kernels reading an F16 cache: the reference runs over the values the cache holds. */
Test(attention, test_f16_cache_selection_and_sparse_match_reference) {
    g_f16 = true;
    check_selection(true, false);
    check_selection(false, true);
}
