/* server.c - the daemon's loop thread.
 *
 * Owns every socket. Each connection parses HTTP/1.1 with llhttp; a complete
 * message pauses the parser, so pipelined requests are answered strictly in
 * order (later bytes wait in the connection's stash until the current answer
 * is done). Engine work goes to the scheduler; the engine thread wakes this
 * loop through one uv_async handle, and the wake callback drains every busy
 * connection's outbox (wakes may merge). A 250 ms timer enforces the request-
 * read (slowloris) and idle timeouts and watches the drain.
 *
 * The model loads on libuv's worker pool after the listener is up, so
 * /health answers 503 while loading. A connection is freed only in its
 * uv_close callback; a request whose client left is cancelled here and freed
 * by whichever side drops the last reference.
 */
#include "server.h"
#include "http.h"
#include "../api/api.h"
#include "../sched/sched.h"

#include <cjson/cJSON.h>
#include <llhttp.h>
#include <pthread.h>
#include <math.h>
#include <netdb.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

typedef enum { SRV_LOADING, SRV_READY, SRV_DRAINING, SRV_FAILED } srv_state_t;

typedef struct conn conn_t;

typedef struct {
    uv_loop_t loop;
    uv_tcp_t listener;
    uv_async_t wake;
    pthread_mutex_t wake_mu; /* guards wake_open against the engine thread's notify */
    bool wake_open;
    uv_signal_t sig_term, sig_int;
    uv_timer_t tick;
    uv_work_t load_work;
    uv_tcp_t reject;        /* accepts a connection there is no memory for, to close it at once */
    bool reject_busy;       /* reject is closing */
    bool accept_owed;       /* a connection waits in the listener for reject to be free again */
    int fail_conn_allocs;   /* test hook (TIDALD_TEST_FAIL_CONN_ALLOC): fail this many allocs */
    pthread_mutex_t api_mu; /* serialises api_* parsing on the worker pool (see parse_work) */
    const cfg_t *cfg;
    eng_model_t *model;
    eng_ctx_t *ctx;
    sched_t *sched;
    char load_msg[ENG_ERRMSG_LEN];
    uint32_t ctx_asked; /* --ctx-size when it exceeded the model's training context (logged) */
    int load_rc;
    api_ctx_t api;
    char model_name[128];
    srv_state_t state;
    double drain_deadline;
    bool drain_cancelled, listener_open;
    int signals;
    conn_t *conns;
    size_t n_conns;
    char **keys;
    size_t n_keys;
    double start_unix;
    uint64_t id_seed;
    int exit_code;
} srv_t;

/* What a request's parse on the worker pool produced (written there, read here after). */
typedef enum { JOB_COMPLETION, JOB_CHAT, JOB_TOKENIZE, JOB_DETOKENIZE } job_kind_t;
typedef struct {
    job_kind_t kind;
    int rc;
    api_error_t err;
    char *out;     /* tokenize/detokenize: the reply JSON */
    api_req_t req; /* completions: the parsed request */
} job_t;

struct conn {
    uv_tcp_t tcp;
    srv_t *srv;
    conn_t *prev, *next;
    srv_http_t http; /* the request stream */
    double t_active;
    /* bytes received while a request was being answered, or while the answers back up */
    char *stash;
    size_t stash_len, stash_cap;
    bool busy, closing, close_after_write, keep_alive, read_eof, reading;
    /* a parse is running on the worker pool: the loop leaves http and job alone, and a close
     * waits for it (uv_close is called from parse_done) */
    bool working, close_deferred;
    uv_work_t work;
    job_t job;
    size_t write_pending;             /* bytes handed to uv_write whose callback has not run */
    uint64_t bytes_queued, sent_seen; /* write-stall watch: progress is sent bytes growing */
    double stall_since;               /* 0: nothing unsent */
    /* the request in flight */
    sched_request_t *req;
    api_req_t areq;
    api_acc_t acc;
    char reqid[130], cmpl_id[64];
    double t_arrival, t_last_token, created;
    bool first_chunk, got_token;
    uint32_t *collapse_run; /* per layer: consecutive tokens under the collapse threshold */
    size_t text_offset;     /* bytes of text streamed so far (completions logprobs text_offset) */
};

static double mono_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double unix_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ---- writing ------------------------------------------------------------ */

typedef struct {
    uv_write_t w;
    conn_t *c;
    size_t len;
    char data[];
} wreq_t;

static void conn_close(conn_t *c);
static void conn_continue(conn_t *c);

/* Bytes queued on the socket that the kernel has not taken yet. */
static size_t unsent(conn_t *c) {
    return uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp);
}

/* More unsent than the stream bound: stop reading this client's requests until it reads. */
static bool backlogged(conn_t *c) {
    return unsent(c) > (size_t)c->srv->cfg->max_stream_buffer_kb * 1024;
}

static void on_written(uv_write_t *w, int status) {
    wreq_t *wr = (wreq_t *)w;
    conn_t *c = wr->c;
    c->write_pending -= wr->len;
    free(wr);
    if (status < 0) {
        /* the peer is gone (EPIPE, ECONNRESET): a request in flight is cancelled */
        conn_close(c);
        return;
    }
    if (c->close_after_write && c->write_pending == 0)
        conn_close(c);
    else if (!c->busy && !c->reading && !c->closing)
        conn_continue(c); /* the backlog may have drained */
}

/* Queue bytes (copied). Whole responses are not bounded here: a stream's backlog is (see
 * write_chunk), and a client that stops reading altogether meets the write-stall timeout. */
static void conn_write(conn_t *c, const char *data, size_t len) {
    if (c->closing || !len) return;
    wreq_t *wr = malloc(sizeof(*wr) + len);
    if (!wr) {
        conn_close(c);
        return;
    }
    wr->c = c;
    wr->len = len;
    memcpy(wr->data, data, len);
    uv_buf_t b = uv_buf_init(wr->data, (unsigned)len);
    c->write_pending += len;
    if (uv_write(&wr->w, (uv_stream_t *)&c->tcp, &b, 1, on_written) != 0) {
        c->write_pending -= len;
        free(wr);
        conn_close(c);
        return;
    }
    c->bytes_queued += len;
}

static const char *status_text(int s) {
    switch (s) {
    case 200:
        return "OK";
    case 400:
        return "Bad Request";
    case 401:
        return "Unauthorized";
    case 404:
        return "Not Found";
    case 405:
        return "Method Not Allowed";
    case 408:
        return "Request Timeout";
    case 413:
        return "Content Too Large";
    case 417:
        return "Expectation Failed";
    case 429:
        return "Too Many Requests";
    case 431:
        return "Request Header Fields Too Large";
    case 500:
        return "Internal Server Error";
    case 503:
        return "Service Unavailable";
    case 505:
        return "HTTP Version Not Supported";
    default:
        return "Unknown";
    }
}

/* A whole response with a body; `extra` holds additional header lines ending in CRLF. */
static void respond(conn_t *c, int status, const char *ctype, const char *body, size_t len,
                    const char *extra) {
    char head[1024];
    int n = snprintf(head, sizeof(head),
                     "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
                     "X-Request-Id: %s\r\n%s%s\r\n",
                     status, status_text(status), ctype, len, c->reqid, extra ? extra : "",
                     c->keep_alive ? "" : "Connection: close\r\n");
    conn_write(c, head, (size_t)n);
    conn_write(c, body, len);
    if (!c->keep_alive) {
        c->close_after_write = true;
        if (c->write_pending == 0) conn_close(c);
    }
}

static void respond_json(conn_t *c, int status, char *json, const char *extra) {
    if (!json) {
        static const char oom[] = "{\"error\":{\"message\":\"out of memory\",\"type\":"
                                  "\"server_error\",\"param\":null,\"code\":null}}";
        respond(c, 500, "application/json", oom, sizeof(oom) - 1, NULL);
        return;
    }
    respond(c, status, "application/json", json, strlen(json), extra);
    cJSON_free(json);
}

static void respond_error(conn_t *c, const api_error_t *e, const char *reject_reason,
                          const char *extra) {
    if (reject_reason) api_metrics_rejected(reject_reason);
    srv_log(e->status >= 500 ? SRV_WARN : SRV_INFO, c->reqid, "request_error", "%d %s", e->status,
            e->message);
    respond_json(c, e->status, api_error_json(e), extra);
}

/* Chunked transfer framing for a stream body. */
static void write_chunk(conn_t *c, const char *s, size_t n) {
    if (c->closing) return;
    /* a stream reader that lets more than the bound pile up unsent is cut off (one chunk larger
     * than the bound, with nothing unsent before it, is not a slow reader) */
    size_t backlog = unsent(c);
    if (backlog && backlog + n > (size_t)c->srv->cfg->max_stream_buffer_kb * 1024) {
        srv_log(SRV_WARN, c->reqid, "slow_reader",
                "client reads too slowly (%zu bytes unsent); cancelling", backlog);
        conn_close(c);
        return;
    }
    char hdr[32];
    int h = snprintf(hdr, sizeof(hdr), "%zx\r\n", n);
    size_t total = (size_t)h + n + 2;
    char *buf = malloc(total);
    if (!buf) {
        conn_close(c);
        return;
    }
    memcpy(buf, hdr, (size_t)h);
    memcpy(buf + h, s, n);
    memcpy(buf + h + n, "\r\n", 2);
    conn_write(c, buf, total);
    free(buf);
}

static void write_sse(conn_t *c, char *json) {
    if (!json) return;
    size_t n = strlen(json);
    char *ev = malloc(n + 9);
    if (ev) {
        memcpy(ev, "data: ", 6);
        memcpy(ev + 6, json, n);
        memcpy(ev + 6 + n, "\n\n", 2);
        write_chunk(c, ev, n + 8);
        free(ev);
    }
    cJSON_free(json);
}

/* ---- connection lifecycle -------------------------------------------- */

static void drop_request(conn_t *c) {
    if (c->req) {
        sched_request_cancel(c->req);
        sched_request_release(c->req);
        c->req = NULL;
    }
    api_req_free(&c->areq);
    api_acc_free(&c->acc);
}

static void job_free(job_t *j) {
    free(j->out);
    j->out = NULL;
    api_req_free(&j->req);
}

static void on_closed(uv_handle_t *h) {
    conn_t *c = h->data;
    srv_t *s = c->srv;
    if (c->prev)
        c->prev->next = c->next;
    else
        s->conns = c->next;
    if (c->next) c->next->prev = c->prev;
    s->n_conns--;
    srv_http_free(&c->http);
    free(c->stash);
    free(c->collapse_run);
    free(c);
}

static void conn_close(conn_t *c) {
    if (c->closing) return;
    c->closing = true;
    if (c->req) {
        srv_log(SRV_INFO, c->reqid, "cancelled", "connection closed mid-request");
        api_metrics_finished("cancelled");
    }
    drop_request(c);
    if (c->working) { /* parse_done closes it: the worker still reads c->http */
        uv_read_stop((uv_stream_t *)&c->tcp);
        c->reading = false;
        c->close_deferred = true;
        return;
    }
    uv_close((uv_handle_t *)&c->tcp, on_closed);
}

/* ---- request handling ------------------------------------------------ */

static void set_request_id(conn_t *c) {
    bool ok = c->http.reqid_len > 0;
    for (size_t i = 0; i < c->http.reqid_len && ok; i++)
        ok = c->http.reqid[i] > 32 && c->http.reqid[i] < 127 && c->http.reqid[i] != '"';
    if (ok) {
        snprintf(c->reqid, sizeof(c->reqid), "%s", c->http.reqid);
    } else {
        uint64_t x = (c->srv->id_seed += 0x9e3779b97f4a7c15ull);
        x ^= x >> 31;
        x *= 0xbf58476d1ce4e5b9ull;
        x ^= x >> 29;
        snprintf(c->reqid, sizeof(c->reqid), "req-%016llx", (unsigned long long)x);
    }
}

/* The whole presented key against every configured key, in time that depends only on the
 * configured keys' lengths (a length mismatch is folded into the difference, not returned
 * early). A header longer than the parser keeps (auth_overflow) matches nothing. */
static bool authorized(conn_t *c) {
    srv_t *s = c->srv;
    if (!s->n_keys) return true;
    if (c->http.auth_overflow || c->http.auth_len < 7 ||
        strncasecmp(c->http.auth, "Bearer ", 7) != 0)
        return false;
    const char *k = c->http.auth + 7;
    size_t kl = c->http.auth_len - 7;
    bool ok = false;
    for (size_t i = 0; i < s->n_keys; i++) {
        size_t l = strlen(s->keys[i]);
        size_t diff = l ^ kl;
        for (size_t j = 0; j < l; j++)
            diff |= (unsigned char)s->keys[i][j] ^ (unsigned char)(j < kl ? k[j] : 0);
        ok |= diff == 0;
    }
    return ok;
}

static void answer_engine_unavailable(conn_t *c) {
    api_error_t e;
    srv_state_t st = c->srv->state;
    api_fail(&e, 503, "service_unavailable", NULL, NULL,
             st == SRV_LOADING    ? "the model is still loading"
             : st == SRV_DRAINING ? "the server is shutting down"
                                  : "the model failed to load");
    respond_error(c, &e, "unavailable", "Retry-After: 5\r\n");
}

static void message_done(conn_t *c);

/* Worker pool: validate, parse and tokenize the body (JSON parsing, chat rendering and
 * tokenizing a megabyte prompt take seconds; the loop must not). Reads c->http, writes c->job
 * only; the model and tokenizer are read-only after load. api_* parsing is not reentrant
 * (cJSON_Parse records its error position in a global; the seed counter is a plain static),
 * so jobs run one at a time under api_mu: off the loop thread, not in parallel. */
static void parse_work(uv_work_t *w) {
    conn_t *c = w->data;
    srv_t *s = c->srv;
    job_t *j = &c->job;
    const char *body = c->http.body ? c->http.body : "";
    size_t len = c->http.body_len;
    j->rc = 0;
    j->out = NULL;
    if (!eng_utf8_valid(body, len)) {
        j->rc = api_fail(&j->err, 400, "invalid_request_error", NULL, NULL,
                         "the body is not valid UTF-8");
        return;
    }
    pthread_mutex_lock(&s->api_mu);
    switch (j->kind) {
    case JOB_COMPLETION:
    case JOB_CHAT:
        j->rc = api_parse_request(&s->api, j->kind == JOB_CHAT ? API_CHAT : API_COMPLETION, body,
                                  len, &j->req, &j->err);
        break;
    case JOB_TOKENIZE:
    case JOB_DETOKENIZE:
        j->out = j->kind == JOB_TOKENIZE ? api_tokenize(&s->api, body, len, &j->err)
                                         : api_detokenize(&s->api, body, len, &j->err);
        j->rc = j->out ? 0 : -1;
        break;
    }
    pthread_mutex_unlock(&s->api_mu);
}

/* Loop thread, after a parse: submit the request, or answer. */
static void submit_parsed(conn_t *c) {
    srv_t *s = c->srv;
    job_t *j = &c->job;
    api_error_t e;
    if (s->state == SRV_DRAINING && s->drain_cancelled &&
        (j->kind == JOB_COMPLETION || j->kind == JOB_CHAT)) {
        /* parsed after the drain deadline cancelled everything: do not start it */
        job_free(j);
        answer_engine_unavailable(c);
        message_done(c);
        return;
    }
    if (j->rc) {
        respond_error(c, &j->err, j->err.code ? "context_length" : "invalid_request", NULL);
        job_free(j);
        message_done(c);
        return;
    }
    if (j->kind == JOB_TOKENIZE || j->kind == JOB_DETOKENIZE) {
        respond_json(c, 200, j->out, NULL);
        j->out = NULL;
        message_done(c);
        return;
    }
    c->areq = j->req;
    memset(&j->req, 0, sizeof(j->req));
    api_kind_t kind = j->kind == JOB_CHAT ? API_CHAT : API_COMPLETION;
    /* telemetry costs nothing unless asked for; a share of the other tokens feeds /metrics */
    c->areq.eng.telemetry_sample = (float)s->cfg->telemetry_sample;
    srv_log(SRV_INFO, c->reqid, "request_start", "%s prompt_tokens=%u max_tokens=%u stream=%d",
            kind == API_CHAT ? "chat" : "completion", c->areq.eng.n_prompt, c->areq.eng.max_tokens,
            c->areq.stream);
    sched_request_t *r = sched_request_create(&c->areq.eng);
    char msg[ENG_ERRMSG_LEN];
    int rc = r ? sched_submit(s->sched, r, msg) : ENG_ENOMEM;
    if (rc) {
        if (r) sched_request_release(r);
        api_req_free(&c->areq);
        if (rc == ENG_ERANGE) {
            api_fail(&e, 429, "rate_limit_error", NULL, "queue_full", "%s; retry later", msg);
            respond_error(c, &e, "queue_full", "Retry-After: 1\r\n");
        } else {
            api_fail(&e, 400, "invalid_request_error", NULL, NULL, "%s",
                     rc == ENG_ENOMEM ? "out of memory" : msg);
            respond_error(c, &e, "invalid_request", NULL);
        }
        message_done(c);
        return;
    }
    c->req = r;
    c->t_arrival = c->http.t_start;
    c->created = unix_now();
    c->t_last_token = 0;
    c->first_chunk = true;
    c->got_token = false;
    if (c->collapse_run)
        memset(c->collapse_run, 0, sizeof(uint32_t) * eng_model_hparams(s->model)->n_layer);
    c->text_offset = c->areq.echo && c->areq.prompt_text ? strlen(c->areq.prompt_text) : 0;
    snprintf(c->cmpl_id, sizeof(c->cmpl_id), "%s-%s", kind == API_CHAT ? "chatcmpl" : "cmpl",
             c->reqid + (strncmp(c->reqid, "req-", 4) == 0 ? 4 : 0));
    if (c->areq.stream) {
        char head[512];
        int n = snprintf(head, sizeof(head),
                         "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         "Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n"
                         "X-Request-Id: %s\r\n%s\r\n",
                         c->reqid, c->keep_alive ? "" : "Connection: close\r\n");
        conn_write(c, head, (size_t)n);
    }
}

static void parse_done(uv_work_t *w, int status) {
    conn_t *c = w->data;
    c->working = false;
    if (c->closing) { /* the client left while its request was parsed */
        job_free(&c->job);
        if (c->close_deferred) uv_close((uv_handle_t *)&c->tcp, on_closed);
        return;
    }
    if (status != 0) { /* cancelled: only at loop teardown */
        job_free(&c->job);
        conn_close(c);
        return;
    }
    submit_parsed(c);
}

/* Hand the body to the worker pool; the connection stays busy until parse_done. */
static void queue_parse(conn_t *c, job_kind_t kind) {
    srv_t *s = c->srv;
    if (s->state != SRV_READY &&
        (s->state != SRV_DRAINING || kind == JOB_COMPLETION || kind == JOB_CHAT)) {
        answer_engine_unavailable(c);
        return;
    }
    memset(&c->job, 0, sizeof(c->job));
    c->job.kind = kind;
    c->work.data = c;
    if (uv_queue_work(&s->loop, &c->work, parse_work, parse_done) != 0) {
        static const char busy[] = "{\"error\":{\"message\":\"cannot queue the request\","
                                   "\"type\":\"server_error\",\"param\":null,\"code\":null}}";
        respond(c, 500, "application/json", busy, sizeof(busy) - 1, NULL);
        return;
    }
    c->busy = true;
    c->working = true;
}

static void route(conn_t *c) {
    srv_t *s = c->srv;
    const char *method = srv_http_method(&c->http);
    char path[2048];
    snprintf(path, sizeof(path), "%.*s", (int)strcspn(c->http.url, "?"), c->http.url);
    set_request_id(c);
    api_error_t e;
    typedef struct {
        const char *path, *method;
        int id;
        bool open; /* health-class: no key unless auth_health */
    } route_t;
    static const route_t routes[] = {
        {"/v1/completions", "POST", 1, false},
        {"/v1/chat/completions", "POST", 2, false},
        {"/v1/models", "GET", 3, false},
        {"/tokenize", "POST", 4, false},
        {"/detokenize", "POST", 5, false},
        {"/health", "GET", 6, true},
        {"/livez", "GET", 7, true},
        {"/readyz", "GET", 8, true},
        {"/metrics", "GET", 9, true},
    };
    const route_t *hit = NULL;
    bool path_known = false;
    for (size_t i = 0; i < sizeof(routes) / sizeof(routes[0]); i++)
        if (strcmp(path, routes[i].path) == 0) {
            path_known = true;
            if (strcmp(method, routes[i].method) == 0) hit = &routes[i];
        }
    if (!path_known) {
        api_fail(&e, 404, "invalid_request_error", NULL, "not_found", "no such endpoint: %s %s",
                 method, path);
        respond_error(c, &e, "not_found", NULL);
        return;
    }
    if (!hit) {
        char allow[64];
        for (size_t i = 0; i < sizeof(routes) / sizeof(routes[0]); i++)
            if (strcmp(path, routes[i].path) == 0)
                snprintf(allow, sizeof(allow), "Allow: %s\r\n", routes[i].method);
        api_fail(&e, 405, "invalid_request_error", NULL, "method_not_allowed",
                 "%s is not allowed on %s", method, path);
        respond_error(c, &e, "method_not_allowed", allow);
        return;
    }
    if ((!hit->open || s->cfg->auth_health) && !authorized(c)) {
        api_fail(&e, 401, "authentication_error", NULL, "invalid_api_key",
                 "a valid API key is required (Authorization: Bearer KEY)");
        respond_error(c, &e, "unauthorized", "WWW-Authenticate: Bearer\r\n");
        return;
    }
    switch (hit->id) {
    case 1:
        queue_parse(c, JOB_COMPLETION);
        return;
    case 2:
        queue_parse(c, JOB_CHAT);
        return;
    case 3:
        if (s->state != SRV_READY && s->state != SRV_DRAINING)
            answer_engine_unavailable(c);
        else
            respond_json(c, 200, api_models_json(&s->api, s->start_unix), NULL);
        return;
    case 4:
        queue_parse(c, JOB_TOKENIZE);
        return;
    case 5:
        queue_parse(c, JOB_DETOKENIZE);
        return;
    case 6:
    case 8: {
        static const char *bodies[] = {"{\"status\":\"loading\"}", "{\"status\":\"ok\"}",
                                       "{\"status\":\"draining\"}", "{\"status\":\"failed\"}"};
        const char *b = bodies[s->state];
        respond(c, s->state == SRV_READY ? 200 : 503, "application/json", b, strlen(b), NULL);
        return;
    }
    case 7:
        respond(c, 200, "application/json", "{\"status\":\"alive\"}", 18, NULL);
        return;
    case 9: {
        sched_stats_t st = {0};
        if (s->sched) sched_stats(s->sched, &st);
        api_server_facts_t facts = {.connections = s->n_conns};
        for (conn_t *o = s->conns; o; o = o->next)
            facts.request_buffer_bytes += srv_http_buffered(&o->http) + o->stash_cap;
        char *text = api_metrics_render(&st, &facts);
        if (!text) {
            respond_json(c, 500, NULL, NULL);
            return;
        }
        respond(c, 200, "text/plain; version=0.0.4; charset=utf-8", text, strlen(text), NULL);
        free(text);
        return;
    }
    }
}

static void conn_feed(conn_t *c, const char *data, size_t len);
static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf);
static void on_read(uv_stream_t *st, ssize_t n, const uv_buf_t *buf);

/* The current message is answered (or its answer is queued): ready for the next one. */
static void message_end(conn_t *c) {
    c->busy = false;
    srv_http_next(&c->http);
    c->t_active = mono_now();
}

/* After a message or a write: with nothing in flight, read on, stop reading while the
 * answers back up, or close once everything is written after the client's EOF. */
static void conn_settle(conn_t *c) {
    if (c->closing || c->close_after_write || c->busy) return;
    if (backlogged(c)) {
        if (c->reading) uv_read_stop((uv_stream_t *)&c->tcp);
        c->reading = false;
        return;
    }
    if (c->read_eof) { /* half-closed: every complete request is answered; an incomplete one
                          can never complete */
        if (c->write_pending == 0)
            conn_close(c);
        else
            c->close_after_write = true;
        return;
    }
    if (!c->reading && uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) == 0)
        c->reading = true;
}

/* Go on with stashed bytes (pipelined requests), then settle. */
static void conn_continue(conn_t *c) {
    while (!c->closing && !c->close_after_write && !c->busy && c->stash_len && !backlogged(c)) {
        char *buf = c->stash;
        size_t n = c->stash_len;
        c->stash = NULL;
        c->stash_len = c->stash_cap = 0;
        conn_feed(c, buf, n);
        free(buf);
    }
    conn_settle(c);
}

/* The answer to a message that was in flight (parse or engine) is complete. */
static void message_done(conn_t *c) {
    message_end(c);
    conn_continue(c);
}

static void http_error(conn_t *c) {
    int status = srv_http_error_status(&c->http);
    api_error_t e;
    if (status == 431)
        api_fail(&e, 431, "invalid_request_error", NULL, "headers_too_large",
                 "the request head exceeds %lld bytes", (long long)c->srv->cfg->max_header_bytes);
    else if (status == 413)
        api_fail(&e, 413, "invalid_request_error", NULL, "body_too_large",
                 "the request body exceeds %lld bytes", (long long)c->srv->cfg->max_body_bytes);
    else if (status == 505)
        api_fail(&e, 505, "invalid_request_error", NULL, "http_version_not_supported", "%s",
                 srv_http_error_reason(&c->http));
    else if (status == 417)
        api_fail(&e, 417, "invalid_request_error", NULL, "expectation_failed", "%s",
                 srv_http_error_reason(&c->http));
    else
        api_fail(&e, 400, "invalid_request_error", NULL, "malformed_http",
                 "malformed HTTP request: %s", srv_http_error_reason(&c->http));
    set_request_id(c); /* every response carries one, the refused ones too */
    c->keep_alive = false;
    respond_error(c, &e, status == 400 ? "invalid_request" : "too_large", NULL);
}

/* Parse and answer what arrived; whatever cannot be handled now (a request is in flight, or
 * the answers back up) waits in the stash. */
static void conn_feed(conn_t *c, const char *data, size_t len) {
    while (len && !c->busy && !c->closing && !c->close_after_write && !backlogged(c)) {
        size_t used;
        srv_http_rc_t rc = srv_http_feed(&c->http, data, len, &used);
        if (rc == SRV_HTTP_MORE) {
            /* the client waits for this before it sends the body (RFC 9110 sec. 10.1.1) */
            if (c->http.expect_continue && !c->http.continue_sent) {
                c->http.continue_sent = true;
                conn_write(c, "HTTP/1.1 100 Continue\r\n\r\n", 25);
            }
            return;
        }
        if (rc == SRV_HTTP_ERROR) {
            http_error(c);
            return;
        }
        data += used;
        len -= used;
        c->keep_alive = srv_http_keep_alive(&c->http) && c->srv->state != SRV_DRAINING;
        route(c);
        if (!c->busy) message_end(c);
    }
    if (len && !c->closing && !c->close_after_write) {
        if (c->stash_len + len > (size_t)c->srv->cfg->max_body_bytes + 65536) {
            conn_close(c); /* a client pipelining more than it could ever send in one request */
            return;
        }
        if (c->stash_len + len > c->stash_cap) {
            size_t cap = (c->stash_len + len) * 2;
            char *s = realloc(c->stash, cap);
            if (!s) {
                conn_close(c);
                return;
            }
            c->stash = s;
            c->stash_cap = cap;
        }
        memcpy(c->stash + c->stash_len, data, len);
        c->stash_len += len;
    }
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
    (void)h;
    (void)suggested;
    buf->base = malloc(65536);
    buf->len = buf->base ? 65536 : 0;
}

static void on_read(uv_stream_t *st, ssize_t n, const uv_buf_t *buf) {
    conn_t *c = st->data;
    if (n > 0) {
        c->t_active = mono_now();
        conn_feed(c, buf->base, (size_t)n);
        conn_settle(c);
    } else if (n == UV_EOF) {
        /* a half-close (shutdown(SHUT_WR), nc -N) is not a cancellation: a request in flight
         * is answered, then the connection closes. A client that is really gone shows up as a
         * write error (EPIPE/ECONNRESET) on the answer or the stream, which cancels. */
        uv_read_stop(st);
        c->reading = false;
        c->read_eof = true;
        conn_settle(c);
    } else if (n < 0) {
        conn_close(c); /* ECONNRESET and the like: the client is gone; cancel what runs */
    }
    free(buf->base);
}

/* ---- engine events ---------------------------------------------------- */

static void finish_request(conn_t *c, const sched_event_t *ev) {
    const api_req_t *rq = &c->areq;
    api_resp_ctx_t rc = {
        c->cmpl_id,    c->srv->model_name, c->created, rq, eng_model_tokenizer(c->srv->model),
        c->text_offset};
    const char *fr = sched_finish_name(ev->finish);
    api_metrics_finished(fr);
    api_metrics_observe(API_H_E2E, ev->time - c->t_arrival);
    double start = sched_request_start_time(c->req);
    if (start > 0) api_metrics_observe(API_H_QUEUE, start - sched_request_submit_time(c->req));
    bool ok = ev->finish == SCHED_FINISH_STOP || ev->finish == SCHED_FINISH_LENGTH;
    char err[256];
    snprintf(err, sizeof(err), "%s",
             ev->finish == SCHED_FINISH_TIMEOUT     ? "the request's deadline passed"
             : ev->finish == SCHED_FINISH_CANCELLED ? "the request was cancelled: the server is "
                                                      "shutting down"
                                                    : ev->error);
    srv_log(ok ? SRV_INFO : SRV_WARN, c->reqid, "request_end",
            "finish=%s prompt_tokens=%u completion_tokens=%u e2e=%.3fs", fr, ev->prompt_tokens,
            ev->completion_tokens, ev->time - c->t_arrival);
    if (rq->stream) {
        if (ok) {
            write_sse(c, api_stream_chunk(&rc, ev, c->first_chunk));
            if (rq->include_usage)
                write_sse(c, api_usage_chunk(&rc, ev->prompt_tokens, ev->completion_tokens));
        } else {
            write_sse(c, api_stream_error(err));
        }
        write_sse(c, strdup("[DONE]"));
        conn_write(c, "0\r\n\r\n", 5);
        if (!c->keep_alive) c->close_after_write = true;
        if (c->close_after_write && c->write_pending == 0) conn_close(c);
    } else if (ok) {
        api_acc_add(&c->acc, ev);
        respond_json(
            c, 200,
            api_final_response(&rc, &c->acc, ev->finish, ev->prompt_tokens, ev->completion_tokens),
            NULL);
    } else {
        api_error_t e;
        api_fail(&e, ev->finish == SCHED_FINISH_ERROR ? 500 : 503,
                 ev->finish == SCHED_FINISH_ERROR ? "server_error" : "service_unavailable", NULL,
                 ev->finish == SCHED_FINISH_TIMEOUT ? "timeout" : NULL, "%s", err);
        respond_error(c, &e, NULL, NULL);
    }
    sched_request_release(c->req);
    c->req = NULL;
    api_req_free(&c->areq);
    api_acc_free(&c->acc);
    message_done(c);
}

/* Entropy collapse: a layer whose normalised entropy stays under the threshold for a run of
 * tokens fires the counter and a log line once per run. A request without telemetry is
 * measured on a share of its tokens, evenly spread: its run counts the measured ones, the same
 * stretch of text. */
static void watch_collapse(conn_t *c, const sched_attn_stats_t *a) {
    const cfg_t *cfg = c->srv->cfg;
    if (!c->collapse_run) c->collapse_run = calloc(a->n_layer, sizeof(uint32_t));
    if (!c->collapse_run) return;
    double run = (double)cfg->entropy_collapse_tokens;
    if (!c->areq.entropy && cfg->telemetry_sample < 1) run = ceil(run * cfg->telemetry_sample);
    uint32_t need = run >= 1 ? (uint32_t)run : 1;
    for (uint32_t l = 0; l < a->n_layer; l++) {
        if (a->entropy_norm[l] >= cfg->entropy_collapse_threshold) {
            c->collapse_run[l] = 0;
        } else if (++c->collapse_run[l] == need) {
            api_metrics_collapse(l);
            srv_log(SRV_WARN, c->reqid, "entropy_collapse",
                    "layer %u: normalised attention entropy under %g for %u tokens", l,
                    cfg->entropy_collapse_threshold, (uint32_t)cfg->entropy_collapse_tokens);
        }
    }
}

static void deliver(conn_t *c) {
    sched_event_t ev[64];
    size_t n;
    while (c->req && !c->closing && (n = sched_request_drain(c->req, ev, 64)) > 0) {
        size_t i = 0;
        for (; i < n && c->req && !c->closing; i++) {
            sched_event_t *e = &ev[i];
            if (e->finish) {
                finish_request(c, e);
            } else {
                if (!c->got_token)
                    api_metrics_observe(API_H_TTFT, e->time - c->t_arrival);
                else
                    api_metrics_observe(API_H_ITL, e->time - c->t_last_token);
                if (e->has_entropy) api_metrics_observe(API_H_ENTROPY, e->entropy_bits);
                if (e->attn) {
                    api_metrics_attention(e->attn);
                    watch_collapse(c, e->attn);
                }
                c->got_token = true;
                c->t_last_token = e->time;
                if (!c->areq.stream) {
                    if (api_acc_add(&c->acc, e) == 0) e->attn = NULL; /* the accumulator owns it */
                } else if (e->text_len || c->areq.logprobs >= 0 || c->areq.entropy) {
                    api_resp_ctx_t rc = {c->cmpl_id,
                                         c->srv->model_name,
                                         c->created,
                                         &c->areq,
                                         eng_model_tokenizer(c->srv->model),
                                         c->text_offset};
                    write_sse(c, api_stream_chunk(&rc, e, c->first_chunk));
                    c->text_offset += e->text_len;
                    c->first_chunk = false;
                }
            }
            sched_event_free(e);
        }
        for (; i < n; i++) sched_event_free(&ev[i]); /* the connection went away mid-batch */
    }
}

static void on_wake(uv_async_t *a) {
    srv_t *s = a->data;
    conn_t *next;
    for (conn_t *c = s->conns; c; c = next) {
        next = c->next;
        if (c->req) deliver(c);
    }
}

/* Engine thread: wake the loop unless it has already closed the async handle. */
static void notify_loop(void *arg) {
    srv_t *s = arg;
    pthread_mutex_lock(&s->wake_mu);
    if (s->wake_open) uv_async_send(&s->wake);
    pthread_mutex_unlock(&s->wake_mu);
}

/* ---- accept, timers, signals, loading --------------------------------- */

static void reject_connection(srv_t *s);

static void on_reject_closed(uv_handle_t *h) {
    srv_t *s = h->data;
    s->reject_busy = false;
    if (s->accept_owed && s->listener_open) {
        s->accept_owed = false;
        reject_connection(s); /* the one still waiting in the listener */
    }
}

/* No memory for a connection: accept it anyway and close it, because libuv stops polling a
 * listener whose pending connection was not accepted (uv_accept restarts it). With the spare
 * handle still closing, the connection waits in the listener and is taken in
 * on_reject_closed. */
static void reject_connection(srv_t *s) {
    if (s->reject_busy) {
        s->accept_owed = true;
        return;
    }
    uv_tcp_init(&s->loop, &s->reject);
    s->reject.data = s;
    s->reject_busy = true;
    uv_accept((uv_stream_t *)&s->listener, (uv_stream_t *)&s->reject);
    uv_close((uv_handle_t *)&s->reject, on_reject_closed);
    srv_log(SRV_WARN, NULL, "accept", "out of memory for a connection: closed it");
}

static void on_connection(uv_stream_t *ls, int status) {
    srv_t *s = ls->data;
    if (status < 0) return;
    conn_t *c = NULL;
    if (s->fail_conn_allocs > 0)
        s->fail_conn_allocs--;
    else
        c = calloc(1, sizeof(*c));
    if (!c) {
        reject_connection(s);
        return;
    }
    c->srv = s;
    uv_tcp_init(&s->loop, &c->tcp);
    c->tcp.data = c;
    c->next = s->conns;
    if (s->conns) s->conns->prev = c;
    s->conns = c;
    s->n_conns++;
    if (uv_accept(ls, (uv_stream_t *)&c->tcp) != 0) {
        conn_close(c);
        return;
    }
    if (s->n_conns > (size_t)s->cfg->max_connections || s->state == SRV_DRAINING) {
        conn_close(c); /* over the connection bound: refuse by closing at once */
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    srv_http_init(&c->http, (size_t)s->cfg->max_header_bytes, (size_t)s->cfg->max_body_bytes);
    c->t_active = mono_now();
    snprintf(c->reqid, sizeof(c->reqid), "-");
    c->reading = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) == 0;
}

/* A client that leaves sent bytes unread for write_timeout_s is cut off: it would otherwise
 * hold its connection (and a --max-connections slot) forever. Progress is any growth of the
 * bytes the kernel took, so a slow but steady reader is fine. */
static bool write_stalled(conn_t *c, double now) {
    size_t q = unsent(c);
    if (q == 0) {
        c->stall_since = 0;
        return false;
    }
    uint64_t sent = c->bytes_queued - q;
    if (c->stall_since == 0 || sent != c->sent_seen) {
        c->sent_seen = sent;
        c->stall_since = now;
        return false;
    }
    return now - c->stall_since > c->srv->cfg->write_timeout_s;
}

static void close_handle(uv_handle_t *h) {
    if (!uv_is_closing(h)) uv_close(h, NULL);
}

static void begin_shutdown(srv_t *s);

static void on_tick(uv_timer_t *t) {
    srv_t *s = t->data;
    double now = mono_now();
    conn_t *next;
    for (conn_t *c = s->conns; c; c = next) {
        next = c->next;
        if (c->closing) continue;
        if (write_stalled(c, now)) {
            srv_log(SRV_WARN, c->req ? c->reqid : NULL, "write_stall",
                    "client read nothing of %zu unsent bytes for %g s; closing", unsent(c),
                    s->cfg->write_timeout_s);
            conn_close(c);
            continue;
        }
        if (c->busy || c->close_after_write) continue; /* its last answer is on its way out */
        if (c->http.in_message && now - c->http.t_start > s->cfg->header_timeout_s) {
            api_error_t e;
            api_fail(&e, 408, "invalid_request_error", NULL, "request_timeout",
                     "the request was not received within %g s", s->cfg->header_timeout_s);
            c->keep_alive = false;
            set_request_id(c);
            respond_error(c, &e, "invalid_request", NULL);
        } else if (!c->http.in_message && c->write_pending == 0 &&
                   now - c->t_active > s->cfg->idle_timeout_s) {
            conn_close(c);
        }
    }
    if (s->state == SRV_DRAINING) {
        /* answers still being written count until the drain deadline (closing a connection
         * drops what libuv has not written yet) */
        bool busy = false, writing = false;
        for (conn_t *c = s->conns; c; c = c->next) {
            busy |= c->busy;
            writing |= c->write_pending > 0;
        }
        if (!busy && (!writing || now > s->drain_deadline)) {
            begin_shutdown(s);
        } else if (now > s->drain_deadline && !s->drain_cancelled) {
            srv_log(SRV_WARN, NULL, "drain_timeout", "cancelling requests still running");
            s->drain_cancelled = true;
            for (conn_t *c = s->conns; c; c = c->next)
                if (c->req) sched_request_cancel(c->req);
        }
    }
}

/* Everything is finished: close every handle so uv_run returns. */
static void begin_shutdown(srv_t *s) {
    conn_t *next;
    for (conn_t *c = s->conns; c; c = next) {
        next = c->next;
        conn_close(c);
    }
    if (s->listener_open) close_handle((uv_handle_t *)&s->listener);
    s->listener_open = false;
    close_handle((uv_handle_t *)&s->tick);
    close_handle((uv_handle_t *)&s->sig_term);
    close_handle((uv_handle_t *)&s->sig_int);
    pthread_mutex_lock(&s->wake_mu);
    if (s->wake_open) close_handle((uv_handle_t *)&s->wake);
    s->wake_open = false;
    pthread_mutex_unlock(&s->wake_mu);
}

static void on_signal(uv_signal_t *h, int signum) {
    srv_t *s = h->data;
    if (++s->signals > 1) {
        srv_log(SRV_WARN, NULL, "shutdown", "second signal: exiting now");
        _exit(1);
    }
    srv_log(SRV_INFO, NULL, "shutdown", "signal %d: draining for up to %g s", signum,
            s->cfg->drain_timeout_s);
    if (s->state == SRV_LOADING)
        s->state = SRV_FAILED; /* nothing to drain */
    else
        s->state = SRV_DRAINING;
    s->drain_deadline = mono_now() + s->cfg->drain_timeout_s;
    if (s->listener_open) close_handle((uv_handle_t *)&s->listener);
    s->listener_open = false;
    if (s->state == SRV_FAILED) begin_shutdown(s);
}

int srv_attn_params(const char *mode, int64_t budget, const char *layers, bool force_sinks,
                    bool per_group, const eng_hparams_t *hp, eng_attn_params_t *a, char *msg) {
    memset(a, 0, sizeof(*a));
    a->mode = strcmp(mode, "tidal") == 0 ? ENG_ATTN_TIDAL : ENG_ATTN_FULL;
    a->token_budget = (uint32_t)budget;
    a->force_sinks = force_sinks;
    a->per_group = per_group;
    eng_attn_defaults(hp, a);
    if (layers && *layers &&
        cfg_parse_layers(layers, a->sel_layers, ENG_MAX_SEL_LAYERS, &a->n_sel_layers, msg))
        return -1;
    return eng_attn_check(hp, a, msg) ? -1 : 0;
}

static void load_model(uv_work_t *w) {
    srv_t *s = w->data;
    const cfg_t *cfg = s->cfg;
    s->load_rc = eng_model_load(&s->model, cfg->model, s->load_msg);
    if (s->load_rc) return;
    const eng_hparams_t *hp = eng_model_hparams(s->model);
    eng_ctx_params_t p;
    eng_ctx_params_default(&p);
    p.n_threads = (int)cfg->threads;
    p.device = (eng_device_t)eng_device_parse(cfg->device);
    p.n_ctx = (uint32_t)cfg->ctx_size;
    p.block_size = (uint32_t)cfg->kv_block_size;
    p.kv_mem_bytes = (size_t)cfg->kv_mem_mb << 20;
    p.kv_f16 = strcmp(cfg->kv_type, "f16") == 0;
    p.swa_full = cfg->swa_full;
    p.sinks = (uint32_t)cfg->sinks;
    p.max_seqs = (uint32_t)cfg->max_running;
    p.max_batch_tokens =
        (uint32_t)(cfg->step_tokens > cfg->max_running ? cfg->step_tokens : cfg->max_running);
    if (p.n_ctx > hp->n_ctx_train) { /* logged by loaded(), on the loop thread */
        s->ctx_asked = p.n_ctx;
        p.n_ctx = hp->n_ctx_train;
    }
    s->load_rc = eng_ctx_create(&s->ctx, s->model, &p, s->load_msg);
}

static void loaded(uv_work_t *w, int status) {
    srv_t *s = w->data;
    if (s->state == SRV_FAILED) return; /* a signal arrived while loading: already closing */
    if (status == 0 && s->load_rc == 0) {
        sched_params_t sp = {.max_running = (uint32_t)s->cfg->max_running,
                             .max_waiting = (uint32_t)s->cfg->max_waiting,
                             .step_tokens = (uint32_t)s->cfg->step_tokens,
                             .notify = notify_loop,
                             .notify_arg = s,
                             .pressure_evict = strcmp(s->cfg->kv_pressure, "evict") == 0};
        s->load_rc = sched_create(&s->sched, s->ctx, s->model, &sp, s->load_msg);
    }
    if (status != 0 || s->load_rc != 0) {
        srv_log(SRV_ERROR, NULL, "load_failed", "%s", s->load_msg);
        s->state = SRV_FAILED;
        s->exit_code = 1;
        begin_shutdown(s);
        return;
    }
    const eng_hparams_t *hp = eng_model_hparams(s->model);
    snprintf(s->model_name, sizeof(s->model_name), "%s",
             *s->cfg->model_alias ? s->cfg->model_alias : hp->name);
    /* what one request can really hold: its window, unless the whole KV pool is smaller */
    const kv_pool_t *pool = eng_ctx_kv_pool(s->ctx);
    uint64_t pool_tokens = (uint64_t)pool->n_blocks * pool->block_size;
    uint32_t n_ctx = eng_ctx_n_ctx(s->ctx);
    if (pool_tokens < n_ctx) {
        srv_log(SRV_WARN, NULL, "kv_budget",
                "the KV cache holds %llu tokens, less than one %u-token context; requests are "
                "limited to %llu tokens (raise --kv-mem-mb or lower --ctx-size)",
                (unsigned long long)pool_tokens, n_ctx, (unsigned long long)pool_tokens);
        n_ctx = (uint32_t)pool_tokens;
    }
    s->api = (api_ctx_t){.model = s->model,
                         .model_name = s->model_name,
                         .n_ctx = n_ctx,
                         .default_max_tokens = (uint32_t)s->cfg->default_max_tokens,
                         .request_timeout_s = s->cfg->request_timeout_s};
    char amsg[ENG_ERRMSG_LEN];
    if (srv_attn_params(s->cfg->attention, s->cfg->token_budget, s->cfg->selection_layers,
                        s->cfg->force_sinks, s->cfg->per_group, hp, &s->api.attn, amsg)) {
        srv_log(SRV_ERROR, NULL, "config", "%s", amsg);
        s->state = SRV_FAILED;
        s->exit_code = 1;
        begin_shutdown(s);
        return;
    }
    s->api.sinks = (uint32_t)s->cfg->sinks;
    s->api.evict = s->cfg->kv_eviction;
    s->api.max_nonstream_tokens = (uint32_t)s->cfg->max_nonstream_tokens;
    if (s->ctx_asked)
        srv_log(SRV_WARN, NULL, "ctx_size",
                "--ctx-size %u exceeds the model's training context of %u tokens: using %u",
                s->ctx_asked, eng_model_hparams(s->model)->n_ctx_train, eng_ctx_n_ctx(s->ctx));
    api_metrics_layers(hp->n_layer);
    if (s->state == SRV_LOADING) s->state = SRV_READY;
    eng_device_info_t dev;
    eng_ctx_device_info(s->ctx, &dev);
    srv_log(SRV_INFO, NULL, "ready", "model %s: %u layers, %u ctx, %u KV blocks, backend %s on %s",
            s->model_name, hp->n_layer, eng_ctx_n_ctx(s->ctx), pool->n_blocks,
            eng_ctx_backend_name(s->ctx), dev.name);
    if (pool->local)
        srv_log(SRV_INFO, NULL, "kv_split",
                "%u sliding-window layers keep their %u-token window in %u blocks of their own "
                "(%zu MiB); %u global layers in the %u blocks above (--swa-full keeps every "
                "position in every layer)",
                pool->local->n_layer, pool->window, pool->local->n_blocks,
                kv_pool_bytes(pool->local->n_layer, pool->kv_dim, pool->block_size,
                              pool->local->n_blocks, pool->elem == 2) >>
                    20,
                pool->n_layer, pool->n_blocks);
}

/* Add one key (trimmed); keys longer than the parser keeps of Authorization are refused. */
static int add_key(srv_t *s, char *tok, char *msg) {
    while (*tok == ' ' || *tok == '\t' || *tok == '\r' || *tok == '\n') tok++;
    size_t l = strlen(tok);
    while (l &&
           (tok[l - 1] == ' ' || tok[l - 1] == '\t' || tok[l - 1] == '\r' || tok[l - 1] == '\n'))
        tok[--l] = 0;
    if (!l) return 0;
    if (l > SRV_HTTP_AUTH_MAX - 8) {
        snprintf(msg, 256, "api key %zu: %zu characters, at most %d", s->n_keys + 1, l,
                 SRV_HTTP_AUTH_MAX - 8);
        return -1;
    }
    char **k = realloc(s->keys, sizeof(char *) * (s->n_keys + 1));
    if (!k) goto oom;
    s->keys = k;
    if (!(s->keys[s->n_keys] = strdup(tok))) goto oom;
    s->n_keys++;
    return 0;
oom:
    snprintf(msg, 256, "out of memory reading the API keys");
    return -1;
}

/* Keys from --api-key-file (one a line, any length) and --api-keys (comma-separated). Any
 * failure is an error: a server must not start with fewer keys than it was given. */
static int load_keys(srv_t *s, char *msg) {
    const cfg_t *cfg = s->cfg;
    int rc = 0;
    if (*cfg->api_key_file) {
        FILE *f = fopen(cfg->api_key_file, "r");
        if (!f) {
            snprintf(msg, 256, "api_key_file: cannot open '%s'", cfg->api_key_file);
            return -1;
        }
        char *line = NULL;
        size_t cap = 0;
        while (rc == 0 && getline(&line, &cap, f) != -1) rc = add_key(s, line, msg);
        if (rc == 0 && ferror(f)) {
            snprintf(msg, 256, "api_key_file: cannot read '%s'", cfg->api_key_file);
            rc = -1;
        }
        free(line);
        fclose(f);
        if (rc) return -1;
    }
    char *all = strdup(cfg->api_keys);
    if (!all) {
        snprintf(msg, 256, "out of memory reading the API keys");
        return -1;
    }
    char *save = NULL;
    for (char *tok = strtok_r(all, ",", &save); tok && rc == 0; tok = strtok_r(NULL, ",", &save))
        rc = add_key(s, tok, msg);
    free(all);
    return rc;
}

/* Bind the listener to cfg->host: an IP literal or a name (localhost), IPv4 or IPv6; the
 * first address that binds wins. Start-up only, so the blocking lookup is fine. */
static int bind_listener(srv_t *s) {
    const cfg_t *cfg = s->cfg;
    char port[16];
    snprintf(port, sizeof(port), "%lld", (long long)cfg->port);
    struct addrinfo hints = {
        .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE};
    struct addrinfo *res = NULL;
    int g = getaddrinfo(*cfg->host ? cfg->host : NULL, port, &hints, &res);
    if (g != 0) {
        srv_log(SRV_ERROR, NULL, "config", "host: cannot resolve '%s': %s", cfg->host,
                gai_strerror(g));
        return -1;
    }
    int rc = UV_EADDRNOTAVAIL;
    for (struct addrinfo *a = res; a; a = a->ai_next) {
        rc = uv_tcp_bind(&s->listener, a->ai_addr, 0);
        if (!rc) rc = uv_listen((uv_stream_t *)&s->listener, 511, on_connection);
        if (!rc) break;
        /* a failed bind leaves the handle unusable for another family: start over */
        close_handle((uv_handle_t *)&s->listener);
        uv_run(&s->loop, UV_RUN_DEFAULT);
        uv_tcp_init(&s->loop, &s->listener);
        s->listener.data = s;
    }
    freeaddrinfo(res);
    if (rc) {
        srv_log(SRV_ERROR, NULL, "listen", "cannot listen on %s:%lld: %s", cfg->host,
                (long long)cfg->port, uv_strerror(rc));
        return -1;
    }
    return 0;
}

int srv_run(const cfg_t *cfg) {
    srv_t *s = calloc(1, sizeof(*s));
    if (!s) return 1;
    s->cfg = cfg;
    s->start_unix = unix_now();
    s->id_seed = (uint64_t)(s->start_unix * 1e6) ^ ((uint64_t)getpid() << 32);
    srv_log_level(cfg->log_level);
    /* a write to a peer that is gone must return EPIPE, not kill the process (libuv writes
     * with write(2), which has no MSG_NOSIGNAL) */
    struct sigaction ign = {.sa_handler = SIG_IGN};
    sigemptyset(&ign.sa_mask);
    sigaction(SIGPIPE, &ign, NULL);
    const char *fault = getenv("TIDALD_TEST_FAIL_CONN_ALLOC");
    s->fail_conn_allocs = fault ? atoi(fault) : 0;
    pthread_mutex_init(&s->wake_mu, NULL);
    pthread_mutex_init(&s->api_mu, NULL);
    api_metrics_init(s->start_unix);
    char msg[256] = {0};
    int code = 1;
    if (load_keys(s, msg)) {
        srv_log(SRV_ERROR, NULL, "config", "%s", msg);
        goto out;
    }
    uv_loop_init(&s->loop);
    uv_tcp_init(&s->loop, &s->listener);
    s->listener.data = s;
    if (bind_listener(s)) goto out_loop;
    s->listener_open = true;
    struct sockaddr_storage bound;
    int blen = sizeof(bound);
    uv_tcp_getsockname(&s->listener, (struct sockaddr *)&bound, &blen);
    int port = ntohs(bound.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&bound)->sin6_port
                                                 : ((struct sockaddr_in *)&bound)->sin_port);
    bool v6_literal = strchr(cfg->host, ':') != NULL;
    srv_log(SRV_INFO, NULL, "listening", "http://%s%s%s:%d (port %d)", v6_literal ? "[" : "",
            cfg->host, v6_literal ? "]" : "", port, port);
    uv_async_init(&s->loop, &s->wake, on_wake);
    s->wake.data = s;
    s->wake_open = true;
    uv_timer_init(&s->loop, &s->tick);
    s->tick.data = s;
    uv_timer_start(&s->tick, on_tick, 250, 250);
    uv_signal_init(&s->loop, &s->sig_term);
    uv_signal_init(&s->loop, &s->sig_int);
    s->sig_term.data = s->sig_int.data = s;
    uv_signal_start(&s->sig_term, on_signal, SIGTERM);
    uv_signal_start(&s->sig_int, on_signal, SIGINT);
    s->load_work.data = s;
    uv_queue_work(&s->loop, &s->load_work, load_model, loaded);
    uv_run(&s->loop, UV_RUN_DEFAULT);
    code = s->exit_code;
    /* the engine thread is idle now (every request finished or was cancelled) */
    sched_destroy(s->sched);
    eng_ctx_free(s->ctx);
    eng_model_free(s->model);
out_loop:
    if (s->listener_open) close_handle((uv_handle_t *)&s->listener);
    uv_run(&s->loop, UV_RUN_DEFAULT);
    if (uv_loop_close(&s->loop) != 0) {
        srv_log(SRV_ERROR, NULL, "shutdown", "handles left open at exit");
        code = 1;
    }
    srv_log(SRV_INFO, NULL, "exit", "exit code %d", code);
out:
    for (size_t i = 0; i < s->n_keys; i++) free(s->keys[i]);
    free(s->keys);
    pthread_mutex_destroy(&s->wake_mu);
    pthread_mutex_destroy(&s->api_mu);
    free(s);
    return code;
}
