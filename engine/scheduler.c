/* scheduler.c - continuous batching on the engine thread.
 *
 * Other threads submit requests to a locked queue; the engine thread drains
 * it, admits requests FIFO while a sequence slot and enough KV blocks are
 * free, then runs one batched forward per step: one decode token for every
 * running sequence plus prefill chunks of new ones, up to a per-step token
 * budget (chunked prefill keeps long prompts from stalling the streams).
 * After each step it samples, detokenizes, applies stop strings and
 * publishes events to each request's outbox, then calls notify once.
 *
 * KV admission is conservative: a request is admitted only when the blocks
 * for prompt + max_tokens (capped by the context) are free, so a running
 * request never fails for lack of memory. (Eviction and preemption, which
 * relax this, come with the attention issue.)
 *
 * Locks: sched->mu guards the incoming queue, stop flag and stats; each
 * request's mu guards its outbox. Neither is held during a forward pass.
 */
#define _GNU_SOURCE /* memmem */
#include "engine.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct eng_request {
    atomic_int refs;
    atomic_bool cancel;
    eng_req_params_t p;
    eng_sched_t *sched;
    double t_submit, t_start;
    /* engine-thread state */
    kv_seq_t seq;
    eng_sampler_t *smp;
    eng_detok_t detok;
    uint32_t n_prefilled, n_generated;
    int32_t *feed; /* tokens to prefill: the prompt, or after a preemption prompt + generated */
    uint32_t n_feed;
    int32_t *gen; /* generated ids, for recomputation after a preemption */
    uint32_t gen_cap;
    uint64_t admit_order;
    int32_t last_token;
    bool decoding, admitted;
    char *held; /* released text held back while it may start a stop string */
    size_t held_len, held_cap;
    uint32_t window;
    eng_attn_tele_t tele; /* per-layer, per-head attention telemetry of the last forward */
    float *tele_buf;
    /* outbox, guarded by mu */
    pthread_mutex_t mu;
    eng_event_t *ev;
    size_t n_ev, cap_ev;
};

struct eng_sched {
    eng_ctx_t *ctx;
    const eng_model_t *m;
    eng_sched_params_t p;
    uint32_t n_vocab, n_ctx;
    pthread_t thread;
    bool thread_started;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool stop;
    eng_request_t **inq; /* submitted, not yet seen by the engine thread (mu) */
    size_t n_in;
    atomic_uint n_queued;    /* inq + waiting, for the bound */
    eng_sched_stats_t stats; /* mu */
    /* engine thread only */
    eng_request_t **waiting, **running;
    size_t n_waiting, n_running;
    uint64_t admissions;
    eng_request_t **snap; /* running requests at the start of a step */
    eng_event_t *draws;   /* per batch item: the token drawn this step */
    bool *drawn;
    float *logits, *raw;
    int32_t *argmax; /* per batch item: the greedy id, for requests that need nothing more */
    eng_batch_item_t *items;
    eng_request_t **item_req;
    bool published;
};

static double mono_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

void eng_event_free(eng_event_t *e) {
    free(e->text);
    free(e->attn);
    e->text = NULL;
    e->attn = NULL;
}

const char *eng_finish_name(eng_finish_t f) {
    switch (f) {
    case ENG_FINISH_STOP:
        return "stop";
    case ENG_FINISH_LENGTH:
        return "length";
    case ENG_FINISH_CANCELLED:
        return "cancelled";
    case ENG_FINISH_TIMEOUT:
        return "timeout";
    case ENG_FINISH_ERROR:
        return "error";
    default:
        return "none";
    }
}

/* ---- requests ---------------------------------------------------------- */

eng_request_t *eng_request_create(eng_req_params_t *p) {
    eng_request_t *r = calloc(1, sizeof(*r));
    if (!r) return NULL;
    atomic_init(&r->refs, 1);
    atomic_init(&r->cancel, false);
    r->p = *p;
    memset(p, 0, sizeof(*p)); /* ownership moved */
    pthread_mutex_init(&r->mu, NULL);
    return r;
}

static void free_request(eng_request_t *r) {
    if (r->feed != r->p.prompt) free(r->feed);
    free(r->gen);
    free(r->p.prompt);
    for (uint32_t i = 0; i < r->p.n_stop; i++) free(r->p.stop[i]);
    for (size_t i = 0; i < r->n_ev; i++) eng_event_free(&r->ev[i]);
    free(r->ev);
    free(r->held);
    free(r->tele_buf);
    eng_sampler_free(r->smp);
    if (r->seq.pool) kv_seq_close(&r->seq);
    pthread_mutex_destroy(&r->mu);
    free(r);
}

void eng_request_release(eng_request_t *r) {
    if (r && atomic_fetch_sub(&r->refs, 1) == 1) free_request(r);
}

void eng_request_cancel(eng_request_t *r) {
    atomic_store(&r->cancel, true);
    eng_sched_t *s = r->sched;
    if (s) {
        pthread_mutex_lock(&s->mu);
        pthread_cond_signal(&s->cv);
        pthread_mutex_unlock(&s->mu);
    }
}

double eng_request_submit_time(const eng_request_t *r) {
    return r->t_submit;
}
double eng_request_start_time(const eng_request_t *r) {
    return r->t_start;
}

size_t eng_request_drain(eng_request_t *r, eng_event_t *ev, size_t cap) {
    pthread_mutex_lock(&r->mu);
    size_t n = r->n_ev < cap ? r->n_ev : cap;
    if (n) {
        memcpy(ev, r->ev, n * sizeof(eng_event_t));
        memmove(r->ev, r->ev + n, (r->n_ev - n) * sizeof(eng_event_t));
        r->n_ev -= n;
    }
    pthread_mutex_unlock(&r->mu);
    return n;
}

/* Publish an event (takes ownership of e->text). On allocation failure the text is dropped
 * but a final event is still delivered, since its slot is reserved ahead. */
static void publish(eng_sched_t *s, eng_request_t *r, eng_event_t *e) {
    e->time = mono_now();
    pthread_mutex_lock(&r->mu);
    if (r->n_ev == r->cap_ev) {
        size_t cap = r->cap_ev ? r->cap_ev * 2 : 16;
        eng_event_t *ne = realloc(r->ev, cap * sizeof(*ne));
        if (ne) {
            r->ev = ne;
            r->cap_ev = cap;
        }
    }
    if (r->n_ev < r->cap_ev) {
        r->ev[r->n_ev++] = *e;
    } else {
        eng_event_free(e);
    }
    pthread_mutex_unlock(&r->mu);
    s->published = true;
}

static char *dup_text(const char *t, size_t n) {
    char *d = malloc(n + 1);
    if (d) {
        memcpy(d, t, n);
        d[n] = 0;
    }
    return d;
}

/* ---- scheduler lifecycle ------------------------------------------------ */

static void *engine_main(void *arg);

int eng_sched_create(eng_sched_t **out, eng_ctx_t *ctx, const eng_model_t *m,
                     const eng_sched_params_t *p, char *msg) {
    *out = NULL;
    eng_sched_t *s = calloc(1, sizeof(*s));
    if (!s) return eng_fail(msg, ENG_ENOMEM, "out of memory");
    s->ctx = ctx;
    s->m = m;
    s->p = *p;
    if (!s->p.max_running) s->p.max_running = 16;
    if (!s->p.max_waiting) s->p.max_waiting = 256;
    if (!s->p.step_tokens) s->p.step_tokens = 512;
    s->n_vocab = eng_model_hparams(m)->n_vocab;
    s->n_ctx = eng_ctx_n_ctx(ctx);
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    s->inq = calloc(s->p.max_waiting, sizeof(eng_request_t *));
    s->waiting = calloc(s->p.max_waiting, sizeof(eng_request_t *));
    s->running = calloc(s->p.max_running, sizeof(eng_request_t *));
    s->snap = calloc(s->p.max_running, sizeof(eng_request_t *));
    s->items = calloc(s->p.max_running, sizeof(eng_batch_item_t));
    s->item_req = calloc(s->p.max_running, sizeof(eng_request_t *));
    s->logits = malloc(sizeof(float) * s->n_vocab * s->p.max_running);
    s->argmax = malloc(sizeof(int32_t) * s->p.max_running);
    s->raw = malloc(sizeof(float) * s->n_vocab * s->p.max_running);
    s->draws = calloc(s->p.max_running, sizeof(eng_event_t));
    s->drawn = calloc(s->p.max_running, sizeof(bool));
    if (!s->inq || !s->waiting || !s->running || !s->snap || !s->items || !s->item_req ||
        !s->logits || !s->raw || !s->argmax) {
        eng_sched_destroy(s);
        return eng_fail(msg, ENG_ENOMEM, "out of memory for the scheduler");
    }
    if (pthread_create(&s->thread, NULL, engine_main, s) != 0) {
        eng_sched_destroy(s);
        return eng_fail(msg, ENG_ENOMEM, "cannot start the engine thread");
    }
    s->thread_started = true;
    *out = s;
    return 0;
}

void eng_sched_destroy(eng_sched_t *s) {
    if (!s) return;
    if (s->thread_started) {
        pthread_mutex_lock(&s->mu);
        s->stop = true;
        pthread_cond_signal(&s->cv);
        pthread_mutex_unlock(&s->mu);
        pthread_join(s->thread, NULL);
    }
    for (size_t i = 0; i < s->n_in; i++) eng_request_release(s->inq[i]);
    free(s->inq);
    free(s->waiting);
    free(s->running);
    free(s->snap);
    free(s->items);
    free(s->item_req);
    free(s->logits);
    free(s->argmax);
    free(s->raw);
    free(s->draws);
    free(s->drawn);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    free(s);
}

static uint32_t window_of(const eng_sched_t *s, const eng_request_t *r) {
    return r->p.window && r->p.window < s->n_ctx ? r->p.window : s->n_ctx;
}

static uint32_t blocks_needed(const eng_sched_t *s, const eng_request_t *r) {
    uint64_t toks = (uint64_t)r->p.n_prompt + r->p.max_tokens;
    if (toks > window_of(s, r)) toks = window_of(s, r);
    uint32_t bs = eng_ctx_kv_pool(s->ctx)->block_size;
    return (uint32_t)((toks + bs - 1) / bs);
}

int eng_sched_submit(eng_sched_t *s, eng_request_t *r, char *msg) {
    if (r->p.n_prompt == 0) return eng_fail(msg, ENG_EINVAL, "the prompt has no tokens");
    if (r->p.n_prompt >= window_of(s, r))
        return eng_fail(msg, ENG_EINVAL, "the prompt is %u tokens; the context holds %u",
                        r->p.n_prompt, window_of(s, r));
    char amsg[ENG_ERRMSG_LEN];
    if (eng_attn_check(eng_model_hparams(s->m), &r->p.attn, amsg))
        return eng_fail(msg, ENG_EINVAL, "%s", amsg);
    for (uint32_t i = 0; i < r->p.n_prompt; i++)
        if (r->p.prompt[i] < 0 || (uint32_t)r->p.prompt[i] >= s->n_vocab)
            return eng_fail(msg, ENG_EINVAL, "token id %d is outside the vocabulary of %u",
                            r->p.prompt[i], s->n_vocab);
    uint32_t need = blocks_needed(s, r), have = eng_ctx_kv_pool(s->ctx)->n_blocks;
    if (need > have)
        return eng_fail(msg, ENG_EINVAL, "the request needs %u KV blocks; the cache has %u", need,
                        have);
    pthread_mutex_lock(&s->mu);
    if (s->stop || atomic_load(&s->n_queued) >= s->p.max_waiting) {
        pthread_mutex_unlock(&s->mu);
        return eng_fail(msg, ENG_ERANGE, "the waiting queue is full (%u requests)",
                        s->p.max_waiting);
    }
    r->sched = s;
    r->t_submit = mono_now();
    r->feed = r->p.prompt;
    r->n_feed = r->p.n_prompt;
    atomic_fetch_add(&r->refs, 1);
    atomic_fetch_add(&s->n_queued, 1);
    s->inq[s->n_in++] = r;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
    return 0;
}

void eng_sched_stats(eng_sched_t *s, eng_sched_stats_t *out) {
    pthread_mutex_lock(&s->mu);
    *out = s->stats;
    pthread_mutex_unlock(&s->mu);
}

/* ---- engine thread --------------------------------------------------- */

static void remove_at(eng_request_t **arr, size_t *n, size_t i) {
    memmove(arr + i, arr + i + 1, (*n - i - 1) * sizeof(*arr));
    (*n)--;
}

static void release_seq(eng_sched_t *s, eng_request_t *r) {
    (void)s;
    if (r->admitted) {
        kv_seq_close(&r->seq);
        r->admitted = false;
    }
}

static uint32_t blocks_for(const eng_sched_t *s, uint64_t tokens) {
    uint32_t bs = eng_ctx_kv_pool(s->ctx)->block_size;
    return (uint32_t)((tokens + bs - 1) / bs);
}

/* New blocks a sequence needs to take ntok more tokens. */
static uint32_t growth(const eng_sched_t *s, const kv_seq_t *q, uint32_t ntok) {
    uint32_t want = blocks_for(s, (uint64_t)q->n_tokens + ntok);
    return want > q->n_blocks ? want - q->n_blocks : 0;
}

/* Publish the final event, free KV, and drop the scheduler's reference. The caller removes r
 * from its list. */
static void finish(eng_sched_t *s, eng_request_t *r, eng_finish_t why, const char *err) {
    eng_event_t e = {.token = -1, .finish = why};
    size_t tail = 0;
    char flushed[8];
    if (why == ENG_FINISH_LENGTH || (why == ENG_FINISH_STOP && !err)) {
        tail = eng_detok_flush(&r->detok, flushed, sizeof(flushed));
    }
    /* held text is released unless a stop string matched (then it was cut already) */
    size_t n = (why == ENG_FINISH_LENGTH || why == ENG_FINISH_STOP) ? r->held_len : 0;
    e.text = malloc(n + tail + 1);
    if (e.text) {
        if (n) memcpy(e.text, r->held, n);
        memcpy(e.text + n, flushed, tail);
        e.text[n + tail] = 0;
        e.text_len = n + tail;
    }
    r->held_len = 0;
    e.prompt_tokens = r->p.n_prompt;
    e.completion_tokens = r->n_generated;
    if (err) snprintf(e.error, sizeof(e.error), "%s", err);
    publish(s, r, &e);
    release_seq(s, r);
    eng_request_release(r);
}

static bool expired(const eng_request_t *r, double now) {
    return r->p.deadline > 0 && now > r->p.deadline;
}

static void sweep(eng_sched_t *s) {
    double now = mono_now();
    for (size_t i = 0; i < s->n_running;) {
        eng_request_t *r = s->running[i];
        if (atomic_load(&r->cancel) || expired(r, now)) {
            remove_at(s->running, &s->n_running, i);
            finish(s, r, atomic_load(&r->cancel) ? ENG_FINISH_CANCELLED : ENG_FINISH_TIMEOUT, NULL);
        } else {
            i++;
        }
    }
    for (size_t i = 0; i < s->n_waiting;) {
        eng_request_t *r = s->waiting[i];
        if (atomic_load(&r->cancel) || expired(r, now)) {
            remove_at(s->waiting, &s->n_waiting, i);
            atomic_fetch_sub(&s->n_queued, 1);
            finish(s, r, atomic_load(&r->cancel) ? ENG_FINISH_CANCELLED : ENG_FINISH_TIMEOUT, NULL);
        } else {
            i++;
        }
    }
}

/* Admit FIFO while a slot is free and the pool holds the head's prefill (plus one decode
 * block) on top of what admitted prefills still need. Decoding sequences then grow on demand;
 * when the pool runs dry the pressure policy (relieve) makes room. */
static void admit(eng_sched_t *s) {
    kv_pool_t *pool = eng_ctx_kv_pool(s->ctx);
    uint32_t pending = 0;
    for (size_t i = 0; i < s->n_running; i++) {
        eng_request_t *r = s->running[i];
        if (!r->decoding) pending += growth(s, &r->seq, r->n_feed - r->n_prefilled);
    }
    while (s->n_waiting && s->n_running < s->p.max_running) {
        eng_request_t *r = s->waiting[0];
        uint32_t window = window_of(s, r);
        uint32_t need = blocks_for(s, r->n_feed + 1 < window ? r->n_feed + 1 : window);
        if (pending + need > pool->n_free) break; /* FIFO: the head waits */
        if (!r->smp) {
            if (eng_sampler_create(&r->smp, &r->p.sampling, s->n_vocab) != 0) break;
            for (uint32_t i = 0; i < r->p.n_prompt; i++) eng_sampler_accept(r->smp, r->p.prompt[i]);
            eng_detok_init(&r->detok, eng_model_tokenizer(s->m));
            r->t_start = mono_now();
        }
        const eng_hparams_t *hp = eng_model_hparams(s->m);
        size_t LH = (size_t)hp->n_layer * hp->n_head;
        if (!r->tele_buf) {
            r->tele_buf = malloc(sizeof(float) * 3 * LH + hp->n_layer);
            if (!r->tele_buf) break;
            r->tele =
                (eng_attn_tele_t){r->tele_buf, r->tele_buf + LH, (uint32_t *)(r->tele_buf + 2 * LH),
                                  (uint8_t *)(r->tele_buf + 3 * LH)};
        }
        kv_seq_init(&r->seq, pool);
        r->seq.n_sinks = r->p.sinks;
        r->window = window;
        r->admitted = true;
        r->admit_order = ++s->admissions;
        pending += need;
        remove_at(s->waiting, &s->n_waiting, 0);
        atomic_fetch_sub(&s->n_queued, 1);
        s->running[s->n_running++] = r;
    }
}

/* Preempt a running request: free its KV and requeue it first in line, to recompute its
 * prompt and generated tokens when there is room (a sequence that may evict keeps its sinks
 * and the newest window's worth). Its outbox, sampler and text state carry on. */
static void preempt(eng_sched_t *s, eng_request_t *r) {
    uint32_t n = r->p.n_prompt + r->n_generated, keep = n, head = 0;
    if (r->p.evict && n >= r->window) {
        head = r->p.sinks < r->window / 2 ? r->p.sinks : 0;
        keep = r->window - 1;
    }
    int32_t *feed = malloc(sizeof(int32_t) * (keep ? keep : 1));
    if (!feed) return; /* leave it running: the step skips it */
    for (uint32_t i = 0; i < keep; i++) {
        uint32_t src = i < head ? i : n - (keep - i);
        feed[i] = src < r->p.n_prompt ? r->p.prompt[src] : r->gen[src - r->p.n_prompt];
    }
    if (r->feed != r->p.prompt) free(r->feed);
    r->feed = feed;
    r->n_feed = keep;
    kv_seq_close(&r->seq);
    r->admitted = false;
    r->decoding = false;
    r->n_prefilled = 0;
    for (size_t i = 0; i < s->n_running; i++)
        if (s->running[i] == r) {
            remove_at(s->running, &s->n_running, i);
            break;
        }
    memmove(s->waiting + 1, s->waiting, sizeof(eng_request_t *) * s->n_waiting);
    s->waiting[0] = r;
    s->n_waiting++;
    atomic_fetch_add(&s->n_queued, 1);
    pthread_mutex_lock(&s->mu);
    s->stats.preemptions++;
    pthread_mutex_unlock(&s->mu);
}

/* Memory pressure: free at least `want` blocks for `cur` without touching requests already in
 * this step's batch. Policy evict drops middle blocks (sink-aware) of the longest sequences;
 * policy preempt, or evict with nothing left to drop, requeues the newest request. Returns
 * false when cur itself had to be preempted. */
static bool relieve(eng_sched_t *s, uint32_t want, eng_request_t *cur, uint32_t n_items,
                    uint64_t *evicted) {
    kv_pool_t *pool = eng_ctx_kv_pool(s->ctx);
    uint32_t free0 = pool->n_free;
    while (pool->n_free - free0 < want && s->p.pressure_evict) {
        eng_request_t *v = NULL;
        for (size_t i = 0; i < s->n_running; i++) {
            eng_request_t *r = s->running[i];
            uint32_t bs = pool->block_size, sink_blocks = (r->seq.n_sinks + bs - 1) / bs;
            if (r->seq.n_tokens / bs > sink_blocks && (!v || r->seq.n_tokens > v->seq.n_tokens))
                v = r;
        }
        if (!v) break;
        *evicted += eng_seq_evict(s->ctx, &v->seq, pool->block_size);
    }
    while (pool->n_free - free0 < want) {
        eng_request_t *v = NULL;
        for (size_t i = 0; i < s->n_running; i++) {
            eng_request_t *r = s->running[i];
            bool batched = false;
            for (uint32_t k = 0; k < n_items; k++) batched |= s->item_req[k] == r;
            if (!batched && (!v || r->admit_order > v->admit_order)) v = r;
        }
        if (!v) return false;
        preempt(s, v);
        if (v == cur) return false;
    }
    return true;
}

/* Append released text to the hold buffer. */
static bool hold(eng_request_t *r, const char *t, size_t n) {
    if (r->held_len + n + 1 > r->held_cap) {
        size_t cap = r->held_cap ? r->held_cap * 2 : 64;
        while (cap < r->held_len + n + 1) cap *= 2;
        char *h = realloc(r->held, cap);
        if (!h) return false;
        r->held = h;
        r->held_cap = cap;
    }
    memcpy(r->held + r->held_len, t, n);
    r->held_len += n;
    r->held[r->held_len] = 0;
    return true;
}

/* Find the earliest stop string in held; returns its offset or -1. */
static long find_stop(const eng_request_t *r) {
    long best = -1;
    for (uint32_t i = 0; i < r->p.n_stop; i++) {
        const char *hit = memmem(r->held, r->held_len, r->p.stop[i], strlen(r->p.stop[i]));
        if (hit && (best < 0 || hit - r->held < best)) best = hit - r->held;
    }
    return best;
}

/* Bytes at the end of held that could still begin a stop string. */
static size_t stop_prefix_len(const eng_request_t *r) {
    size_t keep = 0;
    for (uint32_t i = 0; i < r->p.n_stop; i++) {
        size_t sl = strlen(r->p.stop[i]);
        for (size_t k = sl - 1 < r->held_len ? sl - 1 : r->held_len; k > keep; k--)
            if (memcmp(r->held + r->held_len - k, r->p.stop[i], k) == 0) {
                keep = k;
                break;
            }
    }
    return keep;
}

/* From raw logits: the log-sum-exp at temperature 1 (for logprobs, when want_lse), the entropy
 * in bits of the distribution at temperature T (when entropy != NULL), and the n_top best
 * tokens' logprobs. One exp per vocabulary entry for each quantity asked for. */
static void distribution_facts(const float *l, uint32_t V, float T, bool want_lse, double *lse,
                               float *entropy, eng_logprob_t *top, uint32_t n_top) {
    float mx = l[0];
    for (uint32_t i = 1; i < V; i++) mx = l[i] > mx ? l[i] : mx;
    double z = 0, zt = 0, wt = 0;
    float inv_t = 1.0f / T;
    bool shared = T == 1.0f;
    if (entropy || shared) {
        for (uint32_t i = 0; i < V; i++) {
            float d = (l[i] - mx) * inv_t, e = expf(d);
            zt += e;
            wt += (double)e * d;
        }
        if (shared) z = zt;
        /* H = log Z_T - E[x/T], in nats, then bits */
        if (entropy) *entropy = (float)((log(zt) - wt / zt) / M_LN2);
    }
    if (want_lse && !shared)
        for (uint32_t i = 0; i < V; i++) z += expf(l[i] - mx);
    *lse = want_lse ? mx + log(z) : 0;
    for (uint32_t k = 0; k < n_top; k++) top[k] = (eng_logprob_t){-1, -INFINITY};
    for (uint32_t i = 0; i < V && n_top; i++) {
        if (l[i] <= top[n_top - 1].logprob && top[n_top - 1].id >= 0) continue;
        uint32_t k = n_top - 1;
        while (k > 0 && (top[k - 1].id < 0 || l[i] > top[k - 1].logprob)) {
            top[k] = top[k - 1];
            k--;
        }
        top[k] = (eng_logprob_t){(int32_t)i, l[i]};
    }
    for (uint32_t k = 0; k < n_top; k++) top[k].logprob = (float)(top[k].logprob - *lse);
}

/* The event's attention telemetry from the request's last forward (head means per layer). */
static eng_attn_stats_t *attn_stats(const eng_sched_t *s, const eng_request_t *r) {
    const eng_hparams_t *hp = eng_model_hparams(s->m);
    uint32_t L = hp->n_layer, H = hp->n_head;
    size_t per_head = r->p.per_head ? 2 * (size_t)L * H : 0;
    size_t bytes = sizeof(eng_attn_stats_t) + sizeof(float) * (3 * (size_t)L + per_head) + L;
    eng_attn_stats_t *a = malloc(bytes);
    if (!a) return NULL;
    float *f = (float *)(a + 1);
    a->n_layer = L;
    a->n_head = H;
    a->entropy_bits = f;
    a->entropy_norm = f + L;
    a->sink_mass = f + 2 * L;
    a->head_entropy_bits = per_head ? f + 3 * L : NULL;
    a->head_sink_mass = per_head ? f + 3 * L + (size_t)L * H : NULL;
    a->sparse = (uint8_t *)(f + 3 * L + per_head);
    for (uint32_t l = 0; l < L; l++) {
        double e = 0, en = 0, sm = 0;
        for (uint32_t h = 0; h < H; h++) {
            size_t k = (size_t)l * H + h;
            uint32_t n = r->tele.n_att[k];
            e += r->tele.entropy[k];
            en += n > 1 ? r->tele.entropy[k] / log2((double)n) : 0;
            sm += r->tele.sink_mass[k];
        }
        a->entropy_bits[l] = (float)(e / H);
        a->entropy_norm[l] = (float)(en / H);
        a->sink_mass[l] = (float)(sm / H);
        a->sparse[l] = r->tele.sparse[l];
    }
    if (per_head) {
        memcpy(a->head_entropy_bits, r->tele.entropy, sizeof(float) * L * H);
        memcpy(a->head_sink_mass, r->tele.sink_mass, sizeof(float) * L * H);
    }
    return a;
}

/* The first half of a token, safe to run for several requests at once (each touches only its
 * own request, logits and scratch): the distribution's facts, the draw, the sampler's
 * history, the attention stats. */
static void draw(const eng_sched_t *s, eng_request_t *r, float *logits, float *raw,
                 const int32_t *argmax, eng_event_t *e) {
    const eng_tokenizer_t *tok = eng_model_tokenizer(s->m);
    memset(e, 0, sizeof(*e));
    e->token = -1;
    if (!logits) { /* greedy_only(): the engine chose already */
        e->token = *argmax;
        eng_sampler_accept(r->smp, e->token);
        e->attn = attn_stats(s, r);
        return;
    }
    double lse = 0;
    if (r->p.logprobs >= 0 || r->p.entropy) {
        /* the sampler edits logits in place: keep the raw ones only when logprobs need them */
        const float *src = logits;
        if (r->p.logprobs >= 0) src = memcpy(raw, logits, sizeof(float) * s->n_vocab);
        float T = r->p.sampling.temperature > 0 ? r->p.sampling.temperature : 1.0f;
        e->n_top = r->p.logprobs > 0 ? (uint32_t)r->p.logprobs : 0;
        distribution_facts(src, s->n_vocab, T, r->p.logprobs >= 0, &lse,
                           r->p.entropy ? &e->entropy_bits : NULL, e->top, e->n_top);
    }
    if (r->p.ignore_eos && eng_tok_eos(tok) >= 0) logits[eng_tok_eos(tok)] = -INFINITY;
    int32_t id = eng_sampler_sample(r->smp, logits);
    eng_sampler_accept(r->smp, id);
    e->token = id;
    e->attn = attn_stats(s, r);
    if (r->p.logprobs >= 0) e->logprob = (float)(raw[id] - lse);
}

/* The second half, on the engine thread alone: record the token, detokenize, apply stop
 * strings, publish, and decide whether r goes on. Returns true if r finished (caller removes).
 * Takes ownership of what e owns. */
static bool on_token(eng_sched_t *s, eng_request_t *r, eng_event_t *ev) {
    const eng_tokenizer_t *tok = eng_model_tokenizer(s->m);
    eng_event_t e = *ev;
    int32_t id = e.token;
    if (r->n_generated == r->gen_cap) {
        uint32_t cap = r->gen_cap ? r->gen_cap * 2 : 64;
        int32_t *g = realloc(r->gen, sizeof(int32_t) * cap);
        if (g) r->gen = g, r->gen_cap = cap;
    }
    if (r->n_generated < r->gen_cap) r->gen[r->n_generated] = id;
    r->n_generated++;
    pthread_mutex_lock(&s->mu);
    s->stats.generation_tokens++;
    pthread_mutex_unlock(&s->mu);

    if (!r->p.ignore_eos && eng_tok_is_eog(tok, id)) {
        e.text = dup_text("", 0);
        publish(s, r, &e);
        finish(s, r, ENG_FINISH_STOP, NULL);
        return true;
    }
    char piece[512];
    size_t n_piece = eng_detok_push(&r->detok, id, piece, sizeof(piece));
    hold(r, piece, n_piece);
    long at = find_stop(r);
    if (at >= 0) {
        e.text = dup_text(r->held, (size_t)at);
        e.text_len = (size_t)at;
        r->held_len = 0;
        publish(s, r, &e);
        /* the stop string and anything after it are dropped */
        eng_event_t f = {.token = -1, .finish = ENG_FINISH_STOP, .text = dup_text("", 0)};
        f.prompt_tokens = r->p.n_prompt;
        f.completion_tokens = r->n_generated;
        publish(s, r, &f);
        release_seq(s, r);
        eng_request_release(r);
        return true;
    }
    size_t keep = stop_prefix_len(r);
    e.text_len = r->held_len - keep;
    e.text = dup_text(r->held, e.text_len);
    memmove(r->held, r->held + e.text_len, keep);
    r->held_len = keep;
    publish(s, r, &e);
    if (r->n_generated >= r->p.max_tokens || (!r->p.evict && r->seq.n_tokens + 1 > r->window)) {
        finish(s, r, ENG_FINISH_LENGTH, NULL);
        return true;
    }
    r->last_token = id;
    r->decoding = true;
    return false;
}

static void record_batch(eng_sched_t *s, uint32_t n_seqs, uint32_t n_prompt_done) {
    pthread_mutex_lock(&s->mu);
    int b = 0;
    while (b < 7 && n_seqs > (1u << b)) b++;
    s->stats.batch_hist[b]++;
    s->stats.batch_sum += n_seqs;
    s->stats.batch_count++;
    s->stats.steps++;
    s->stats.prompt_tokens += n_prompt_done;
    pthread_mutex_unlock(&s->mu);
}

static void draw_item(void *arg, size_t k) {
    eng_sched_t *s = arg;
    if (s->drawn[k])
        draw(s, s->item_req[k], s->items[k].logits, s->raw + k * s->n_vocab, &s->argmax[k],
             &s->draws[k]);
}

/* A request that needs only the greedy choice of each token: no temperature, penalties,
 * logprobs, token entropy or banned EOS. Its logits stay in the engine (on a GPU, only the
 * chosen id is copied back). */
static bool greedy_only(const eng_request_t *r) {
    const eng_sampler_params_t *p = &r->p.sampling;
    return p->temperature <= 0 && p->repetition_penalty == 1.0f && p->presence_penalty == 0 &&
           p->frequency_penalty == 0 && r->p.logprobs < 0 && !r->p.entropy && !r->p.ignore_eos;
}

/* Where item n's last-token result goes. */
static void set_output(eng_sched_t *s, const eng_request_t *r, uint32_t n, eng_batch_item_t *it) {
    if (greedy_only(r)) {
        it->logits = NULL;
        it->argmax = &s->argmax[n];
    } else {
        it->logits = s->logits + (size_t)n * s->n_vocab;
        it->argmax = NULL;
    }
}

static void step(eng_sched_t *s) {
    sweep(s);
    admit(s);
    uint32_t budget = s->p.step_tokens, n = 0, prompt_done = 0, claimed = 0;
    kv_pool_t *pool = eng_ctx_kv_pool(s->ctx);
    uint64_t evicted = 0;
    /* a snapshot: the pressure policy may preempt requests while the batch is built */
    size_t n_snap = s->n_running;
    memcpy(s->snap, s->running, sizeof(eng_request_t *) * n_snap);
    /* decode tokens first: streams never wait behind a prefill */
    for (size_t i = 0; i < n_snap && budget; i++) {
        eng_request_t *r = s->snap[i];
        if (!r->admitted || !r->decoding) continue;
        if (r->p.evict) evicted += eng_seq_make_room(s->ctx, &r->seq, r->window, 1, 0);
        uint32_t nb = growth(s, &r->seq, 1);
        if (claimed + nb > pool->n_free && !relieve(s, claimed + nb - pool->n_free, r, n, &evicted))
            continue;
        claimed += nb;
        s->items[n] =
            (eng_batch_item_t){&r->seq, &r->last_token, 1, NULL, false, &r->p.attn, &r->tele};
        set_output(s, r, n, &s->items[n]);
        s->item_req[n++] = r;
        budget--;
    }
    for (size_t i = 0; i < n_snap && budget; i++) {
        eng_request_t *r = s->snap[i];
        if (!r->admitted || r->decoding) continue;
        uint32_t left = r->n_feed - r->n_prefilled, chunk = left < budget ? left : budget;
        uint32_t nb = growth(s, &r->seq, chunk);
        if (claimed + nb > pool->n_free && s->p.pressure_evict)
            relieve(s, claimed + nb - pool->n_free, r, n, &evicted);
        if (claimed + nb > pool->n_free) { /* take what fits; the rest waits a step */
            uint32_t room = (r->seq.n_blocks + (pool->n_free - claimed)) * pool->block_size;
            chunk = room > r->seq.n_tokens ? room - r->seq.n_tokens : 0;
            if (chunk > left) chunk = left;
            if (!chunk) continue;
            nb = growth(s, &r->seq, chunk);
        }
        claimed += nb;
        bool last = chunk == left;
        s->items[n] = (eng_batch_item_t){&r->seq, r->feed + r->n_prefilled, chunk, NULL, false,
                                         NULL,    last ? &r->tele : NULL};
        if (last) set_output(s, r, n, &s->items[n]);
        s->item_req[n++] = r;
        budget -= chunk;
    }
    if (!n) return;
    char msg[ENG_ERRMSG_LEN];
    int rc = eng_forward(s->ctx, s->items, n, msg);
    /* which items produced a token: decoding ones, and prefills that finished their feed */
    uint32_t n_draw = 0;
    for (uint32_t k = 0; k < n; k++) {
        eng_request_t *r = s->item_req[k];
        s->drawn[k] = false;
        if (rc) continue;
        if (!r->decoding) {
            r->n_prefilled += s->items[k].n_tokens;
            if (r->n_prefilled != r->n_feed) continue;
            prompt_done += r->n_feed;
        }
        s->drawn[k] = true;
        n_draw++;
    }
    /* the draws (sampling, entropy) run on the worker threads, one request each */
    if (n_draw) eng_ctx_parallel_for(s->ctx, draw_item, s, n);
    for (uint32_t k = 0; k < n; k++) {
        eng_request_t *r = s->item_req[k];
        bool done = false;
        if (rc) {
            done = true;
            finish(s, r, ENG_FINISH_ERROR, msg);
        } else if (s->drawn[k]) {
            done = on_token(s, r, &s->draws[k]);
        }
        if (done)
            for (size_t i = 0; i < s->n_running; i++)
                if (s->running[i] == r) {
                    remove_at(s->running, &s->n_running, i);
                    break;
                }
    }
    record_batch(s, n, prompt_done);
    if (evicted) {
        pthread_mutex_lock(&s->mu);
        s->stats.evicted_tokens += evicted;
        pthread_mutex_unlock(&s->mu);
    }
}

static void *engine_main(void *arg) {
    eng_sched_t *s = arg;
    for (;;) {
        pthread_mutex_lock(&s->mu);
        while (!s->stop && !s->n_in && !s->n_running) {
            if (s->n_waiting) { /* blocked on KV: poll deadlines and cancels */
                struct timespec ts;
                clock_gettime(CLOCK_REALTIME, &ts);
                ts.tv_nsec += 50 * 1000 * 1000;
                if (ts.tv_nsec >= 1000000000) ts.tv_sec++, ts.tv_nsec -= 1000000000;
                pthread_cond_timedwait(&s->cv, &s->mu, &ts);
                break;
            }
            pthread_cond_wait(&s->cv, &s->mu);
        }
        bool stop = s->stop;
        for (size_t i = 0; i < s->n_in; i++) s->waiting[s->n_waiting++] = s->inq[i];
        s->n_in = 0;
        pthread_mutex_unlock(&s->mu);
        if (stop) break;
        s->published = false;
        step(s);
        pthread_mutex_lock(&s->mu);
        s->stats.running = (uint32_t)s->n_running;
        s->stats.waiting = atomic_load(&s->n_queued);
        s->stats.kv_usage = kv_pool_usage(eng_ctx_kv_pool(s->ctx));
        pthread_mutex_unlock(&s->mu);
        if (s->published && s->p.notify) s->p.notify(s->p.notify_arg);
    }
    /* shutdown: everything still here is cancelled */
    while (s->n_running) {
        eng_request_t *r = s->running[--s->n_running];
        finish(s, r, ENG_FINISH_CANCELLED, NULL);
    }
    while (s->n_waiting) {
        eng_request_t *r = s->waiting[--s->n_waiting];
        atomic_fetch_sub(&s->n_queued, 1);
        finish(s, r, ENG_FINISH_CANCELLED, NULL);
    }
    /* no notify here: whoever destroys the scheduler no longer listens */
    return NULL;
}
