/* sched.h - the scheduler: continuous batching on the engine thread.
 *
 * Requests are submitted from any thread into a bounded queue; the engine
 * thread admits them, builds one batch per step (chunked prefill and decode
 * tokens alike, allocate-or-preempt under KV pressure, sink-aware eviction),
 * runs the engine's forward pass, samples, applies stop strings and publishes
 * events to each request's outbox. Layering: server -> api -> sched -> engine
 * -> kvcache.
 */
#ifndef TIDALD_SCHED_H
#define TIDALD_SCHED_H

#include "../engine/engine.h"

#define SCHED_MAX_LOGPROBS 5
#define SCHED_MAX_STOP 8

typedef enum {
    SCHED_FINISH_NONE = 0,
    SCHED_FINISH_STOP,      /* EOS/EOT or a stop string */
    SCHED_FINISH_LENGTH,    /* max_tokens or the context window */
    SCHED_FINISH_CANCELLED, /* the client went away or the server is shutting down */
    SCHED_FINISH_TIMEOUT,   /* the request's deadline passed */
    SCHED_FINISH_ERROR,     /* an engine error; the event's text says which */
} sched_finish_t;

const char *sched_finish_name(sched_finish_t f);

typedef struct {
    int32_t *prompt; /* owned by the request once submitted */
    uint32_t n_prompt;
    uint32_t max_tokens;
    eng_sampler_params_t sampling;
    char *stop[SCHED_MAX_STOP]; /* owned; text is cut before the first match */
    uint32_t n_stop;
    int32_t logprobs; /* -1: none; 0..5: chosen token's logprob plus this many alternatives */
    bool entropy;     /* telemetry asked for: token entropy and attention figures, every token */
    float telemetry_sample; /* the share of the other tokens measured too (0..1; for metrics) */
    double deadline;        /* CLOCK_MONOTONIC seconds; 0: none */
    bool ignore_eos;
    uint32_t window;        /* this sequence's context window; 0: the context's */
    bool evict;             /* run past the window with sink-aware eviction */
    uint32_t sinks;         /* attention-sink tokens (eviction, force_sinks, sink mass) */
    eng_attn_params_t attn; /* FULL or TIDAL (decode steps) */
    bool per_head;          /* telemetry: per-head arrays too */
} sched_req_params_t;

typedef struct {
    int32_t id;
    float logprob;
} sched_logprob_t;

/* Attention telemetry of one generated token: for each layer, the head-mean attention entropy
 * (bits), its normalised form (entropy / log2 of the keys attended, head-mean), the head-mean
 * attention mass on the sink tokens, and whether the layer was sparse (then the figures are
 * over the selected keys). One malloc'd block; per-head arrays only when asked for. */
typedef struct {
    uint32_t n_layer, n_head;
    float *entropy_bits;      /* [n_layer] */
    float *entropy_norm;      /* [n_layer] */
    float *sink_mass;         /* [n_layer] */
    uint8_t *sparse;          /* [n_layer] */
    float *head_entropy_bits; /* [n_layer * n_head] or NULL */
    float *head_sink_mass;    /* [n_layer * n_head] or NULL */
} sched_attn_stats_t;

/* One unit published to the request's outbox. A token event carries the text it released
 * (possibly empty while UTF-8 or a stop-string prefix is held back). The final event has
 * finish != NONE and may carry trailing text. */
typedef struct {
    int32_t token; /* -1 for a final event without a token */
    char *text;    /* malloc'd, NUL-terminated, whole UTF-8; may be "" */
    size_t text_len;
    float logprob;
    uint32_t n_top;
    sched_logprob_t top[SCHED_MAX_LOGPROBS];
    float entropy_bits;
    bool has_entropy;         /* entropy_bits was measured (telemetry asked for or sampled) */
    sched_attn_stats_t *attn; /* the attention telemetry (owned), or NULL when not measured */
    double time;              /* CLOCK_MONOTONIC when produced */
    sched_finish_t finish;
    uint32_t prompt_tokens, completion_tokens; /* filled on the final event */
    char error[128];
} sched_event_t;

/* Free what an event owns (its text and attention telemetry). */
void sched_event_free(sched_event_t *e);

typedef struct sched_request sched_request_t;
typedef struct sched sched_t;

typedef struct {
    uint32_t max_running;      /* sequences decoding at once */
    uint32_t max_waiting;      /* bounded queue; submit fails past it */
    uint32_t step_tokens;      /* token budget per step (chunked prefill); at least max_running */
    void (*notify)(void *arg); /* called from the engine thread when outboxes have news */
    void *notify_arg;
    bool pressure_evict; /* KV pool dry: evict middle blocks of the longest sequence first
                            (sink-aware) instead of preempting the newest request */
} sched_params_t;

typedef struct {
    uint32_t running, waiting;
    double kv_usage;
    uint64_t prompt_tokens, generation_tokens, steps;
    uint64_t batch_hist[8]; /* sequences per step: 1, 2, 4, 8, 16, 32, 64, more */
    uint64_t batch_sum, batch_count;
    uint64_t evicted_tokens; /* sink-aware eviction: windows and memory pressure */
    uint64_t preemptions;    /* requests preempted and requeued under memory pressure */
} sched_stats_t;

/* Takes ownership of nothing; ctx must outlive the scheduler. Starts the engine thread. */
int sched_create(sched_t **out, eng_ctx_t *ctx, const eng_model_t *m, const sched_params_t *p,
                 char *msg);
/* Cancel everything, join the engine thread, free. */
void sched_destroy(sched_t *s);

/* Create a request from params (ownership of prompt and stop strings moves into it). The
 * caller holds one reference. */
sched_request_t *sched_request_create(sched_req_params_t *p);
/* Submit: the scheduler takes its own reference. ENG_ERANGE if the queue is full, ENG_EINVAL
 * if the request can never fit the context (msg filled). */
int sched_submit(sched_t *s, sched_request_t *r, char *msg);
/* Ask the scheduler to stop a request (idempotent, any thread). */
void sched_request_cancel(sched_request_t *r);
/* Drop a reference; the last one frees the request. */
void sched_request_release(sched_request_t *r);
/* Move up to cap published events into ev (caller frees each ev[i].text). Any thread. */
size_t sched_request_drain(sched_request_t *r, sched_event_t *ev, size_t cap);
double sched_request_submit_time(const sched_request_t *r);
double sched_request_start_time(const sched_request_t *r); /* when admitted; 0 while waiting */

void sched_stats(sched_t *s, sched_stats_t *out);

#endif
