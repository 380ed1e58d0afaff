/* request.c - OpenAI completions / chat-completions bodies -> validated engine requests.
 *
 * Every field is type- and range-checked; an error names the field in `param`
 * and the message. Unknown fields are ignored, as OpenAI clients send extras.
 */
#include "api.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

int api_fail(api_error_t *e, int status, const char *type, const char *param, const char *code,
             const char *fmt, ...) {
    e->status = status;
    e->type = type;
    snprintf(e->param, sizeof(e->param), "%s", param ? param : "");
    e->code = code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof(e->message), fmt, ap);
    va_end(ap);
    return -1;
}

#define BAD(e, param, ...) api_fail(e, 400, "invalid_request_error", param, NULL, __VA_ARGS__)

char *api_error_json(const api_error_t *e) {
    cJSON *root = cJSON_CreateObject(), *er = cJSON_AddObjectToObject(root, "error");
    cJSON_AddStringToObject(er, "message", e->message);
    cJSON_AddStringToObject(er, "type", e->type ? e->type : "invalid_request_error");
    if (e->param[0])
        cJSON_AddStringToObject(er, "param", e->param);
    else
        cJSON_AddNullToObject(er, "param");
    if (e->code)
        cJSON_AddStringToObject(er, "code", e->code);
    else
        cJSON_AddNullToObject(er, "code");
    char *s = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    return s;
}

/* Optional number field in [lo, hi]; integer if want_int. Returns 0 absent/ok, -1 error. */
static int num_field(const cJSON *o, const char *name, double lo, double hi, bool want_int,
                     double *out, bool *present, api_error_t *e) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);
    if (present) *present = false;
    if (!v || cJSON_IsNull(v)) return 0;
    if (!cJSON_IsNumber(v)) return BAD(e, name, "'%s' must be a number", name);
    double d = v->valuedouble;
    if (!isfinite(d) || d < lo || d > hi)
        return BAD(e, name, "'%s' must be between %g and %g", name, lo, hi);
    if (want_int && d != floor(d)) return BAD(e, name, "'%s' must be an integer", name);
    *out = d;
    if (present) *present = true;
    return 0;
}

static int bool_field(const cJSON *o, const char *name, bool *out, api_error_t *e) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);
    if (!v || cJSON_IsNull(v)) return 0;
    if (!cJSON_IsBool(v)) return BAD(e, name, "'%s' must be a boolean", name);
    *out = cJSON_IsTrue(v);
    return 0;
}

static int parse_stop(const cJSON *root, eng_req_params_t *p, api_error_t *e) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, "stop");
    if (!v || cJSON_IsNull(v)) return 0;
    const cJSON *one = cJSON_IsString(v) ? v : NULL;
    if (!one && !cJSON_IsArray(v)) return BAD(e, "stop", "'stop' must be a string or a list");
    int n = one ? 1 : cJSON_GetArraySize(v);
    if (n > ENG_MAX_STOP) return BAD(e, "stop", "'stop' may hold at most %d strings", ENG_MAX_STOP);
    for (int i = 0; i < n; i++) {
        const cJSON *s = one ? one : cJSON_GetArrayItem(v, i);
        if (!cJSON_IsString(s)) return BAD(e, "stop", "'stop' entries must be strings");
        size_t l = strlen(s->valuestring);
        if (l == 0 || l > 256) return BAD(e, "stop", "'stop' strings must be 1 to 256 bytes");
        p->stop[p->n_stop] = strdup(s->valuestring);
        if (!p->stop[p->n_stop])
            return api_fail(e, 500, "server_error", NULL, NULL, "out of memory");
        p->n_stop++;
    }
    return 0;
}

/* "attention": {"mode", "token_budget", "selection_layers", "force_sinks", "per_group"} over the
 * server's defaults. */
static int parse_attention(const api_ctx_t *ctx, const cJSON *root, eng_attn_params_t *a,
                           api_error_t *e) {
    *a = ctx->attn;
    const cJSON *o = cJSON_GetObjectItemCaseSensitive(root, "attention");
    if (!o || cJSON_IsNull(o)) return 0;
    if (!cJSON_IsObject(o)) return BAD(e, "attention", "'attention' must be an object");
    const cJSON *mode = cJSON_GetObjectItemCaseSensitive(o, "mode");
    if (mode && !cJSON_IsNull(mode)) {
        if (!cJSON_IsString(mode) ||
            (strcmp(mode->valuestring, "full") && strcmp(mode->valuestring, "tidal")))
            return BAD(e, "attention.mode", "'attention.mode' must be \"full\" or \"tidal\"");
        a->mode = strcmp(mode->valuestring, "tidal") == 0 ? ENG_ATTN_TIDAL : ENG_ATTN_FULL;
    }
    double d;
    bool present;
    if (num_field(o, "token_budget", 1, 1 << 24, true, &d, &present, e)) {
        snprintf(e->param, sizeof(e->param), "attention.token_budget");
        return -1;
    }
    if (present) a->token_budget = (uint32_t)d;
    if (bool_field(o, "force_sinks", &a->force_sinks, e) ||
        bool_field(o, "per_group", &a->per_group, e)) {
        char p[80];
        snprintf(p, sizeof(p), "attention.%.40s", e->param);
        snprintf(e->param, sizeof(e->param), "%.63s", p);
        return -1;
    }
    const cJSON *sl = cJSON_GetObjectItemCaseSensitive(o, "selection_layers");
    if (sl && !cJSON_IsNull(sl)) {
        int n = cJSON_IsArray(sl) ? cJSON_GetArraySize(sl) : -1;
        if (n < 1 || n > ENG_MAX_SEL_LAYERS)
            return BAD(e, "attention.selection_layers",
                       "'attention.selection_layers' must be a list of 1 to %d layer numbers",
                       ENG_MAX_SEL_LAYERS);
        a->n_sel_layers = 0;
        for (int i = 0; i < n; i++) {
            const cJSON *v = cJSON_GetArrayItem(sl, i);
            if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) ||
                v->valuedouble < 0 || v->valuedouble > 4096)
                return BAD(e, "attention.selection_layers",
                           "'attention.selection_layers' entries must be layer numbers");
            a->sel_layers[a->n_sel_layers++] = (uint32_t)v->valuedouble;
        }
    }
    char msg[ENG_ERRMSG_LEN];
    if (eng_attn_check(eng_model_hparams(ctx->model), a, msg))
        return BAD(e, "attention", "%s", msg);
    return 0;
}

static uint64_t fresh_seed(void) {
    static uint64_t counter;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return ((uint64_t)ts.tv_sec * 1000000007ull) ^ (uint64_t)ts.tv_nsec ^ (++counter << 40);
}

/* Chat messages -> prompt text through the model's template. */
static int chat_prompt(const api_ctx_t *ctx, const cJSON *root, char **out, api_error_t *e) {
    const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(root, "messages");
    if (!msgs) return BAD(e, "messages", "'messages' is required");
    if (!cJSON_IsArray(msgs) || cJSON_GetArraySize(msgs) == 0)
        return BAD(e, "messages", "'messages' must be a non-empty list");
    api_tmpl_t t = api_detect_template(eng_tok_chat_template(eng_model_tokenizer(ctx->model)));
    if (t == API_TMPL_NONE)
        return BAD(e, "messages",
                   "this model has no chat template tidald recognises; use /v1/completions");
    int n = cJSON_GetArraySize(msgs);
    api_msg_t *m = calloc((size_t)n, sizeof(api_msg_t));
    char **owned = calloc((size_t)n, sizeof(char *));
    int rc = 0;
    if (!m || !owned) {
        rc = api_fail(e, 500, "server_error", NULL, NULL, "out of memory");
        goto done;
    }
    for (int i = 0; i < n && !rc; i++) {
        const cJSON *msg = cJSON_GetArrayItem(msgs, i);
        char param[48];
        snprintf(param, sizeof(param), "messages[%d]", i);
        const cJSON *role = cJSON_GetObjectItemCaseSensitive(msg, "role");
        const cJSON *content = cJSON_GetObjectItemCaseSensitive(msg, "content");
        if (!cJSON_IsObject(msg) || !cJSON_IsString(role)) {
            rc = BAD(e, param, "%s must be an object with a string 'role'", param);
            break;
        }
        const char *r = role->valuestring;
        if (strcmp(r, "system") && strcmp(r, "user") && strcmp(r, "assistant") &&
            strcmp(r, "developer")) {
            rc = BAD(e, param, "%s: role '%s' must be system, developer, user or assistant", param,
                     r);
            break;
        }
        m[i].role = strcmp(r, "developer") == 0 ? "system" : r;
        if (cJSON_IsString(content)) {
            m[i].content = content->valuestring;
        } else if (cJSON_IsArray(content)) {
            /* content parts: concatenate the text parts */
            size_t total = 0;
            const cJSON *part;
            cJSON_ArrayForEach(part, content) {
                const cJSON *ty = cJSON_GetObjectItemCaseSensitive(part, "type");
                const cJSON *tx = cJSON_GetObjectItemCaseSensitive(part, "text");
                if (!cJSON_IsString(ty) || strcmp(ty->valuestring, "text") || !cJSON_IsString(tx)) {
                    rc = BAD(e, param, "%s: only text content parts are supported", param);
                    break;
                }
                total += strlen(tx->valuestring);
            }
            if (rc) break;
            owned[i] = malloc(total + 1);
            if (!owned[i]) {
                rc = api_fail(e, 500, "server_error", NULL, NULL, "out of memory");
                break;
            }
            owned[i][0] = 0;
            cJSON_ArrayForEach(part, content) {
                strcat(owned[i], cJSON_GetObjectItemCaseSensitive(part, "text")->valuestring);
            }
            m[i].content = owned[i];
        } else if (cJSON_IsNull(content) && strcmp(r, "assistant") == 0) {
            m[i].content = "";
        } else {
            rc = BAD(e, param, "%s: 'content' must be a string or a list of text parts", param);
        }
    }
    if (!rc) {
        *out = api_render_chat(t, m, (size_t)n);
        if (!*out) rc = api_fail(e, 500, "server_error", NULL, NULL, "out of memory");
    }
done:
    for (int i = 0; owned && i < n; i++) free(owned[i]);
    free(owned);
    free(m);
    return rc;
}

static int prompt_tokens(const api_ctx_t *ctx, const cJSON *root, api_req_t *r, api_error_t *e) {
    const eng_tokenizer_t *tok = eng_model_tokenizer(ctx->model);
    char msg[ENG_ERRMSG_LEN];
    size_t n = 0;
    if (r->kind == API_CHAT) {
        char *text = NULL;
        if (chat_prompt(ctx, root, &text, e)) return -1;
        /* templates spell BOS themselves where they need it */
        int rc = eng_tokenize_ex(tok, text, strlen(text), false, true, &r->eng.prompt, &n, msg);
        free(text);
        if (rc) return BAD(e, "messages", "messages: %s", msg);
        r->eng.n_prompt = (uint32_t)n;
        return 0;
    }
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(root, "prompt");
    if (!p) return BAD(e, "prompt", "'prompt' is required");
    if (cJSON_IsString(p)) {
        size_t len = strlen(p->valuestring);
        /* special-token texts become those tokens, as llama.cpp's and vLLM's servers do */
        if (eng_tokenize_ex(tok, p->valuestring, len, eng_tok_add_bos(tok), true, &r->eng.prompt,
                            &n, msg))
            return BAD(e, "prompt", "prompt: %s", msg);
        r->prompt_text = strdup(p->valuestring);
    } else if (cJSON_IsArray(p)) {
        int k = cJSON_GetArraySize(p);
        const cJSON *first = cJSON_GetArrayItem(p, 0);
        if (first && !cJSON_IsNumber(first))
            return BAD(e, "prompt",
                       "'prompt' must be a string or a list of token ids (one prompt "
                       "per request)");
        r->eng.prompt = malloc(sizeof(int32_t) * (size_t)(k ? k : 1));
        if (!r->eng.prompt) return api_fail(e, 500, "server_error", NULL, NULL, "out of memory");
        uint32_t V = eng_tok_n_vocab(tok);
        for (int i = 0; i < k; i++) {
            const cJSON *v = cJSON_GetArrayItem(p, i);
            double d = cJSON_IsNumber(v) ? v->valuedouble : -1;
            if (!cJSON_IsNumber(v) || d != floor(d) || d < 0 || d >= V)
                return BAD(e, "prompt", "prompt[%d] is not a token id in [0, %u)", i, V);
            r->eng.prompt[n++] = (int32_t)d;
        }
    } else {
        return BAD(e, "prompt", "'prompt' must be a string or a list of token ids");
    }
    r->eng.n_prompt = (uint32_t)n;
    return 0;
}

int api_parse_request(const api_ctx_t *ctx, api_kind_t kind, const char *body, size_t len,
                      api_req_t *r, api_error_t *e) {
    memset(r, 0, sizeof(*r));
    r->kind = kind;
    r->logprobs = -1;
    r->eng.logprobs = -1;
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(body, len, &end, false);
    if (!root)
        return BAD(e, NULL, "the body is not valid JSON (near byte %zu)",
                   end ? (size_t)(end - body) : 0);
    int rc = -1;
    double d;
    bool present;
    eng_sampler_params_t *sp = &r->eng.sampling;
    if (!cJSON_IsObject(root)) {
        BAD(e, NULL, "the body must be a JSON object");
        goto done;
    }
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    if (model && !cJSON_IsString(model) && !cJSON_IsNull(model)) {
        BAD(e, "model", "'model' must be a string");
        goto done;
    }
    const cJSON *user = cJSON_GetObjectItemCaseSensitive(root, "user");
    if (user && !cJSON_IsString(user) && !cJSON_IsNull(user)) {
        BAD(e, "user", "'user' must be a string");
        goto done;
    }
    if (num_field(root, "n", 1, 1e9, true, &d, &present, e)) goto done;
    if (present && d > 1) {
        BAD(e, "n", "'n' greater than 1 is not supported; send separate requests");
        goto done;
    }
    eng_sampler_params_default(sp);
    sp->temperature = 1.0f;
    sp->top_k = 0;
    sp->top_p = 1.0f;
    sp->min_p = 0.0f;
    sp->seed = fresh_seed();
    if (num_field(root, "temperature", 0, 2, false, &d, &present, e)) goto done;
    if (present) sp->temperature = (float)d;
    if (num_field(root, "top_p", 0, 1, false, &d, &present, e)) goto done;
    if (present) {
        if (d <= 0) {
            BAD(e, "top_p", "'top_p' must be greater than 0");
            goto done;
        }
        sp->top_p = (float)d;
    }
    if (num_field(root, "top_k", -1, 1 << 24, true, &d, &present, e)) goto done;
    if (present) sp->top_k = (int32_t)d;
    if (num_field(root, "min_p", 0, 1, false, &d, &present, e)) goto done;
    if (present) sp->min_p = (float)d;
    if (num_field(root, "presence_penalty", -2, 2, false, &d, &present, e)) goto done;
    if (present) sp->presence_penalty = (float)d;
    if (num_field(root, "frequency_penalty", -2, 2, false, &d, &present, e)) goto done;
    if (present) sp->frequency_penalty = (float)d;
    if (num_field(root, "repetition_penalty", 0.01, 10, false, &d, &present, e)) goto done;
    if (present) sp->repetition_penalty = (float)d;
    if (num_field(root, "seed", -9.2e18, 1.8e19, true, &d, &present, e)) goto done;
    if (present && d >= 0) sp->seed = (uint64_t)d;
    bool max_given = false;
    r->eng.max_tokens = ctx->default_max_tokens;
    const char *mt_name = "max_tokens";
    if (kind == API_CHAT && cJSON_GetObjectItemCaseSensitive(root, "max_completion_tokens"))
        mt_name = "max_completion_tokens";
    if (num_field(root, mt_name, 1, 1 << 24, true, &d, &max_given, e)) goto done;
    if (max_given) r->eng.max_tokens = (uint32_t)d;
    if (parse_stop(root, &r->eng, e)) goto done;
    if (bool_field(root, "ignore_eos", &r->eng.ignore_eos, e)) goto done; /* as vLLM */
    if (bool_field(root, "stream", &r->stream, e)) goto done;
    const cJSON *so = cJSON_GetObjectItemCaseSensitive(root, "stream_options");
    if (so && !cJSON_IsNull(so)) {
        if (!cJSON_IsObject(so)) {
            BAD(e, "stream_options", "'stream_options' must be an object");
            goto done;
        }
        if (bool_field(so, "include_usage", &r->include_usage, e)) goto done;
    }
    if (kind == API_COMPLETION) {
        if (bool_field(root, "echo", &r->echo, e)) goto done;
        if (num_field(root, "logprobs", 0, ENG_MAX_LOGPROBS, true, &d, &present, e)) goto done;
        if (present) r->logprobs = (int)d;
    } else {
        bool lp = false;
        if (bool_field(root, "logprobs", &lp, e)) goto done;
        if (num_field(root, "top_logprobs", 0, ENG_MAX_LOGPROBS, true, &d, &present, e)) goto done;
        if (present && !lp) {
            BAD(e, "top_logprobs", "'top_logprobs' needs 'logprobs': true");
            goto done;
        }
        if (lp) r->logprobs = present ? (int)d : 0;
    }
    const cJSON *tel = cJSON_GetObjectItemCaseSensitive(root, "telemetry");
    if (tel && !cJSON_IsNull(tel)) {
        if (!cJSON_IsObject(tel)) {
            BAD(e, "telemetry", "'telemetry' must be an object");
            goto done;
        }
        if (bool_field(tel, "entropy", &r->entropy, e)) goto done;
        if (bool_field(tel, "per_head", &r->per_head, e)) goto done;
    }
    if (parse_attention(ctx, root, &r->eng.attn, e)) goto done;
    uint32_t window = ctx->n_ctx;
    if (num_field(root, "ctx_size", 1, 1 << 24, true, &d, &present, e)) goto done;
    if (present) {
        if (d > ctx->n_ctx) {
            BAD(e, "ctx_size", "'ctx_size' may be at most the server's context of %u", ctx->n_ctx);
            goto done;
        }
        window = (uint32_t)d;
    }
    if (prompt_tokens(ctx, root, r, e)) goto done;
    if (r->eng.n_prompt == 0) {
        BAD(e, kind == API_CHAT ? "messages" : "prompt", "the prompt has no tokens");
        goto done;
    }
    /* with eviction the generation may run past the window; the prompt must still fit it */
    uint64_t need = (uint64_t)r->eng.n_prompt + (max_given && !ctx->evict ? r->eng.max_tokens : 1);
    if (need > window) {
        api_fail(e, 400, "invalid_request_error", max_given && !ctx->evict ? mt_name : "prompt",
                 "context_length_exceeded",
                 "this model's context is %u tokens; the request has %u prompt tokens and asks for "
                 "%u more",
                 window, r->eng.n_prompt, max_given && !ctx->evict ? r->eng.max_tokens : 1);
        goto done;
    }
    if (!max_given && !ctx->evict && r->eng.n_prompt + r->eng.max_tokens > window)
        r->eng.max_tokens = window - r->eng.n_prompt;
    r->eng.window = window;
    r->eng.evict = ctx->evict;
    r->eng.sinks = ctx->sinks;
    r->eng.per_head = r->per_head;
    r->eng.logprobs = r->logprobs;
    r->eng.entropy = r->entropy;
    /* deadline: the request's own timeout_s, capped by the server's request_timeout_s */
    double timeout = ctx->request_timeout_s;
    if (num_field(root, "timeout_s", 0.001, 1e7, false, &d, &present, e)) goto done;
    if (present && (timeout <= 0 || d < timeout)) timeout = d;
    if (timeout > 0) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        r->eng.deadline = ts.tv_sec + ts.tv_nsec * 1e-9 + timeout;
    }
    char msg[ENG_ERRMSG_LEN];
    if (eng_sampler_params_check(sp, msg)) {
        BAD(e, NULL, "%s", msg);
        goto done;
    }
    rc = 0;
done:
    cJSON_Delete(root);
    if (rc) api_req_free(r);
    return rc;
}

void api_req_free(api_req_t *r) {
    free(r->eng.prompt);
    for (uint32_t i = 0; i < r->eng.n_stop; i++) free(r->eng.stop[i]);
    free(r->prompt_text);
    memset(r, 0, sizeof(*r));
}

/* ---- /tokenize, /detokenize, /v1/models ------------------------------ */

char *api_tokenize(const api_ctx_t *ctx, const char *body, size_t len, api_error_t *e) {
    cJSON *root = cJSON_ParseWithLength(body, len);
    char *out = NULL;
    if (!cJSON_IsObject(root)) {
        BAD(e, NULL, "the body must be a JSON object");
        goto done;
    }
    const cJSON *content = cJSON_GetObjectItemCaseSensitive(root, "content");
    if (!cJSON_IsString(content)) {
        BAD(e, "content", "'content' must be a string");
        goto done;
    }
    bool add_special = false, parse_special = true;
    if (bool_field(root, "add_special", &add_special, e) ||
        bool_field(root, "parse_special", &parse_special, e))
        goto done;
    int32_t *ids;
    size_t n;
    char msg[ENG_ERRMSG_LEN];
    const eng_tokenizer_t *tok = eng_model_tokenizer(ctx->model);
    if (eng_tokenize_ex(tok, content->valuestring, strlen(content->valuestring), add_special,
                        parse_special, &ids, &n, msg)) {
        BAD(e, "content", "content: %s", msg);
        goto done;
    }
    cJSON *res = cJSON_CreateObject(), *arr = cJSON_AddArrayToObject(res, "tokens");
    for (size_t i = 0; i < n; i++) cJSON_AddItemToArray(arr, cJSON_CreateNumber(ids[i]));
    free(ids);
    out = cJSON_PrintUnformatted(res);
    cJSON_Delete(res);
done:
    cJSON_Delete(root);
    return out;
}

char *api_detokenize(const api_ctx_t *ctx, const char *body, size_t len, api_error_t *e) {
    cJSON *root = cJSON_ParseWithLength(body, len);
    char *out = NULL, *text = NULL;
    if (!cJSON_IsObject(root)) {
        BAD(e, NULL, "the body must be a JSON object");
        goto done;
    }
    const cJSON *toks = cJSON_GetObjectItemCaseSensitive(root, "tokens");
    if (!cJSON_IsArray(toks)) {
        BAD(e, "tokens", "'tokens' must be a list of token ids");
        goto done;
    }
    const eng_tokenizer_t *tok = eng_model_tokenizer(ctx->model);
    uint32_t V = eng_tok_n_vocab(tok);
    int n = cJSON_GetArraySize(toks);
    size_t cap = (size_t)n * 16 + 16, w = 0;
    text = malloc(cap);
    if (!text) {
        api_fail(e, 500, "server_error", NULL, NULL, "out of memory");
        goto done;
    }
    eng_detok_t d;
    eng_detok_init(&d, tok);
    for (int i = 0; i < n; i++) {
        const cJSON *v = cJSON_GetArrayItem(toks, i);
        double x = cJSON_IsNumber(v) ? v->valuedouble : -1;
        if (!cJSON_IsNumber(v) || x != floor(x) || x < 0 || x >= V) {
            BAD(e, "tokens", "tokens[%d] is not a token id in [0, %u)", i, V);
            goto done;
        }
        char piece[512];
        size_t k = eng_detok_push(&d, (int32_t)x, piece, sizeof(piece));
        if (w + k + 8 > cap) {
            cap = (w + k + 8) * 2;
            char *nt = realloc(text, cap);
            if (!nt) {
                api_fail(e, 500, "server_error", NULL, NULL, "out of memory");
                goto done;
            }
            text = nt;
        }
        memcpy(text + w, piece, k);
        w += k;
    }
    w += eng_detok_flush(&d, text + w, 8);
    text[w] = 0;
    cJSON *res = cJSON_CreateObject();
    cJSON_AddStringToObject(res, "content", text);
    out = cJSON_PrintUnformatted(res);
    cJSON_Delete(res);
done:
    free(text);
    cJSON_Delete(root);
    return out;
}

char *api_models_json(const api_ctx_t *ctx, double created) {
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "object", "list");
    cJSON *data = cJSON_AddArrayToObject(root, "data");
    cJSON *m = cJSON_CreateObject();
    cJSON_AddStringToObject(m, "id", ctx->model_name);
    cJSON_AddStringToObject(m, "object", "model");
    cJSON_AddNumberToObject(m, "created", (double)(long long)created);
    cJSON_AddStringToObject(m, "owned_by", "tidald");
    cJSON_AddNumberToObject(m, "max_model_len", ctx->n_ctx);
    cJSON_AddItemToArray(data, m);
    char *s = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    return s;
}
