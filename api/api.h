/* api.h - the OpenAI wire format: request parsing and validation, response and stream-chunk
 * builders, error objects, chat templates, and the Prometheus metrics registry.
 *
 * Nothing here computes anything heavy: parsing turns a JSON body into an engine request
 * (tokenized prompt, sampler settings, stop strings) in time linear in the body, builders turn
 * engine events into JSON text. The parse functions (api_parse_request, api_tokenize,
 * api_detokenize) keep no static buffers and share no unsynchronised state (the one shared
 * value is the atomic counter behind default seeds), so they may run on any thread; the
 * metrics registry is loop-thread only.
 */
#ifndef TIDALD_API_H
#define TIDALD_API_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../sched/sched.h"

/* ---- errors --------------------------------------------------------- */

typedef struct {
    int status;       /* HTTP status */
    const char *type; /* invalid_request_error, authentication_error, ... */
    char param[64];   /* the offending field, or "" */
    const char *code; /* e.g. context_length_exceeded, or NULL */
    char message[256];
} api_error_t;

/* The OpenAI error object {"error":{"message","type","param","code"}}; malloc'd JSON. */
char *api_error_json(const api_error_t *e);
/* Fill an error and return -1 (for one-line error paths). */
int api_fail(api_error_t *e, int status, const char *type, const char *param, const char *code,
             const char *fmt, ...) __attribute__((format(printf, 6, 7)));

/* ---- requests ------------------------------------------------------- */

typedef enum { API_COMPLETION, API_CHAT } api_kind_t;

typedef struct {
    const eng_model_t *model;
    const char *model_name;
    uint32_t n_ctx;
    uint32_t default_max_tokens;
    double request_timeout_s;
    eng_attn_params_t attn;        /* server defaults for "attention" */
    uint32_t sinks;                /* attention-sink tokens */
    bool evict;                    /* requests may run past their window (sink-aware eviction) */
    uint32_t max_nonstream_tokens; /* largest max_tokens without stream; 0: the default below */
} api_ctx_t;

/* max_nonstream_tokens when the context leaves it 0 (as cfg_t's default). */
#define API_DEFAULT_MAX_NONSTREAM_TOKENS 16384
/* The longest token list /detokenize accepts. */
#define API_MAX_DETOKENIZE_TOKENS (1u << 20)

typedef struct {
    api_kind_t kind;
    bool stream, include_usage, echo;
    bool entropy;           /* telemetry.entropy */
    bool per_head;          /* telemetry.per_head */
    int logprobs;           /* -1 off; else alternatives wanted (0..5) */
    char *prompt_text;      /* for echo (completions with a string prompt) */
    sched_req_params_t eng; /* ownership moves into the engine request */
} api_req_t;

/* Parse and validate a completions or chat-completions body. On failure returns -1 and fills
 * err (status 400 with the field named in param). */
int api_parse_request(const api_ctx_t *ctx, api_kind_t kind, const char *body, size_t len,
                      api_req_t *out, api_error_t *err);
void api_req_free(api_req_t *r);

/* Render chat messages with the model's template (recognised from tokenizer.chat_template). */
typedef enum {
    API_TMPL_NONE,
    API_TMPL_LLAMA2,
    API_TMPL_LLAMA3,
    API_TMPL_CHATML,
    API_TMPL_ZEPHYR,
    API_TMPL_GEMMA
} api_tmpl_t;
api_tmpl_t api_detect_template(const char *chat_template);
/* The model's template: its GGUF template's family, or, when the file carries none, the turn
 * format its vocabulary is made for (Gemma's <start_of_turn>; some Gemma 3 GGUF files, the
 * 270M among them, ship without a template). */
api_tmpl_t api_model_template(const eng_tokenizer_t *t);
typedef struct {
    const char *role, *content;
} api_msg_t;
/* malloc'd prompt text (special tokens spelled out), or NULL if the template is NONE */
char *api_render_chat(api_tmpl_t t, const api_msg_t *msgs, size_t n);
/* The same, with the system message the template supplies when the conversation has none
 * (default_system NULL: none). */
char *api_render_chat_ex(api_tmpl_t t, const char *default_system, const api_msg_t *msgs, size_t n);
/* The literal default system message of a ChatML template (SmolLM2's "You are a helpful AI
 * assistant named SmolLM, ..."), malloc'd; NULL if the template has none. */
char *api_template_default_system(const char *chat_template);

/* /tokenize and /detokenize bodies -> JSON reply (malloc'd), or NULL with err filled. */
char *api_tokenize(const api_ctx_t *ctx, const char *body, size_t len, api_error_t *err);
char *api_detokenize(const api_ctx_t *ctx, const char *body, size_t len, api_error_t *err);
char *api_models_json(const api_ctx_t *ctx, double created);
/* Module internal: n bytes of UTF-8 text (NUL bytes allowed) as a quoted JSON string, malloc'd;
 * NULL when out of memory. */
char *api__json_quote(const char *s, size_t n);

/* ---- responses ------------------------------------------------------ */

/* Accumulates a request's output for the final (non-stream) response and usage. */
typedef struct {
    char *text;
    size_t len, cap;
    sched_event_t *tok; /* token events in order, for logprobs and telemetry (text not kept) */
    size_t n_tok, cap_tok;
    bool oom;
} api_acc_t;

typedef struct {
    const char *id; /* "cmpl-..." */
    const char *model;
    double created;
    const api_req_t *req;
    const eng_tokenizer_t *tok;
    size_t text_offset; /* stream: bytes of text sent before this chunk */
} api_resp_ctx_t;

/* One SSE data payload (JSON, malloc'd) for a token event or the final event. */
char *api_stream_chunk(const api_resp_ctx_t *rc, const sched_event_t *ev, bool first);
/* The usage-only chunk (choices: []). */
char *api_usage_chunk(const api_resp_ctx_t *rc, uint32_t prompt, uint32_t completion);
/* A stream error event payload. */
char *api_stream_error(const char *message);
/* Whole response for a non-stream request. */
int api_acc_add(api_acc_t *a, const sched_event_t *ev);
void api_acc_free(api_acc_t *a);
char *api_final_response(const api_resp_ctx_t *rc, const api_acc_t *a, sched_finish_t finish,
                         uint32_t prompt, uint32_t completion);

/* ---- metrics (process-wide registry; loop thread only) --------------- */

typedef enum {
    API_H_TTFT,
    API_H_ITL,
    API_H_E2E,
    API_H_QUEUE,
    API_H_ENTROPY,
    API_H_COUNT
} api_hist_id_t;

void api_metrics_init(double start_time_unix);
/* Size the per-layer attention histograms (once the model is known). */
void api_metrics_layers(uint32_t n_layer);
/* Per-layer attention entropy and sink mass of one token. */
void api_metrics_attention(const sched_attn_stats_t *a);
/* A layer's normalised entropy stayed under the collapse threshold for the configured run. */
void api_metrics_collapse(uint32_t layer);
void api_metrics_observe(api_hist_id_t h, double v);
void api_metrics_finished(const char *finish_reason);
void api_metrics_rejected(const char *reason);
/* What the server itself holds, for its own gauges. */
typedef struct {
    size_t connections;          /* open client connections */
    size_t request_buffer_bytes; /* request bodies and pipelined input held over all of them */
} api_server_facts_t;
/* Render the exposition text (malloc'd). */
char *api_metrics_render(const sched_stats_t *st, const api_server_facts_t *srv);

#endif
