/* http.h - private: one HTTP/1.1 request stream parsed with llhttp, message by message.
 *
 * The parser pauses at the end of every message, so a caller answers
 * pipelined requests strictly in order. Head and body limits are enforced
 * while parsing (431 / 413). Used by the connection code and, unchanged, by
 * the fuzz target and the split-at-every-byte tests.
 *
 * Strict framing (request smuggling): none of llhttp's lenient modes is on, and
 * what llhttp 8.1 still lets through is refused here: obs-fold header lines
 * (RFC 9112 sec. 5.2), chunk data not followed by CRLF (sec. 7.1), HTTP/1.1
 * without exactly one Host (sec. 3.2). A major version other than 1 is 505; an
 * Expect other than 100-continue is 417.
 */
#ifndef TIDALD_SERVER_HTTP_H
#define TIDALD_SERVER_HTTP_H

#include <llhttp.h>
#include <stdbool.h>
#include <stddef.h>

/* Longest Authorization value kept (a longer one matches no key). */
#define SRV_HTTP_AUTH_MAX 4096

typedef struct {
    llhttp_t parser;
    size_t max_head, max_body;
    bool in_message;
    double t_start; /* CLOCK_MONOTONIC when the current message began */
    char url[2048];
    size_t url_len;
    char hfield[32];
    size_t hfield_len;
    int cur_header;
    char auth[SRV_HTTP_AUTH_MAX];
    size_t auth_len;
    bool auth_overflow; /* the Authorization value did not fit: it matches no key */
    char reqid[129];
    size_t reqid_len;
    char expect[32];
    size_t expect_len;
    int n_host;           /* Host header lines in this message */
    bool expect_continue; /* the client waits for 100 Continue before sending the body */
    bool continue_sent;
    char *body; /* released between messages (srv_http_next) */
    size_t body_len, body_cap;
    size_t head_bytes;
    int limit_status;       /* 400, 413, 417, 431 or 505 once this module stopped the parse */
    const char *own_reason; /* why, when it was this module and not llhttp */
    /* framing checks across feeds */
    const char *feed_start, *feed_end; /* the bytes of the current srv_http_feed */
    int crlf_pending; /* after chunk data: 2 = expect CR, 1 = expect LF, 0 = none */
    char prev_nonws;  /* last byte that is not SP/HTAB before the current feed */
} srv_http_t;

typedef enum { SRV_HTTP_MORE, SRV_HTTP_MESSAGE, SRV_HTTP_ERROR } srv_http_rc_t;

void srv_http_init(srv_http_t *h, size_t max_head, size_t max_body);
void srv_http_free(srv_http_t *h);
/* Parse up to len bytes; *used gets how many were consumed. MESSAGE: one whole request is
 * ready (url, method, headers, body); call srv_http_next() before feeding more. */
srv_http_rc_t srv_http_feed(srv_http_t *h, const char *data, size_t len, size_t *used);
void srv_http_next(srv_http_t *h);
/* Bytes held in request buffers (the body) right now. */
size_t srv_http_buffered(const srv_http_t *h);
const char *srv_http_method(const srv_http_t *h);
bool srv_http_keep_alive(const srv_http_t *h);
/* After ERROR: the status to answer (400, 413, 417, 431 or 505) and the reason. */
int srv_http_error_status(const srv_http_t *h);
const char *srv_http_error_reason(const srv_http_t *h);

#endif
