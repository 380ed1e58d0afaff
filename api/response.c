/* response.c - OpenAI response objects and SSE chunk payloads from engine events. */
#include "api.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A token's text as valid UTF-8 (bytes that do not form a character become U+FFFD), plus
 * its raw bytes. */
static void token_text(const eng_tokenizer_t *tok, int32_t id, char *out, size_t cap, uint8_t *raw,
                       size_t *n_raw) {
    char b[256];
    size_t n = eng_token_bytes(tok, id, b, sizeof(b), NULL);
    if (raw) memcpy(raw, b, n), *n_raw = n;
    eng_detok_t d;
    eng_detok_init(&d, tok);
    /* reuse the streaming detokenizer's validation by feeding the bytes one token at a time */
    size_t w = eng_detok_push(&d, id, out, cap - 4);
    w += eng_detok_flush(&d, out + w, 4);
    out[w] = 0;
}

/* Add n bytes of generated text as a string member. The text may hold NUL bytes (a <0x00>
 * byte token): cJSON_AddStringToObject would end the text there, so it is quoted with its
 * length. */
static void add_text(cJSON *o, const char *name, const char *s, size_t n) {
    char *q = api__json_quote(s, n);
    if (!q || !cJSON_AddRawToObject(o, name, q)) cJSON_AddNullToObject(o, name);
    free(q);
}

static const char *finish_str(sched_finish_t f) {
    return f == SCHED_FINISH_STOP ? "stop" : f == SCHED_FINISH_LENGTH ? "length" : NULL;
}

static cJSON *head(const api_resp_ctx_t *rc, bool chunk) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "id", rc->id);
    const char *obj = rc->req->kind == API_CHAT
                          ? (chunk ? "chat.completion.chunk" : "chat.completion")
                          : "text_completion";
    cJSON_AddStringToObject(o, "object", obj);
    cJSON_AddNumberToObject(o, "created", (double)(long long)rc->created);
    cJSON_AddStringToObject(o, "model", rc->model);
    return o;
}

static cJSON *bytes_array(const uint8_t *b, size_t n) {
    cJSON *a = cJSON_CreateArray();
    for (size_t i = 0; i < n; i++) cJSON_AddItemToArray(a, cJSON_CreateNumber(b[i]));
    return a;
}

/* Chat logprobs entry for one token. */
static cJSON *chat_lp(const api_resp_ctx_t *rc, const sched_event_t *ev) {
    char t[1024];
    uint8_t raw[256];
    size_t nr;
    cJSON *o = cJSON_CreateObject();
    token_text(rc->tok, ev->token, t, sizeof(t), raw, &nr);
    cJSON_AddStringToObject(o, "token", t);
    cJSON_AddNumberToObject(o, "logprob", ev->logprob);
    cJSON_AddItemToObject(o, "bytes", bytes_array(raw, nr));
    cJSON *top = cJSON_AddArrayToObject(o, "top_logprobs");
    for (uint32_t k = 0; k < ev->n_top; k++) {
        cJSON *x = cJSON_CreateObject();
        token_text(rc->tok, ev->top[k].id, t, sizeof(t), raw, &nr);
        cJSON_AddStringToObject(x, "token", t);
        cJSON_AddNumberToObject(x, "logprob", ev->top[k].logprob);
        cJSON_AddItemToObject(x, "bytes", bytes_array(raw, nr));
        cJSON_AddItemToArray(top, x);
    }
    return o;
}

/* Completions (legacy) logprobs object for a run of token events. */
static cJSON *completion_lp(const api_resp_ctx_t *rc, const sched_event_t *ev, size_t n,
                            size_t offset0) {
    cJSON *o = cJSON_CreateObject();
    cJSON *toks = cJSON_AddArrayToObject(o, "tokens"),
          *lps = cJSON_AddArrayToObject(o, "token_logprobs");
    cJSON *tops = cJSON_AddArrayToObject(o, "top_logprobs"),
          *offs = cJSON_AddArrayToObject(o, "text_offset");
    size_t off = offset0;
    char t[1024];
    for (size_t i = 0; i < n; i++) {
        token_text(rc->tok, ev[i].token, t, sizeof(t), NULL, NULL);
        cJSON_AddItemToArray(toks, cJSON_CreateString(t));
        cJSON_AddItemToArray(lps, cJSON_CreateNumber(ev[i].logprob));
        cJSON *top = cJSON_CreateObject();
        for (uint32_t k = 0; k < ev[i].n_top; k++) {
            char a[1024];
            token_text(rc->tok, ev[i].top[k].id, a, sizeof(a), NULL, NULL);
            if (!cJSON_GetObjectItemCaseSensitive(top, a))
                cJSON_AddNumberToObject(top, a, ev[i].top[k].logprob);
        }
        cJSON_AddItemToArray(tops, top);
        cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)off));
        off += ev[i].text_len;
    }
    return o;
}

static char *print(cJSON *o) {
    char *s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return s;
}

static cJSON *float_array(const float *v, uint32_t n) {
    cJSON *a = cJSON_CreateArray();
    for (uint32_t i = 0; i < n; i++) cJSON_AddItemToArray(a, cJSON_CreateNumber(v[i]));
    return a;
}

/* The per-token telemetry object: the sampling entropy, and per layer the attention entropy
 * (bits and normalised), the sink mass and which layers were sparse. */
static cJSON *telemetry(const sched_event_t *ev) {
    cJSON *t = cJSON_CreateObject();
    cJSON_AddNumberToObject(t, "token_entropy_bits", ev->entropy_bits);
    const sched_attn_stats_t *a = ev->attn;
    if (!a) return t;
    cJSON_AddItemToObject(t, "attention_entropy_bits", float_array(a->entropy_bits, a->n_layer));
    cJSON_AddItemToObject(t, "attention_entropy_norm", float_array(a->entropy_norm, a->n_layer));
    cJSON_AddItemToObject(t, "sink_mass", float_array(a->sink_mass, a->n_layer));
    cJSON *sp = cJSON_AddArrayToObject(t, "sparse_layers");
    for (uint32_t l = 0; l < a->n_layer; l++)
        if (a->sparse[l]) cJSON_AddItemToArray(sp, cJSON_CreateNumber(l));
    if (a->head_entropy_bits) {
        cJSON *he = cJSON_AddArrayToObject(t, "attention_entropy_bits_per_head");
        cJSON *hs = cJSON_AddArrayToObject(t, "sink_mass_per_head");
        for (uint32_t l = 0; l < a->n_layer; l++) {
            cJSON_AddItemToArray(
                he, float_array(a->head_entropy_bits + (size_t)l * a->n_head, a->n_head));
            cJSON_AddItemToArray(hs,
                                 float_array(a->head_sink_mass + (size_t)l * a->n_head, a->n_head));
        }
    }
    return t;
}

char *api_stream_chunk(const api_resp_ctx_t *rc, const sched_event_t *ev, bool first) {
    cJSON *o = head(rc, true);
    cJSON *choices = cJSON_AddArrayToObject(o, "choices"), *c = cJSON_CreateObject();
    cJSON_AddItemToArray(choices, c);
    cJSON_AddNumberToObject(c, "index", 0);
    const api_req_t *rq = rc->req;
    size_t plen = first && rq->echo && rq->prompt_text ? strlen(rq->prompt_text) : 0;
    char *text = malloc(plen + ev->text_len + 1);
    if (text) {
        if (plen) memcpy(text, rq->prompt_text, plen);
        if (ev->text_len) memcpy(text + plen, ev->text, ev->text_len);
        text[plen + ev->text_len] = 0;
    }
    bool is_token = ev->token >= 0 && !ev->finish;
    if (rq->kind == API_CHAT) {
        cJSON *delta = cJSON_AddObjectToObject(c, "delta");
        if (first) cJSON_AddStringToObject(delta, "role", "assistant");
        if (text && (plen + ev->text_len || !ev->finish))
            add_text(delta, "content", text, plen + ev->text_len);
        if (rq->logprobs >= 0 && is_token) {
            cJSON *lp = cJSON_AddObjectToObject(c, "logprobs");
            cJSON *content = cJSON_AddArrayToObject(lp, "content");
            cJSON_AddItemToArray(content, chat_lp(rc, ev));
        } else {
            cJSON_AddNullToObject(c, "logprobs");
        }
    } else {
        add_text(c, "text", text ? text : "", text ? plen + ev->text_len : 0);
        if (rq->logprobs >= 0 && is_token)
            cJSON_AddItemToObject(c, "logprobs", completion_lp(rc, ev, 1, rc->text_offset + plen));
        else
            cJSON_AddNullToObject(c, "logprobs");
    }
    free(text);
    const char *fr = finish_str(ev->finish);
    if (fr)
        cJSON_AddStringToObject(c, "finish_reason", fr);
    else
        cJSON_AddNullToObject(c, "finish_reason");
    if (rq->entropy && is_token) cJSON_AddItemToObject(o, "telemetry", telemetry(ev));
    return print(o);
}

char *api_usage_chunk(const api_resp_ctx_t *rc, uint32_t prompt, uint32_t completion) {
    cJSON *o = head(rc, true);
    cJSON_AddArrayToObject(o, "choices");
    cJSON *u = cJSON_AddObjectToObject(o, "usage");
    cJSON_AddNumberToObject(u, "prompt_tokens", prompt);
    cJSON_AddNumberToObject(u, "completion_tokens", completion);
    cJSON_AddNumberToObject(u, "total_tokens", prompt + completion);
    return print(o);
}

char *api_stream_error(const char *message) {
    api_error_t e;
    api_fail(&e, 500, "server_error", NULL, NULL, "%s", message);
    return api_error_json(&e);
}

int api_acc_add(api_acc_t *a, const sched_event_t *ev) {
    if (a->len + ev->text_len + 1 > a->cap) {
        size_t cap = (a->len + ev->text_len + 1) * 2;
        char *t = realloc(a->text, cap);
        if (!t) return a->oom = true, -1;
        a->text = t;
        a->cap = cap;
    }
    if (ev->text_len) memcpy(a->text + a->len, ev->text, ev->text_len);
    a->len += ev->text_len;
    a->text[a->len] = 0;
    if (ev->token >= 0 && !ev->finish) {
        if (a->n_tok == a->cap_tok) {
            size_t cap = a->cap_tok ? a->cap_tok * 2 : 64;
            sched_event_t *t = realloc(a->tok, cap * sizeof(*t));
            if (!t) return a->oom = true, -1;
            a->tok = t;
            a->cap_tok = cap;
        }
        a->tok[a->n_tok] = *ev; /* attention telemetry moves here: the caller drops it */
        a->tok[a->n_tok++].text = NULL;
    }
    return 0;
}

void api_acc_free(api_acc_t *a) {
    for (size_t i = 0; i < a->n_tok; i++) free(a->tok[i].attn);
    free(a->text);
    free(a->tok);
    memset(a, 0, sizeof(*a));
}

char *api_final_response(const api_resp_ctx_t *rc, const api_acc_t *a, sched_finish_t finish,
                         uint32_t prompt, uint32_t completion) {
    const api_req_t *rq = rc->req;
    cJSON *o = head(rc, false);
    cJSON *choices = cJSON_AddArrayToObject(o, "choices"), *c = cJSON_CreateObject();
    cJSON_AddItemToArray(choices, c);
    cJSON_AddNumberToObject(c, "index", 0);
    const char *gen = a->text ? a->text : "";
    size_t plen = rq->echo && rq->prompt_text ? strlen(rq->prompt_text) : 0;
    if (rq->kind == API_CHAT) {
        cJSON *m = cJSON_AddObjectToObject(c, "message");
        cJSON_AddStringToObject(m, "role", "assistant");
        add_text(m, "content", gen, a->text ? a->len : 0);
        if (rq->logprobs >= 0) {
            cJSON *lp = cJSON_AddObjectToObject(c, "logprobs");
            cJSON *content = cJSON_AddArrayToObject(lp, "content");
            for (size_t i = 0; i < a->n_tok; i++)
                cJSON_AddItemToArray(content, chat_lp(rc, &a->tok[i]));
        } else {
            cJSON_AddNullToObject(c, "logprobs");
        }
    } else {
        char *text = malloc(plen + a->len + 1);
        if (text) {
            if (plen) memcpy(text, rq->prompt_text, plen);
            memcpy(text + plen, gen, a->len);
            text[plen + a->len] = 0;
        }
        add_text(c, "text", text ? text : "", text ? plen + a->len : 0);
        free(text);
        if (rq->logprobs >= 0)
            cJSON_AddItemToObject(c, "logprobs", completion_lp(rc, a->tok, a->n_tok, plen));
        else
            cJSON_AddNullToObject(c, "logprobs");
    }
    const char *fr = finish_str(finish);
    if (fr)
        cJSON_AddStringToObject(c, "finish_reason", fr);
    else
        cJSON_AddNullToObject(c, "finish_reason");
    cJSON *u = cJSON_AddObjectToObject(o, "usage");
    cJSON_AddNumberToObject(u, "prompt_tokens", prompt);
    cJSON_AddNumberToObject(u, "completion_tokens", completion);
    cJSON_AddNumberToObject(u, "total_tokens", prompt + completion);
    if (rq->entropy) { /* one object per token, each what its streamed chunk carries */
        cJSON *t = cJSON_AddArrayToObject(o, "telemetry");
        for (size_t i = 0; i < a->n_tok; i++) cJSON_AddItemToArray(t, telemetry(&a->tok[i]));
    }
    return print(o);
}
