/* fuzz_request.c - libFuzzer target for the request path: the bytes of HTTP requests, through
 * the llhttp message parser (with the server's limits), to the validated engine request that
 * api_parse_request builds for completions and chat completions.
 *
 * Build and run: make fuzz (FUZZ_SECONDS=N). make test runs a short smoke pass.
 */
#include "../../api/api.h"
#include "../../server/http.h"
#include "../../tools/synth_model.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static eng_model_t *model;
static api_ctx_t ctx;

static void setup(void) {
    char path[128], msg[256] = {0};
    snprintf(path, sizeof(path), "/tmp/tidald-fuzz-%d.gguf", (int)getpid());
    if (synth_write("tiny-f32", path, 0, msg) != 0 || eng_model_load(&model, path, msg) != 0) {
        fprintf(stderr, "fuzz setup: %s\n", msg);
        abort();
    }
    unlink(path); /* the mapping stays valid */
    ctx = (api_ctx_t){model, "tiny", 256, 16, 0};
}

static void handle(const srv_http_t *h) {
    api_kind_t kind;
    if (strcmp(h->url, "/v1/completions") == 0)
        kind = API_COMPLETION;
    else if (strcmp(h->url, "/v1/chat/completions") == 0)
        kind = API_CHAT;
    else if (strcmp(h->url, "/tokenize") == 0 || strcmp(h->url, "/detokenize") == 0) {
        api_error_t e;
        char *out = h->url[1] == 't'
                        ? api_tokenize(&ctx, h->body ? h->body : "", h->body_len, &e)
                        : api_detokenize(&ctx, h->body ? h->body : "", h->body_len, &e);
        free(out);
        return;
    } else
        return;
    if (!eng_utf8_valid(h->body, h->body_len)) return;
    api_req_t r;
    api_error_t e;
    if (api_parse_request(&ctx, kind, h->body ? h->body : "", h->body_len, &r, &e) == 0) {
        if (r.eng.n_prompt == 0 || r.eng.max_tokens == 0 || r.eng.n_prompt >= ctx.n_ctx) abort();
        api_req_free(&r);
    } else {
        char *j = api_error_json(&e);
        if (!j || e.status < 400) abort();
        free(j);
    }
}

/* Messages parsed and the final status (0, or the error status) when the bytes are fed in two
 * pieces cut at `cut`: the framing checks that span feeds must not depend on where reads end. */
static int parse_split(const char *p, size_t size, size_t cut, int *status) {
    srv_http_t h;
    srv_http_init(&h, 16384, 1 << 20);
    int n = 0;
    *status = 0;
    size_t piece[2] = {cut, size - cut};
    for (int k = 0; k < 2 && !*status; k++) {
        size_t left = piece[k];
        while (left) {
            size_t used;
            srv_http_rc_t rc = srv_http_feed(&h, p, left, &used);
            if (rc == SRV_HTTP_ERROR) {
                *status = srv_http_error_status(&h);
                break;
            }
            if (rc == SRV_HTTP_MESSAGE) {
                n++;
                srv_http_next(&h);
            }
            p += used;
            left -= used;
        }
    }
    srv_http_free(&h);
    return n;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!model) setup();
    if (size > 1) {
        int st_whole, st_split;
        int whole = parse_split((const char *)data, size, size, &st_whole);
        int split = parse_split((const char *)data, size, 1 + data[0] % (size - 1), &st_split);
        if (whole != split || st_whole != st_split) abort(); /* split-dependent framing */
    }
    srv_http_t h;
    srv_http_init(&h, 16384, 1 << 20);
    const char *p = (const char *)data;
    while (size) {
        size_t used;
        srv_http_rc_t rc = srv_http_feed(&h, p, size, &used);
        if (rc != SRV_HTTP_MESSAGE) break;
        handle(&h);
        srv_http_next(&h);
        p += used;
        size -= used;
    }
    srv_http_free(&h);
    return 0;
}
