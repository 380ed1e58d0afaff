/* sched.c - continuous batching on the engine thread.
 *
 * Other threads submit requests to a locked queue; the engine thread drains it into a
 * waiting deque and runs one batched forward per step. The model is vLLM v1's: every
 * running request has a token list and a count of the tokens whose K/V are computed, and
 * each step lets that count chase the list's length, so a prefill chunk and a decode token
 * are the same thing (a decode is a chunk of one). One loop builds the batch: running
 * requests first (those with one token to compute before those prefilling, so streams never
 * wait behind a prompt), then waiting requests admitted FIFO, up to a per-step token budget.
 * Every path gets its KV blocks from one allocate-or-preempt primitive (allocate()).
 *
 * After the forward pass it samples (on the worker threads), detokenizes, applies stop
 * strings and publishes events to each request's outbox, then calls notify once.
 *
 * Memory pressure: admission waits until the head request's whole remaining prompt (plus
 * one token) fits beside what admitted prefills still need; decoding sequences then grow on
 * demand, and when the pool is dry allocate() frees room by the configured policy: the evict
 * policy first drops the oldest non-sink blocks of sequences that allow eviction and are not
 * in this step's batch; then (and always under the preempt policy) the newest running
 * request not in the batch is preempted: its blocks return to the pool and it is requeued at
 * the front, to recompute its tokens when there is room (identical greedy text). When the
 * victim is the caller itself, allocate() says so and the caller leaves it out of the step.
 *
 * Bounds: the waiting deque has room for max_waiting + max_running requests, every request
 * that can ever be requeued (submissions stop at max_waiting queued; preemption moves a
 * request out of the running set, which holds at most max_running).
 *
 * Locks: sched->mu guards the incoming queue, stop flag and stats; each request's mu guards
 * its outbox. Neither is held during a forward pass.
 */
#define _GNU_SOURCE /* memmem */
#include "sched.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef enum { RQ_NEW = 0, RQ_WAITING, RQ_RUNNING, RQ_DONE } rq_state_t;

struct sched_request {
    atomic_int refs;
    atomic_bool cancel;
    sched_req_params_t p;
    sched_t *sched;
    double t_submit, t_start;
    /* engine-thread state */
    rq_state_t state;
    kv_seq_t seq;
    eng_sampler_t *smp;
    eng_detok_t detok;
    /* The sequence's tokens in cache order: toks[0..n_computed) have their K/V in seq (so
     * n_computed == seq.n_tokens), the rest wait to be computed. Starts as the prompt; each
     * drawn token is appended; eviction removes what it drops, so a preempted request
     * recomputes exactly what its cache held. */
    int32_t *toks;
    uint32_t n_toks, cap_toks, n_computed;
    uint32_t n_generated;
    uint64_t admit_order;
    bool decoding; /* its prompt (or recomputation) is done: one token per step from now on */
    bool batched;  /* in the batch being built this step */
    char *held;    /* released text held back while it may start a stop string */
    size_t held_len, held_cap;
    uint32_t window;
    bool measure;         /* the token being computed gets its telemetry measured */
    eng_attn_tele_t tele; /* per-layer, per-head attention telemetry of the last forward */
    float *tele_buf;
    /* outbox, guarded by mu */
    pthread_mutex_t mu;
    sched_event_t *ev;
    size_t n_ev, cap_ev;
};

struct sched {
    eng_ctx_t *ctx;
    const eng_model_t *m;
    sched_params_t p;
    uint32_t n_vocab, n_ctx;
    pthread_t thread;
    bool thread_started;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool stop;
    sched_request_t **inq; /* submitted, not yet seen by the engine thread (mu) */
    size_t n_in;
    atomic_uint n_queued; /* inq + waiting, for the bound */
    sched_stats_t stats;  /* mu */
    /* engine thread only */
    sched_request_t **wq; /* the waiting deque: a ring of wq_cap entries from wq_head */
    size_t wq_cap, wq_head, n_waiting;
    sched_request_t **running; /* in admission order */
    size_t n_running;
    uint64_t admissions;
    sched_request_t **order; /* this step's scheduling order of the running requests */
    sched_event_t *draws;    /* per batch item: the token drawn this step */
    bool *drawn;
    float *logits, *raw;
    int32_t *argmax; /* per batch item: the greedy id, for requests that need nothing more */
    eng_batch_item_t *items;
    sched_request_t **item_req;
    uint32_t n_items;
    uint64_t evicted; /* tokens evicted during this step */
    bool published;
};

static double mono_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

void sched_event_free(sched_event_t *e) {
    free(e->text);
    free(e->attn);
    e->text = NULL;
    e->attn = NULL;
}

const char *sched_finish_name(sched_finish_t f) {
    switch (f) {
    case SCHED_FINISH_STOP:
        return "stop";
    case SCHED_FINISH_LENGTH:
        return "length";
    case SCHED_FINISH_CANCELLED:
        return "cancelled";
    case SCHED_FINISH_TIMEOUT:
        return "timeout";
    case SCHED_FINISH_ERROR:
        return "error";
    default:
        return "none";
    }
}

/* ---- requests ---------------------------------------------------------- */

sched_request_t *sched_request_create(sched_req_params_t *p) {
    sched_request_t *r = calloc(1, sizeof(*r));
    if (!r) return NULL;
    atomic_init(&r->refs, 1);
    atomic_init(&r->cancel, false);
    r->p = *p;
    memset(p, 0, sizeof(*p)); /* ownership moved */
    pthread_mutex_init(&r->mu, NULL);
    return r;
}

static void free_request(sched_request_t *r) {
    free(r->toks);
    free(r->p.prompt);
    for (uint32_t i = 0; i < r->p.n_stop; i++) free(r->p.stop[i]);
    for (size_t i = 0; i < r->n_ev; i++) sched_event_free(&r->ev[i]);
    free(r->ev);
    free(r->held);
    free(r->tele_buf);
    eng_sampler_free(r->smp);
    if (r->seq.pool) kv_seq_close(&r->seq);
    pthread_mutex_destroy(&r->mu);
    free(r);
}

void sched_request_release(sched_request_t *r) {
    if (r && atomic_fetch_sub(&r->refs, 1) == 1) free_request(r);
}

void sched_request_cancel(sched_request_t *r) {
    atomic_store(&r->cancel, true);
    sched_t *s = r->sched;
    if (s) {
        pthread_mutex_lock(&s->mu);
        pthread_cond_signal(&s->cv);
        pthread_mutex_unlock(&s->mu);
    }
}

double sched_request_submit_time(const sched_request_t *r) {
    return r->t_submit;
}
double sched_request_start_time(const sched_request_t *r) {
    return r->t_start;
}

size_t sched_request_drain(sched_request_t *r, sched_event_t *ev, size_t cap) {
    pthread_mutex_lock(&r->mu);
    size_t n = r->n_ev < cap ? r->n_ev : cap;
    if (n) {
        memcpy(ev, r->ev, n * sizeof(sched_event_t));
        memmove(r->ev, r->ev + n, (r->n_ev - n) * sizeof(sched_event_t));
        r->n_ev -= n;
    }
    pthread_mutex_unlock(&r->mu);
    return n;
}

/* Publish an event (takes ownership of what e owns). The outbox grows by doubling; if that
 * fails, a token event is dropped, but a final event is never lost: it overwrites the last
 * undelivered event (the outbox has slots from submission on), so the client always learns
 * how the request ended. */
static void publish(sched_t *s, sched_request_t *r, sched_event_t *e) {
    e->time = mono_now();
    pthread_mutex_lock(&r->mu);
    if (r->n_ev == r->cap_ev) {
        size_t cap = r->cap_ev ? r->cap_ev * 2 : 16;
        sched_event_t *ne = realloc(r->ev, cap * sizeof(*ne));
        if (ne) {
            r->ev = ne;
            r->cap_ev = cap;
        }
    }
    if (r->n_ev < r->cap_ev) {
        r->ev[r->n_ev++] = *e;
    } else if (e->finish != SCHED_FINISH_NONE && r->n_ev) {
        sched_event_free(&r->ev[r->n_ev - 1]);
        r->ev[r->n_ev - 1] = *e;
    } else {
        sched_event_free(e);
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

int sched_create(sched_t **out, eng_ctx_t *ctx, const eng_model_t *m, const sched_params_t *p,
                 char *msg) {
    *out = NULL;
    sched_t *s = calloc(1, sizeof(*s));
    if (!s) return eng_fail(msg, ENG_ENOMEM, "out of memory");
    s->ctx = ctx;
    s->m = m;
    s->p = *p;
    if (!s->p.max_running) s->p.max_running = 16;
    if (!s->p.max_waiting) s->p.max_waiting = 256;
    if (!s->p.step_tokens) s->p.step_tokens = 512;
    /* every running stream gets its token each step (as vLLM requires max_num_batched_tokens
     * >= max_num_seqs): a smaller budget would starve the streams admitted last */
    if (s->p.step_tokens < s->p.max_running) s->p.step_tokens = s->p.max_running;
    s->n_vocab = eng_model_hparams(m)->n_vocab;
    s->n_ctx = eng_ctx_n_ctx(ctx);
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    size_t R = s->p.max_running, V = s->n_vocab;
    s->wq_cap = (size_t)s->p.max_waiting + R;
    s->inq = calloc(s->p.max_waiting, sizeof(sched_request_t *));
    s->wq = calloc(s->wq_cap, sizeof(sched_request_t *));
    s->running = calloc(R, sizeof(sched_request_t *));
    s->order = calloc(R, sizeof(sched_request_t *));
    s->items = calloc(R, sizeof(eng_batch_item_t));
    s->item_req = calloc(R, sizeof(sched_request_t *));
    s->logits = V <= SIZE_MAX / sizeof(float) / R ? malloc(sizeof(float) * V * R) : NULL;
    s->raw = s->logits ? malloc(sizeof(float) * V * R) : NULL;
    s->argmax = malloc(sizeof(int32_t) * R);
    s->draws = calloc(R, sizeof(sched_event_t));
    s->drawn = calloc(R, sizeof(bool));
    if (!s->inq || !s->wq || !s->running || !s->order || !s->items || !s->item_req || !s->logits ||
        !s->raw || !s->argmax || !s->draws || !s->drawn) {
        sched_destroy(s);
        return eng_fail(msg, ENG_ENOMEM, "out of memory for the scheduler");
    }
    if (pthread_create(&s->thread, NULL, engine_main, s) != 0) {
        sched_destroy(s);
        return eng_fail(msg, ENG_ENOMEM, "cannot start the engine thread");
    }
    s->thread_started = true;
    *out = s;
    return 0;
}

void sched_destroy(sched_t *s) {
    if (!s) return;
    if (s->thread_started) {
        pthread_mutex_lock(&s->mu);
        s->stop = true;
        pthread_cond_signal(&s->cv);
        pthread_mutex_unlock(&s->mu);
        pthread_join(s->thread, NULL);
    }
    for (size_t i = 0; i < s->n_in; i++) sched_request_release(s->inq[i]);
    free(s->inq);
    free(s->wq);
    free(s->running);
    free(s->order);
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

static uint32_t window_of(const sched_t *s, const sched_request_t *r) {
    return r->p.window && r->p.window < s->n_ctx ? r->p.window : s->n_ctx;
}

static uint32_t blocks_for(const sched_t *s, uint64_t tokens) {
    uint32_t bs = eng_ctx_kv_pool(s->ctx)->block_size;
    return (uint32_t)((tokens + bs - 1) / bs);
}

/* The blocks a request needs at its largest: prompt + max_tokens, capped by its window, and
 * past it the slots eviction leaves in the blocks it keeps (kv_seq_t.skip). */
static uint32_t blocks_needed(const sched_t *s, const sched_request_t *r) {
    uint64_t toks = (uint64_t)r->p.n_prompt + r->p.max_tokens;
    if (toks <= window_of(s, r)) return blocks_for(s, toks);
    uint32_t slack = r->p.evict ? kv_skip_max(eng_ctx_kv_pool(s->ctx)->block_size, r->p.sinks) : 0;
    return blocks_for(s, (uint64_t)window_of(s, r) + slack);
}

int sched_submit(sched_t *s, sched_request_t *r, char *msg) {
    if (r->p.n_prompt == 0 || !r->p.prompt)
        return eng_fail(msg, ENG_EINVAL, "the prompt has no tokens");
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
    /* the outbox has room from the start, so a final event always finds a slot (publish) */
    if (!r->ev) {
        r->ev = malloc(16 * sizeof(*r->ev));
        if (!r->ev) {
            pthread_mutex_unlock(&s->mu);
            return eng_fail(msg, ENG_ENOMEM, "out of memory for the request's events");
        }
        r->cap_ev = 16;
    }
    /* the token list takes over the prompt */
    r->toks = r->p.prompt;
    r->n_toks = r->cap_toks = r->p.n_prompt;
    r->p.prompt = NULL;
    r->sched = s;
    r->t_submit = mono_now();
    atomic_fetch_add(&r->refs, 1);
    atomic_fetch_add(&s->n_queued, 1);
    s->inq[s->n_in++] = r;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
    return 0;
}

void sched_stats(sched_t *s, sched_stats_t *out) {
    pthread_mutex_lock(&s->mu);
    *out = s->stats;
    pthread_mutex_unlock(&s->mu);
}

/* ---- engine thread: the waiting deque and the running set ---------------- */

static sched_request_t *wq_at(const sched_t *s, size_t i) {
    return s->wq[(s->wq_head + i) % s->wq_cap];
}

/* Room is guaranteed by the deque's size (see the file comment); the checks keep a broken
 * invariant from writing out of bounds. */
static bool wq_push_back(sched_t *s, sched_request_t *r) {
    if (s->n_waiting == s->wq_cap) return false;
    s->wq[(s->wq_head + s->n_waiting++) % s->wq_cap] = r;
    r->state = RQ_WAITING; /* from the incoming queue: n_queued counts it already */
    return true;
}

static bool wq_push_front(sched_t *s, sched_request_t *r) {
    if (s->n_waiting == s->wq_cap) return false;
    s->wq_head = (s->wq_head + s->wq_cap - 1) % s->wq_cap;
    s->wq[s->wq_head] = r;
    s->n_waiting++;
    r->state = RQ_WAITING;
    atomic_fetch_add(&s->n_queued, 1);
    return true;
}

/* Take r out of the deque or the running set, wherever it is. */
static void unlist(sched_t *s, sched_request_t *r) {
    if (r->state == RQ_WAITING) {
        size_t k = 0;
        for (size_t i = 0; i < s->n_waiting; i++) {
            sched_request_t *q = wq_at(s, i);
            if (q != r) s->wq[(s->wq_head + k++) % s->wq_cap] = q;
        }
        if (k < s->n_waiting) {
            s->n_waiting = k;
            atomic_fetch_sub(&s->n_queued, 1);
        }
    } else if (r->state == RQ_RUNNING) {
        for (size_t i = 0; i < s->n_running; i++)
            if (s->running[i] == r) {
                memmove(s->running + i, s->running + i + 1,
                        (s->n_running - i - 1) * sizeof(*s->running));
                s->n_running--;
                break;
            }
    }
    r->state = RQ_DONE;
}

/* r leaves the scheduler: its KV returns to the pool, it leaves its list, and the
 * scheduler's reference is dropped (r may be freed when this returns). */
static void retire(sched_t *s, sched_request_t *r) {
    if (r->seq.pool) kv_seq_close(&r->seq);
    unlist(s, r);
    sched_request_release(r);
}

/* Publish the final event, free r's KV, take it out of its list and drop the scheduler's
 * reference: r may be freed when this returns. */
static void finish(sched_t *s, sched_request_t *r, sched_finish_t why, const char *err) {
    sched_event_t e = {.token = -1, .finish = why};
    size_t tail = 0;
    char flushed[8];
    if (why == SCHED_FINISH_LENGTH || (why == SCHED_FINISH_STOP && !err)) {
        tail = eng_detok_flush(&r->detok, flushed, sizeof(flushed));
    }
    /* held text is released unless a stop string matched (then it was cut already) */
    size_t n = (why == SCHED_FINISH_LENGTH || why == SCHED_FINISH_STOP) ? r->held_len : 0;
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
    retire(s, r);
}

static bool expired(const sched_request_t *r, double now) {
    return r->p.deadline > 0 && now > r->p.deadline;
}

/* Finish every request that was cancelled or whose deadline passed. */
static void sweep(sched_t *s) {
    double now = mono_now();
    for (size_t i = s->n_running; i-- > 0;) {
        sched_request_t *r = s->running[i];
        bool c = atomic_load(&r->cancel);
        if (c || expired(r, now))
            finish(s, r, c ? SCHED_FINISH_CANCELLED : SCHED_FINISH_TIMEOUT, NULL);
    }
    for (size_t i = s->n_waiting; i-- > 0;) {
        sched_request_t *r = wq_at(s, i);
        bool c = atomic_load(&r->cancel);
        if (c || expired(r, now))
            finish(s, r, c ? SCHED_FINISH_CANCELLED : SCHED_FINISH_TIMEOUT, NULL);
    }
}

/* ---- eviction, preemption and the allocation primitive -------------------- */

/* After the engine evicted `gone` of r's oldest non-sink tokens (sink-aware, keys after them
 * K-shifted), drop the same tokens from r's token list. */
static void forget_evicted(sched_t *s, sched_request_t *r, uint32_t gone) {
    if (!gone) return;
    uint32_t from = r->seq.n_sinks; /* eviction dropped the tokens right after the sinks */
    memmove(r->toks + from, r->toks + from + gone, sizeof(int32_t) * (r->n_toks - from - gone));
    r->n_toks -= gone;
    r->n_computed -= gone;
    s->evicted += gone;
}

/* Free r's blocks and requeue it at the front of the deque, to recompute its tokens when
 * there is room. Its token list already holds exactly what its cache held (eviction removed
 * what it dropped; at most window + 1 tokens), so the recomputation, and the window eviction
 * after it, go as they would have without the preemption. Its outbox, sampler and text state
 * carry on. False (nothing changed) if the deque is full, which its size rules out. */
static bool preempt(sched_t *s, sched_request_t *r) {
    if (s->n_waiting == s->wq_cap) return false;
    kv_seq_close(&r->seq);
    r->n_computed = 0;
    r->decoding = false;
    unlist(s, r);
    wq_push_front(s, r);
    pthread_mutex_lock(&s->mu);
    s->stats.preemptions++;
    pthread_mutex_unlock(&s->mu);
    return true;
}

/* The evict policy's victim: the longest running sequence that allows eviction, is not in
 * this step's batch, and has a block past its sinks to give. */
static sched_request_t *evict_victim(sched_t *s) {
    sched_request_t *v = NULL;
    for (size_t i = 0; i < s->n_running; i++) {
        sched_request_t *r = s->running[i];
        if (r->p.evict && !r->batched &&
            r->seq.n_tokens >= r->seq.n_sinks + kv_seq_evict_for_block(&r->seq) &&
            (!v || r->seq.n_tokens > v->seq.n_tokens))
            v = r;
    }
    return v;
}

/* The preemption victim: the newest running request not in this step's batch. */
static sched_request_t *preempt_victim(sched_t *s) {
    sched_request_t *v = NULL;
    for (size_t i = 0; i < s->n_running; i++) {
        sched_request_t *r = s->running[i];
        if (!r->batched && (!v || r->admit_order > v->admit_order)) v = r;
    }
    return v;
}

/* The allocation primitive: reserve the KV blocks for r's next n tokens. When the pool is
 * dry and may_free is set, free room by the configured policy (evict, then preempt) and
 * retry. Returns true when the blocks are r's; false when r must sit this step out: it was
 * preempted itself (now waiting), it finished with an error (and may be freed), or, without
 * may_free, the room is not there. */
static bool allocate(sched_t *s, sched_request_t *r, uint32_t n, bool may_free) {
    for (;;) {
        int rc = kv_seq_reserve(&r->seq, r->seq.n_tokens + n);
        if (rc == 0) return true;
        if (rc != ENG_ENOSPACE) {
            finish(s, r, SCHED_FINISH_ERROR, "out of memory for a KV block table");
            return false;
        }
        if (!may_free) return false;
        /* eviction drops the oldest tokens, whose sliding-window blocks are long gone: when
         * that pool is the one dry, only preemption makes room */
        const kv_pool_t *pool = r->seq.pool;
        bool local_dry =
            pool->local && kv_seq_local_need(&r->seq, r->seq.n_tokens + n) > pool->local->n_free;
        sched_request_t *v = s->p.pressure_evict && !local_dry ? evict_victim(s) : NULL;
        if (v) {
            forget_evicted(s, v, eng_seq_evict(s->ctx, &v->seq, kv_seq_evict_for_block(&v->seq)));
            continue;
        }
        if (!(v = preempt_victim(s)) || !preempt(s, v)) return false;
        if (v == r) return false;
    }
}

/* ---- building the step's batch -------------------------------------------- */

static void set_output(sched_t *s, const sched_request_t *r, uint32_t n, eng_batch_item_t *it);

/* Whether r's next token gets telemetry: every token when the request asked for it, else the
 * configured share of its tokens, spread evenly (tokens 0, 1/share, 2/share, ...), for the
 * Prometheus histograms. The rest compute no entropy at all: the attention kernels skip their
 * accumulators, and a greedy request's logits never leave the engine. */
static bool measured(const sched_request_t *r) {
    double p = r->p.telemetry_sample;
    uint32_t i = r->n_generated;
    if (r->p.entropy || p >= 1) return true;
    if (!(p > 0)) return false;
    return i == 0 || floor(i * p) > floor((i - 1) * p);
}

/* Put r's next chunk (its uncomputed tokens, at most *budget) into the batch. Returns false if
 * r sits this step out (r may then no longer be running). */
static bool schedule(sched_t *s, sched_request_t *r, uint32_t *budget, bool may_free) {
    kv_pool_t *pool = eng_ctx_kv_pool(s->ctx);
    uint32_t n = r->n_toks - r->n_computed;
    if (n > *budget) n = *budget;
    if (!n || s->n_items == s->p.max_running) return false;
    /* a stream that may run past its window drops its oldest non-sink tokens first */
    if (r->p.evict) {
        forget_evicted(s, r, eng_seq_make_room(s->ctx, &r->seq, r->window, n, 0));
        if ((uint64_t)r->seq.n_tokens + n > r->window) { /* only sinks left */
            if (r->seq.n_tokens >= r->window) {
                finish(s, r, SCHED_FINISH_LENGTH, NULL);
                return false;
            }
            n = r->window - r->seq.n_tokens;
        }
    }
    if (n > 1) { /* a prefill chunk takes what the free blocks hold before anyone is moved */
        uint32_t free = pool->n_free;
        if (pool->local) { /* a split cache: both pools must hold the chunk */
            kv_seq_drop_out_of_window(&r->seq);
            if (pool->local->n_free < free) free = pool->local->n_free;
        }
        uint64_t room = (uint64_t)(r->seq.n_blocks + free) * pool->block_size,
                 used = (uint64_t)r->seq.n_tokens + r->seq.skip; /* slots, evicted ones too */
        if (room > used && room - used < n) n = (uint32_t)(room - used);
    }
    if (!allocate(s, r, n, may_free)) return false;
    bool last = r->n_computed + n == r->n_toks;
    if (last) r->measure = measured(r);
    eng_batch_item_t *it = &s->items[s->n_items];
    *it = (eng_batch_item_t){.seq = &r->seq,
                             .tokens = r->toks + r->n_computed,
                             .n_tokens = n,
                             .attn = r->decoding ? &r->p.attn : NULL,
                             .tele = last && r->measure ? &r->tele : NULL};
    if (last) set_output(s, r, s->n_items, it);
    s->item_req[s->n_items++] = r;
    r->batched = true;
    *budget -= n;
    return true;
}

/* Make a waiting request runnable: its sampler, detokenizer and telemetry buffers on first
 * admission, a fresh sequence. False on allocation failure (the caller ends the request). */
static bool start(sched_t *s, sched_request_t *r) {
    if (!r->smp) {
        if (eng_sampler_create(&r->smp, &r->p.sampling, s->n_vocab) != 0) return false;
        for (uint32_t i = 0; i < r->p.n_prompt; i++) eng_sampler_accept(r->smp, r->toks[i]);
        eng_detok_init(&r->detok, eng_model_tokenizer(s->m));
    }
    if (!r->tele_buf) {
        const eng_hparams_t *hp = eng_model_hparams(s->m);
        size_t LH = (size_t)hp->n_layer * hp->n_head;
        r->tele_buf = malloc(sizeof(float) * 3 * LH + hp->n_layer);
        if (!r->tele_buf) return false;
        r->tele = (eng_attn_tele_t){.entropy = r->tele_buf,
                                    .sink_mass = r->tele_buf + LH,
                                    .n_att = (uint32_t *)(r->tele_buf + 2 * LH),
                                    .sparse = (uint8_t *)(r->tele_buf + 3 * LH)};
    }
    if (r->t_start == 0) r->t_start = mono_now();
    kv_seq_init(&r->seq, eng_ctx_kv_pool(s->ctx));
    r->seq.n_sinks = r->p.sinks;
    r->window = window_of(s, r);
    r->admit_order = ++s->admissions;
    return true;
}

/* Build the step's batch: running requests (those with one token to compute first), then
 * waiting requests admitted FIFO while a slot, the blocks for their whole remaining prompt
 * and budget are there. */
static void build_batch(sched_t *s) {
    uint32_t budget = s->p.step_tokens;
    s->n_items = 0;
    size_t n_order = 0;
    for (int pass = 0; pass < 2; pass++)
        for (size_t i = 0; i < s->n_running; i++) {
            sched_request_t *r = s->running[i];
            bool one = r->n_toks - r->n_computed == 1;
            if (one == (pass == 0)) s->order[n_order++] = r;
        }
    for (size_t i = 0; i < n_order && budget; i++) {
        sched_request_t *r = s->order[i];
        if (r->state == RQ_RUNNING && !r->batched) schedule(s, r, &budget, true);
    }
    /* admission: blocks are not taken from anyone for a request that is not running yet */
    kv_pool_t *pool = eng_ctx_kv_pool(s->ctx);
    uint64_t pending = 0; /* blocks that admitted prefills still need */
    for (size_t i = 0; i < s->n_running; i++) {
        sched_request_t *r = s->running[i];
        uint32_t want = kv_seq_blocks_for(&r->seq, r->n_toks);
        if (!r->decoding && want > r->seq.n_blocks) pending += want - r->seq.n_blocks;
    }
    while (budget && s->n_waiting && s->n_running < s->p.max_running &&
           s->n_items < s->p.max_running) {
        sched_request_t *r = wq_at(s, 0);
        uint32_t window = window_of(s, r);
        uint32_t need = blocks_for(s, r->n_toks + 1 < window ? r->n_toks + 1 : window);
        if (pending + need > pool->n_free) break; /* FIFO: the head waits */
        if (!start(s, r)) {
            finish(s, r, SCHED_FINISH_ERROR, "out of memory for the request's sampler");
            continue;
        }
        unlist(s, r);
        s->running[s->n_running++] = r;
        r->state = RQ_RUNNING;
        pending += need;
        schedule(s, r, &budget, false);
    }
}
/* Append released text to the hold buffer. */
static bool hold(sched_request_t *r, const char *t, size_t n) {
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
static long find_stop(const sched_request_t *r) {
    long best = -1;
    for (uint32_t i = 0; i < r->p.n_stop; i++) {
        const char *hit = memmem(r->held, r->held_len, r->p.stop[i], strlen(r->p.stop[i]));
        if (hit && (best < 0 || hit - r->held < best)) best = hit - r->held;
    }
    return best;
}

/* Bytes at the end of held that could still begin a stop string. */
static size_t stop_prefix_len(const sched_request_t *r) {
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
                               float *entropy, sched_logprob_t *top, uint32_t n_top) {
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
    for (uint32_t k = 0; k < n_top; k++) top[k] = (sched_logprob_t){-1, -INFINITY};
    for (uint32_t i = 0; i < V && n_top; i++) {
        if (l[i] <= top[n_top - 1].logprob && top[n_top - 1].id >= 0) continue;
        uint32_t k = n_top - 1;
        while (k > 0 && (top[k - 1].id < 0 || l[i] > top[k - 1].logprob)) {
            top[k] = top[k - 1];
            k--;
        }
        top[k] = (sched_logprob_t){(int32_t)i, l[i]};
    }
    for (uint32_t k = 0; k < n_top; k++) top[k].logprob = (float)(top[k].logprob - *lse);
}

/* The event's attention telemetry from the request's last forward (head means per layer). */
static sched_attn_stats_t *attn_stats(const sched_t *s, const sched_request_t *r) {
    const eng_hparams_t *hp = eng_model_hparams(s->m);
    uint32_t L = hp->n_layer, H = hp->n_head;
    size_t per_head = r->p.per_head ? 2 * (size_t)L * H : 0;
    size_t bytes = sizeof(sched_attn_stats_t) + sizeof(float) * (3 * (size_t)L + per_head) + L;
    sched_attn_stats_t *a = malloc(bytes);
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
static void draw(const sched_t *s, sched_request_t *r, float *logits, float *raw,
                 const int32_t *argmax, sched_event_t *e) {
    const eng_tokenizer_t *tok = eng_model_tokenizer(s->m);
    memset(e, 0, sizeof(*e));
    e->token = -1;
    if (!logits) { /* greedy_only(): the engine chose already (-1: non-finite logits) */
        e->token = *argmax;
        if (e->token < 0) return;
        eng_sampler_accept(r->smp, e->token);
        e->attn = r->measure ? attn_stats(s, r) : NULL;
        return;
    }
    if (eng_argmax(logits, s->n_vocab) < 0) return; /* NaN or infinity: on_token ends r */
    double lse = 0;
    if (r->p.logprobs >= 0 || r->measure) {
        /* the sampler edits logits in place: keep the raw ones only when logprobs need them */
        const float *src = logits;
        if (r->p.logprobs >= 0) src = memcpy(raw, logits, sizeof(float) * s->n_vocab);
        float T = r->p.sampling.temperature > 0 ? r->p.sampling.temperature : 1.0f;
        e->n_top = r->p.logprobs > 0 ? (uint32_t)r->p.logprobs : 0;
        distribution_facts(src, s->n_vocab, T, r->p.logprobs >= 0, &lse,
                           r->measure ? &e->entropy_bits : NULL, e->top, e->n_top);
        e->has_entropy = r->measure;
    }
    if (r->p.ignore_eos && eng_tok_eos(tok) >= 0) logits[eng_tok_eos(tok)] = -INFINITY;
    int32_t id = eng_sampler_sample(r->smp, logits);
    if (id < 0) return;
    eng_sampler_accept(r->smp, id);
    e->token = id;
    e->attn = r->measure ? attn_stats(s, r) : NULL;
    if (r->p.logprobs >= 0) e->logprob = (float)(raw[id] - lse);
}

/* Append a drawn token to r's token list. */
static bool push_token(sched_request_t *r, int32_t id) {
    if (r->n_toks == r->cap_toks) {
        uint32_t cap = r->cap_toks < 32 ? 64 : r->cap_toks * 2;
        int32_t *t = cap > r->cap_toks ? realloc(r->toks, sizeof(int32_t) * cap) : NULL;
        if (!t) return false;
        r->toks = t;
        r->cap_toks = cap;
    }
    r->toks[r->n_toks++] = id;
    return true;
}

/* The second half, on the engine thread alone: record the token, detokenize, apply stop
 * strings, publish, and decide whether r goes on (it may be freed when it does not). Takes
 * ownership of what ev owns. */
static void on_token(sched_t *s, sched_request_t *r, sched_event_t *ev) {
    const eng_tokenizer_t *tok = eng_model_tokenizer(s->m);
    sched_event_t e = *ev;
    int32_t id = e.token;
    if (id < 0) {
        sched_event_free(&e);
        finish(s, r, SCHED_FINISH_ERROR,
               "the model produced non-finite logits (NaN or infinity): its weights or "
               "activations are broken");
        return;
    }
    if (!push_token(r, id)) {
        sched_event_free(&e);
        finish(s, r, SCHED_FINISH_ERROR, "out of memory for the generated tokens");
        return;
    }
    r->n_generated++;
    r->decoding = true;
    pthread_mutex_lock(&s->mu);
    s->stats.generation_tokens++;
    pthread_mutex_unlock(&s->mu);

    if (!r->p.ignore_eos && eng_tok_is_eog(tok, id)) {
        e.text = dup_text("", 0);
        publish(s, r, &e);
        finish(s, r, SCHED_FINISH_STOP, NULL);
        return;
    }
    char piece[512];
    size_t n_piece = eng_detok_push(&r->detok, id, piece, sizeof(piece));
    if (!hold(r, piece, n_piece)) {
        sched_event_free(&e);
        finish(s, r, SCHED_FINISH_ERROR, "out of memory for the generated text");
        return;
    }
    long at = find_stop(r);
    if (at >= 0) {
        e.text = dup_text(r->held, (size_t)at);
        e.text_len = e.text ? (size_t)at : 0;
        r->held_len = 0;
        publish(s, r, &e);
        /* the stop string and anything after it are dropped */
        sched_event_t f = {.token = -1, .finish = SCHED_FINISH_STOP, .text = dup_text("", 0)};
        f.prompt_tokens = r->p.n_prompt;
        f.completion_tokens = r->n_generated;
        publish(s, r, &f);
        retire(s, r);
        return;
    }
    size_t keep = stop_prefix_len(r);
    e.text_len = r->held_len - keep;
    e.text = dup_text(r->held, e.text_len);
    if (!e.text) e.text_len = 0;
    memmove(r->held, r->held + r->held_len - keep, keep);
    r->held_len = keep;
    publish(s, r, &e);
    if (r->n_generated >= r->p.max_tokens || (!r->p.evict && r->n_toks > r->window))
        finish(s, r, SCHED_FINISH_LENGTH, NULL);
}

static void record_batch(sched_t *s, uint32_t n_seqs, uint32_t n_prompt_done) {
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
    sched_t *s = arg;
    if (s->drawn[k])
        draw(s, s->item_req[k], s->items[k].logits, s->raw + k * s->n_vocab, &s->argmax[k],
             &s->draws[k]);
}

/* A request that needs only the greedy choice of each token: no temperature, penalties,
 * logprobs, telemetry asked for or banned EOS. Its logits stay in the engine (on a GPU, only
 * the chosen id is copied back); its sampled tokens get attention telemetry alone. */
static bool greedy_only(const sched_request_t *r) {
    const eng_sampler_params_t *p = &r->p.sampling;
    return p->temperature <= 0 && p->repetition_penalty == 1.0f && p->presence_penalty == 0 &&
           p->frequency_penalty == 0 && r->p.logprobs < 0 && !r->p.entropy && !r->p.ignore_eos;
}

/* Where item n's last-token result goes. */
static void set_output(sched_t *s, const sched_request_t *r, uint32_t n, eng_batch_item_t *it) {
    if (greedy_only(r)) {
        it->logits = NULL;
        it->argmax = &s->argmax[n];
    } else {
        it->logits = s->logits + (size_t)n * s->n_vocab;
        it->argmax = NULL;
    }
}

static void step(sched_t *s) {
    sweep(s);
    s->evicted = 0;
    build_batch(s);
    uint32_t n = s->n_items, prompt_done = 0;
    for (uint32_t k = 0; k < n; k++) s->item_req[k]->batched = false;
    if (s->evicted) {
        pthread_mutex_lock(&s->mu);
        s->stats.evicted_tokens += s->evicted;
        pthread_mutex_unlock(&s->mu);
    }
    if (!n) return;
    char msg[ENG_ERRMSG_LEN];
    int rc = eng_forward(s->ctx, s->items, n, msg);
    /* which items produced a token: those whose computed count reached the token count */
    uint32_t n_draw = 0;
    for (uint32_t k = 0; k < n; k++) {
        sched_request_t *r = s->item_req[k];
        s->drawn[k] = false;
        if (rc) continue;
        if (!r->decoding) prompt_done += s->items[k].n_tokens;
        r->n_computed += s->items[k].n_tokens;
        if (r->n_computed == r->n_toks) {
            s->drawn[k] = true;
            n_draw++;
        }
    }
    /* the draws (sampling, entropy) run on the worker threads, one request each */
    if (n_draw) eng_ctx_parallel_for(s->ctx, draw_item, s, n);
    for (uint32_t k = 0; k < n; k++) {
        sched_request_t *r = s->item_req[k];
        if (rc)
            finish(s, r, SCHED_FINISH_ERROR, msg);
        else if (s->drawn[k])
            on_token(s, r, &s->draws[k]);
    }
    record_batch(s, n, prompt_done);
}

static void *engine_main(void *arg) {
    sched_t *s = arg;
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
        size_t n_in = s->n_in, n_moved = 0;
        for (; n_moved < n_in && wq_push_back(s, s->inq[n_moved]); n_moved++) {
        }
        s->n_in = 0;
        pthread_mutex_unlock(&s->mu);
        for (size_t i = n_moved; i < n_in; i++) { /* the deque's size rules this out */
            atomic_fetch_sub(&s->n_queued, 1);
            finish(s, s->inq[i], SCHED_FINISH_ERROR, "internal error: the waiting queue is full");
        }
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
    while (s->n_running) finish(s, s->running[s->n_running - 1], SCHED_FINISH_CANCELLED, NULL);
    while (s->n_waiting) finish(s, wq_at(s, s->n_waiting - 1), SCHED_FINISH_CANCELLED, NULL);
    pthread_mutex_lock(&s->mu);
    s->stats.running = s->stats.waiting = 0;
    s->stats.kv_usage = kv_pool_usage(eng_ctx_kv_pool(s->ctx));
    pthread_mutex_unlock(&s->mu);
    /* no notify here: whoever destroys the scheduler no longer listens */
    return NULL;
}
