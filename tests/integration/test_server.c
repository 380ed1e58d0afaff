/* test_server.c - the real daemon over loopback: completions (plain, streamed, chat), stop
 * strings, logprobs, every error class, 429, cancellation on disconnect, SIGTERM drain,
 * Prometheus exposition, bad HTTP of many kinds, pipelining, auth and request ids. */
#define _GNU_SOURCE /* strcasestr */
#include "../../tools/synth_model.h"
#include "harness.h"

#include <arpa/inet.h>
#include <cjson/cJSON.h>
#include <netinet/in.h>
#include <criterion/criterion.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define STORIES "../shared/models/stories260K.gguf"
static const char *STORY =
    ", there was a little girl named Lily. She loved to play outside in the park.";

static bool have_stories(void) {
    return access(STORIES, R_OK) == 0;
}

/* The tiny model carries ChatML markers and template. */
static const char *tiny_chat_model(void) {
    return harness_synth_model("tiny-f32");
}

/* Slow enough (4 layers, dim 256, 2K context) that a long request is still running while a
 * test acts on it. */
static const char *small_model(void) {
    return harness_synth_model("small-f32");
}

#define LONG_STREAM "{\"prompt\":\"hello\",\"max_tokens\":1800,\"stream\":true,\"ignore_eos\":true}"

#define NEED_STORIES()                                                                             \
    if (!have_stories()) cr_skip_test(STORIES " not present; skipping")

static void start_stories(daemon_t *d, const char *const *extra) {
    const char *args[32] = {"--model", STORIES};
    int n = 2;
    for (int i = 0; extra && extra[i]; i++) args[n++] = extra[i];
    args[n] = NULL;
    daemon_start(d, args);
}

static cJSON *post_json(int port, const char *path, const char *body, int *status) {
    char *resp, *head;
    *status = http_req(port, "POST", path, NULL, body, &resp, &head);
    cJSON *j = cJSON_Parse(resp);
    cr_assert(j, "response is not JSON: %s", resp);
    free(resp);
    free(head);
    return j;
}

/* Follow a path like "choices.0.text". */
static const cJSON *walk(const cJSON *o, const char *path) {
    char buf[128], *save = NULL;
    snprintf(buf, sizeof(buf), "%s", path);
    const cJSON *cur = o;
    for (char *tok = strtok_r(buf, ".", &save); tok && cur; tok = strtok_r(NULL, ".", &save))
        cur = (*tok >= '0' && *tok <= '9') ? cJSON_GetArrayItem(cur, atoi(tok))
                                           : cJSON_GetObjectItemCaseSensitive(cur, tok);
    return cur;
}

static const char *jstr(const cJSON *o, const char *path) {
    return cJSON_IsString(walk(o, path)) ? walk(o, path)->valuestring : NULL;
}

static double jnum(const cJSON *o, const char *path) {
    const cJSON *v = walk(o, path);
    return cJSON_IsNumber(v) ? v->valuedouble : -1e300;
}

/* Collect the text of an SSE completion stream; returns the number of data events. */
static int sse_text(char *body, char *text, size_t cap, bool *done, cJSON **usage, char *error) {
    int events = 0;
    size_t w = 0;
    char *save = NULL;
    *done = false;
    text[0] = 0;
    for (char *line = strtok_r(body, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        if (strncmp(line, "data: ", 6) != 0) continue;
        events++;
        if (strcmp(line + 6, "[DONE]") == 0) {
            *done = true;
            continue;
        }
        cJSON *j = cJSON_Parse(line + 6);
        cr_assert(j, "bad SSE payload: %s", line + 6);
        if (cJSON_GetObjectItem(j, "error") && error) snprintf(error, 256, "%s", line + 6);
        const cJSON *ch = cJSON_GetObjectItem(j, "choices");
        if (ch && cJSON_GetArraySize(ch) == 0 && usage) *usage = cJSON_Duplicate(j, 1);
        const char *t = jstr(j, "choices.0.text");
        if (!t) t = jstr(j, "choices.0.delta.content");
        if (t && w + strlen(t) < cap) {
            memcpy(text + w, t, strlen(t) + 1);
            w += strlen(t);
        }
        cJSON_Delete(j);
    }
    return events;
}

Test(server, test_completion_matches_engine_text_and_usage) {
    NEED_STORIES();
    daemon_t d;
    start_stories(&d, NULL);
    int st;
    cJSON *j =
        post_json(d.port, "/v1/completions",
                  "{\"prompt\":\"Once upon a time\",\"max_tokens\":20,\"temperature\":0}", &st);
    cr_expect_eq(st, 200);
    char text[1024];
    cr_assert(jstr(j, "choices.0.text"));
    snprintf(text, sizeof(text), "%s", jstr(j, "choices.0.text"));
    cr_expect(strncmp(text, STORY, strlen(text)) == 0 && strlen(text) > 40, "got '%s'", text);
    cr_expect_str_eq(jstr(j, "choices.0.finish_reason"), "length");
    cr_expect_str_eq(jstr(j, "object"), "text_completion");
    cr_expect_eq(jnum(j, "usage.prompt_tokens"), 5);
    cr_expect_eq(jnum(j, "usage.completion_tokens"), 20);
    cr_expect_eq(jnum(j, "usage.total_tokens"), 25);
    cJSON_Delete(j);
    /* token ids as the prompt give the same text */
    j = post_json(d.port, "/v1/completions",
                  "{\"prompt\":[1,403,407,261,378],\"max_tokens\":20,\"temperature\":0}", &st);
    cr_expect_eq(st, 200);
    cr_expect_str_eq(jstr(j, "choices.0.text"), text);
    cJSON_Delete(j);
    cr_expect_eq(daemon_stop(&d), 0);
}

Test(server, test_stream_equals_plain_and_ends_with_usage_and_done) {
    NEED_STORIES();
    daemon_t d;
    start_stories(&d, NULL);
    char *body, *head;
    int st = http_req(d.port, "POST", "/v1/completions", NULL,
                      "{\"prompt\":\"Once upon a time\",\"max_tokens\":20,\"temperature\":0,"
                      "\"stream\":true,\"stream_options\":{\"include_usage\":true},"
                      "\"telemetry\":{\"entropy\":true}}",
                      &body, &head);
    cr_expect_eq(st, 200);
    cr_expect(strcasestr(head, "content-type: text/event-stream"), "%s", head);
    cr_expect(strstr(body, "\"token_entropy_bits\""), "no telemetry in the stream");
    char text[4096];
    bool done;
    cJSON *usage = NULL;
    int n = sse_text(body, text, sizeof(text), &done, &usage, NULL);
    cr_expect(done, "no [DONE]");
    cr_expect_geq(n, 20);
    cr_expect(strncmp(text, STORY, strlen(text)) == 0 && strlen(text) > 40, "got '%s'", text);
    cr_assert(usage, "no usage chunk");
    cr_expect_eq(jnum(usage, "usage.completion_tokens"), 20);
    cr_expect_eq(jnum(usage, "usage.prompt_tokens"), 5);
    cJSON_Delete(usage);
    free(body);
    free(head);
    cr_expect_eq(daemon_stop(&d), 0);
}

Test(server, test_stop_strings_and_logprobs) {
    NEED_STORIES();
    daemon_t d;
    start_stories(&d, NULL);
    int st;
    cJSON *j = post_json(d.port, "/v1/completions",
                         "{\"prompt\":\"Once upon a time\",\"max_tokens\":60,\"temperature\":0,"
                         "\"stop\":[\"Lily\",\"zzz\"],\"logprobs\":5}",
                         &st);
    cr_expect_eq(st, 200);
    cr_expect_str_eq(jstr(j, "choices.0.text"), ", there was a little girl named ");
    cr_expect_str_eq(jstr(j, "choices.0.finish_reason"), "stop");
    const cJSON *lp =
        cJSON_GetObjectItem(cJSON_GetArrayItem(cJSON_GetObjectItem(j, "choices"), 0), "logprobs");
    cr_assert(cJSON_IsObject(lp));
    const cJSON *tops = cJSON_GetObjectItem(lp, "top_logprobs");
    cr_expect_geq(cJSON_GetArraySize(tops), 7);
    cr_expect_eq(cJSON_GetArraySize(cJSON_GetArrayItem(tops, 0)), 5);
    cr_expect_str_eq(jstr(lp, "tokens.0"), ",");
    cr_expect_leq(jnum(lp, "token_logprobs.0"), 0);
    cr_expect_gt(jnum(lp, "token_logprobs.0"), -1);
    cJSON_Delete(j);
    /* echo prepends the prompt */
    j = post_json(
        d.port, "/v1/completions",
        "{\"prompt\":\"Once upon a time\",\"max_tokens\":2,\"temperature\":0,\"echo\":true}", &st);
    cr_expect_str_eq(jstr(j, "choices.0.text"), "Once upon a time, there");
    cJSON_Delete(j);
    cr_expect_eq(daemon_stop(&d), 0);
}

Test(server, test_chat_completions_with_a_template_and_without) {
    daemon_t d;
    const char *args[] = {"--model", tiny_chat_model(), NULL};
    daemon_start(&d, args);
    int st;
    cJSON *j = post_json(d.port, "/v1/chat/completions",
                         "{\"messages\":[{\"role\":\"system\",\"content\":\"be brief\"},"
                         "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"hi\"}]}],"
                         "\"max_tokens\":4,\"temperature\":0,\"logprobs\":true,\"top_logprobs\":2}",
                         &st);
    cr_expect_eq(st, 200, "%s", cJSON_PrintUnformatted(j));
    cr_expect_str_eq(jstr(j, "object"), "chat.completion");
    cr_expect_str_eq(jstr(j, "choices.0.message.role"), "assistant");
    cr_expect(jstr(j, "choices.0.message.content"));
    cr_expect(jstr(j, "choices.0.logprobs.content.0.token"));
    /* the template's markers are single special tokens */
    cJSON *t = post_json(d.port, "/tokenize", "{\"content\":\"<|im_start|>\"}", &st);
    cr_expect_eq(st, 200);
    cr_expect_eq(cJSON_GetArraySize(cJSON_GetObjectItem(t, "tokens")), 1);
    cr_expect_eq(jnum(t, "tokens.0"), 3);
    cJSON_Delete(t);
    cJSON_Delete(j);
    char *body, *head;
    st = http_req(d.port, "POST", "/v1/chat/completions", NULL,
                  "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":3,"
                  "\"stream\":true}",
                  &body, &head);
    cr_expect_eq(st, 200);
    cr_expect(strstr(body, "chat.completion.chunk") && strstr(body, "\"delta\""), "%s", body);
    cr_expect(strstr(body, "\"role\":\"assistant\""), "%s", body);
    cr_expect(strstr(body, "data: [DONE]"));
    free(body);
    free(head);
    cr_expect_eq(daemon_stop(&d), 0);
    if (have_stories()) {
        start_stories(&d, NULL);
        j = post_json(d.port, "/v1/chat/completions",
                      "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", &st);
        cr_expect_eq(st, 400);
        cr_expect(strstr(jstr(j, "error.message"), "chat template"));
        cJSON_Delete(j);
        cr_expect_eq(daemon_stop(&d), 0);
    }
}

typedef struct {
    const char *method, *path, *headers, *body;
    int status;
    const char *param, *code;
} err_case_t;

Test(server, test_every_error_class_uses_the_openai_error_object) {
    daemon_t d;
    const char *args[] = {
        "--model", tiny_chat_model(), "--api-keys", "k1,k2", "--max-body-bytes", "4096", NULL};
    daemon_start(&d, args);
    char big[6000];
    memset(big, 'a', sizeof(big) - 1);
    big[sizeof(big) - 1] = 0;
    char bigbody[6100];
    snprintf(bigbody, sizeof(bigbody), "{\"prompt\":\"%s\"}", big);
    const char *auth = "Authorization: Bearer k2\r\n";
    err_case_t cases[] = {
        {"POST", "/v1/completions", NULL, "{\"prompt\":\"x\"}", 401, NULL, "invalid_api_key"},
        {"POST", "/v1/completions", "Authorization: Bearer nope\r\n", "{\"prompt\":\"x\"}", 401,
         NULL, NULL},
        {"GET", "/nope", auth, NULL, 404, NULL, "not_found"},
        {"GET", "/v1/completions", auth, NULL, 405, NULL, "method_not_allowed"},
        {"POST", "/v1/completions", auth, bigbody, 413, NULL, "body_too_large"},
        {"POST", "/v1/completions", auth, "{\"prompt\":", 400, NULL, NULL},
        {"POST", "/v1/completions", auth, "[1,2]", 400, NULL, NULL},
        {"POST", "/v1/completions", auth, "{\"prompt\":\"x\",\"temperature\":\"hot\"}", 400,
         "temperature", NULL},
        {"POST", "/v1/completions", auth, "{\"prompt\":\"x\",\"temperature\":-1}", 400,
         "temperature", NULL},
        {"POST", "/v1/completions", auth, "{\"prompt\":\"x\",\"temperature\":NaN}", 400, NULL,
         NULL},
        {"POST", "/v1/completions", auth, "{\"prompt\":\"x\",\"top_p\":1e999}", 400, "top_p", NULL},
        {"POST", "/v1/completions", auth, "{\"prompt\":\"x\",\"max_tokens\":1.5}", 400,
         "max_tokens", NULL},
        {"POST", "/v1/completions", auth, "{\"prompt\":\"x\",\"max_tokens\":0}", 400, "max_tokens",
         NULL},
        {"POST", "/v1/completions", auth, "{\"prompt\":\"x\",\"max_tokens\":99999999999}", 400,
         "max_tokens", NULL},
        {"POST", "/v1/completions", auth, "{\"prompt\":\"x\",\"max_tokens\":100000}", 400,
         "max_tokens", "context_length_exceeded"},
        {"POST", "/v1/completions", auth, "{\"prompt\":\"x\",\"n\":3}", 400, "n", NULL},
        {"POST", "/v1/completions", auth, "{\"prompt\":\"x\",\"stop\":5}", 400, "stop", NULL},
        {"POST", "/v1/completions", auth, "{\"prompt\":\"x\",\"stream\":\"yes\"}", 400, "stream",
         NULL},
        {"POST", "/v1/completions", auth, "{\"prompt\":\"x\",\"logprobs\":9}", 400, "logprobs",
         NULL},
        {"POST", "/v1/completions", auth, "{\"prompt\":\"x\",\"seed\":\"a\"}", 400, "seed", NULL},
        {"POST", "/v1/completions", auth, "{\"prompt\":[]}", 400, "prompt", NULL},
        {"POST", "/v1/completions", auth, "{\"prompt\":[1,-5]}", 400, "prompt", NULL},
        {"POST", "/v1/completions", auth, "{\"prompt\":[\"a\",\"b\"]}", 400, "prompt", NULL},
        {"POST", "/v1/completions", auth, "{}", 400, "prompt", NULL},
        {"POST", "/v1/completions", auth, "{\"prompt\":\"\\ud800\"}", 400, NULL, NULL},
        {"POST", "/v1/completions", auth, "{\"prompt\":\"\xc3\x28\"}", 400, NULL, NULL},
        {"POST", "/v1/chat/completions", auth, "{\"messages\":[]}", 400, "messages", NULL},
        {"POST", "/v1/chat/completions", auth,
         "{\"messages\":[{\"role\":\"wizard\",\"content\":\"x\"}]}", 400, "messages[0]", NULL},
        {"POST", "/v1/chat/completions", auth, "{\"messages\":[{\"role\":\"user\",\"content\":5}]}",
         400, "messages[0]", NULL},
        {"POST", "/tokenize", auth, "{\"content\":5}", 400, "content", NULL},
        {"POST", "/detokenize", auth, "{\"tokens\":[999999]}", 400, "tokens", NULL},
        {NULL, NULL, NULL, NULL, 0, NULL, NULL}, /* filled below */
    };
    /* a prompt longer than the 256-token context */
    char longprompt[4096];
    size_t lp = (size_t)snprintf(longprompt, sizeof(longprompt), "{\"prompt\":[");
    for (int i = 0; i < 300; i++)
        lp += (size_t)snprintf(longprompt + lp, sizeof(longprompt) - lp, "%s7", i ? "," : "");
    snprintf(longprompt + lp, sizeof(longprompt) - lp, "]}");
    cases[sizeof(cases) / sizeof(cases[0]) - 1] = (err_case_t){
        "POST", "/v1/completions", auth, longprompt, 400, "prompt", "context_length_exceeded"};
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        err_case_t *c = &cases[i];
        char *body, *head;
        int st = http_req(d.port, c->method, c->path, c->headers, c->body, &body, &head);
        cr_expect_eq(st, c->status, "case %zu (%s %s %.60s): status %d, body %s", i, c->method,
                     c->path, c->body ? c->body : "", st, body);
        cJSON *j = cJSON_Parse(body);
        cr_expect(j && cJSON_IsObject(cJSON_GetObjectItem(j, "error")),
                  "case %zu: no error object: %s", i, body);
        if (j) {
            cr_expect(jstr(j, "error.message") && jstr(j, "error.type"), "case %zu: %s", i, body);
            const cJSON *e = cJSON_GetObjectItem(j, "error");
            cr_expect(cJSON_GetObjectItem(e, "param") && cJSON_GetObjectItem(e, "code"),
                      "case %zu: param and code must be present: %s", i, body);
            if (c->param)
                cr_expect(jstr(j, "error.param") && strcmp(jstr(j, "error.param"), c->param) == 0,
                          "case %zu: param %s, want %s", i, jstr(j, "error.param"), c->param);
            if (c->code)
                cr_expect(jstr(j, "error.code") && strcmp(jstr(j, "error.code"), c->code) == 0,
                          "case %zu: code %s, want %s", i, jstr(j, "error.code"), c->code);
        }
        cJSON_Delete(j);
        free(body);
        free(head);
    }
    /* with a key everything works; health stays open */
    char *body, *head;
    cr_expect_eq(http_req(d.port, "POST", "/v1/completions", auth,
                          "{\"prompt\":\"x\",\"max_tokens\":2}", &body, &head),
                 200);
    free(body), free(head);
    cr_expect_eq(http_req(d.port, "GET", "/health", NULL, NULL, &body, &head), 200);
    free(body), free(head);
    cr_expect_eq(http_req(d.port, "GET", "/metrics", NULL, NULL, &body, &head), 200);
    free(body), free(head);
    cr_expect_eq(daemon_stop(&d), 0);
}

/* Open a streaming request without reading it; returns the socket. */
static int start_stream(int port, const char *body) {
    int fd = tcp_connect(port);
    char req[2048];
    int n = snprintf(req, sizeof(req),
                     "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %zu\r\n\r\n%s",
                     strlen(body), body);
    cr_assert_eq(send(fd, req, (size_t)n, MSG_NOSIGNAL), n);
    return fd;
}

/* Poll a metric until cond(value) holds or the hang guard passes; returns the last value. */
static double wait_metric(int port, const char *name, bool (*cond)(double)) {
    double v = harness_metric(port, name), t0 = harness_now();
    while (!cond(v) && harness_now() - t0 < HARNESS_HANG_GUARD_S) {
        usleep(20000);
        v = harness_metric(port, name);
    }
    return v;
}

static bool is_zero(double v) {
    return v == 0;
}
static bool is_one(double v) {
    return v == 1;
}
static bool at_most_40(double v) {
    return v >= 0 && v <= 40;
}

static bool wait_log(daemon_t *d, const char *needle) {
    double t0 = harness_now();
    for (;;) {
        daemon_pump_log(d);
        if (strstr(d->log, needle)) return true;
        if (harness_now() - t0 > HARNESS_HANG_GUARD_S) return false;
        usleep(20000);
    }
}

Test(server, test_queue_full_gets_429_with_retry_after) {
    daemon_t d;
    const char *args[] = {
        "--model", small_model(), "--max-running", "1", "--max-waiting", "1", "--threads",
        "1",       NULL};
    daemon_start(&d, args);
    const char *longreq = LONG_STREAM;
    int a = start_stream(d.port, longreq);
    cr_assert(harness_read_until(a, "data: "), "a never started"); /* a is running */
    int b = start_stream(d.port, longreq);                         /* b waits */
    cr_assert_eq(wait_metric(d.port, "tidald_requests_waiting", is_one), 1, "b is not waiting");
    char *body, *head;
    int st = http_req(d.port, "POST", "/v1/completions", NULL,
                      "{\"prompt\":\"hello\",\"max_tokens\":2}", &body, &head);
    cr_expect_eq(st, 429, "%s", body);
    cr_expect(strcasestr(head, "retry-after:"), "%s", head);
    cr_expect(strstr(body, "queue_full"), "%s", body);
    free(body), free(head);
    close(a);
    close(b);
    cr_expect_eq(daemon_stop(&d), 0);
}

Test(server, test_client_disconnect_mid_stream_frees_kv) {
    daemon_t d;
    const char *args[] = {"--model", small_model(), "--threads", "1", NULL};
    daemon_start(&d, args);
    int fd = start_stream(d.port, LONG_STREAM);
    cr_expect(harness_read_until(fd, "data: "), "no stream started");
    cr_expect_gt(harness_metric(d.port, "tidald_kv_cache_usage_ratio"), 0);
    close(fd);
    double usage = wait_metric(d.port, "tidald_kv_cache_usage_ratio", is_zero);
    cr_expect_eq(usage, 0, "KV usage stayed at %g after the client left", usage);
    cr_expect_geq(harness_metric(d.port, "tidald_requests_total{finish_reason=\"cancelled\"}"), 1);
    /* the server answers the next request correctly */
    char *body, *head;
    cr_expect_eq(http_req(d.port, "POST", "/v1/completions", NULL,
                          "{\"prompt\":\"x\",\"max_tokens\":2}", &body, &head),
                 200);
    free(body), free(head);
    cr_expect_eq(daemon_stop(&d), 0);
}

Test(server, test_sigterm_drains_in_flight_requests_then_exits_zero) {
    daemon_t d;
    const char *args[] = {"--model", tiny_chat_model(), NULL};
    daemon_start(&d, args);
    int fd = start_stream(
        d.port, "{\"prompt\":\"hello\",\"max_tokens\":120,\"stream\":true,\"temperature\":0}");
    cr_assert(harness_read_until(fd, "data: "), "no stream started");
    kill(d.pid, SIGTERM);
    cr_assert(wait_log(&d, "draining for up to"), "SIGTERM was not seen");
    /* the listener closes in the same callback that logs: wait for it, never forever */
    int late = tcp_connect(d.port);
    for (double t0 = harness_now(); late >= 0 && harness_now() - t0 < HARNESS_HANG_GUARD_S;
         late = tcp_connect(d.port)) {
        close(late);
        usleep(10000);
    }
    cr_expect_lt(late, 0, "still accepting after SIGTERM");
    /* the stream still finishes normally */
    static char all[1 << 20];
    size_t n = 0;
    for (;;) {
        struct pollfd p = {fd, POLLIN, 0};
        if (poll(&p, 1, (int)(HARNESS_HANG_GUARD_S * 1000)) <= 0) break;
        ssize_t r = recv(fd, all + n, sizeof(all) - 1 - n, 0);
        if (r <= 0) break;
        n += (size_t)r;
    }
    all[n] = 0;
    cr_expect(strstr(all, "\"finish_reason\":\"length\"") && strstr(all, "data: [DONE]"),
              "the in-flight stream did not finish: ...%s", n > 300 ? all + n - 300 : all);
    close(fd);
    int status = -1;
    for (double t0 = harness_now(); harness_now() - t0 < HARNESS_HANG_GUARD_S;) {
        daemon_pump_log(&d);
        if (waitpid(d.pid, &status, WNOHANG) == d.pid) break;
        usleep(5000);
    }
    cr_expect(WIFEXITED(status) && WEXITSTATUS(status) == 0, "exit status %d", status);
    d.pid = 0;
    daemon_stop(&d);
}

Test(server, test_metrics_exposition_passes_promtool) {
    daemon_t d;
    const char *args[] = {"--model", tiny_chat_model(), NULL};
    daemon_start(&d, args);
    char *body, *head;
    /* ignore_eos: a random draw could end the request early with finish_reason "stop" */
    int st0 = http_req(d.port, "POST", "/v1/completions", NULL,
                       "{\"prompt\":\"x\",\"max_tokens\":3,\"ignore_eos\":true}", &body, &head);
    cr_expect_eq(st0, 200, "%s", body);
    free(body), free(head);
    cr_expect_eq(http_req(d.port, "GET", "/metrics", NULL, NULL, &body, &head), 200);
    cr_expect(strcasestr(head, "text/plain; version=0.0.4"), "%s", head);
    const char *families[] = {"tidald_requests_running",
                              "tidald_requests_waiting",
                              "tidald_kv_cache_usage_ratio",
                              "tidald_prompt_tokens_total",
                              "tidald_generation_tokens_total",
                              "tidald_requests_total{finish_reason=\"length\"} 1",
                              "tidald_requests_rejected_total",
                              "tidald_time_to_first_token_seconds_bucket",
                              "tidald_inter_token_latency_seconds_bucket",
                              "tidald_e2e_request_latency_seconds_count 1",
                              "tidald_request_queue_time_seconds_bucket",
                              "tidald_batch_size_bucket",
                              "tidald_token_entropy_bits_bucket",
                              "process_resident_memory_bytes",
                              "process_open_fds",
                              "process_start_time_seconds"};
    for (size_t i = 0; i < sizeof(families) / sizeof(families[0]); i++)
        cr_expect(strstr(body, families[i]), "metrics lack %s", families[i]);
    if (system("command -v promtool >/dev/null 2>&1") == 0) {
        char path[64];
        snprintf(path, sizeof(path), "/tmp/tidald-metrics-%d.txt", (int)getpid());
        FILE *f = fopen(path, "w");
        fputs(body, f);
        fclose(f);
        char cmd[512];
        snprintf(cmd, sizeof(cmd), "promtool check metrics < %s > %s.out 2>&1", path, path);
        int rc = system(cmd);
        char out[4096] = {0};
        snprintf(cmd, sizeof(cmd), "%s.out", path);
        f = fopen(cmd, "r");
        if (f) {
            size_t k = fread(out, 1, sizeof(out) - 1, f);
            out[k] = 0;
            fclose(f);
        }
        /* promtool's linter maps any "bits" unit to bytes; entropy is information, measured in
         * bits by definition, and the family names are part of the API. That one lint is
         * allowed for the entropy families; any other problem fails. */
        int other = 0;
        char *save = NULL;
        for (char *line = strtok_r(out, "\n", &save); line; line = strtok_r(NULL, "\n", &save))
            if (!strstr(line, "entropy_bits use base unit \"bytes\" instead of \"bits\"")) {
                other++;
                cr_log_error("promtool: %s", line);
            }
        cr_expect_eq(other, 0, "promtool check metrics reported problems (rc %d)", rc);
        remove(path);
        remove(cmd);
    } else {
        cr_log_warn("promtool not installed (Debian package prometheus): exposition checked by "
                    "family only");
    }
    free(body), free(head);
    cr_expect_eq(daemon_stop(&d), 0);
}

Test(server, test_bad_http_never_hurts_the_server) {
    daemon_t d;
    const char *args[] = {"--model", tiny_chat_model(),    "--max-header-bytes",
                          "2048",    "--header-timeout-s", "0.5",
                          NULL};
    daemon_start(&d, args);
    struct {
        const char *raw;
        const char *want;
    } cases[] = {
        {"GARBAGE\r\n\r\n", "HTTP/1.1 400"},
        {"GET / HTTP/9.9\r\n\r\n", "HTTP/1.1 400"},
        {"GET /health HTTP/1.1\r\nBad Header\r\n\r\n", "HTTP/1.1 400"},
        {"POST /v1/completions HTTP/1.1\r\nContent-Length: abc\r\n\r\n", "HTTP/1.1 400"},
        {"POST /v1/completions HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
         "HTTP/1.1 400"},
        {"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
         "HTTP/1.1 400"},
        {"POST /v1/completions HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
         "HTTP/1.1 4"},
        {"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{\"prompt\"",
         "HTTP/1.1 408"},
        {"GET /health HTTP/1.1\r\nHost: x", "HTTP/1.1 408"},
        {"\x00\x01\x02\xff\r\n\r\n", "HTTP/1.1 400"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        size_t len = cases[i].raw[0] ? strlen(cases[i].raw) : 8;
        char *resp = http_raw(d.port, cases[i].raw, len, HARNESS_HANG_GUARD_S, NULL);
        cr_expect(strncmp(resp, cases[i].want, strlen(cases[i].want)) == 0, "case %zu: got %.80s",
                  i, resp);
        free(resp);
    }
    /* an oversized head */
    char big[4096];
    int n = snprintf(big, sizeof(big), "GET /health HTTP/1.1\r\nX-Pad: ");
    memset(big + n, 'a', 3000);
    memcpy(big + n + 3000, "\r\n\r\n", 5);
    char *resp = http_raw(d.port, big, strlen(big), HARNESS_HANG_GUARD_S, NULL);
    cr_expect(strncmp(resp, "HTTP/1.1 431", 12) == 0, "got %.80s", resp);
    free(resp);
    /* a chunked body is accepted */
    const char *chunked =
        "POST /tokenize HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: "
        "close\r\n\r\n"
        "5\r\n{\"con\r\ne\r\ntent\":\"hello\"}\r\n0\r\n\r\n";
    resp = http_raw(d.port, chunked, strlen(chunked), HARNESS_HANG_GUARD_S, NULL);
    cr_expect(strstr(resp, "\"tokens\""), "chunked body: %.200s", resp);
    free(resp);
    /* 1,000 connections opened and dropped, some mid-request */
    for (int i = 0; i < 1000; i++) {
        int fd = tcp_connect(d.port);
        if (fd < 0) continue;
        if (i % 3 == 1)
            send(fd, "POST /v1/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{", 55,
                 MSG_NOSIGNAL);
        if (i % 3 == 2) send(fd, "GET /hea", 8, MSG_NOSIGNAL);
        close(fd);
    }
    char *body, *head;
    int st = http_req(d.port, "POST", "/v1/completions", NULL,
                      "{\"prompt\":\"hello\",\"max_tokens\":3,\"temperature\":0}", &body, &head);
    cr_expect_eq(st, 200, "after the storm: %s", body);
    free(body), free(head);
    cr_expect_leq(wait_metric(d.port, "tidald_process_open_fds", at_most_40), 40,
                  "descriptors leak");
    cr_expect_eq(daemon_stop(&d), 0);
}

Test(server, test_keep_alive_pipelining_and_request_ids) {
    daemon_t d;
    const char *args[] = {"--model", tiny_chat_model(), NULL};
    daemon_start(&d, args);
    const char *req = "GET /livez HTTP/1.1\r\nHost: x\r\n\r\n"
                      "POST /tokenize HTTP/1.1\r\nHost: x\r\nX-Request-Id: "
                      "my-id-42\r\nContent-Length: 19\r\n\r\n{\"content\":\"hello\"}"
                      "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: "
                      "46\r\n\r\n{\"prompt\":\"hi\",\"max_tokens\":2,\"temperature\":0}"
                      "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    size_t len;
    char *resp = http_raw(d.port, req, strlen(req), HARNESS_HANG_GUARD_S, &len);
    char *a = strstr(resp, "\"alive\""), *b = strstr(resp, "\"tokens\""),
         *c = strstr(resp, "text_completion"), *e = strstr(resp, "{\"status\":\"ok\"}");
    cr_expect(a && b && c && e && a < b && b < c && c < e, "responses out of order or missing:\n%s",
              resp);
    cr_expect(strstr(resp, "X-Request-Id: my-id-42"), "request id not echoed");
    int count = 0;
    for (char *p = resp; (p = strstr(p, "HTTP/1.1 200")); p++) count++;
    cr_expect_eq(count, 4);
    free(resp);
    /* every split point of one request gives the same answer */
    const char *one = "POST /tokenize HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: "
                      "19\r\n\r\n{\"content\":\"hello\"}";
    for (size_t cut = 1; cut < strlen(one); cut += 7) {
        int fd = tcp_connect(d.port);
        send(fd, one, cut, MSG_NOSIGNAL);
        usleep(2000);
        send(fd, one + cut, strlen(one) - cut, MSG_NOSIGNAL);
        cr_expect(harness_read_until(fd, "\"tokens\""), "split at %zu: no answer", cut);
        close(fd);
    }
    cr_expect_eq(daemon_stop(&d), 0);
}

Test(server, test_health_models_tokenize_detokenize) {
    NEED_STORIES();
    daemon_t d;
    const char *extra[] = {"--model-alias", "stories", NULL};
    start_stories(&d, extra);
    int st;
    cJSON *j = post_json(d.port, "/tokenize",
                         "{\"content\":\"Once upon a time\",\"add_special\":true}", &st);
    cr_expect_eq(st, 200);
    const cJSON *toks = cJSON_GetObjectItem(j, "tokens");
    int want[] = {1, 403, 407, 261, 378};
    cr_assert_eq(cJSON_GetArraySize(toks), 5);
    for (int i = 0; i < 5; i++) cr_expect_eq(cJSON_GetArrayItem(toks, i)->valueint, want[i]);
    cJSON_Delete(j);
    j = post_json(d.port, "/detokenize", "{\"tokens\":[403,407,261,378]}", &st);
    cr_expect_str_eq(jstr(j, "content"), " Once upon a time");
    cJSON_Delete(j);
    char *body, *head;
    cr_expect_eq(http_req(d.port, "GET", "/v1/models", NULL, NULL, &body, &head), 200);
    j = cJSON_Parse(body);
    cr_expect_str_eq(jstr(j, "data.0.id"), "stories");
    cJSON_Delete(j);
    free(body), free(head);
    cr_expect_eq(http_req(d.port, "GET", "/livez", NULL, NULL, &body, &head), 200);
    free(body), free(head);
    cr_expect_eq(daemon_stop(&d), 0);
}

Test(server, test_deadlines_end_requests_with_a_clear_error) {
    daemon_t d;
    char keyfile[64];
    snprintf(keyfile, sizeof(keyfile), "/tmp/tidald-keys-%d", (int)getpid());
    FILE *f = fopen(keyfile, "w");
    fputs("# comment-free key file\nsecret-one\n  secret-two  \n", f);
    fclose(f);
    /* eviction and no bound on non-streamed generation: both requests would run for 2^24
     * tokens, so the deadline ends them on a machine of any speed */
    const char *args[] = {
        "--model",        small_model(), "--threads",     "1",
        "--api-key-file", keyfile,       "--kv-eviction", "--max-nonstream-tokens",
        "16777216",       NULL};
    daemon_start(&d, args);
    const char *auth = "Authorization: Bearer secret-two\r\n";
    char *body, *head;
    int st = http_req(
        d.port, "POST", "/v1/completions", auth,
        "{\"prompt\":\"hello\",\"max_tokens\":16777216,\"ignore_eos\":true,\"timeout_s\":0.3}",
        &body, &head);
    cr_expect_eq(st, 503, "%s", body);
    cr_expect(strstr(body, "\"code\":\"timeout\"") && strstr(body, "deadline"), "%s", body);
    free(body), free(head);
    st = http_req(d.port, "POST", "/v1/completions", auth,
                  "{\"prompt\":\"hello\",\"max_tokens\":16777216,\"ignore_eos\":true,"
                  "\"timeout_s\":0.3,\"stream\":true}",
                  &body, &head);
    cr_expect_eq(st, 200);
    char *err = strstr(body, "\"error\""), *done = strstr(body, "data: [DONE]");
    cr_expect(err && done &&
                      err<done,
                          "a mid-stream failure must send an error event, then "
                          "[DONE]: ...%s",
                          strlen(body)> 300
                  ? body + strlen(body) - 300
                  : body);
    free(body), free(head);
    st = http_req(d.port, "POST", "/v1/completions", "Authorization: Bearer secret-three\r\n",
                  "{\"prompt\":\"x\"}", &body, &head);
    cr_expect_eq(st, 401);
    free(body), free(head);
    cr_expect_geq(harness_metric(d.port, "tidald_requests_total{finish_reason=\"timeout\"}"), 2);
    remove(keyfile);
    cr_expect_eq(daemon_stop(&d), 0);
}

Test(server, test_attention_telemetry_in_every_chunk_and_per_layer_metrics) {
    NEED_STORIES();
    daemon_t d;
    const char *extra[] = {"--kv-eviction", "--ctx-size", "128", NULL};
    start_stories(&d, extra);
    char *body, *head;
    int st =
        http_req(d.port, "POST", "/v1/completions", NULL,
                 "{\"prompt\":\"Once upon a time\",\"max_tokens\":200,\"temperature\":0,"
                 "\"stream\":true,\"telemetry\":{\"entropy\":true,\"per_head\":true},"
                 "\"attention\":{\"mode\":\"tidal\",\"token_budget\":16,\"force_sinks\":true}}",
                 &body, &head);
    cr_expect_eq(st, 200);
    int chunks = 0, sparse_seen = 0;
    char *save = NULL;
    for (char *line = strtok_r(body, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        if (strncmp(line, "data: {", 7) != 0) continue;
        cJSON *j = cJSON_Parse(line + 6);
        const cJSON *t = cJSON_GetObjectItem(j, "telemetry");
        if (jstr(j, "choices.0.finish_reason")) { /* the closing chunk carries no token */
            cJSON_Delete(j);
            continue;
        }
        chunks++;
        cr_assert(t, "a chunk without telemetry: %s", line);
        const char *keys[] = {"attention_entropy_bits", "attention_entropy_norm", "sink_mass",
                              "attention_entropy_bits_per_head"};
        for (int k = 0; k < 4; k++) {
            const cJSON *a = cJSON_GetObjectItem(t, keys[k]);
            cr_assert_eq(cJSON_GetArraySize(a), 5, "%s must have one value per layer: %s", keys[k],
                         line);
            for (int l = 0; l < 5 && k < 3; l++) {
                double v = cJSON_GetArrayItem(a, l)->valuedouble;
                cr_expect(v >= 0 && (k == 0 || v <= 1.0001), "%s[%d] = %g", keys[k], l, v);
            }
        }
        cr_expect_eq(cJSON_GetArraySize(cJSON_GetArrayItem(
                         cJSON_GetObjectItem(t, "attention_entropy_bits_per_head"), 0)),
                     8);
        sparse_seen += cJSON_GetArraySize(cJSON_GetObjectItem(t, "sparse_layers")) == 2;
        cJSON_Delete(j);
    }
    cr_expect_eq(chunks, 200);
    cr_expect_geq(sparse_seen, 190,
                  "decode steps past the prefill attend sparsely in layers 3 and 4");
    free(body), free(head);
    /* 2,000 tokens through a 128-token window */
    cJSON *j =
        post_json(d.port, "/v1/completions",
                  "{\"prompt\":\"Once upon a time\",\"max_tokens\":2000,\"temperature\":0}", &st);
    cr_expect_eq(st, 200);
    cr_expect_eq(jnum(j, "usage.completion_tokens"), 2000);
    cr_expect_gt(strlen(jstr(j, "choices.0.text")), 3000);
    cJSON_Delete(j);
    cr_expect_gt(harness_metric(d.port, "tidald_kv_evicted_tokens_total"), 1800);
    /* every token of the request that asked for telemetry, and 1 in 16 of the others (tokens
     * 0, 16, ..., 1984 of 2,000: 125); the greedy request's sampling entropy is never computed */
    cr_expect_eq(harness_metric(d.port, "tidald_attention_entropy_bits_count{layer=\"4\"}"),
                 200 + 125);
    cr_expect_eq(harness_metric(d.port, "tidald_sink_mass_count{layer=\"0\"}"), 200 + 125);
    cr_expect_eq(harness_metric(d.port, "tidald_token_entropy_bits_count"), 200);
    cr_expect_geq(harness_metric(d.port, "tidald_entropy_collapse_total{layer=\"0\"}"), 0);
    /* a bad attention object is a 400 naming the field */
    j = post_json(d.port, "/v1/completions",
                  "{\"prompt\":\"x\",\"attention\":{\"mode\":\"sparse\"}}", &st);
    cr_expect_eq(st, 400);
    cr_expect_str_eq(jstr(j, "error.param"), "attention.mode");
    cJSON_Delete(j);
    j = post_json(d.port, "/v1/completions",
                  "{\"prompt\":\"x\",\"attention\":{\"selection_layers\":[9]}}", &st);
    cr_expect_eq(st, 400);
    cJSON_Delete(j);
    j = post_json(d.port, "/v1/completions", "{\"prompt\":\"x\",\"ctx_size\":4096}", &st);
    cr_expect_eq(st, 400);
    cr_expect_str_eq(jstr(j, "error.param"), "ctx_size");
    cJSON_Delete(j);
    cr_expect_eq(daemon_stop(&d), 0);
}

Test(server, test_entropy_collapse_counter_fires_after_a_run) {
    daemon_t d;
    /* a threshold of 1 makes every token "collapsed": a run of 3 fires once per layer */
    const char *args[] = {"--model", tiny_chat_model(),           "--entropy-collapse-threshold",
                          "1",       "--entropy-collapse-tokens", "3",
                          NULL};
    daemon_start(&d, args);
    char *body, *head;
    cr_expect_eq(http_req(d.port, "POST", "/v1/completions", NULL,
                          "{\"prompt\":\"hello world\",\"max_tokens\":8,\"ignore_eos\":true}",
                          &body, &head),
                 200);
    free(body), free(head);
    cr_expect_eq(harness_metric(d.port, "tidald_entropy_collapse_total{layer=\"0\"}"), 1);
    cr_expect_eq(harness_metric(d.port, "tidald_entropy_collapse_total{layer=\"1\"}"), 1);
    daemon_pump_log(&d);
    cr_expect(strstr(d.log, "\"event\":\"entropy_collapse\""), "no collapse log line");
    cr_expect_eq(daemon_stop(&d), 0);
}

/* A client that stops reading is buffered up to max_stream_buffer_kb, then cut off; the loop
 * keeps serving others meanwhile. */
Test(server, test_slow_reader_is_cut_off_without_blocking_others) {
    daemon_t d;
    /* no write-stall cut: this test is about the backlog bound */
    const char *args[] = {"--model", small_model(),       "--max-stream-buffer-kb",
                          "64",      "--write-timeout-s", "3600",
                          NULL};
    daemon_start(&d, args);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    int small = 4096;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof(small));
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)d.port)};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    cr_assert_eq(connect(fd, (struct sockaddr *)&a, sizeof(a)), 0);
    const char *body =
        "{\"prompt\":\"hello\",\"max_tokens\":1800,\"stream\":true,\"ignore_eos\":true,"
        "\"logprobs\":5,\"telemetry\":{\"entropy\":true,\"per_head\":true}}";
    char req[1024];
    int n = snprintf(req, sizeof(req),
                     "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %zu\r\n\r\n%s",
                     strlen(body), body);
    cr_assert_eq(send(fd, req, (size_t)n, MSG_NOSIGNAL), n);
    /* never read; meanwhile another client is served. The cut comes when the backlog passes
     * the bound, however long the daemon takes to produce it: wait for that event. */
    bool cut = false;
    for (double t0 = harness_now(); !cut && harness_now() - t0 < 4 * HARNESS_HANG_GUARD_S;) {
        char *rb, *rh;
        cr_expect_eq(http_req(d.port, "GET", "/health", NULL, NULL, &rb, &rh), 200);
        free(rb), free(rh);
        daemon_pump_log(&d);
        cut = strstr(d.log, "\"event\":\"slow_reader\"") != NULL;
        if (!cut) usleep(50000);
    }
    cr_expect(cut, "the slow reader was never cut off");
    cr_expect_geq(harness_metric(d.port, "tidald_requests_total{finish_reason=\"cancelled\"}"), 1);
    close(fd);
    cr_expect_eq(daemon_stop(&d), 0);
}

/* A real checkpoint end to end through the API: SmolLM2-135M-Instruct answers a chat request
 * through its own template (ChatML with its default system message: 37 prompt tokens, as
 * llama.cpp renders and tokenizes it in tests/fixtures/reference/), plain and streamed, with the
 * same greedy text. */
/* A real model's chat through the API with its own template, plain and streamed; the prompt
 * renders to `prompt_tokens` tokens (llama.cpp's count for the same conversation). */
static void chat_end_to_end(const char *file, int prompt_tokens, const char *expect) {
    const char *dir = getenv("TIDALD_MODELS_DIR");
    char path[4096];
    snprintf(path, sizeof(path), "%s/%s", dir ? dir : "build/models", file);
    if (access(path, R_OK) != 0)
        cr_skip_test("%s not fetched (offline?): run `make models`; skipping", path);
    daemon_t d;
    const char *args[] = {"--model", path, "--threads", "2", NULL};
    daemon_start(&d, args);
    const char *body = "{\"messages\":[{\"role\":\"user\",\"content\":\"What is the capital of "
                       "France?\"}],\"max_tokens\":40,\"temperature\":0}";
    int status;
    cJSON *j = post_json(d.port, "/v1/chat/completions", body, &status);
    cr_assert_eq(status, 200);
    cJSON *ch = cJSON_GetArrayItem(cJSON_GetObjectItem(j, "choices"), 0);
    const char *text =
        cJSON_GetObjectItem(cJSON_GetObjectItem(ch, "message"), "content")->valuestring;
    cr_expect_gt(strlen(text), 0, "an answer");
    if (expect)
        cr_expect(strncmp(text, expect, strlen(expect)) == 0, "the answer '%s' begins '%s'", text,
                  expect);
    cr_expect_eq(jnum(j, "usage.prompt_tokens"), prompt_tokens);
    const char *fr = cJSON_GetObjectItem(ch, "finish_reason")->valuestring;
    cr_expect(strcmp(fr, "stop") == 0 || strcmp(fr, "length") == 0, "finish_reason %s", fr);
    /* the turn's end marker ends the answer; it is not part of the text */
    cr_expect(!strstr(text, "<end_of_turn>") && !strstr(text, "<|im_end|>"), "%s", text);
    /* streamed: the deltas concatenate to the same text */
    const char *sbody = "{\"messages\":[{\"role\":\"user\",\"content\":\"What is the capital of "
                        "France?\"}],\"max_tokens\":40,\"temperature\":0,\"stream\":true}";
    char *resp, *head;
    cr_assert_eq(http_req(d.port, "POST", "/v1/chat/completions", NULL, sbody, &resp, &head), 200);
    char joined[4096];
    bool done;
    sse_text(resp, joined, sizeof(joined), &done, NULL, NULL);
    cr_expect(done, "the stream ends with [DONE]");
    cr_expect_str_eq(joined, text);
    free(resp), free(head);
    cJSON_Delete(j);
    cr_expect_eq(daemon_stop(&d), 0);
}

Test(server, test_smollm2_chat_end_to_end, .timeout = 600) {
    chat_end_to_end("SmolLM2-135M-Instruct.Q4_1.gguf", 37, NULL);
}

/* Gemma 3 270M: its file has no chat template; its vocabulary's turn markers select Gemma's
 * format (16 tokens, as llama.cpp counts the same conversation). The packaged checkpoint is the
 * pretrained model, not the instruction-tuned one: greedy, it repeats the question, and
 * llama.cpp's greedy tokens for this prompt (the parity fixture) begin with the same text. */
Test(server, test_gemma3_chat_end_to_end, .timeout = 600) {
    chat_end_to_end("gemma-3-270m-q4_k_m.gguf", 16, "What is the capital of France?");
}

/* The same greedy request streamed and not: the non-streamed telemetry list holds exactly the
 * objects of the streamed chunks, one per token. */
static void check_telemetry_list(int port, const char *path, const char *fields, bool per_head) {
    char stream_body[512], plain_body[512];
    snprintf(stream_body, sizeof(stream_body), "{%s,\"stream\":true}", fields);
    snprintf(plain_body, sizeof(plain_body), "{%s}", fields);
    char *body, *head;
    cr_assert_eq(http_req(port, "POST", path, NULL, stream_body, &body, &head), 200, "%s", body);
    cJSON *streamed = cJSON_CreateArray();
    char *save = NULL;
    for (char *line = strtok_r(body, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        if (strncmp(line, "data: {", 7) != 0) continue;
        cJSON *j = cJSON_Parse(line + 6);
        cJSON *t = cJSON_DetachItemFromObject(j, "telemetry");
        if (t) cJSON_AddItemToArray(streamed, t);
        cJSON_Delete(j);
    }
    free(body), free(head);
    int st;
    cJSON *j = post_json(port, path, plain_body, &st);
    cr_assert_eq(st, 200);
    const cJSON *list = cJSON_GetObjectItem(j, "telemetry");
    cr_assert(cJSON_IsArray(list), "%s: the telemetry is not a list", path);
    cr_assert_eq(cJSON_GetArraySize(list), (int)jnum(j, "usage.completion_tokens"));
    cr_assert_eq(cJSON_GetArraySize(list), cJSON_GetArraySize(streamed));
    cr_assert_gt(cJSON_GetArraySize(list), 0);
    const cJSON *first = cJSON_GetArrayItem(list, 0);
    cr_assert(cJSON_GetObjectItem(first, "attention_entropy_bits") &&
              cJSON_GetObjectItem(first, "sink_mass") &&
              cJSON_GetObjectItem(first, "token_entropy_bits"));
    cr_assert_eq(cJSON_GetObjectItem(first, "sink_mass_per_head") != NULL, per_head);
    for (int i = 0; i < cJSON_GetArraySize(list); i++) {
        char *a = cJSON_PrintUnformatted(cJSON_GetArrayItem(list, i)),
             *b = cJSON_PrintUnformatted(cJSON_GetArrayItem(streamed, i));
        cr_assert_str_eq(a, b, "%s token %d", path, i);
        free(a), free(b);
    }
    cJSON_Delete(j);
    cJSON_Delete(streamed);
}

/* A non-streamed response's telemetry is a list of the very objects the streamed chunks carry,
 * one per token (completions on stories260K, chat on a model with a template). */
Test(server, test_non_streamed_telemetry_lists_the_streamed_objects) {
    daemon_t d;
    const char *args[] = {"--model", tiny_chat_model(), NULL};
    daemon_start(&d, args);
    check_telemetry_list(d.port, "/v1/chat/completions",
                         "\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":12,"
                         "\"temperature\":0,\"ignore_eos\":true,\"telemetry\":{\"entropy\":true}",
                         false);
    cr_expect_eq(daemon_stop(&d), 0);
    if (!have_stories()) return;
    start_stories(&d, NULL);
    check_telemetry_list(d.port, "/v1/completions",
                         "\"prompt\":\"Once upon a time\",\"max_tokens\":24,\"temperature\":0,"
                         "\"telemetry\":{\"entropy\":true,\"per_head\":true}",
                         true);
    cr_expect_eq(daemon_stop(&d), 0);
}
