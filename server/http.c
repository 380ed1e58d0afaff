/* http.c - llhttp callbacks collecting one request at a time (see http.h). */
#include "http.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

enum { H_NONE, H_AUTH, H_REQID };

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
    h->reqid_len = 0;
    h->reqid[0] = 0;
    h->body_len = 0;
    h->head_bytes = 0;
    h->limit_status = 0;
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
        h->cur_header = H_AUTH, h->auth_len = 0;
    else if (strcasecmp(h->hfield, "x-request-id") == 0)
        h->cur_header = H_REQID, h->reqid_len = 0;
    h->hfield_len = 0;
    h->hfield[0] = 0;
    return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t n) {
    srv_http_t *h = of(p);
    if (count_head(h, n)) return -1;
    if (h->cur_header == H_AUTH)
        append(h->auth, &h->auth_len, sizeof(h->auth), at, n);
    else if (h->cur_header == H_REQID)
        append(h->reqid, &h->reqid_len, sizeof(h->reqid), at, n);
    return 0;
}

static int on_headers_complete(llhttp_t *p) {
    srv_http_t *h = of(p);
    if ((p->flags & F_CONTENT_LENGTH) && p->content_length > h->max_body) {
        h->limit_status = 413;
        return -1;
    }
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
    h->parser.data = h;
}

void srv_http_free(srv_http_t *h) {
    free(h->body);
    h->body = NULL;
    h->body_cap = 0;
}

srv_http_rc_t srv_http_feed(srv_http_t *h, const char *data, size_t len, size_t *used) {
    llhttp_errno_t err = llhttp_execute(&h->parser, data, len);
    if (err == HPE_OK) {
        *used = len;
        return SRV_HTTP_MORE;
    }
    if (err == HPE_PAUSED) {
        const char *pos = llhttp_get_error_pos(&h->parser);
        *used = pos && pos >= data && pos <= data + len ? (size_t)(pos - data) : len;
        return SRV_HTTP_MESSAGE;
    }
    *used = len;
    return SRV_HTTP_ERROR;
}

void srv_http_next(srv_http_t *h) {
    llhttp_resume(&h->parser);
    reset(h);
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
    const char *r = llhttp_get_error_reason(&h->parser);
    return r ? r : "unknown";
}
