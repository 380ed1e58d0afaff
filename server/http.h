/* http.h - private: one HTTP/1.1 request stream parsed with llhttp, message by message.
 *
 * The parser pauses at the end of every message, so a caller answers
 * pipelined requests strictly in order. Head and body limits are enforced
 * while parsing (431 / 413). Used by the connection code and, unchanged, by
 * the fuzz target and the split-at-every-byte tests.
 */
#ifndef TIDALD_SERVER_HTTP_H
#define TIDALD_SERVER_HTTP_H

#include <llhttp.h>
#include <stdbool.h>
#include <stddef.h>

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
    char auth[512];
    size_t auth_len;
    char reqid[129];
    size_t reqid_len;
    char *body;
    size_t body_len, body_cap;
    size_t head_bytes;
    int limit_status; /* 431 or 413 once a limit stopped the parse */
} srv_http_t;

typedef enum { SRV_HTTP_MORE, SRV_HTTP_MESSAGE, SRV_HTTP_ERROR } srv_http_rc_t;

void srv_http_init(srv_http_t *h, size_t max_head, size_t max_body);
void srv_http_free(srv_http_t *h);
/* Parse up to len bytes; *used gets how many were consumed. MESSAGE: one whole request is
 * ready (url, method, headers, body); call srv_http_next() before feeding more. */
srv_http_rc_t srv_http_feed(srv_http_t *h, const char *data, size_t len, size_t *used);
void srv_http_next(srv_http_t *h);
const char *srv_http_method(const srv_http_t *h);
bool srv_http_keep_alive(const srv_http_t *h);
/* After ERROR: the status to answer (400, 413 or 431) and llhttp's reason. */
int srv_http_error_status(const srv_http_t *h);
const char *srv_http_error_reason(const srv_http_t *h);

#endif
