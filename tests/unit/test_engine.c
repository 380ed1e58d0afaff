/* test_engine.c - the forward pass: llama.cpp parity on stories260K, batching and chunking
 * invariance, weight types, and refusals that leave the state untouched. */
#include "../../engine/engine.h"
#include "helpers.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    eng_model_t *m;
    eng_ctx_t *c;
    uint32_t V;
} fx_t;

static bool g_kv_f16;

static void fx_open(fx_t *f, const char *path, uint32_t max_seqs, uint32_t threads) {
    char msg[ENG_ERRMSG_LEN];
    cr_assert_eq(eng_model_load(&f->m, path, msg), 0, "%s", msg);
    eng_ctx_params_t p;
    eng_ctx_params_default(&p);
    p.device = ENG_DEVICE_CPU; /* the CPU backend under test; GPU parity is in test_cuda.c */
    p.max_seqs = max_seqs;
    p.n_threads = (int)threads;
    p.block_size = 4; /* small blocks: every sequence spans several */
    p.kv_f16 = g_kv_f16;
    cr_assert_eq(eng_ctx_create(&f->c, f->m, &p, msg), 0, "%s", msg);
    f->V = eng_model_hparams(f->m)->n_vocab;
}

static void fx_close(fx_t *f) {
    eng_ctx_free(f->c);
    eng_model_free(f->m);
}

static double max_abs_diff(const float *a, const float *b, size_t n) {
    double e = 0;
    for (size_t i = 0; i < n; i++) e = fmax(e, fabs((double)a[i] - b[i]));
    return e;
}

/* Greedy-generate n tokens after a prompt; returns the ids (malloc'd). */
static int32_t *greedy(fx_t *f, const int32_t *prompt, uint32_t n_prompt, uint32_t n) {
    kv_seq_t s;
    kv_seq_init(&s, eng_ctx_kv_pool(f->c));
    float *logits = malloc(sizeof(float) * f->V);
    int32_t *out = malloc(sizeof(int32_t) * n);
    char msg[ENG_ERRMSG_LEN];
    eng_batch_item_t it = {&s, prompt, n_prompt, logits, false};
    cr_assert_eq(eng_forward(f->c, &it, 1, msg), 0, "%s", msg);
    for (uint32_t i = 0; i < n; i++) {
        out[i] = test_argmax(logits, f->V);
        eng_batch_item_t d = {&s, &out[i], 1, logits, false};
        cr_assert_eq(eng_forward(f->c, &d, 1, msg), 0, "%s", msg);
    }
    kv_seq_close(&s);
    free(logits);
    return out;
}

/* The first 12 greedy ids after BOS + "Once upon a time", as llama.cpp prints them. */
static void check_greedy_ids(bool kv_f16) {
    if (!have_stories()) cr_skip_test("%s not present; skipping", STORIES_PATH);
    g_kv_f16 = kv_f16;
    fx_t f;
    fx_open(&f, STORIES_PATH, 4, 2);
    const int32_t prompt[] = {1, 403, 407, 261, 378};
    const int32_t want[] = {432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338};
    int32_t *got = greedy(&f, prompt, 5, 12);
    for (int i = 0; i < 12; i++)
        cr_expect_eq(got[i], want[i], "token %d: %d, want %d", i, got[i], want[i]);
    free(got);
    fx_close(&f);
}

Test(engine, test_greedy_ids_match_llama_cpp_on_stories260K) {
    check_greedy_ids(false);
}

/* llama.cpp's default cache type: the greedy ids still match. */
Test(engine, test_greedy_ids_match_llama_cpp_with_an_f16_cache) {
    check_greedy_ids(true);
}

Test(engine, test_greedy_text_matches_llama_cpp_on_stories260K) {
    if (!have_stories()) cr_skip_test("%s not present; skipping", STORIES_PATH);
    fx_t f;
    fx_open(&f, STORIES_PATH, 1, 1);
    const eng_tokenizer_t *t = eng_model_tokenizer(f.m);
    int32_t *prompt;
    size_t np;
    char msg[ENG_ERRMSG_LEN];
    cr_assert_eq(eng_tokenize(t, "Once upon a time", 16, true, &prompt, &np, msg), 0);
    const char *want =
        ", there was a little girl named Lily. She loved to play outside in the park. "
        "One day, she saw a big, red ball. She wanted to play with it, but it was too "
        "high.";
    int32_t *ids = greedy(&f, prompt, (uint32_t)np, 80);
    char text[1024] = {0};
    size_t w = 0;
    eng_detok_t d;
    eng_detok_init(&d, t);
    for (int i = 0; i < 80 && w < strlen(want); i++)
        w += eng_detok_push(&d, ids[i], text + w, sizeof(text) - w - 1);
    text[w] = 0;
    cr_expect(strncmp(text, want, strlen(want)) == 0, "got: %s", text);
    free(ids);
    free(prompt);
    fx_close(&f);
}

/* Prefill in one pass == prefill in chunks == token by token (logits of every position). */
static void check_chunking(const char *path) {
    fx_t f;
    fx_open(&f, path, 2, 2);
    int32_t toks[23];
    for (int i = 0; i < 23; i++) toks[i] = 3 + (i * 37) % (int32_t)(f.V - 3);
    float *all = malloc(sizeof(float) * 23 * f.V), *one = malloc(sizeof(float) * f.V);
    char msg[ENG_ERRMSG_LEN];
    kv_seq_t a, b;
    kv_seq_init(&a, eng_ctx_kv_pool(f.c));
    kv_seq_init(&b, eng_ctx_kv_pool(f.c));
    eng_batch_item_t it = {&a, toks, 23, all, true};
    cr_assert_eq(eng_forward(f.c, &it, 1, msg), 0, "%s", msg);
    cr_expect_eq(a.n_tokens, 23);
    uint32_t chunks[] = {1, 6, 3, 13};
    uint32_t done = 0;
    for (int k = 0; k < 4; k++) {
        eng_batch_item_t c = {&b, toks + done, chunks[k], one, false};
        cr_assert_eq(eng_forward(f.c, &c, 1, msg), 0, "%s", msg);
        done += chunks[k];
        double e = max_abs_diff(one, all + (size_t)(done - 1) * f.V, f.V);
        cr_expect_lt(e, 1e-4, "%s: position %u differs by %g", path, done - 1, e);
    }
    kv_seq_close(&a);
    kv_seq_close(&b);
    free(all), free(one);
    fx_close(&f);
}

Test(engine, test_chunked_prefill_equals_single_pass) {
    check_chunking(synth_path("tiny-f32"));
    if (have_stories()) check_chunking(STORIES_PATH);
}

/* Several sequences in one step give the same logits as each alone. */
Test(engine, test_batched_sequences_equal_separate_runs) {
    fx_t f;
    fx_open(&f, synth_path("tiny-f32"), 4, 2);
    uint32_t lens[3] = {7, 1, 12};
    int32_t toks[3][12];
    for (int s = 0; s < 3; s++)
        for (int i = 0; i < 12; i++) toks[s][i] = 3 + (s * 101 + i * 13) % (int32_t)(f.V - 3);
    float *sep = malloc(sizeof(float) * 3 * f.V), *bat = malloc(sizeof(float) * 3 * f.V);
    char msg[ENG_ERRMSG_LEN];
    /* separately: prefill all but the last token, then the last */
    kv_seq_t s1[3], s2[3];
    for (int s = 0; s < 3; s++) {
        kv_seq_init(&s1[s], eng_ctx_kv_pool(f.c));
        eng_batch_item_t it = {&s1[s], toks[s], lens[s], sep + s * f.V, false};
        cr_assert_eq(eng_forward(f.c, &it, 1, msg), 0, "%s", msg);
    }
    /* batched: a mixed step of one prefill chunk and decode tokens */
    eng_batch_item_t items[3];
    for (int s = 0; s < 3; s++) {
        kv_seq_init(&s2[s], eng_ctx_kv_pool(f.c));
        if (lens[s] > 1) {
            eng_batch_item_t it = {&s2[s], toks[s], lens[s] - 1, NULL, false};
            cr_assert_eq(eng_forward(f.c, &it, 1, msg), 0, "%s", msg);
        }
    }
    for (int s = 0; s < 3; s++)
        items[s] = (eng_batch_item_t){&s2[s], lens[s] > 1 ? toks[s] + lens[s] - 1 : toks[s], 1,
                                      bat + s * f.V, false};
    cr_assert_eq(eng_forward(f.c, items, 3, msg), 0, "%s", msg);
    for (int s = 0; s < 3; s++) {
        double e = max_abs_diff(sep + s * f.V, bat + s * f.V, f.V);
        cr_expect_lt(e, 1e-4, "sequence %d differs by %g", s, e);
        kv_seq_close(&s1[s]);
        kv_seq_close(&s2[s]);
    }
    cr_expect_float_eq(kv_pool_usage(eng_ctx_kv_pool(f.c)), 0.0, 1e-9);
    free(sep), free(bat);
    fx_close(&f);
}

/* F16, BF16 and Q8_0 weights give logits close to F32 and the same greedy choice. */
Test(engine, test_weight_types_agree_with_f32) {
    const char *types[] = {"tiny-f16", "tiny-bf16", "tiny-q8_0"};
    const double tol[] = {2e-2, 1e-1, 1e-1};
    fx_t ref;
    fx_open(&ref, synth_path("tiny-f32"), 1, 2);
    const int32_t prompt[] = {1, 300, 301, 302, 303, 304};
    float *lr = malloc(sizeof(float) * ref.V), *lt = malloc(sizeof(float) * ref.V);
    char msg[ENG_ERRMSG_LEN];
    kv_seq_t s;
    kv_seq_init(&s, eng_ctx_kv_pool(ref.c));
    eng_batch_item_t it = {&s, prompt, 6, lr, false};
    cr_assert_eq(eng_forward(ref.c, &it, 1, msg), 0, "%s", msg);
    kv_seq_close(&s);
    for (int k = 0; k < 3; k++) {
        fx_t f;
        fx_open(&f, synth_path(types[k]), 1, 2);
        kv_seq_init(&s, eng_ctx_kv_pool(f.c));
        eng_batch_item_t i2 = {&s, prompt, 6, lt, false};
        cr_assert_eq(eng_forward(f.c, &i2, 1, msg), 0, "%s", msg);
        double e = max_abs_diff(lr, lt, ref.V), mx = 0;
        for (uint32_t i = 0; i < ref.V; i++) mx = fmax(mx, fabs(lr[i]));
        cr_expect_lt(e / mx, tol[k], "%s: relative logit error %g", types[k], e / mx);
        kv_seq_close(&s);
        fx_close(&f);
    }
    free(lr), free(lt);
    fx_close(&ref);
}

Test(engine, test_forward_refuses_bad_batches_without_side_effects) {
    fx_t f;
    fx_open(&f, synth_path("tiny-f32"), 2, 1);
    uint32_t n_ctx = eng_ctx_n_ctx(f.c);
    char msg[ENG_ERRMSG_LEN] = {0};
    kv_seq_t s;
    kv_seq_init(&s, eng_ctx_kv_pool(f.c));
    int32_t bad = (int32_t)f.V, neg = -1, ok = 5;
    eng_batch_item_t it = {&s, &bad, 1, NULL, false};
    cr_expect_eq(eng_forward(f.c, &it, 1, msg), ENG_ERANGE);
    cr_expect(strstr(msg, "vocabulary"), "%s", msg);
    it.tokens = &neg;
    cr_expect_eq(eng_forward(f.c, &it, 1, msg), ENG_ERANGE);
    cr_expect_eq(s.n_tokens, 0);
    cr_expect_eq(s.n_blocks, 0);
    /* context overflow */
    int32_t *many = calloc(n_ctx + 1, sizeof(int32_t));
    s.n_tokens = 0;
    eng_batch_item_t big = {&s, many, 300, NULL, false};
    cr_expect_neq(eng_forward(f.c, &big, 1, msg), 0); /* 300 > 256-token context */
    cr_expect_eq(s.n_tokens, 0);
    /* the same sequence twice in one step */
    it.tokens = &ok;
    eng_batch_item_t two[2] = {it, it};
    cr_expect_eq(eng_forward(f.c, two, 2, msg), ENG_EINVAL);
    cr_expect_eq(eng_forward(f.c, &it, 1, msg), 0, "%s", msg);
    cr_expect_eq(s.n_tokens, 1);
    kv_seq_close(&s);
    free(many);
    fx_close(&f);
}

Test(engine, test_kv_pool_exhaustion_is_reported_not_fatal) {
    eng_model_t *m;
    eng_ctx_t *c;
    char msg[ENG_ERRMSG_LEN];
    cr_assert_eq(eng_model_load(&m, synth_path("tiny-f32"), msg), 0, "%s", msg);
    eng_ctx_params_t p;
    eng_ctx_params_default(&p);
    p.device = ENG_DEVICE_CPU; /* the CPU backend under test; GPU parity is in test_cuda.c */
    p.block_size = 4;
    p.kv_mem_bytes = 2 * 2 * 32 * 4 * 4 * 3; /* 3 blocks of 4 tokens: 2 layers, kv_dim 32 */
    cr_assert_eq(eng_ctx_create(&c, m, &p, msg), 0, "%s", msg);
    cr_assert_eq(eng_ctx_kv_pool(c)->n_blocks, 3);
    kv_seq_t s;
    kv_seq_init(&s, eng_ctx_kv_pool(c));
    int32_t toks[16] = {1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
    eng_batch_item_t it = {&s, toks, 13, NULL, false};
    cr_expect_eq(eng_forward(c, &it, 1, msg), ENG_ENOSPACE);
    cr_expect(strstr(msg, "free blocks"), "%s", msg);
    cr_expect_eq(s.n_blocks, 0);
    it.n_tokens = 12;
    cr_expect_eq(eng_forward(c, &it, 1, msg), 0, "%s", msg);
    kv_seq_close(&s);
    eng_ctx_free(c);
    eng_model_free(m);
}

Test(engine, test_model_load_names_missing_tensor_and_bad_architecture) {
    eng_model_t *m;
    char msg[ENG_ERRMSG_LEN] = {0};
    cr_expect_eq(eng_model_load(&m, "/nonexistent.gguf", msg), ENG_EIO);
    /* a GGUF with the right metadata but no tensors */
    FILE *o = fopen("/tmp/tidald-empty.gguf", "wb");
    const char hdr[] = "GGUF\x03\x00\x00\x00"
                       "\x00\x00\x00\x00\x00\x00\x00\x00"
                       "\x00\x00\x00\x00\x00\x00\x00\x00";
    fwrite(hdr, 1, 24, o);
    fclose(o);
    cr_expect_eq(eng_model_load(&m, "/tmp/tidald-empty.gguf", msg), ENG_EFORMAT);
    cr_expect(strstr(msg, "general.architecture"), "%s", msg);
    remove("/tmp/tidald-empty.gguf");
}

/* Argmax items get the index of the largest last-token logit (the lowest on ties), whatever
 * the mix of items in the batch. */
Test(engine, test_argmax_items_get_the_greedy_id_of_their_logits) {
    fx_t f;
    fx_open(&f, synth_path("tiny-f32"), 4, 2);
    char msg[ENG_ERRMSG_LEN];
    kv_seq_t s[4];
    float *l = malloc(sizeof(float) * f.V * 4);
    int32_t prompt[6] = {1, 20, 30, 40, 50, 60}, ids[4] = {-1, -1, -1, -1};
    for (int i = 0; i < 4; i++) kv_seq_init(&s[i], eng_ctx_kv_pool(f.c));
    /* 0 and 2 want logits, 1 and 3 only the argmax; 3 is a prefill chunk */
    eng_batch_item_t items[4] = {{&s[0], prompt, 3, l, false},
                                 {&s[1], prompt, 3, NULL, false, NULL, NULL, &ids[1]},
                                 {&s[2], prompt + 1, 4, l + f.V, false},
                                 {&s[3], prompt, 6, NULL, false, NULL, NULL, &ids[3]}};
    cr_assert_eq(eng_forward(f.c, items, 4, msg), 0, "%s", msg);
    cr_expect_eq(ids[1], test_argmax(l, f.V), "same prompt as item 0: same greedy id");
    /* and item 3's id equals what a logits item with its tokens gets */
    kv_seq_t t;
    kv_seq_init(&t, eng_ctx_kv_pool(f.c));
    eng_batch_item_t ref = {&t, prompt, 6, l + 2 * (size_t)f.V, false};
    cr_assert_eq(eng_forward(f.c, &ref, 1, msg), 0, "%s", msg);
    cr_expect_eq(ids[3], test_argmax(l + 2 * (size_t)f.V, f.V));
    kv_seq_close(&t);
    for (int i = 0; i < 4; i++) kv_seq_close(&s[i]);
    free(l);
    fx_close(&f);
}

/* Greedy steps on a sliding-window model with the split cache (local layers in a pool of their
 * own, blocks out of the window returned) or every position kept (swa_full): every step's
 * logits, and the most local blocks held at once. */
static void swa_run(eng_model_t *m, bool swa_full, bool f16, const eng_attn_params_t *attn,
                    uint32_t window, uint32_t chunk, uint32_t n, float *logits_out,
                    uint32_t *local_peak) {
    char msg[ENG_ERRMSG_LEN];
    eng_ctx_params_t p;
    eng_ctx_params_default(&p);
    p.device = ENG_DEVICE_CPU;
    p.max_seqs = 2;
    p.n_ctx = 256;
    p.block_size = 4;
    p.kv_f16 = f16;
    p.swa_full = swa_full;
    eng_ctx_t *c;
    cr_assert_eq(eng_ctx_create(&c, m, &p, msg), 0, "%s", msg);
    kv_pool_t *pool = eng_ctx_kv_pool(c);
    cr_assert_eq(pool->local != NULL, !swa_full, "a split cache unless swa_full");
    uint32_t V = eng_model_hparams(m)->n_vocab;
    kv_seq_t s;
    kv_seq_init(&s, pool);
    const int32_t prompt[7] = {1, 403, 407, 261, 378, 300, 42};
    eng_batch_item_t it = {&s, prompt, 7, logits_out};
    cr_assert_eq(eng_forward(c, &it, 1, msg), 0, "%s", msg);
    *local_peak = 0;
    for (uint32_t i = 1; i < n; i++) {
        int32_t id = test_argmax(logits_out + (size_t)(i - 1) * V, V);
        if (window) eng_seq_make_room(c, &s, window, 1, chunk);
        eng_batch_item_t d = {&s, &id, 1, logits_out + (size_t)i * V, false, attn};
        cr_assert_eq(eng_forward(c, &d, 1, msg), 0, "step %u: %s", i, msg);
        if (pool->local && pool->local->n_blocks - pool->local->n_free > *local_peak)
            *local_peak = pool->local->n_blocks - pool->local->n_free;
    }
    kv_seq_close(&s);
    cr_expect_eq(pool->n_free, pool->n_blocks);
    if (pool->local) cr_expect_eq(pool->local->n_free, pool->local->n_blocks);
    eng_ctx_free(c);
}

/* Gemma 3's local layers (synthetic: a 16-token window on ten layers of twelve) keep about a
 * window of keys, yet every logit of 96 steps is bit for bit what the cache that keeps every
 * position computes: dense, with TidalDecode on the global layers, with stream eviction past a
 * 40-token window (K-shift through both tables), on F32 and F16 caches. */
Test(engine, test_sliding_window_cache_frees_blocks_and_changes_nothing) {
    eng_model_t *m;
    char msg[ENG_ERRMSG_LEN];
    cr_assert_eq(eng_model_load(&m, synth_path("gemma-f32"), msg), 0, "%s", msg);
    const eng_hparams_t *hp = eng_model_hparams(m);
    cr_assert_eq(hp->swa_window, 16);
    eng_attn_params_t tidal = {ENG_ATTN_TIDAL, 8};
    eng_attn_defaults(hp, &tidal);
    enum { N = 96 };
    size_t V = hp->n_vocab;
    float *a = malloc(sizeof(float) * V * N), *b = malloc(sizeof(float) * V * N);
    /* evicting 24 at a time K-shifts tokens next to the sink block, back into the window of
     * local layers that had left it behind */
    struct {
        const eng_attn_params_t *attn;
        uint32_t window, chunk;
        bool f16;
    } cfg[] = {{NULL, 0, 0, false},
               {&tidal, 0, 0, false},
               {&tidal, 40, 8, false},
               {NULL, 40, 24, true},
               {&tidal, 48, 32, false}};
    for (size_t k = 0; k < sizeof(cfg) / sizeof(cfg[0]); k++) {
        uint32_t peak_split, peak_full;
        swa_run(m, false, cfg[k].f16, cfg[k].attn, cfg[k].window, cfg[k].chunk, N, a, &peak_split);
        swa_run(m, true, cfg[k].f16, cfg[k].attn, cfg[k].window, cfg[k].chunk, N, b, &peak_full);
        for (size_t i = 0; i < V * N; i++)
            cr_assert_eq(a[i], b[i], "config %zu, step %zu, logit %zu: %g split, %g full", k, i / V,
                         i % V, a[i], b[i]);
        /* a query sees 16 keys: with 4-token blocks at most 5 blocks before the new one, and
         * the sink block */
        cr_expect_leq(peak_split, 7, "config %zu: %u local blocks held", k, peak_split);
        cr_expect_gt(peak_split, 0);
    }
    free(a);
    free(b);
    eng_model_free(m);
}

/* One stream over stories260K past a 48-token window, evicting 5 tokens at a time (never a
 * whole block): every step's logits, the tokens fed (greedy when ids_in is NULL, else
 * ids_in's), and the tokens the cache held at each step. */
static void stream_run(eng_model_t *m, uint32_t block_size, bool f16, const int32_t *ids_in,
                       uint32_t n, float *logits_out, int32_t *ids_out, uint32_t *held) {
    char msg[ENG_ERRMSG_LEN];
    eng_ctx_params_t p;
    eng_ctx_params_default(&p);
    p.device = ENG_DEVICE_CPU;
    p.max_seqs = 1;
    p.n_ctx = 256;
    p.block_size = block_size;
    p.kv_f16 = f16;
    eng_ctx_t *c;
    cr_assert_eq(eng_ctx_create(&c, m, &p, msg), 0, "%s", msg);
    uint32_t V = eng_model_hparams(m)->n_vocab;
    kv_seq_t s;
    kv_seq_init(&s, eng_ctx_kv_pool(c));
    s.n_sinks = 4;
    int32_t id = 1;
    for (uint32_t i = 0; i < n; i++) {
        eng_seq_make_room(c, &s, 48, 1, 5);
        held[i] = s.n_tokens;
        eng_batch_item_t it = {&s, &id, 1, logits_out + (size_t)i * V};
        cr_assert_eq(eng_forward(c, &it, 1, msg), 0, "step %u: %s", i, msg);
        ids_out[i] = id;
        id = ids_in ? ids_in[i + 1 < n ? i + 1 : i] : test_argmax(logits_out + (size_t)i * V, V);
    }
    kv_seq_close(&s);
    eng_ctx_free(c);
}

/* The sinks cost exactly their 4 slots at any block size: a stream evicting 5 tokens at a time
 * from a 48-token window computes, with blocks of 16 (4 sinks in a block of 16) and of 5, what
 * single-token blocks compute (where eviction is exact by construction): the same window
 * (4 sinks and the newest 44 tokens), the same logits to float rounding (the blocks cut the
 * keys into other chunks of the online softmax, which an F16 cache amplifies), the same greedy
 * text.
 * Before eviction was exact, blocks of 16 kept 16 old tokens and 32 new ones. */
Test(engine, test_exact_sinks_stream_the_same_window_at_every_block_size) {
    if (!have_stories()) cr_skip_test("%s not present; skipping", STORIES_PATH);
    eng_model_t *m;
    char msg[ENG_ERRMSG_LEN];
    cr_assert_eq(eng_model_load(&m, STORIES_PATH, msg), 0, "%s", msg);
    enum { N = 160 };
    size_t V = eng_model_hparams(m)->n_vocab;
    float *ref = malloc(sizeof(float) * V * N), *got = malloc(sizeof(float) * V * N);
    int32_t ids[N], fed[N];
    uint32_t held_ref[N], held[N];
    for (int f16 = 0; f16 < 2; f16++) {
        stream_run(m, 1, f16, NULL, N, ref, ids, held_ref);
        uint32_t drops = 0; /* the window fills (47 tokens and the new one), then evicts */
        for (uint32_t i = 1; i < N; i++) drops += held_ref[i] < held_ref[i - 1];
        cr_assert_gt(drops, 20);
        cr_assert_eq(held_ref[47], 47);
        const uint32_t sizes[] = {16, 5};
        for (size_t k = 0; k < 2; k++) {
            stream_run(m, sizes[k], f16, ids, N, got, fed, held);
            for (uint32_t i = 0; i < N; i++) {
                cr_assert_eq(held[i], held_ref[i], "block %u step %u", sizes[k], i);
                cr_assert_eq(
                    test_argmax(got + (size_t)i * V, V), test_argmax(ref + (size_t)i * V, V),
                    "block %u%s step %u: another greedy token", sizes[k], f16 ? " (F16)" : "", i);
                for (size_t j = 0; j < V; j++)
                    cr_assert(fabsf(got[i * V + j] - ref[i * V + j]) <
                                  (f16 ? 1e-2f : 1e-4f) * (1 + fabsf(ref[i * V + j])),
                              "block %u%s step %u logit %zu: %g vs %g", sizes[k],
                              f16 ? " (F16)" : "", i, j, got[i * V + j], ref[i * V + j]);
            }
        }
    }
    free(ref);
    free(got);
    eng_model_free(m);
}
