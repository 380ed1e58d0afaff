/* test_http.c - the request-stream parser: every request split at every byte parses the same,
 * pipelined messages come out one at a time, limits give 431/413, garbage gives 400. */
#include "../../server/http.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    char method[16], url[2048], auth[SRV_HTTP_AUTH_MAX], reqid[129], body[512];
    size_t body_len;
    bool keep_alive;
} msg_t;

/* Feed `raw` in pieces cut at the given offsets; collect messages. Returns count or -status. */
static int parse_cut(const char *raw, size_t len, const size_t *cuts, int n_cuts, msg_t *out,
                     int max) {
    srv_http_t h;
    srv_http_init(&h, 1024, 256);
    int n = 0, status = 0;
    size_t start = 0;
    for (int k = 0; k <= n_cuts && !status; k++) {
        size_t end = k < n_cuts ? cuts[k] : len;
        const char *p = raw + start;
        size_t left = end - start;
        while (left && !status) {
            size_t used;
            srv_http_rc_t rc = srv_http_feed(&h, p, left, &used);
            if (rc == SRV_HTTP_ERROR) {
                status = srv_http_error_status(&h);
                break;
            }
            if (rc == SRV_HTTP_MESSAGE) {
                if (n < max) {
                    msg_t *m = &out[n];
                    snprintf(m->method, sizeof(m->method), "%s", srv_http_method(&h));
                    snprintf(m->url, sizeof(m->url), "%s", h.url);
                    snprintf(m->auth, sizeof(m->auth), "%s", h.auth);
                    snprintf(m->reqid, sizeof(m->reqid), "%s", h.reqid);
                    m->body_len = h.body_len;
                    memcpy(m->body, h.body ? h.body : "", h.body_len);
                    m->keep_alive = srv_http_keep_alive(&h);
                }
                n++;
                srv_http_next(&h);
            }
            p += used;
            left -= used;
        }
        start = end;
    }
    srv_http_free(&h);
    return status ? -status : n;
}

static const char *REQS =
    "POST /v1/completions?x=1 HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer k1\r\n"
    "X-Request-Id: abc\r\nContent-Length: 15\r\n\r\n{\"prompt\":\"hi\"}"
    "GET /health HTTP/1.1\r\nHost: a\r\n\r\n"
    "POST /tokenize HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    "4\r\n{\"co\r\n10\r\nntent\":\"hello\"} \r\n0\r\n\r\n";

static void check(const msg_t *m, int n) {
    cr_assert_eq(n, 3);
    cr_expect_str_eq(m[0].method, "POST");
    cr_expect_str_eq(m[0].url, "/v1/completions?x=1");
    cr_expect_str_eq(m[0].auth, "Bearer k1");
    cr_expect_str_eq(m[0].reqid, "abc");
    cr_expect_eq(m[0].body_len, 15);
    cr_expect(memcmp(m[0].body, "{\"prompt\":\"hi\"}", 15) == 0);
    cr_expect(m[0].keep_alive);
    cr_expect_str_eq(m[1].method, "GET");
    cr_expect_str_eq(m[1].url, "/health");
    cr_expect_eq(m[1].body_len, 0);
    cr_expect_eq(m[2].body_len, 20);
    cr_expect(memcmp(m[2].body, "{\"content\":\"hello\"} ", 20) == 0);
    cr_expect(!m[2].keep_alive);
}

Test(http, test_every_split_point_parses_the_same) {
    size_t len = strlen(REQS);
    msg_t m[4];
    check(m, parse_cut(REQS, len, NULL, 0, m, 4));
    for (size_t cut = 1; cut < len; cut++) {
        memset(m, 0, sizeof(m));
        int n = parse_cut(REQS, len, &cut, 1, m, 4);
        cr_assert_eq(n, 3, "split at %zu gave %d messages", cut, n);
        check(m, n);
    }
    /* and byte by byte */
    size_t *cuts = malloc(sizeof(size_t) * len);
    for (size_t i = 0; i < len; i++) cuts[i] = i + 1;
    memset(m, 0, sizeof(m));
    check(m, parse_cut(REQS, len, cuts, (int)len - 1, m, 4));
    free(cuts);
}

Test(http, test_limits_and_garbage_give_the_right_status) {
    msg_t m[2];
    char big[2048];
    int k = snprintf(big, sizeof(big), "GET / HTTP/1.1\r\nX-A: ");
    memset(big + k, 'a', 1100);
    strcpy(big + k + 1100, "\r\n\r\n");
    cr_expect_eq(parse_cut(big, strlen(big), NULL, 0, m, 2), -431);
    const char *body = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 300\r\n\r\n";
    cr_expect_eq(parse_cut(body, strlen(body), NULL, 0, m, 2), -413);
    const char *chunky = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n200\r\n";
    char c2[1024];
    snprintf(c2, sizeof(c2), "%s%0512d", chunky, 0);
    cr_expect_eq(parse_cut(c2, strlen(c2), NULL, 0, m, 2), -413);
    const char *bad[] = {"NOPE\r\n\r\n", "GET / HTTP/1.1\r\nNo colon\r\n\r\n",
                         "GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", "\x01\x02\r\n"};
    for (int i = 0; i < 4; i++)
        cr_expect_eq(parse_cut(bad[i], strlen(bad[i]), NULL, 0, m, 2), -400, "case %d", i);
}

/* The status a request gets, fed whole and split at every byte: every split must agree. */
static int status_every_split(const char *raw) {
    size_t len = strlen(raw);
    msg_t m[2];
    int whole = parse_cut(raw, len, NULL, 0, m, 2);
    for (size_t cut = 1; cut < len; cut++) {
        int n = parse_cut(raw, len, &cut, 1, m, 2);
        cr_assert_eq(n, whole, "split at %zu gave %d, whole gave %d: %s", cut, n, whole, raw);
    }
    return whole;
}

/* Request-smuggling primitives llhttp 8.1 lets through by itself. */
Test(http, test_obs_fold_and_bad_chunk_terminator_are_refused) {
    cr_expect_eq(status_every_split("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n chunked"
                                    "\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
                 -400);
    cr_expect_eq(status_every_split("GET / HTTP/1.1\r\nHost: a\r\nX-A: a\r\n\tb\r\n\r\n"), -400);
    cr_expect_eq(status_every_split("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                                    "\r\n5\r\nhelloXY0\r\n\r\n"),
                 -400);
    cr_expect_eq(status_every_split("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                                    "\r\n5\r\nhello\rX0\r\n\r\n"),
                 -400);
    cr_expect_eq(status_every_split("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n"
                                    "Transfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n"),
                 -400);
    /* the well-formed versions parse, and whitespace around values is still fine */
    cr_expect_eq(
        status_every_split("POST / HTTP/1.1\r\nHost:   a  \r\nTransfer-Encoding: chunked\r\n"
                           "\r\n5\r\nhello\r\n2\r\nab\r\n0\r\n\r\n"),
        1);
}

/* An empty header value is legal (curl -H 'X;' sends one): it once read as a fold, since
 * llhttp hands it over as a 0-byte span that points at the next line. */
Test(http, test_empty_header_values_are_not_folds) {
    cr_expect_eq(status_every_split("GET / HTTP/1.1\r\nHost: a\r\nX-Empty:\r\n\r\n"), 1);
    cr_expect_eq(status_every_split("GET / HTTP/1.1\r\nHost: a\r\nX-Empty: \r\n\r\n"), 1);
    cr_expect_eq(status_every_split("GET / HTTP/1.1\r\nX-Empty:\r\nHost: a\r\n\r\n"), 1);
    /* a fold after an empty value is still one */
    cr_expect_eq(status_every_split("POST / HTTP/1.1\r\nHost: a\r\nX:\r\n\tContent-Length: 2"
                                    "\r\n\r\nab"),
                 -400);
}

Test(http, test_host_version_and_expect_rules) {
    cr_expect_eq(status_every_split("GET / HTTP/1.1\r\n\r\n"), -400);
    cr_expect_eq(status_every_split("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"), -400);
    cr_expect_eq(status_every_split("GET / HTTP/1.0\r\n\r\n"), 1); /* 1.0 needs no Host */
    cr_expect_eq(status_every_split("GET / HTTP/2.0\r\nHost: a\r\n\r\n"), -505);
    cr_expect_eq(status_every_split("POST / HTTP/1.1\r\nHost: a\r\nExpect: tea\r\n"
                                    "Content-Length: 1\r\n\r\nx"),
                 -417);
    /* 100-continue: flagged at the head, before any body byte */
    srv_http_t h;
    srv_http_init(&h, 1024, 256);
    const char *head = "POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\n"
                       "Content-Length: 2\r\n\r\n";
    size_t used;
    cr_assert_eq(srv_http_feed(&h, head, strlen(head), &used), SRV_HTTP_MORE);
    cr_expect(h.expect_continue);
    cr_assert_eq(srv_http_feed(&h, "ok", 2, &used), SRV_HTTP_MESSAGE);
    cr_expect_eq(h.body_len, 2);
    srv_http_next(&h);
    cr_expect(!h.expect_continue);
    srv_http_free(&h);
    /* too large with Expect: 413 before the body */
    cr_expect_eq(status_every_split("POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
                                    "Content-Length: 300\r\n\r\n"),
                 -413);
}

Test(http, test_body_buffer_is_released_between_messages) {
    srv_http_t h;
    srv_http_init(&h, 1024, 256);
    const char *req = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 200\r\n\r\n";
    size_t used;
    cr_assert_eq(srv_http_feed(&h, req, strlen(req), &used), SRV_HTTP_MORE);
    char body[200];
    memset(body, 'x', sizeof(body));
    cr_assert_eq(srv_http_feed(&h, body, sizeof(body), &used), SRV_HTTP_MESSAGE);
    cr_expect_geq(srv_http_buffered(&h), 200);
    srv_http_next(&h);
    cr_expect_eq(srv_http_buffered(&h), 0);
    srv_http_free(&h);
}
