/* http.c - llhttp callbacks collecting one request at a time (see http.h). */
#include "http.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

enum { H_NONE, H_AUTH, H_REQID, H_HOST, H_EXPECT };

static llhttp_settings_t settings;
static bool settings_ready;

static double mono_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static srv_http_t *of(llhttp_t *p) {
    return p->data;
}

static void reset(srv_http_t *h) {
    h->in_message = false;
    h->url_len = 0;
    h->url[0] = 0;
    h->hfield_len = 0;
    h->cur_header = H_NONE;
    h->auth_len = 0;
    h->auth[0] = 0;
    h->auth_overflow = false;
    h->reqid_len = 0;
    h->reqid[0] = 0;
    h->expect_len = 0;
    h->expect[0] = 0;
    h->n_host = 0;
    h->expect_continue = false;
    h->continue_sent = false;
    h->body_len = 0;
    h->head_bytes = 0;
    h->limit_status = 0;
    h->own_reason = NULL;
    h->crlf_pending = 0;
}

/* Stop the parse with a status of our own (returned from a callback as -1). */
static int refuse(srv_http_t *h, int status, const char *reason) {
    h->limit_status = status;
    h->own_reason = reason;
    return -1;
}

static int count_head(srv_http_t *h, size_t n) {
    h->head_bytes += n;
    if (h->head_bytes > h->max_head) {
        h->limit_status = 431;
        return -1;
    }
    return 0;
}

static void append(char *dst, size_t *len, size_t cap, const char *at, size_t n) {
    size_t k = *len + n < cap - 1 ? n : cap - 1 - *len;
    memcpy(dst + *len, at, k);
    *len += k;
    dst[*len] = 0;
}

static int on_message_begin(llhttp_t *p) {
    srv_http_t *h = of(p);
    reset(h);
    h->in_message = true;
    h->t_start = mono_now();
    return 0;
}

static int on_url(llhttp_t *p, const char *at, size_t n) {
    srv_http_t *h = of(p);
    if (count_head(h, n)) return -1;
    if (h->url_len + n >= sizeof(h->url)) {
        h->limit_status = 431;
        return -1;
    }
    append(h->url, &h->url_len, sizeof(h->url), at, n);
    return 0;
}

static int on_header_field(llhttp_t *p, const char *at, size_t n) {
    srv_http_t *h = of(p);
    if (count_head(h, n)) return -1;
    append(h->hfield, &h->hfield_len, sizeof(h->hfield), at, n); /* long names are not ours */
    return 0;
}

static int on_header_field_complete(llhttp_t *p) {
    srv_http_t *h = of(p);
    h->cur_header = H_NONE;
    if (strcasecmp(h->hfield, "authorization") == 0)
        h->cur_header = H_AUTH, h->auth_len = 0, h->auth_overflow = false;
    else if (strcasecmp(h->hfield, "x-request-id") == 0)
        h->cur_header = H_REQID, h->reqid_len = 0;
    else if (strcasecmp(h->hfield, "host") == 0)
        h->cur_header = H_HOST, h->n_host++;
    else if (strcasecmp(h->hfield, "expect") == 0)
        h->cur_header = H_EXPECT, h->expect_len = 0;
    h->hfield_len = 0;
    h->hfield[0] = 0;
    return 0;
}

/* The last byte before `at` that is not SP/HTAB, looking back into earlier feeds if needed. */
static char byte_before(const srv_http_t *h, const char *at, const char *feed_start) {
    const char *q = at;
    while (q > feed_start && (q[-1] == ' ' || q[-1] == '\t')) q--;
    return q > feed_start ? q[-1] : h->prev_nonws;
}

static int on_header_value(llhttp_t *p, const char *at, size_t n) {
    srv_http_t *h = of(p);
    if (count_head(h, n)) return -1;
    /* an empty value ("X-Empty:\r\n", legal) arrives as a span of 0 bytes pointing at the next
     * line: nothing to fold, nothing to keep */
    if (n == 0) return 0;
    /* a value span that starts a line is an obs-fold continuation: llhttp 8.1 joins it to the
     * previous line ("Transfer-Encoding:\r\n chunked" would read as chunked) */
    char before = byte_before(h, at, h->feed_start);
    if (before == '\n' || before == '\r')
        return refuse(h, 400, "obsolete line folding in a header");
    if (h->cur_header == H_EXPECT) {
        append(h->expect, &h->expect_len, sizeof(h->expect), at, n);
    } else if (h->cur_header == H_AUTH) {
        if (h->auth_len + n >= sizeof(h->auth)) h->auth_overflow = true;
        append(h->auth, &h->auth_len, sizeof(h->auth), at, n);
    } else if (h->cur_header == H_REQID)
        append(h->reqid, &h->reqid_len, sizeof(h->reqid), at, n);
    return 0;
}

static int on_headers_complete(llhttp_t *p) {
    srv_http_t *h = of(p);
    if (p->http_major != 1) return refuse(h, 505, "only HTTP/1.x is supported");
    if (p->http_minor == 1 && h->n_host != 1)
        return refuse(h, 400, h->n_host ? "more than one Host header" : "HTTP/1.1 without Host");
    if ((p->flags & F_CONTENT_LENGTH) && p->content_length > h->max_body) {
        h->limit_status = 413;
        return -1;
    }
    if (h->expect_len) {
        if (strcasecmp(h->expect, "100-continue") != 0) return refuse(h, 417, "unsupported Expect");
        h->expect_continue =
            p->http_minor >= 1 &&
            ((p->flags & F_CHUNKED) || ((p->flags & F_CONTENT_LENGTH) && p->content_length > 0));
    }
    return 0;
}

/* Check bytes of the CRLF that must follow chunk data; -1 on anything else. */
static int check_chunk_crlf(srv_http_t *h, const char *at, const char *end) {
    for (; h->crlf_pending && at < end; at++, h->crlf_pending--)
        if (*at != (h->crlf_pending == 2 ? '\r' : '\n'))
            return refuse(h, 400, "chunk data not followed by CRLF");
    return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t n) {
    srv_http_t *h = of(p);
    if (h->body_len + n > h->max_body) {
        h->limit_status = 413;
        return -1;
    }
    if (h->body_len + n + 1 > h->body_cap) {
        size_t cap = (h->body_len + n + 1) * 2;
        char *b = realloc(h->body, cap);
        if (!b) {
            h->limit_status = 413;
            return -1;
        }
        h->body = b;
        h->body_cap = cap;
    }
    memcpy(h->body + h->body_len, at, n);
    h->body_len += n;
    h->body[h->body_len] = 0;
    /* llhttp 8.1 skips the two bytes after chunk data without looking at them */
    if ((p->flags & F_CHUNKED) && p->content_length == 0) {
        h->crlf_pending = 2;
        return check_chunk_crlf(h, at + n, h->feed_end);
    }
    return 0;
}

static int on_message_complete(llhttp_t *p) {
    (void)p;
    return HPE_PAUSED;
}

void srv_http_init(srv_http_t *h, size_t max_head, size_t max_body) {
    if (!settings_ready) { /* loop thread only */
        llhttp_settings_init(&settings);
        settings.on_message_begin = on_message_begin;
        settings.on_url = on_url;
        settings.on_header_field = on_header_field;
        settings.on_header_field_complete = on_header_field_complete;
        settings.on_header_value = on_header_value;
        settings.on_headers_complete = on_headers_complete;
        settings.on_body = on_body;
        settings.on_message_complete = on_message_complete;
        settings_ready = true;
    }
    memset(h, 0, sizeof(*h));
    h->max_head = max_head;
    h->max_body = max_body;
    llhttp_init(&h->parser, HTTP_REQUEST, &settings);
    /* strict by default already; said here so that no one turns one on by accident */
    llhttp_set_lenient_headers(&h->parser, 0);
    llhttp_set_lenient_chunked_length(&h->parser, 0);
    llhttp_set_lenient_keep_alive(&h->parser, 0);
    llhttp_set_lenient_transfer_encoding(&h->parser, 0);
    h->parser.data = h;
    h->prev_nonws = '\n';
}

void srv_http_free(srv_http_t *h) {
    free(h->body);
    h->body = NULL;
    h->body_cap = 0;
}

/* Remember the last byte that is not SP/HTAB of data[0, n) for byte_before(). */
static void note_tail(srv_http_t *h, const char *data, size_t n) {
    while (n && (data[n - 1] == ' ' || data[n - 1] == '\t')) n--;
    if (n) h->prev_nonws = data[n - 1];
}

srv_http_rc_t srv_http_feed(srv_http_t *h, const char *data, size_t len, size_t *used) {
    *used = len;
    if (h->limit_status) return SRV_HTTP_ERROR;
    if (check_chunk_crlf(h, data, data + len)) return SRV_HTTP_ERROR;
    h->feed_start = data;
    h->feed_end = data + len;
    llhttp_errno_t err = llhttp_execute(&h->parser, data, len);
    h->feed_start = h->feed_end = NULL;
    if (err == HPE_OK) {
        note_tail(h, data, len);
        return SRV_HTTP_MORE;
    }
    if (err == HPE_PAUSED) {
        const char *pos = llhttp_get_error_pos(&h->parser);
        *used = pos && pos >= data && pos <= data + len ? (size_t)(pos - data) : len;
        note_tail(h, data, *used);
        return SRV_HTTP_MESSAGE;
    }
    return SRV_HTTP_ERROR;
}

void srv_http_next(srv_http_t *h) {
    llhttp_resume(&h->parser);
    reset(h);
    /* an idle keep-alive connection keeps no body buffer (it may have been megabytes) */
    free(h->body);
    h->body = NULL;
    h->body_cap = 0;
}

size_t srv_http_buffered(const srv_http_t *h) {
    return h->body_cap;
}

const char *srv_http_method(const srv_http_t *h) {
    return llhttp_method_name((llhttp_method_t)h->parser.method);
}

bool srv_http_keep_alive(const srv_http_t *h) {
    return llhttp_should_keep_alive(&h->parser);
}
int srv_http_error_status(const srv_http_t *h) {
    return h->limit_status ? h->limit_status : 400;
}
const char *srv_http_error_reason(const srv_http_t *h) {
    if (h->own_reason) return h->own_reason;
    const char *r = llhttp_get_error_reason(&h->parser);
    return r ? r : "unknown";
}
