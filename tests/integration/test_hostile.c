/* test_hostile.c - hostile clients against the real daemon: clients that vanish (close, RST)
 * before or during an answer, half-closed clients, huge prompts while the loop must stay
 * live, responses larger than the stream bound, pipelining without reading, smuggling forms
 * of HTTP, long API keys, a failed connection allocation, host names and a small KV budget.
 *
 * Every test waits for events (an answer, a log line, a metric), never for a fixed time; the
 * bounds in the loops are hang guards only. Every test ends with the daemon still answering
 * and stopping cleanly (daemon_stop checks its sanitizer output). */
#define _GNU_SOURCE /* strcasestr */
#include "../../tools/synth_model.h"
#include "harness.h"

#include <arpa/inet.h>
#include <cjson/cJSON.h>
#include <criterion/criterion.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void send_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        cr_assert_gt(w, 0, "send failed: %s", strerror(errno));
        p += w;
        n -= (size_t)w;
    }
}

/* Read until the peer closes (or the hang guard); returns the bytes (malloc'd). */
static char *read_to_eof(int fd, size_t *len) {
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    double t0 = harness_now();
    while (harness_now() - t0 < HARNESS_HANG_GUARD_S) {
        struct pollfd p = {fd, POLLIN, 0};
        if (poll(&p, 1, 1000) <= 0) continue;
        if (n + 65536 + 1 > cap) buf = realloc(buf, cap *= 2);
        ssize_t r = recv(fd, buf + n, cap - n - 1, 0);
        if (r <= 0) break;
        n += (size_t)r;
    }
    buf[n] = 0;
    if (len) *len = n;
    return buf;
}

/* Poll a metric until it equals want (hang guard); returns the last value. */
static double wait_metric(int port, const char *name, double want) {
    double v = harness_metric(port, name), t0 = harness_now();
    while (v != want && harness_now() - t0 < HARNESS_HANG_GUARD_S) {
        usleep(20000);
        v = harness_metric(port, name);
    }
    return v;
}

/* Count occurrences of a log event, pumping the daemon's stderr. */
static int log_count(daemon_t *d, const char *event) {
    daemon_pump_log(d);
    int n = 0;
    for (const char *p = d->log; (p = strstr(p, event)); p++) n++;
    return n;
}

static void wait_log(daemon_t *d, const char *event, int count) {
    double t0 = harness_now();
    while (log_count(d, event) < count && harness_now() - t0 < HARNESS_HANG_GUARD_S) usleep(20000);
    cr_assert_geq(log_count(d, event), count, "expected %d x %s in the log:\n%s", count, event,
                  d->log);
}

static void expect_healthy(daemon_t *d) {
    char *body, *head;
    cr_expect_eq(http_req(d->port, "GET", "/health", NULL, NULL, &body, &head), 200,
                 "not healthy: %s", body);
    free(body), free(head);
}

/* Close with SO_LINGER 0: the peer gets an RST instead of a FIN. */
static void close_rst(int fd) {
    struct linger l = {.l_onoff = 1, .l_linger = 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
    close(fd);
}

static int stream_request(int port, int max_tokens) {
    char body[256], req[512];
    snprintf(body, sizeof(body),
             "{\"prompt\":\"Once upon a time\",\"max_tokens\":%d,\"stream\":true,"
             "\"ignore_eos\":true}",
             max_tokens);
    int n = snprintf(req, sizeof(req),
                     "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %zu\r\n\r\n%s",
                     strlen(body), body);
    int fd = tcp_connect(port);
    cr_assert_geq(fd, 0);
    send_all(fd, req, (size_t)n);
    return fd;
}

/* ---- vanishing clients (SIGPIPE) -------------------------------------- */

Test(hostile, test_vanishing_clients_never_kill_the_daemon) {
    daemon_t d;
    const char *args[] = {"--model", harness_synth_model("small-f32"), "--threads", "1", NULL};
    daemon_start(&d, args);
    static const char health[] = "GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
    static const char two[] = "GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
                              "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
    for (int i = 0; i < 300; i++) {
        int fd = tcp_connect(d.port);
        cr_assert_geq(fd, 0, "connect %d refused: the daemon died?", i);
        if (i % 2)
            send_all(fd, two, sizeof(two) - 1);
        else
            send_all(fd, health, sizeof(health) - 1);
        if (i % 3 == 0)
            close_rst(fd);
        else
            close(fd);
    }
    cr_assert_eq(waitpid(d.pid, NULL, WNOHANG), 0, "the daemon died (SIGPIPE?)");
    /* streams that vanish mid-answer: a write to a peer that is gone */
    for (int i = 0; i < 6; i++) {
        int fd = stream_request(d.port, 2000);
        cr_assert(harness_read_until(fd, "data: "), "no stream started");
        if (i % 2)
            close_rst(fd);
        else
            close(fd);
    }
    cr_assert_eq(waitpid(d.pid, NULL, WNOHANG), 0, "the daemon died (SIGPIPE?)");
    cr_expect_eq(wait_metric(d.port, "tidald_kv_cache_usage_ratio", 0), 0,
                 "KV blocks of vanished streams were not freed");
    cr_expect_eq(wait_metric(d.port, "tidald_requests_running", 0), 0);
    expect_healthy(&d);
    cr_expect_eq(daemon_stop(&d), 0, "the daemon did not exit cleanly on SIGTERM");
}

/* ---- a failed connection allocation (6b) ------------------------------ */

Test(hostile, test_listener_survives_failed_connection_allocations) {
    daemon_t d;
    setenv("TIDALD_TEST_FAIL_CONN_ALLOC", "3", 1);
    const char *args[] = {"--model", harness_synth_model("tiny-f32"), NULL};
    daemon_start(&d, args);
    unsetenv("TIDALD_TEST_FAIL_CONN_ALLOC");
    /* three at once: the spare handle is still closing for the second and third */
    int fds[3];
    for (int i = 0; i < 3; i++) cr_assert_geq(fds[i] = tcp_connect(d.port), 0);
    for (int i = 0; i < 3; i++) {
        size_t n;
        free(read_to_eof(fds[i], &n)); /* closed without an answer */
        cr_expect_eq(n, 0);
        close(fds[i]);
    }
    expect_healthy(&d);
    wait_log(&d, "out of memory for a connection", 3);
    cr_expect_eq(daemon_stop(&d), 0);
}

/* ---- half-close (9) --------------------------------------------------- */

static char *half_closed_request(int port, const char *raw, size_t *len) {
    int fd = tcp_connect(port);
    cr_assert_geq(fd, 0);
    send_all(fd, raw, strlen(raw));
    shutdown(fd, SHUT_WR);
    char *got = read_to_eof(fd, len);
    close(fd);
    return got;
}

Test(hostile, test_half_closed_clients_get_their_answer) {
    daemon_t d;
    const char *args[] = {"--model", harness_synth_model("tiny-f32"), NULL};
    daemon_start(&d, args);
    const char *body = "{\"prompt\":\"hello\",\"max_tokens\":8,\"ignore_eos\":true}";
    char req[512];
    snprintf(req, sizeof(req),
             "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %zu\r\n\r\n%s",
             strlen(body), body);
    for (int i = 0; i < 30; i++) {
        size_t n;
        char *got = half_closed_request(d.port, req, &n);
        cr_expect(strncmp(got, "HTTP/1.1 200", 12) == 0 && strstr(got, "\"completion_tokens\":8"),
                  "round %d: %.200s", i, got);
        free(got);
    }
    /* pipelined, then half-closed: both answered, in order */
    char two[1024];
    snprintf(two, sizeof(two), "%sGET /livez HTTP/1.1\r\nHost: x\r\n\r\n", req);
    char *got = half_closed_request(d.port, two, NULL);
    char *a = strstr(got, "text_completion"), *b = strstr(got, "\"alive\"");
    cr_expect(a && b && a < b, "pipelined + half-close: %.300s", got);
    free(got);
    /* a stream to a half-closed client runs to its end */
    snprintf(req, sizeof(req),
             "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
             "{\"prompt\":\"hello\",\"max_tokens\":20,\"stream\":true,\"ignore_eos\":true}",
             (int)strlen("{\"prompt\":\"hello\",\"max_tokens\":20,\"stream\":true,"
                         "\"ignore_eos\":true}"));
    got = half_closed_request(d.port, req, NULL);
    cr_expect(strstr(got, "data: [DONE]"), "stream to a half-closed client: %.300s", got);
    free(got);
    /* EOF with an incomplete request, or idle: closed, nothing sent */
    size_t n;
    got = half_closed_request(
        d.port, "POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{", &n);
    cr_expect_eq(n, 0, "%s", got);
    free(got);
    got = half_closed_request(d.port, "", &n);
    cr_expect_eq(n, 0, "%s", got);
    free(got);
    cr_expect_geq(harness_metric(d.port, "tidald_requests_total{finish_reason=\"length\"}"), 32);
    cr_expect_eq(harness_metric(d.port, "tidald_requests_total{finish_reason=\"cancelled\"}"), 0);
    expect_healthy(&d);
    cr_expect_eq(daemon_stop(&d), 0);
}

/* ---- the loop stays live while a huge request is parsed (8) ----------- */

/* Send `req` whole but its last byte; make sure the daemon has read it all (round trips on
 * another connection: each loop iteration reads the big connection too); send the last byte,
 * then count /livez round trips that complete before the big answer arrives. A loop that
 * parses on its own thread can answer at most one probe (one that raced the last byte) until
 * the parse is done; a loop that hands the parse off answers every probe. */
static int livez_answers_during(int port, const char *req, size_t len, const char *want) {
    int big = tcp_connect(port);
    cr_assert_geq(big, 0);
    send_all(big, req, len - 1);
    static const char probe[] = "GET /livez HTTP/1.1\r\nHost: x\r\n\r\n";
    int pfd = tcp_connect(port);
    cr_assert_geq(pfd, 0);
    for (int i = 0; i < 8; i++) { /* the daemon drains the big body meanwhile */
        send_all(pfd, probe, sizeof(probe) - 1);
        cr_assert(harness_read_until(pfd, "\"alive\""), "no /livez answer");
    }
    send_all(big, req + len - 1, 1);
    int answered = 0;
    for (;;) {
        send_all(pfd, probe, sizeof(probe) - 1);
        cr_assert(harness_read_until(pfd, "\"alive\""), "no /livez answer");
        struct pollfd p = {big, POLLIN, 0};
        if (poll(&p, 1, 0) > 0) break; /* the big answer is here: this probe does not count */
        answered++;
        if (answered >= 3) break;
    }
    char *got = read_to_eof(big, NULL);
    cr_expect(strstr(got, want), "big request: %.300s", got);
    free(got);
    close(big);
    close(pfd);
    return answered;
}

Test(hostile, test_huge_prompts_do_not_freeze_the_loop) {
    daemon_t d;
    const char *args[] = {"--model", harness_synth_model("small-f32"), "--max-body-bytes",
                          "8388608", NULL};
    daemon_start(&d, args);
    /* a ~4 MB prompt string: tokenized, then refused as longer than the context */
    size_t n_text = 4000000;
    char *req = malloc(n_text + 512);
    const char *body_head = "{\"prompt\":\"";
    size_t body_len = strlen(body_head) + n_text + 2;
    int h = snprintf(req, 512,
                     "POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     "Content-Length: %zu\r\n\r\n%s",
                     body_len, body_head);
    static const char words[] = "Once upon a time there was a girl. ";
    for (size_t i = 0; i < n_text; i++) req[h + i] = words[i % (sizeof(words) - 1)];
    memcpy(req + h + n_text, "\"}", 2);
    size_t len = (size_t)h + n_text + 2;
    int a = livez_answers_during(d.port, req, len, "context_length_exceeded");
    cr_expect_geq(a, 3, "/livez answered %d times while a 4 MB prompt was tokenized", a);
    /* a big token-id array. 20,000 elements, not the 160,000 of the report: api/request.c
     * walks the array with cJSON_GetArrayItem (quadratic), so 160,000 take a minute even in
     * the release build; off the loop that no longer freezes it, but it would make this test
     * slow. 20,000 still take far longer than a few loopback round trips. */
    size_t n_ids = 20000, cap = n_ids * 8 + 512, k = 0;
    char *arr = malloc(cap);
    k += (size_t)snprintf(arr, cap, "{\"prompt\":[");
    for (size_t i = 0; i < n_ids; i++)
        k += (size_t)snprintf(arr + k, cap - k, "%s%d", i ? "," : "", 5 + (int)(i % 200));
    k += (size_t)snprintf(arr + k, cap - k, "]}");
    h = snprintf(req, 512,
                 "POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                 "Content-Length: %zu\r\n\r\n",
                 k);
    char *req2 = malloc((size_t)h + k);
    memcpy(req2, req, (size_t)h);
    memcpy(req2 + h, arr, k);
    a = livez_answers_during(d.port, req2, (size_t)h + k, "context_length_exceeded");
    cr_expect_geq(a, 3, "/livez answered %d times while 20,000 token ids were parsed", a);
    free(req2);
    free(arr);
    free(req);
    expect_healthy(&d);
    cr_expect_eq(daemon_stop(&d), 0);
}

/* A client that closes while its request is being parsed: the work finishes, then the
 * connection is freed (ASan would see a use after free otherwise). */
Test(hostile, test_client_leaving_during_a_parse_is_harmless) {
    daemon_t d;
    const char *args[] = {"--model", harness_synth_model("small-f32"), NULL};
    daemon_start(&d, args);
    size_t n_text = 2000000;
    char *req = malloc(n_text + 512);
    int h = snprintf(req, 512,
                     "POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: %zu\r\n\r\n"
                     "{\"content\":\"",
                     n_text + 14);
    for (size_t i = 0; i < n_text; i++) req[h + i] = "abc def "[i % 8];
    memcpy(req + h + n_text, "\"}", 2);
    for (int i = 0; i < 4; i++) {
        int fd = tcp_connect(d.port);
        send_all(fd, req, (size_t)h + n_text + 2);
        if (i % 2)
            close_rst(fd);
        else
            close(fd);
    }
    free(req);
    cr_expect_eq(wait_metric(d.port, "tidald_http_connections", 1), 1, "connections leak");
    expect_healthy(&d);
    cr_expect_eq(daemon_stop(&d), 0);
}

/* ---- a response larger than the stream bound (10) -------------------- */

Test(hostile, test_big_response_is_sent_whole) {
    daemon_t d;
    const char *args[] = {"--model", harness_synth_model("tiny-f32"), "--max-stream-buffer-kb",
                          "64", NULL};
    daemon_start(&d, args);
    size_t n_chars = 500000;
    size_t blen = strlen("{\"content\":\"\"}") + 2 * n_chars;
    char *req = malloc(blen + 512);
    int h = snprintf(req, 512,
                     "POST /tokenize HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     "Content-Length: %zu\r\n\r\n{\"content\":\"",
                     blen);
    for (size_t i = 0; i < n_chars; i++) memcpy(req + h + 2 * i, "\xc3\xa9", 2);
    memcpy(req + h + 2 * n_chars, "\"}", 2);
    int fd = tcp_connect(d.port);
    send_all(fd, req, (size_t)h + 2 * n_chars + 2);
    free(req);
    size_t n;
    char *got = read_to_eof(fd, &n);
    close(fd);
    cr_assert(strncmp(got, "HTTP/1.1 200", 12) == 0, "%.200s", got);
    char *cl = strcasestr(got, "content-length:");
    char *sep = strstr(got, "\r\n\r\n");
    cr_assert(cl && sep);
    size_t want = strtoull(cl + 15, NULL, 10);
    cr_expect_gt(want, 64 * 1024 * 4, "the response should dwarf the stream bound");
    cr_expect_eq(n - (size_t)(sep + 4 - got), want, "got %zu body bytes of %zu",
                 n - (size_t)(sep + 4 - got), want);
    cJSON *j = cJSON_Parse(sep + 4);
    cr_expect(j && cJSON_GetArraySize(cJSON_GetObjectItem(j, "tokens")) > 0, "not JSON");
    cJSON_Delete(j);
    free(got);
    cr_expect_eq(log_count(&d, "slow_reader"), 0);
    expect_healthy(&d);
    cr_expect_eq(daemon_stop(&d), 0);
}

/* A streamed chunk bigger than --max-stream-buffer-kb, with nothing unsent before it, is not a
 * slow reader (the stream was cut after its head). */
Test(hostile, test_one_big_stream_chunk_is_not_a_slow_reader) {
    daemon_t d;
    const char *args[] = {"--model", harness_synth_model("small-f32"), "--max-stream-buffer-kb",
                          "1", NULL};
    daemon_start(&d, args);
    char body[4096], prompt[1400];
    for (int i = 0; i < 1300; i++) prompt[i] = "hello world "[i % 12];
    prompt[1300] = 0;
    snprintf(body, sizeof(body),
             "{\"prompt\":\"%s\",\"max_tokens\":4,\"echo\":true,\"stream\":true}", prompt);
    char *resp, *head;
    int st = http_req(d.port, "POST", "/v1/completions", NULL, body, &resp, &head);
    cr_expect_eq(st, 200);
    cr_expect(strstr(resp, "[DONE]"), "the stream was cut: %.300s", resp);
    free(resp);
    free(head);
    cr_expect_eq(log_count(&d, "slow_reader"), 0);
    cr_expect_eq(daemon_stop(&d), 0);
}

/* ---- pipelining without reading; idle buffers (11) -------------------- */

Test(hostile, test_pipelining_clients_that_never_read_are_cut_off) {
    daemon_t d;
    const char *args[] = {"--model",
                          harness_synth_model("tiny-f32"),
                          "--max-connections",
                          "10",
                          "--write-timeout-s",
                          "1",
                          NULL};
    daemon_start(&d, args);
    static const char req[] = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
    char *many = malloc(300 * (sizeof(req) - 1));
    for (int i = 0; i < 300; i++) memcpy(many + i * (sizeof(req) - 1), req, sizeof(req) - 1);
    int fds[10];
    for (int i = 0; i < 10; i++) {
        fds[i] = socket(AF_INET, SOCK_STREAM, 0);
        int small = 4096;
        setsockopt(fds[i], SOL_SOCKET, SO_RCVBUF, &small, sizeof(small));
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)d.port)};
        inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
        cr_assert_eq(connect(fds[i], (struct sockaddr *)&a, sizeof(a)), 0);
        /* never read; the daemon stops reading too once its answers back up, so the send may
         * stop short: that is fine */
        size_t off = 0, len = 300 * (sizeof(req) - 1);
        while (off < len) {
            struct pollfd p = {fds[i], POLLOUT, 0};
            if (poll(&p, 1, 2000) <= 0) break;
            ssize_t w = send(fds[i], many + off, len - off, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (w <= 0) break;
            off += (size_t)w;
        }
    }
    free(many);
    wait_log(&d, "\"event\":\"write_stall\"", 10);
    /* every slot is free again: new clients are served */
    double t0 = harness_now();
    int st = 0;
    while (st != 200 && harness_now() - t0 < HARNESS_HANG_GUARD_S) {
        char *body, *head;
        st = http_req(d.port, "GET", "/health", NULL, NULL, &body, &head);
        free(body), free(head);
        if (st != 200) usleep(20000);
    }
    cr_expect_eq(st, 200, "new clients are locked out");
    for (int i = 0; i < 10; i++) close(fds[i]);
    cr_expect_eq(daemon_stop(&d), 0);
}

Test(hostile, test_idle_keep_alive_connections_release_their_body_buffers) {
    daemon_t d;
    const char *args[] = {"--model", harness_synth_model("tiny-f32"), NULL};
    daemon_start(&d, args);
    size_t blen = 1 << 20;
    char *req = malloc(blen + 256);
    int h =
        snprintf(req, 256, "POST /livez HTTP/1.1\r\nHost: x\r\nContent-Length: %zu\r\n\r\n", blen);
    memset(req + h, 'x', blen);
    int fds[20];
    for (int i = 0; i < 20; i++) {
        fds[i] = tcp_connect(d.port);
        send_all(fds[i], req, (size_t)h + blen);
        cr_assert(harness_read_until(fds[i], "method_not_allowed"), "no answer");
    }
    free(req);
    /* 20 idle keep-alive connections that each sent 1 MiB hold no request bytes */
    double held = harness_metric(d.port, "tidald_http_request_buffer_bytes");
    cr_expect(held >= 0 && held < 65536, "idle connections hold %g request bytes", held);
    cr_expect_geq(harness_metric(d.port, "tidald_http_connections"), 21);
    for (int i = 0; i < 20; i++) close(fds[i]);
    expect_healthy(&d);
    cr_expect_eq(daemon_stop(&d), 0);
}

/* ---- smuggling forms and other HTTP edges (13, 16) --------------------- */

Test(hostile, test_smuggling_forms_and_http_edges) {
    daemon_t d;
    const char *args[] = {"--model",
                          harness_synth_model("tiny-f32"),
                          "--max-body-bytes",
                          "4096",
                          "--max-header-bytes",
                          "1024",
                          NULL};
    daemon_start(&d, args);
    char big_head[2048];
    int bh = snprintf(big_head, sizeof(big_head), "GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: ");
    memset(big_head + bh, 'a', 1500);
    memcpy(big_head + bh + 1500, "\r\n\r\n", 5);
    struct {
        const char *raw, *want;
    } cases[] = {
        {big_head, "HTTP/1.1 431"},
        {"POST /tokenize HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\r\n chunked\r\n\r\n"
         "14\r\n{\"content\":\"hello\"}\r\n0\r\n\r\n",
         "HTTP/1.1 400"},
        {"POST /tokenize HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
         "14\r\n{\"content\":\"hello\"}XY0\r\n\r\n",
         "HTTP/1.1 400"},
        {"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n"
         "Transfer-Encoding: chunked\r\n\r\n14\r\n{\"content\":\"hello\"}\r\n0\r\n\r\n",
         "HTTP/1.1 400"},
        {"GET /health HTTP/1.1\r\n\r\n", "HTTP/1.1 400"},
        {"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "HTTP/1.1 400"},
        {"GET /health HTTP/2.0\r\nHost: x\r\n\r\n", "HTTP/1.1 505"},
        {"POST /tokenize HTTP/1.1\r\nHost: x\r\nExpect: tea\r\nContent-Length: 2\r\n\r\n{}",
         "HTTP/1.1 417"},
        {"POST /tokenize HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: "
         "99999\r\n\r\n",
         "HTTP/1.1 413"},
        {"GET /health HTTP/1.0\r\n\r\n", "HTTP/1.1 200"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char *resp =
            http_raw(d.port, cases[i].raw, strlen(cases[i].raw), HARNESS_HANG_GUARD_S, NULL);
        cr_expect(strncmp(resp, cases[i].want, strlen(cases[i].want)) == 0, "case %zu: got %.120s",
                  i, resp);
        char *id = strcasestr(resp, "x-request-id: ");
        cr_expect(id && strncmp(id + 14, "-\r", 2) != 0, "case %zu: no request id: %.300s", i,
                  resp);
        free(resp);
    }
    /* Expect: 100-continue gets the interim answer before the body is sent */
    int fd = tcp_connect(d.port);
    const char *head = "POST /tokenize HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                       "Connection: close\r\nContent-Length: 19\r\n\r\n";
    send_all(fd, head, strlen(head));
    cr_expect(harness_read_until(fd, "HTTP/1.1 100 Continue\r\n\r\n"), "no 100 Continue");
    send_all(fd, "{\"content\":\"hello\"}", 19);
    char *rest = read_to_eof(fd, NULL);
    cr_expect(strncmp(rest, "HTTP/1.1 200", 12) == 0 && strstr(rest, "\"tokens\""), "%.200s", rest);
    free(rest);
    close(fd);
    expect_healthy(&d);
    cr_expect_eq(daemon_stop(&d), 0);
}

/* ---- API keys (12) ----------------------------------------------------- */

Test(hostile, test_api_keys_are_compared_whole) {
    static char k504[505], k600[601], keys[1200], hdr[1400];
    for (int i = 0; i < 504; i++) k504[i] = (char)('a' + i % 26);
    for (int i = 0; i < 600; i++) k600[i] = (char)('A' + i % 26);
    snprintf(keys, sizeof(keys), "%s,%s", k504, k600);
    daemon_t d;
    const char *args[] = {"--model", harness_synth_model("tiny-f32"), "--api-keys", keys, NULL};
    daemon_start(&d, args);
    struct {
        const char *key, *suffix;
        int status;
    } cases[] = {
        {k504, "", 200}, {k504, "anything", 401}, {k504, "x", 401},
        {k600, "", 200}, {k600, "x", 401},        {"", "", 401},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        snprintf(hdr, sizeof(hdr), "Authorization: Bearer %s%s\r\n", cases[i].key, cases[i].suffix);
        char *body, *head;
        int st = http_req(d.port, "GET", "/v1/models", hdr, NULL, &body, &head);
        cr_expect_eq(st, cases[i].status, "case %zu: %d %s", i, st, body);
        free(body), free(head);
    }
    /* the 600-character key with its last character changed */
    k600[599] = '#';
    snprintf(hdr, sizeof(hdr), "Authorization: Bearer %s\r\n", k600);
    char *body, *head;
    cr_expect_eq(http_req(d.port, "GET", "/v1/models", hdr, NULL, &body, &head), 401);
    free(body), free(head);
    cr_expect_eq(daemon_stop(&d), 0);
}

/* ---- host names and the KV budget (16) --------------------------------- */

static int connect_any(int port, const char *host6) {
    int fd = tcp_connect(port);
    if (fd >= 0) return fd;
    fd = socket(AF_INET6, SOCK_STREAM, 0);
    struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons((uint16_t)port)};
    inet_pton(AF_INET6, host6, &a.sin6_addr);
    if (connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static void expect_health_on(int port) {
    int fd = connect_any(port, "::1");
    cr_assert_geq(fd, 0, "nothing listens on 127.0.0.1 or ::1 port %d", port);
    static const char req[] =
        "GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    send_all(fd, req, sizeof(req) - 1);
    char *got = read_to_eof(fd, NULL);
    cr_expect(strncmp(got, "HTTP/1.1 200", 12) == 0, "%.200s", got);
    free(got);
    close(fd);
}

Test(hostile, test_host_names_and_ipv6_are_accepted) {
    daemon_t d;
    const char *args[] = {"--model", harness_synth_model("tiny-f32"), "--host", "localhost", NULL};
    daemon_start(&d, args);
    expect_health_on(d.port);
    cr_expect_eq(daemon_stop(&d), 0);
    int probe = socket(AF_INET6, SOCK_STREAM, 0);
    struct sockaddr_in6 a = {.sin6_family = AF_INET6};
    inet_pton(AF_INET6, "::1", &a.sin6_addr);
    bool v6 = probe >= 0 && bind(probe, (struct sockaddr *)&a, sizeof(a)) == 0;
    if (probe >= 0) close(probe);
    if (!v6) {
        cr_log_warn("no IPv6 loopback here: --host ::1 not tested");
        return;
    }
    const char *args6[] = {"--model", harness_synth_model("tiny-f32"), "--host", "::1", NULL};
    daemon_start(&d, args6);
    expect_health_on(d.port);
    cr_expect_eq(daemon_stop(&d), 0);
}

Test(hostile, test_small_kv_budget_is_logged_and_advertised) {
    daemon_t d;
    /* small-f32: a 2,048-token context; 1 MiB of f16 KV holds far fewer tokens */
    const char *args[] = {"--model", harness_synth_model("small-f32"), "--kv-mem-mb", "1", NULL};
    daemon_start(&d, args);
    cr_expect_eq(log_count(&d, "\"event\":\"kv_budget\""), 1, "no start-up warning:\n%s", d.log);
    char *body, *head;
    cr_assert_eq(http_req(d.port, "GET", "/v1/models", NULL, NULL, &body, &head), 200);
    cJSON *j = cJSON_Parse(body);
    const cJSON *len =
        cJSON_GetObjectItem(cJSON_GetArrayItem(cJSON_GetObjectItem(j, "data"), 0), "max_model_len");
    cr_assert(cJSON_IsNumber(len), "%s", body);
    double adv = len->valuedouble;
    cr_expect(adv > 0 && adv < 2048, "advertised %g tokens", adv);
    cJSON_Delete(j);
    free(body), free(head);
    /* a request that fits the advertised length runs to its end */
    char req[256];
    snprintf(req, sizeof(req), "{\"prompt\":\"hello\",\"max_tokens\":%d,\"ignore_eos\":true}",
             (int)adv - 8);
    cr_expect_eq(http_req(d.port, "POST", "/v1/completions", NULL, req, &body, &head), 200, "%s",
                 body);
    free(body), free(head);
    /* one past it is refused up front */
    snprintf(req, sizeof(req), "{\"prompt\":\"hello\",\"max_tokens\":%d}", (int)adv + 1);
    cr_expect_eq(http_req(d.port, "POST", "/v1/completions", NULL, req, &body, &head), 400, "%s",
                 body);
    free(body), free(head);
    cr_expect_eq(daemon_stop(&d), 0);
}
