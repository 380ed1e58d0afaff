/* test_scheduler.c - continuous batching: parity with solo runs, stop strings, logprobs and
 * entropy, cancellation freeing KV, the bounded queue and deadlines. */
#include "../../sched/sched.h"
#include "../../engine/gguf.h"
#include "helpers.h"

#include <criterion/criterion.h>
#include <dlfcn.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    eng_model_t *m;
    eng_ctx_t *c;
    sched_t *s;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int wakes;
} sfx_t;

static void on_notify(void *arg) {
    sfx_t *f = arg;
    pthread_mutex_lock(&f->mu);
    f->wakes++;
    pthread_cond_broadcast(&f->cv);
    pthread_mutex_unlock(&f->mu);
}

static eng_device_t g_dev = ENG_DEVICE_CPU; /* the CUDA tests at the end switch it */

static void sfx_open(sfx_t *f, const char *path, uint32_t max_running, uint32_t max_waiting,
                     uint32_t step_tokens) {
    char msg[ENG_ERRMSG_LEN];
    memset(f, 0, sizeof(*f));
    pthread_mutex_init(&f->mu, NULL);
    pthread_cond_init(&f->cv, NULL);
    cr_assert_eq(eng_model_load(&f->m, path, msg), 0, "%s", msg);
    eng_ctx_params_t p;
    eng_ctx_params_default(&p);
    p.device = g_dev; /* the CPU backend, but for the cuda tests below */
    p.max_seqs = max_running;
    p.n_threads = 2;
    p.n_ctx = 256;
    cr_assert_eq(eng_ctx_create(&f->c, f->m, &p, msg), 0, "%s", msg);
    sched_params_t sp = {.max_running = max_running,
                         .max_waiting = max_waiting,
                         .step_tokens = step_tokens,
                         .notify = on_notify,
                         .notify_arg = f};
    cr_assert_eq(sched_create(&f->s, f->c, f->m, &sp, msg), 0, "%s", msg);
}

static void sfx_close(sfx_t *f) {
    sched_destroy(f->s);
    eng_ctx_free(f->c);
    eng_model_free(f->m);
}

static sched_req_params_t greedy_params(const eng_model_t *m, const char *text,
                                        uint32_t max_tokens) {
    sched_req_params_t p = {0};
    size_t n;
    char msg[ENG_ERRMSG_LEN];
    const eng_tokenizer_t *t = eng_model_tokenizer(m);
    cr_assert_eq(eng_tokenize(t, text, strlen(text), true, &p.prompt, &n, msg), 0);
    p.n_prompt = (uint32_t)n;
    p.max_tokens = max_tokens;
    eng_sampler_params_default(&p.sampling);
    p.sampling.temperature = 0;
    p.logprobs = -1;
    return p;
}

typedef struct {
    char text[4096];
    size_t len;
    sched_finish_t finish;
    uint32_t n_events, prompt_tokens, completion_tokens;
    sched_event_t first;
} result_t;

/* Collect events until the final one (at most 20 s). */
static void collect(sfx_t *f, sched_request_t *r, result_t *out) {
    memset(out, 0, sizeof(*out));
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        sched_event_t ev[32];
        size_t n = sched_request_drain(r, ev, 32);
        for (size_t i = 0; i < n; i++) {
            if (out->n_events == 0) {
                out->first = ev[i]; /* scalars only: what it owns is freed below */
                out->first.text = NULL;
                out->first.attn = NULL;
            }
            out->n_events++;
            if (ev[i].text && out->len + ev[i].text_len < sizeof(out->text)) {
                memcpy(out->text + out->len, ev[i].text, ev[i].text_len);
                out->len += ev[i].text_len;
            }
            bool fin = ev[i].finish != SCHED_FINISH_NONE;
            if (fin) {
                out->finish = ev[i].finish;
                out->prompt_tokens = ev[i].prompt_tokens;
                out->completion_tokens = ev[i].completion_tokens;
            }
            sched_event_free(&ev[i]);
            if (fin) {
                for (size_t k = i + 1; k < n; k++) sched_event_free(&ev[k]);
                return;
            }
        }
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        cr_assert_lt(now.tv_sec - t0.tv_sec, 20, "no final event within 20 s");
        pthread_mutex_lock(&f->mu);
        struct timespec dl;
        clock_gettime(CLOCK_REALTIME, &dl);
        dl.tv_nsec += 20 * 1000 * 1000;
        if (dl.tv_nsec >= 1000000000) dl.tv_sec++, dl.tv_nsec -= 1000000000;
        pthread_cond_timedwait(&f->cv, &f->mu, &dl);
        pthread_mutex_unlock(&f->mu);
    }
}

/* Each prompt alone on a fresh scheduler: the reference the batched runs must equal. */
static void solo_runs(const char *const *prompts, int n, uint32_t max_tokens, bool ignore_eos,
                      result_t *out) {
    char msg[ENG_ERRMSG_LEN];
    for (int i = 0; i < n; i++) {
        sfx_t f;
        sfx_open(&f, STORIES_PATH, 4, 8, 512);
        sched_req_params_t p = greedy_params(f.m, prompts[i], max_tokens);
        p.ignore_eos = ignore_eos;
        sched_request_t *r = sched_request_create(&p);
        cr_assert_eq(sched_submit(f.s, r, msg), 0, "%s", msg);
        collect(&f, r, &out[i]);
        sched_request_release(r);
        sfx_close(&f);
    }
}

static const char *STORY =
    ", there was a little girl named Lily. She loved to play outside in the park.";

Test(scheduler, test_greedy_request_matches_llama_cpp_text_and_usage) {
    if (!have_stories()) cr_skip_test("%s not present; skipping", STORIES_PATH);
    sfx_t f;
    sfx_open(&f, STORIES_PATH, 4, 8, 512);
    sched_req_params_t p = greedy_params(f.m, "Once upon a time", 20);
    sched_request_t *r = sched_request_create(&p);
    char msg[ENG_ERRMSG_LEN];
    cr_assert_eq(sched_submit(f.s, r, msg), 0, "%s", msg);
    result_t res;
    collect(&f, r, &res);
    cr_expect_eq(res.finish, SCHED_FINISH_LENGTH);
    cr_expect_eq(res.prompt_tokens, 5);
    cr_expect_eq(res.completion_tokens, 20);
    cr_expect(strncmp(res.text, STORY, res.len) == 0 && res.len > 40, "got '%s'", res.text);
    sched_request_release(r);
    sfx_close(&f);
}

/* Mixed prompts submitted together (small step budget: prefill is chunked and interleaved)
 * give the same text as each alone. */
Test(scheduler, test_concurrent_requests_equal_solo_runs) {
    if (!have_stories()) cr_skip_test("%s not present; skipping", STORIES_PATH);
    const char *prompts[4] = {"Once upon a time", "The dog", "Lily and Tom went to the big park",
                              "One day"};
    result_t solo[4], both[4];
    char msg[ENG_ERRMSG_LEN];
    solo_runs(prompts, 4, 24, false, solo);
    sfx_t f;
    sfx_open(&f, STORIES_PATH, 4, 8, 6);
    sched_request_t *rs[4];
    for (int i = 0; i < 4; i++) {
        sched_req_params_t p = greedy_params(f.m, prompts[i], 24);
        rs[i] = sched_request_create(&p);
        cr_assert_eq(sched_submit(f.s, rs[i], msg), 0, "%s", msg);
    }
    for (int i = 0; i < 4; i++) {
        collect(&f, rs[i], &both[i]);
        cr_expect_str_eq(both[i].text, solo[i].text, "prompt %d", i);
        sched_request_release(rs[i]);
    }
    sched_stats_t st;
    sched_stats(f.s, &st);
    cr_expect_gt(st.batch_sum, st.batch_count, "steps never batched two sequences");
    cr_expect_eq(st.generation_tokens, 4 * 24);
    sfx_close(&f);
}

Test(scheduler, test_stop_string_cuts_text_before_it) {
    if (!have_stories()) cr_skip_test("%s not present; skipping", STORIES_PATH);
    sfx_t f;
    sfx_open(&f, STORIES_PATH, 2, 8, 512);
    sched_req_params_t p = greedy_params(f.m, "Once upon a time", 60);
    p.stop[0] = strdup("xyz never");
    p.stop[1] = strdup("Lily");
    p.n_stop = 2;
    sched_request_t *r = sched_request_create(&p);
    char msg[ENG_ERRMSG_LEN];
    cr_assert_eq(sched_submit(f.s, r, msg), 0, "%s", msg);
    result_t res;
    collect(&f, r, &res);
    cr_expect_eq(res.finish, SCHED_FINISH_STOP);
    cr_expect_str_eq(res.text, ", there was a little girl named ");
    sched_request_release(r);
    sfx_close(&f);
}

Test(scheduler, test_logprobs_and_entropy_match_explicit_computation) {
    if (!have_stories()) cr_skip_test("%s not present; skipping", STORIES_PATH);
    sfx_t f;
    sfx_open(&f, STORIES_PATH, 2, 8, 512);
    sched_req_params_t p = greedy_params(f.m, "Once upon a time", 1);
    p.logprobs = 5;
    p.entropy = true;
    /* the explicit distribution of the first token */
    uint32_t V = eng_model_hparams(f.m)->n_vocab;
    float *l = malloc(sizeof(float) * V);
    kv_seq_t seq;
    eng_ctx_params_t cp;
    eng_ctx_params_default(&cp);
    cp.device = ENG_DEVICE_CPU; /* the CPU backend under test; GPU parity is in test_cuda.c */
    eng_ctx_t *c2;
    char msg[ENG_ERRMSG_LEN];
    cr_assert_eq(eng_ctx_create(&c2, f.m, &cp, msg), 0);
    kv_seq_init(&seq, eng_ctx_kv_pool(c2));
    eng_batch_item_t it = {&seq, p.prompt, p.n_prompt, l, false};
    cr_assert_eq(eng_forward(c2, &it, 1, msg), 0);
    double mx = l[0], z = 0, h = 0;
    for (uint32_t i = 0; i < V; i++) mx = fmax(mx, l[i]);
    for (uint32_t i = 0; i < V; i++) z += exp(l[i] - mx);
    for (uint32_t i = 0; i < V; i++) {
        double pr = exp(l[i] - mx) / z;
        if (pr > 0) h -= pr * log2(pr);
    }
    sched_request_t *r = sched_request_create(&p);
    cr_assert_eq(sched_submit(f.s, r, msg), 0, "%s", msg);
    result_t res;
    collect(&f, r, &res);
    sched_event_t *e = &res.first;
    cr_expect_eq(e->token, 432);
    cr_expect_eq(e->n_top, 5);
    cr_expect_eq(e->top[0].id, 432);
    for (int k = 1; k < 5; k++) cr_expect_geq(e->top[k - 1].logprob, e->top[k].logprob);
    double want_lp = l[432] - (mx + log(z));
    cr_expect(fabs(e->logprob - want_lp) < 1e-4, "logprob %g want %g", e->logprob, want_lp);
    cr_expect(fabs(e->entropy_bits - h) < 1e-3, "entropy %g want %g", e->entropy_bits, h);
    kv_seq_close(&seq);
    eng_ctx_free(c2);
    free(l);
    sched_request_release(r);
    sfx_close(&f);
}

Test(scheduler, test_cancel_frees_kv_within_a_step) {
    sfx_t f;
    sfx_open(&f, synth_path("tiny-f32"), 2, 8, 512);
    sched_req_params_t p = greedy_params(f.m, "hello world", 200);
    p.ignore_eos = true;
    sched_request_t *r = sched_request_create(&p);
    char msg[ENG_ERRMSG_LEN];
    cr_assert_eq(sched_submit(f.s, r, msg), 0, "%s", msg);
    sched_event_t ev[4];
    while (sched_request_drain(r, ev, 1) == 0) usleep(1000);
    sched_event_free(&ev[0]);
    sched_request_cancel(r);
    result_t res;
    collect(&f, r, &res);
    cr_expect_eq(res.finish, SCHED_FINISH_CANCELLED);
    usleep(20000);
    sched_stats_t st;
    sched_stats(f.s, &st);
    cr_expect_float_eq(st.kv_usage, 0.0, 1e-9);
    cr_expect_float_eq(kv_pool_usage(eng_ctx_kv_pool(f.c)), 0.0, 1e-9);
    sched_request_release(r);
    sfx_close(&f);
}

Test(scheduler, test_queue_bound_and_deadline_and_bad_prompts) {
    sfx_t f;
    sfx_open(&f, synth_path("tiny-f32"), 1, 1, 512);
    char msg[ENG_ERRMSG_LEN];
    sched_req_params_t p = greedy_params(f.m, "hello", 100000);
    p.ignore_eos = true;
    p.evict = true; /* runs until cancelled, however fast it fills its window */
    p.sinks = 4;
    sched_request_t *a = sched_request_create(&p);
    cr_assert_eq(sched_submit(f.s, a, msg), 0, "%s", msg);
    while (sched_request_start_time(a) == 0) usleep(1000); /* a is running */
    p = greedy_params(f.m, "hello", 4);
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    p.deadline = now.tv_sec + now.tv_nsec * 1e-9 + 0.05;
    sched_request_t *b = sched_request_create(&p);
    cr_assert_eq(sched_submit(f.s, b, msg), 0, "%s", msg); /* waits: one slot */
    p = greedy_params(f.m, "hello", 4);
    sched_request_t *c = sched_request_create(&p);
    cr_expect_eq(sched_submit(f.s, c, msg), ENG_ERANGE);
    cr_expect(strstr(msg, "queue is full"), "%s", msg);
    result_t res;
    collect(&f, b, &res);
    cr_expect_eq(res.finish, SCHED_FINISH_TIMEOUT);
    sched_request_cancel(a);
    collect(&f, a, &res);
    cr_expect_eq(res.finish, SCHED_FINISH_CANCELLED);
    /* empty and oversized prompts are refused up front */
    sched_req_params_t e = {0};
    e.max_tokens = 1;
    sched_request_t *d = sched_request_create(&e);
    cr_expect_eq(sched_submit(f.s, d, msg), ENG_EINVAL);
    sched_req_params_t big = {0};
    big.prompt = calloc(300, sizeof(int32_t));
    big.n_prompt = 300;
    big.max_tokens = 1;
    sched_request_t *g = sched_request_create(&big);
    cr_expect_eq(sched_submit(f.s, g, msg), ENG_EINVAL);
    cr_expect(strstr(msg, "context"), "%s", msg);
    sched_request_release(a);
    sched_request_release(b);
    sched_request_release(c);
    sched_request_release(d);
    sched_request_release(g);
    sfx_close(&f);
}

/* A KV pool too small for everyone at once: under the preempt policy every request finishes
 * with exactly its solo text (recomputed after preemption); under the evict policy every
 * request (each allowing eviction) finishes, with middle blocks dropped. Nothing fails. */
static void run_pressure(bool evict_policy) {
    if (!have_stories()) cr_skip_test("%s not present; skipping", STORIES_PATH);
    const char *prompts[3] = {"Once upon a time", "The dog", "One day"};
    result_t solo[3], got[3];
    char msg[ENG_ERRMSG_LEN];
    solo_runs(prompts, 3, 60, true, solo);
    sfx_t f;
    memset(&f, 0, sizeof(f));
    pthread_mutex_init(&f.mu, NULL);
    pthread_cond_init(&f.cv, NULL);
    cr_assert_eq(eng_model_load(&f.m, STORIES_PATH, msg), 0);
    eng_ctx_params_t cp;
    eng_ctx_params_default(&cp);
    cp.device = ENG_DEVICE_CPU; /* the CPU backend under test; GPU parity is in test_cuda.c */
    cp.max_seqs = 4;
    cp.n_ctx = 256;
    cp.kv_mem_bytes = (size_t)8 * 5 * 2 * 16 * 32 * 4; /* 8 blocks: 5 layers, kv_dim 32 */
    cr_assert_eq(eng_ctx_create(&f.c, f.m, &cp, msg), 0, "%s", msg);
    cr_assert_eq(eng_ctx_kv_pool(f.c)->n_blocks, 8);
    sched_params_t sp = {.max_running = 4,
                         .max_waiting = 8,
                         .step_tokens = 512,
                         .notify = on_notify,
                         .notify_arg = &f,
                         .pressure_evict = evict_policy};
    cr_assert_eq(sched_create(&f.s, f.c, f.m, &sp, msg), 0);
    sched_request_t *rs[3];
    for (int i = 0; i < 3; i++) {
        sched_req_params_t p = greedy_params(f.m, prompts[i], 60);
        p.ignore_eos = true;
        p.sinks = 4;
        p.evict = evict_policy; /* pressure eviction takes blocks only from those that allow it */
        rs[i] = sched_request_create(&p);
        cr_assert_eq(sched_submit(f.s, rs[i], msg), 0, "%s", msg);
    }
    for (int i = 0; i < 3; i++) {
        collect(&f, rs[i], &got[i]);
        cr_expect_eq(got[i].finish, SCHED_FINISH_LENGTH);
        cr_expect_eq(got[i].completion_tokens, 60);
        if (!evict_policy) cr_expect_str_eq(got[i].text, solo[i].text, "request %d", i);
        sched_request_release(rs[i]);
    }
    sched_stats_t st;
    sched_stats(f.s, &st);
    if (evict_policy)
        cr_expect_gt(st.evicted_tokens, 0);
    else
        cr_expect_gt(st.preemptions, 0);
    usleep(20000);
    cr_expect_float_eq(kv_pool_usage(eng_ctx_kv_pool(f.c)), 0.0, 1e-9);
    sfx_close(&f);
}

Test(scheduler, test_memory_pressure_preempts_and_recomputes_exactly) {
    run_pressure(false);
}
Test(scheduler, test_memory_pressure_evicts_middle_blocks) {
    run_pressure(true);
}

/* The scheduler on the CUDA backend: greedy requests (their ids chosen on the GPU), a sampled
 * one and a tidal one in the same steps, with chunked prefill, give what the CPU gives. */
Test(cuda, test_scheduler_on_the_gpu_equals_the_cpu) {
    char msg[ENG_ERRMSG_LEN];
    need_cuda_gpu();
    if (!have_stories()) cr_skip_test("%s not present; skipping", STORIES_PATH);
    const char *prompts[4] = {"Once upon a time", "The dog", "Lily and Tom went to the big park",
                              "One day"};
    result_t out[2][4];
    for (int dev = 0; dev < 2; dev++) {
        g_dev = dev ? ENG_DEVICE_CUDA : ENG_DEVICE_CPU;
        sfx_t f;
        sfx_open(&f, STORIES_PATH, 4, 8, 6);
        cr_assert_str_eq(eng_ctx_backend_name(f.c), dev ? "cuda" : "cpu");
        sched_request_t *rs[4];
        for (int i = 0; i < 4; i++) {
            sched_req_params_t p = greedy_params(f.m, prompts[i], 24);
            if (i == 2) { /* sampled: its logits come back to the host */
                p.sampling.temperature = 0.8f;
                p.sampling.seed = 42;
            }
            if (i == 3) {
                p.attn = (eng_attn_params_t){ENG_ATTN_TIDAL, 8};
                eng_attn_defaults(eng_model_hparams(f.m), &p.attn);
            }
            rs[i] = sched_request_create(&p);
            cr_assert_eq(sched_submit(f.s, rs[i], msg), 0, "%s", msg);
        }
        for (int i = 0; i < 4; i++) {
            collect(&f, rs[i], &out[dev][i]);
            sched_request_release(rs[i]);
        }
        sfx_close(&f);
    }
    cr_expect(strncmp(out[1][0].text, STORY, out[1][0].len) == 0 && out[1][0].len > 40, "got '%s'",
              out[1][0].text);
    for (int i = 0; i < 4; i++) {
        cr_expect_eq(out[1][i].finish, out[0][i].finish, "request %d", i);
        cr_expect_str_eq(out[1][i].text, out[0][i].text, "request %d", i);
    }
}

/* ---- memory pressure, bounded queues and the allocate-or-preempt loop ---------------- */

/* A scheduler over a pool of exactly n_blocks F32 blocks of block_size tokens of stories260K
 * (5 layers, kv_dim 32), with a 1,024-token context. */
static void sfx_open_blocks(sfx_t *f, uint32_t block_size, uint32_t n_blocks, uint32_t max_running,
                            uint32_t max_waiting, uint32_t step_tokens, bool evict_policy) {
    char msg[ENG_ERRMSG_LEN];
    memset(f, 0, sizeof(*f));
    pthread_mutex_init(&f->mu, NULL);
    pthread_cond_init(&f->cv, NULL);
    cr_assert_eq(eng_model_load(&f->m, STORIES_PATH, msg), 0, "%s", msg);
    eng_ctx_params_t cp;
    eng_ctx_params_default(&cp);
    cp.device = ENG_DEVICE_CPU;
    cp.max_seqs = max_running;
    cp.n_threads = 2;
    cp.n_ctx = 1024;
    cp.kv_f16 = false;
    cp.block_size = block_size;
    cp.kv_mem_bytes = (size_t)n_blocks * 5 * 2 * block_size * 32 * 4;
    cr_assert_eq(eng_ctx_create(&f->c, f->m, &cp, msg), 0, "%s", msg);
    cr_assert_eq(eng_ctx_kv_pool(f->c)->n_blocks, n_blocks);
    sched_params_t sp = {.max_running = max_running,
                         .max_waiting = max_waiting,
                         .step_tokens = step_tokens,
                         .notify = on_notify,
                         .notify_arg = f,
                         .pressure_evict = evict_policy};
    cr_assert_eq(sched_create(&f->s, f->c, f->m, &sp, msg), 0, "%s", msg);
}

/* The same with 16-token blocks. */
static void sfx_open_pool(sfx_t *f, uint32_t n_blocks, uint32_t max_running, uint32_t max_waiting,
                          uint32_t step_tokens, bool evict_policy) {
    sfx_open_blocks(f, 16, n_blocks, max_running, max_waiting, step_tokens, evict_policy);
}

/* Wait (bounded, as a hang guard only) until the scheduler reports nothing running or waiting,
 * then check the pool is empty. */
static void expect_idle_and_empty(sfx_t *f) {
    sched_stats_t st;
    for (int i = 0; i < 2000; i++) {
        sched_stats(f->s, &st);
        if (!st.running && !st.waiting && kv_pool_usage(eng_ctx_kv_pool(f->c)) == 0) break;
        usleep(5000);
    }
    cr_expect_eq(st.running, 0);
    cr_expect_eq(st.waiting, 0);
    cr_expect_float_eq(kv_pool_usage(eng_ctx_kv_pool(f->c)), 0.0, 1e-9);
}

/* Preemption while the waiting queue is full: the requeued request must find room in the
 * queue (it once wrote past an array of max_waiting entries), and every request still ends
 * with its solo text. */
Test(scheduler, test_preemption_with_a_full_queue_stays_in_bounds) {
    if (!have_stories()) cr_skip_test("%s not present; skipping", STORIES_PATH);
    const char *prompts[4] = {"Once upon a time", "The dog", "One day", "Lily"};
    result_t solo[4], got[4];
    solo_runs(prompts, 4, 50, true, solo);
    sfx_t f;
    sfx_open_pool(&f, 6, 2, 2, 512, false);
    char msg[ENG_ERRMSG_LEN];
    sched_request_t *rs[4];
    for (int i = 0; i < 4; i++) {
        sched_req_params_t p = greedy_params(f.m, prompts[i], 50);
        p.ignore_eos = true;
        rs[i] = sched_request_create(&p);
        if (i == 2) /* two running, then the queue fills */
            while (sched_request_start_time(rs[1]) == 0) usleep(1000);
        cr_assert_eq(sched_submit(f.s, rs[i], msg), 0, "request %d: %s", i, msg);
    }
    for (int i = 0; i < 4; i++) {
        collect(&f, rs[i], &got[i]);
        cr_expect_eq(got[i].finish, SCHED_FINISH_LENGTH, "request %d", i);
        cr_expect_str_eq(got[i].text, solo[i].text, "request %d", i);
        sched_request_release(rs[i]);
    }
    sched_stats_t st;
    sched_stats(f.s, &st);
    cr_expect_gt(st.preemptions, 0);
    expect_idle_and_empty(&f);
    sfx_close(&f);
}

/* The evict policy with chunked prefill and a pool of six 256-token blocks: requests
 * preempted while decoding come back and recompute ~260 tokens in 4-token chunks, and a chunk
 * that crosses into a new block finds the pool taken by the decoders batched before it. The
 * chunk's own request is then the newest, the one to preempt: it must be left out of the
 * batch (it once went in with a closed sequence, failing the whole step, and was touched
 * again after it finished). */
Test(scheduler, test_pressure_evict_with_chunked_prefill_never_fails_a_step) {
    if (!have_stories()) cr_skip_test("%s not present; skipping", STORIES_PATH);
    enum { N = 6 };
    const char *prompts[N] = {"Once upon a time", "The dog", "One day", "Lily", "Tom", "A cat"};
    sfx_t f;
    sfx_open_blocks(&f, 256, 6, 8, 16, 4, true);
    char msg[ENG_ERRMSG_LEN];
    sched_request_t *rs[N];
    for (int i = 0; i < N; i++) {
        sched_req_params_t p = greedy_params(f.m, prompts[i], 300);
        p.ignore_eos = true;
        rs[i] = sched_request_create(&p);
        cr_assert_eq(sched_submit(f.s, rs[i], msg), 0, "%s", msg);
    }
    for (int i = 0; i < N; i++) {
        result_t got;
        collect(&f, rs[i], &got);
        cr_expect_eq(got.finish, SCHED_FINISH_LENGTH, "request %d ended %s", i,
                     sched_finish_name(got.finish));
        cr_expect_eq(got.completion_tokens, 300, "request %d", i);
        sched_request_release(rs[i]);
    }
    sched_stats_t st;
    sched_stats(f.s, &st);
    cr_expect_gt(st.preemptions, 0);
    expect_idle_and_empty(&f);
    sfx_close(&f);
}

/* Pressure eviction takes blocks only from sequences that allow eviction and are not already
 * in the step's batch: a request with evict=false keeps every token (its text equals its solo
 * run), and so does an evicting stream that is batched first in every step. */
Test(scheduler, test_pressure_evict_spares_requests_that_did_not_ask) {
    if (!have_stories()) cr_skip_test("%s not present; skipping", STORIES_PATH);
    const char *prompts[2] = {"Once upon a time", "The dog"};
    result_t solo[2], got[2];
    solo_runs(prompts, 2, 50, true, solo);
    sfx_t f;
    sfx_open_pool(&f, 6, 2, 4, 512, true);
    char msg[ENG_ERRMSG_LEN];
    sched_request_t *rs[2];
    for (int i = 0; i < 2; i++) {
        sched_req_params_t p = greedy_params(f.m, prompts[i], 50);
        p.ignore_eos = true;
        p.evict = i == 0; /* the first may be evicted (when not batched), the second never */
        p.sinks = 4;
        rs[i] = sched_request_create(&p);
        cr_assert_eq(sched_submit(f.s, rs[i], msg), 0, "%s", msg);
        if (i == 0)
            while (sched_request_start_time(rs[0]) == 0) usleep(1000);
    }
    for (int i = 0; i < 2; i++) {
        collect(&f, rs[i], &got[i]);
        cr_expect_eq(got[i].finish, SCHED_FINISH_LENGTH, "request %d", i);
        cr_expect_str_eq(got[i].text, solo[i].text, "request %d", i);
        sched_request_release(rs[i]);
    }
    expect_idle_and_empty(&f);
    sfx_close(&f);
}

/* A stress run: random arrivals, cancels, deadlines, sampled and greedy, tidal and dense,
 * windows with and without eviction, into a pool of six blocks and a queue of four. Bounded
 * in count (every request is small); afterwards every request has ended with a valid reason
 * (never an engine error), within its max_tokens, and the pool is empty. make test runs it
 * under ASan+UBSan too, which catches any out-of-bounds write or use after free. */
static void stress(bool evict_policy, uint32_t step_tokens, uint64_t seed) {
    if (!have_stories()) cr_skip_test("%s not present; skipping", STORIES_PATH);
    static const char *prompts[] = {"Once upon a time", "The dog", "One day Lily went to the park",
                                    "Tom had a big red ball and a little", "Lily"};
    enum { N = 48 };
    sfx_t f;
    sfx_open_pool(&f, 6, 4, 4, step_tokens, evict_policy);
    char msg[ENG_ERRMSG_LEN];
    sched_request_t *rs[N];
    uint32_t max_tok[N];
    int n = 0, refused = 0; /* refusals depend on the machine's speed: counted, not checked */
    uint64_t rng = seed;
    for (int i = 0; i < N; i++) {
        uint32_t pick = (uint32_t)((frand(&rng) + 1) * 2.5f) % 5;
        sched_req_params_t p =
            greedy_params(f.m, prompts[pick], 1 + (uint32_t)((frand(&rng) + 1) * 30));
        p.ignore_eos = frand(&rng) > 0;
        p.sinks = 4;
        if (frand(&rng) > 0) {
            p.evict = true;
            p.window = frand(&rng) > 0 ? 48 : 0;
        }
        if (frand(&rng) > 0.5f) {
            p.sampling.temperature = 0.9f;
            p.sampling.seed = (uint64_t)i;
            p.logprobs = 2;
            p.entropy = true;
        }
        if (frand(&rng) > 0.6f) {
            p.attn = (eng_attn_params_t){.mode = ENG_ATTN_TIDAL, .token_budget = 8};
            eng_attn_defaults(eng_model_hparams(f.m), &p.attn);
        }
        if (frand(&rng) > 0.8f) {
            struct timespec now;
            clock_gettime(CLOCK_MONOTONIC, &now);
            p.deadline = now.tv_sec + now.tv_nsec * 1e-9 + 0.002 * (frand(&rng) + 1);
        }
        uint32_t mt = p.max_tokens;
        sched_request_t *r = sched_request_create(&p);
        int rc;
        /* a full queue refuses (the API's 429): retry, as a client would, until it takes it */
        for (int t = 0; (rc = sched_submit(f.s, r, msg)) == ENG_ERANGE && t < 20000; t++) {
            refused++;
            usleep(1000);
        }
        cr_assert_eq(rc, 0, "request %d: %s", i, msg);
        rs[n] = r;
        max_tok[n++] = mt;
        if (frand(&rng) > 0.6f)
            sched_request_cancel(rs[(uint32_t)((frand(&rng) + 1) * 0.5f * n) % n]);
        usleep((useconds_t)((frand(&rng) + 1) * 1000));
    }
    for (int i = 0; i < n; i++) {
        result_t got;
        collect(&f, rs[i], &got);
        cr_expect(got.finish == SCHED_FINISH_STOP || got.finish == SCHED_FINISH_LENGTH ||
                      got.finish == SCHED_FINISH_CANCELLED || got.finish == SCHED_FINISH_TIMEOUT,
                  "request %d ended %s", i, sched_finish_name(got.finish));
        cr_expect_leq(got.completion_tokens, max_tok[i], "request %d", i);
        sched_request_release(rs[i]);
    }
    (void)refused;
    expect_idle_and_empty(&f);
    sfx_close(&f);
}

Test(scheduler, test_stress_preempt_policy_chunked_prefill) {
    stress(false, 4, 7);
}
Test(scheduler, test_stress_preempt_policy) {
    stress(false, 64, 11);
}
Test(scheduler, test_stress_evict_policy_chunked_prefill) {
    stress(true, 4, 13);
}
Test(scheduler, test_stress_evict_policy) {
    stress(true, 64, 17);
}

/* A model whose weights hold a NaN produces NaN logits: the request ends with an error that
 * says so (it once emitted token 0 forever), on the greedy path (the engine's argmax) and the
 * sampled one. */
Test(scheduler, test_non_finite_logits_end_the_request_with_an_error) {
    if (!have_stories()) cr_skip_test("%s not present; skipping", STORIES_PATH);
    FILE *in = fopen(STORIES_PATH, "rb");
    cr_assert_not_null(in);
    fseek(in, 0, SEEK_END);
    size_t size = (size_t)ftell(in);
    fseek(in, 0, SEEK_SET);
    uint8_t *buf = malloc(size);
    cr_assert_eq(fread(buf, 1, size, in), size);
    fclose(in);
    gguf_t *g;
    char msg[ENG_ERRMSG_LEN];
    cr_assert_eq(gguf_parse(&g, buf, size, msg), 0, "%s", msg);
    const gguf_tensor_t *t = gguf_tensor(g, "output_norm.weight");
    cr_assert(t && t->type == 0, "stories260K has an F32 output_norm.weight");
    size_t off = (size_t)((const uint8_t *)t->data - buf);
    gguf_close(g);
    float nan = NAN;
    memcpy(buf + off, &nan, sizeof(nan));
    const char *dir = getenv("TIDALD_TEST_TMP");
    char path[512];
    snprintf(path, sizeof(path), "%s/nan-%d.gguf", dir ? dir : "/tmp", (int)getpid());
    FILE *out = fopen(path, "wb");
    cr_assert_not_null(out);
    cr_assert_eq(fwrite(buf, 1, size, out), size);
    fclose(out);
    free(buf);
    sfx_t f;
    sfx_open(&f, path, 2, 4, 512);
    for (int sampled = 0; sampled < 2; sampled++) {
        sched_req_params_t p = greedy_params(f.m, "Once upon a time", 20);
        if (sampled) p.sampling.temperature = 0.8f;
        sched_request_t *r = sched_request_create(&p);
        cr_assert_eq(sched_submit(f.s, r, msg), 0, "%s", msg);
        result_t got;
        memset(&got, 0, sizeof(got));
        sched_event_t ev[8];
        char err[128] = "";
        for (int i = 0; i < 4000 && got.finish == SCHED_FINISH_NONE; i++) {
            size_t n = sched_request_drain(r, ev, 8);
            for (size_t k = 0; k < n; k++) {
                if (ev[k].finish != SCHED_FINISH_NONE) {
                    got.finish = ev[k].finish;
                    got.completion_tokens = ev[k].completion_tokens;
                    snprintf(err, sizeof(err), "%s", ev[k].error);
                }
                sched_event_free(&ev[k]);
            }
            if (!n) usleep(5000);
        }
        cr_expect_eq(got.finish, SCHED_FINISH_ERROR, "sampled %d ended %s", sampled,
                     sched_finish_name(got.finish));
        cr_expect_eq(got.completion_tokens, 0);
        cr_expect(strstr(err, "non-finite"), "sampled %d: '%s'", sampled, err);
        sched_request_release(r);
    }
    sfx_close(&f);
    unlink(path);
}

/* A stream that may evict, preempted as its token list reaches its window (33 tokens: the
 * 33rd token needs a new block, and the pool of four blocks is then held by it and an older
 * request): its cache held exactly its token list, so it must recompute all of it (it once
 * dropped the token after its sinks) and go on, evicting past its window, exactly as it
 * would have alone. Any timing of the preemption must give the solo text. */
Test(scheduler, test_preempted_evicting_stream_recomputes_its_whole_cache) {
    if (!have_stories()) cr_skip_test("%s not present; skipping", STORIES_PATH);
    const char *prompts[2] = {"The dog", "Once upon a time"}; /* the second is the newer */
    char msg[ENG_ERRMSG_LEN];
    for (int round = 0; round < 2; round++) {
        result_t solo[2], got[2];
        for (int pass = 0; pass < 2; pass++) {
            sfx_t f;
            sfx_open_pool(&f, pass ? 4 : 8, 2, 4, 512, false);
            sched_request_t *rs[2];
            for (int i = 0; i < 2; i++) {
                sched_req_params_t p = greedy_params(f.m, prompts[i], i ? 60 : 36 + round);
                p.ignore_eos = true;
                p.evict = i == 1;
                p.window = i == 1 ? 33 : 0;
                p.sinks = 4;
                rs[i] = sched_request_create(&p);
                cr_assert_eq(sched_submit(f.s, rs[i], msg), 0, "%s", msg);
                if (pass == 0) { /* the reference: each alone */
                    collect(&f, rs[i], &solo[i]);
                    sched_request_release(rs[i]);
                }
            }
            if (pass == 1)
                for (int i = 0; i < 2; i++) {
                    collect(&f, rs[i], &got[i]);
                    cr_expect_eq(got[i].finish, SCHED_FINISH_LENGTH, "round %d request %d", round,
                                 i);
                    cr_expect_str_eq(got[i].text, solo[i].text, "round %d request %d", round, i);
                    sched_request_release(rs[i]);
                }
            sfx_close(&f);
        }
    }
}

/* Gemma 3's split cache (synthetic gemma3: 16-token windows on ten layers of twelve) when its
 * sliding-window pool is the one that runs dry: four requests that each hold three local
 * blocks (the sink block and the two the window spans) share nine. The scheduler preempts for that
 * pool (eviction would free nothing there, so even the evict policy preempts), and every request
 * finishes with the text it gets alone. */
static void run_local_pressure(bool evict_policy) {
    const char *prompts[4] = {"Once upon a time", "The dog ran", "One day", "A cat and a bird"};
    char msg[ENG_ERRMSG_LEN];
    result_t solo[4], got[4];
    for (int pass = 0; pass < 2; pass++) {
        sfx_t f;
        memset(&f, 0, sizeof(f));
        pthread_mutex_init(&f.mu, NULL);
        pthread_cond_init(&f.cv, NULL);
        cr_assert_eq(eng_model_load(&f.m, synth_path("gemma-f32"), msg), 0, "%s", msg);
        const eng_hparams_t *hp = eng_model_hparams(f.m);
        size_t kvd = (size_t)hp->n_head_kv * hp->head_dim;
        size_t lb = 10 * 2 * 16 * kvd * 4, gb = 2 * 2 * 16 * kvd * 4; /* bytes per block */
        eng_ctx_params_t cp;
        eng_ctx_params_default(&cp);
        cp.device = ENG_DEVICE_CPU;
        cp.max_seqs = 4;
        cp.n_threads = 2;
        cp.n_ctx = 256;
        cp.max_batch_tokens = 32;
        cp.kv_mem_bytes = pass ? 6 * lb + 64 * gb : 0; /* pass 0: roomy, the solo reference */
        cr_assert_eq(eng_ctx_create(&f.c, f.m, &cp, msg), 0, "%s", msg);
        kv_pool_t *pool = eng_ctx_kv_pool(f.c);
        cr_assert(pool->local, "the gemma3 model gets a split cache");
        if (pass) cr_assert_eq(pool->local->n_blocks, 9, "%u local blocks", pool->local->n_blocks);
        sched_params_t sp = {.max_running = 4,
                             .max_waiting = 8,
                             .step_tokens = 32,
                             .notify = on_notify,
                             .notify_arg = &f,
                             .pressure_evict = evict_policy};
        cr_assert_eq(sched_create(&f.s, f.c, f.m, &sp, msg), 0, "%s", msg);
        sched_request_t *rs[4];
        for (int i = 0; i < 4; i++) {
            sched_req_params_t p = greedy_params(f.m, prompts[i], 48);
            p.ignore_eos = true;
            p.evict = evict_policy;
            p.sinks = 4; /* each keeps its sink block in the local layers too */
            rs[i] = sched_request_create(&p);
            cr_assert_eq(sched_submit(f.s, rs[i], msg), 0, "%s", msg);
            if (!pass) { /* alone: one at a time */
                collect(&f, rs[i], &solo[i]);
                sched_request_release(rs[i]);
            }
        }
        if (pass) {
            for (int i = 0; i < 4; i++) {
                collect(&f, rs[i], &got[i]);
                cr_expect_eq(got[i].finish, SCHED_FINISH_LENGTH, "request %d", i);
                cr_expect_eq(got[i].completion_tokens, 48);
                cr_expect_str_eq(got[i].text, solo[i].text, "request %d", i);
                sched_request_release(rs[i]);
            }
            sched_stats_t st;
            sched_stats(f.s, &st);
            cr_expect_gt(st.preemptions, 0, "the local pool never ran dry");
            cr_expect_eq(st.evicted_tokens, 0, "eviction cannot free sliding-window blocks");
            expect_idle_and_empty(&f);
            cr_expect_eq(pool->local->n_free, pool->local->n_blocks);
        }
        sfx_close(&f);
    }
}

Test(scheduler, test_sliding_window_pool_pressure_preempts_and_recomputes_exactly) {
    run_local_pressure(false);
}
Test(scheduler, test_sliding_window_pool_pressure_under_the_evict_policy) {
    run_local_pressure(true);
}

/* ---- telemetry only where it is used ---------------------------------------------- */

typedef struct {
    uint32_t n;                   /* token events */
    uint32_t attn, entropy;       /* of them with attention telemetry, with token entropy */
    uint64_t attn_at, entropy_at; /* bit i: token i had it (the first 64) */
} measured_t;

/* Run one request to its end and note which of its tokens were measured. */
static void run_measured(sfx_t *f, sched_req_params_t *p, measured_t *m) {
    char msg[ENG_ERRMSG_LEN];
    memset(m, 0, sizeof(*m));
    sched_request_t *r = sched_request_create(p);
    cr_assert_eq(sched_submit(f->s, r, msg), 0, "%s", msg);
    for (bool done = false; !done;) {
        sched_event_t ev[32];
        size_t n = sched_request_drain(r, ev, 32);
        for (size_t i = 0; i < n; i++) {
            if (ev[i].finish != SCHED_FINISH_NONE) {
                cr_assert_eq(ev[i].finish, SCHED_FINISH_LENGTH, "%s", ev[i].error);
                done = true;
            } else {
                uint64_t bit = m->n < 64 ? 1ull << m->n : 0;
                if (ev[i].attn) m->attn++, m->attn_at |= bit;
                if (ev[i].has_entropy) m->entropy++, m->entropy_at |= bit;
                m->n++;
            }
            sched_event_free(&ev[i]);
        }
        if (!n) {
            pthread_mutex_lock(&f->mu);
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_nsec += 50000000;
            if (ts.tv_nsec >= 1000000000) ts.tv_sec++, ts.tv_nsec -= 1000000000;
            pthread_cond_timedwait(&f->cv, &f->mu, &ts);
            pthread_mutex_unlock(&f->mu);
        }
    }
    sched_request_release(r);
}

/* Telemetry is computed for every token of a request that asked for it, and otherwise only for
 * the sampled share of its tokens (0, 4, 8, ... at a share of 1/4); a greedy request's sampled
 * tokens get attention figures alone (its distribution is never computed), a sampled request's
 * the token entropy too; a share of 0 measures nothing. */
Test(scheduler, test_telemetry_is_measured_only_where_asked_or_sampled) {
    if (!have_stories()) cr_skip_test("%s not present; skipping", STORIES_PATH);
    sfx_t f;
    sfx_open(&f, STORIES_PATH, 2, 8, 512);
    const uint64_t every4 = 0x1111; /* tokens 0, 4, 8, 12 of 16 */
    struct {
        float temperature, share;
        bool asked;
        uint32_t attn, entropy;
        uint64_t attn_at, entropy_at;
    } cases[] = {{0, 0.25f, false, 4, 0, every4, 0},
                 {0.8f, 0.25f, false, 4, 4, every4, every4},
                 {0, 0.25f, true, 16, 16, 0xffff, 0xffff},
                 {0.8f, 0, false, 0, 0, 0, 0},
                 {0, 1, false, 16, 0, 0xffff, 0}};
    for (size_t k = 0; k < sizeof(cases) / sizeof(cases[0]); k++) {
        sched_req_params_t p = greedy_params(f.m, "Once upon a time", 16);
        p.ignore_eos = cases[k].temperature > 0; /* greedy: the story goes on past 16 tokens */
        p.sampling.temperature = cases[k].temperature;
        p.sampling.seed = 7;
        p.telemetry_sample = cases[k].share;
        p.entropy = cases[k].asked;
        measured_t m;
        run_measured(&f, &p, &m);
        cr_expect_eq(m.n, 16, "case %zu", k);
        cr_expect_eq(m.attn, cases[k].attn, "case %zu: %u tokens with attention figures", k,
                     m.attn);
        cr_expect_eq(m.entropy, cases[k].entropy, "case %zu: %u with token entropy", k, m.entropy);
        cr_expect_eq(m.attn_at, cases[k].attn_at, "case %zu: tokens %llx", k,
                     (unsigned long long)m.attn_at);
        cr_expect_eq(m.entropy_at, cases[k].entropy_at, "case %zu", k);
    }
    sfx_close(&f);
}

/* On the GPU (the emulator counts the bytes copied back): a greedy request brings back one id
 * per token, plus its sampled tokens' attention figures, never a row of logits; asking for
 * telemetry brings every token's logits back (its distribution's entropy is computed on the
 * host). */
Test(cuda, test_greedy_requests_copy_back_one_id_per_token_unless_telemetry_is_asked) {
    need_cuda_gpu();
    if (!have_stories()) cr_skip_test("%s not present; skipping", STORIES_PATH);
    const char *lib = getenv("TIDALD_CUDA_LIB");
    void *h = lib ? dlopen(lib, RTLD_NOW | RTLD_NOLOAD) : NULL;
    unsigned long long (*d2h)(void) =
        h ? (unsigned long long (*)(void))dlsym(h, "emu_d2h_bytes") : NULL;
    if (!d2h) cr_skip_test("not on the CUDA emulator: the bytes copied back are not counted");
    g_dev = ENG_DEVICE_CUDA;
    sfx_t f;
    sfx_open(&f, STORIES_PATH, 2, 8, 512);
    cr_assert_str_eq(eng_ctx_backend_name(f.c), "cuda");
    uint32_t V = eng_model_hparams(f.m)->n_vocab, N = 32;
    struct {
        float share;
        bool asked;
    } cases[] = {{0, false}, {0.0625f, false}, {0, true}};
    unsigned long long bytes[3];
    for (int k = 0; k < 3; k++) {
        sched_req_params_t p = greedy_params(f.m, "Once upon a time", N);
        p.telemetry_sample = cases[k].share;
        p.entropy = cases[k].asked;
        unsigned long long b0 = d2h();
        measured_t m;
        run_measured(&f, &p, &m);
        bytes[k] = d2h() - b0;
        cr_assert_eq(m.n, N);
    }
    g_dev = ENG_DEVICE_CPU;
    cr_log_info("bytes copied back for %u tokens: %llu greedy, %llu sampled 1/16, %llu with "
                "telemetry (vocabulary %u)",
                N, bytes[0], bytes[1], bytes[2], V);
    /* the ids alone: 4 bytes a token (the prompt's step included) */
    cr_expect_leq(bytes[0], 4ull * N, "%llu bytes for %u greedy tokens", bytes[0], N);
    /* and two sampled tokens' attention figures: far less than one row of logits */
    cr_expect_lt(bytes[1], 4ull * N + 4ull * V, "%llu bytes", bytes[1]);
    cr_expect_gt(bytes[1], bytes[0]);
    cr_expect_geq(bytes[2], 4ull * V * N, "%llu bytes with telemetry", bytes[2]);
    sfx_close(&f);
}
