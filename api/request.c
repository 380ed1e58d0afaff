/* request.c - OpenAI completions / chat-completions bodies -> validated engine requests.
 *
 * Every field is type- and range-checked; an error names the field in `param`
 * and the message. OpenAI fields tidald does not implement are refused unless they hold the
 * value that asks for nothing (see `unsupported` below); other unknown fields are ignored, as
 * OpenAI clients send extras.
 *
 * Cost: every function here is O(body length). Arrays are walked once through ->next
 * (cJSON_GetArrayItem and cJSON_GetArraySize are themselves O(n)), and each is bounded --
 * by the context window or a fixed limit -- by a count that stops just past the bound.
 * Nothing here touches shared mutable state except fresh_seed's atomic counter, so parsing
 * may run on any thread.
 */
#define _GNU_SOURCE /* memmem */
#include "api.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdatomic.h>
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
    /* integer limits print as integers: %g would write 1 << 24 as 1.67772e+07 */
    if (!isfinite(d) || d < lo || d > hi)
        return want_int
                   ? BAD(e, name, "'%s' must be an integer between %.0f and %.0f", name, lo, hi)
                   : BAD(e, name, "'%s' must be between %g and %g", name, lo, hi);
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

/* Entries of a JSON array counted in one walk that stops past max: the count, or max + 1 when
 * there are more. (cJSON_GetArraySize walks the whole list, however long.) */
static size_t array_count(const cJSON *a, size_t max) {
    size_t n = 0;
    for (const cJSON *it = a->child; it && n <= max; it = it->next) n++;
    return n;
}

static int parse_stop(const cJSON *root, sched_req_params_t *p, api_error_t *e) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, "stop");
    if (!v || cJSON_IsNull(v)) return 0;
    const cJSON *one = cJSON_IsString(v) ? v : NULL;
    if (!one && !cJSON_IsArray(v)) return BAD(e, "stop", "'stop' must be a string or a list");
    if (!one && array_count(v, SCHED_MAX_STOP) > SCHED_MAX_STOP)
        return BAD(e, "stop", "'stop' may hold at most %d strings", SCHED_MAX_STOP);
    for (const cJSON *s = one ? one : v->child; s; s = one ? NULL : s->next) {
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
        size_t n = cJSON_IsArray(sl) ? array_count(sl, ENG_MAX_SEL_LAYERS) : 0;
        if (n < 1 || n > ENG_MAX_SEL_LAYERS)
            return BAD(e, "attention.selection_layers",
                       "'attention.selection_layers' must be a list of 1 to %d layer numbers",
                       ENG_MAX_SEL_LAYERS);
        a->n_sel_layers = 0;
        const cJSON *v;
        cJSON_ArrayForEach(v, sl) {
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

/* A seed for a request that gives none. The counter separates requests parsed in the same
 * nanosecond; it is atomic because parsing may run on worker threads. */
static uint64_t fresh_seed(void) {
    static _Atomic uint64_t counter;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t k = atomic_fetch_add_explicit(&counter, 1, memory_order_relaxed) + 1;
    return ((uint64_t)ts.tv_sec * 1000000007ull) ^ (uint64_t)ts.tv_nsec ^ (k << 40);
}

/* The window a request runs in: the server's context, or a smaller one the request asked for
 * with "ctx_size". Messages name which, with its size. */
typedef struct {
    uint32_t n;
    bool from_request;
} window_t;

static const char *window_name(const window_t *w) {
    return w->from_request ? "the request's ctx_size" : "the server's context window";
}

/* A non-null messages[i].tool_calls / function_call: replaying tool calls is not implemented. */
static int chat_tool_fields(const cJSON *msg, const char *param, api_error_t *e) {
    static const char *const fields[] = {"tool_calls", "function_call"};
    for (size_t k = 0; k < sizeof(fields) / sizeof(fields[0]); k++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(msg, fields[k]);
        if (!v || cJSON_IsNull(v) || (cJSON_IsArray(v) && !v->child)) continue;
        char p[64];
        snprintf(p, sizeof(p), "%.40s.%s", param, fields[k]);
        return api_fail(e, 400, "invalid_request_error", p, "unsupported_parameter",
                        "'%s' is not supported: tidald has no tool calling", p);
    }
    return 0;
}

/* Chat messages -> prompt text through the model's template. Every message costs at least one
 * token, so a list longer than the window is refused before it is walked. */
static int chat_prompt(const api_ctx_t *ctx, const cJSON *root, const window_t *win, char **out,
                       api_error_t *e) {
    const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(root, "messages");
    if (!msgs) return BAD(e, "messages", "'messages' is required");
    size_t n = cJSON_IsArray(msgs) ? array_count(msgs, win->n) : 0;
    if (n == 0) return BAD(e, "messages", "'messages' must be a non-empty list");
    if (n > win->n)
        return api_fail(e, 400, "invalid_request_error", "messages", "context_length_exceeded",
                        "'messages' holds more than %u messages; %s is %u tokens and every "
                        "message takes at least one",
                        win->n, window_name(win), win->n);
    api_tmpl_t t = api_model_template(eng_model_tokenizer(ctx->model));
    if (t == API_TMPL_NONE)
        return BAD(e, "messages",
                   "this model has no chat template tidald recognises; use /v1/completions");
    api_msg_t *m = calloc(n, sizeof(api_msg_t));
    char **owned = calloc(n, sizeof(char *));
    int rc = 0;
    if (!m || !owned) {
        rc = api_fail(e, 500, "server_error", NULL, NULL, "out of memory");
        goto done;
    }
    size_t i = 0;
    const cJSON *msg;
    cJSON_ArrayForEach(msg, msgs) {
        char param[48];
        snprintf(param, sizeof(param), "messages[%zu]", i);
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
        if ((rc = chat_tool_fields(msg, param, e))) break;
        m[i].role = strcmp(r, "developer") == 0 ? "system" : r;
        if (cJSON_IsString(content)) {
            m[i].content = content->valuestring;
        } else if (cJSON_IsArray(content)) {
            /* content parts: concatenate the text parts (one pass to size, one to copy) */
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
            size_t w = 0;
            cJSON_ArrayForEach(part, content) {
                const char *tx = cJSON_GetObjectItemCaseSensitive(part, "text")->valuestring;
                size_t l = strlen(tx);
                memcpy(owned[i] + w, tx, l);
                w += l;
            }
            owned[i][w] = 0;
            m[i].content = owned[i];
        } else if (cJSON_IsNull(content) && strcmp(r, "assistant") == 0) {
            m[i].content = "";
        } else {
            rc = BAD(e, param, "%s: 'content' must be a string or a list of text parts", param);
            break;
        }
        i++;
    }
    if (!rc) {
        char *sys =
            api_template_default_system(eng_tok_chat_template(eng_model_tokenizer(ctx->model)));
        *out = api_render_chat_ex(t, sys, m, n);
        free(sys);
        if (!*out) rc = api_fail(e, 500, "server_error", NULL, NULL, "out of memory");
    }
done:
    for (size_t k = 0; owned && k < n; k++) free(owned[k]);
    free(owned);
    free(m);
    return rc;
}

/* The prompt as token ids. A list of ids longer than the window is refused before it is
 * walked; the caller checks the tokenized length against the window. */
static int prompt_tokens(const api_ctx_t *ctx, const cJSON *root, const window_t *win, api_req_t *r,
                         api_error_t *e) {
    const eng_tokenizer_t *tok = eng_model_tokenizer(ctx->model);
    char msg[ENG_ERRMSG_LEN];
    size_t n = 0;
    if (r->kind == API_CHAT) {
        char *text = NULL;
        if (chat_prompt(ctx, root, win, &text, e)) return -1;
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
        if (p->child && !cJSON_IsNumber(p->child))
            return BAD(e, "prompt",
                       "'prompt' must be a string or a list of token ids (one prompt "
                       "per request)");
        size_t k = array_count(p, win->n);
        if (k > win->n)
            return api_fail(e, 400, "invalid_request_error", "prompt", "context_length_exceeded",
                            "the prompt has more than %u token ids; %s is %u tokens", win->n,
                            window_name(win), win->n);
        r->eng.prompt = malloc(sizeof(int32_t) * (k ? k : 1));
        if (!r->eng.prompt) return api_fail(e, 500, "server_error", NULL, NULL, "out of memory");
        uint32_t V = eng_tok_n_vocab(tok);
        const cJSON *v;
        cJSON_ArrayForEach(v, p) {
            double d = cJSON_IsNumber(v) ? v->valuedouble : -1;
            if (!cJSON_IsNumber(v) || d != floor(d) || d < 0 || d >= V)
                return BAD(e, "prompt", "prompt[%zu] is not a token id in [0, %u)", n, V);
            r->eng.prompt[n++] = (int32_t)d;
        }
    } else {
        return BAD(e, "prompt", "'prompt' must be a string or a list of token ids");
    }
    r->eng.n_prompt = (uint32_t)n;
    return 0;
}

/* ---- NUL characters ---------------------------------------------------- */

/* A body holding a NUL character in a string -- the escape \u0000, or a raw zero byte. cJSON's
 * strings are NUL-terminated without a length, so whatever follows the NUL would silently
 * vanish; such bodies are refused instead. Returns true and puts in key the object key under
 * which the NUL was found ("" for none, e.g. inside a top-level array). The body must have
 * parsed as JSON, so a backslash can only start an escape inside a string. O(len). */
static bool body_has_nul(const char *b, size_t len, char *key, size_t key_cap) {
    key[0] = 0;
    if (!memchr(b, 0, len) && !memmem(b, len, "u0000", 5)) return false; /* the common case */
    const char *last_key = NULL, *str = NULL;
    size_t last_key_len = 0;
    bool found = false;
    for (size_t i = 0; i < len; i++) {
        char c = b[i];
        if (c == 0 && !str) {
            found = true;
            break;
        }
        if (!str) {
            if (c == '"') str = b + i + 1;
            continue;
        }
        if (c == 0) {
            found = true;
        } else if (c == '\\' && i + 1 < len) {
            if (b[i + 1] == 'u' && i + 5 < len && memcmp(b + i + 2, "0000", 4) == 0) found = true;
            i += b[i + 1] == 'u' ? 5 : 1;
        } else if (c == '"') {
            size_t j = i + 1;
            while (j < len && (b[j] == ' ' || b[j] == '\t' || b[j] == '\n' || b[j] == '\r')) j++;
            bool is_key = j < len && b[j] == ':';
            if (is_key) last_key = str, last_key_len = (size_t)(b + i - str);
            str = NULL;
            if (found) break;
        }
    }
    if (found && last_key) {
        size_t n = last_key_len < key_cap - 1 ? last_key_len : key_cap - 1;
        memcpy(key, last_key, n);
        key[n] = 0;
    }
    return found;
}

static int refuse_nul(const char *body, size_t len, api_error_t *e) {
    char key[64];
    if (!body_has_nul(body, len, key, sizeof(key))) return 0;
    if (!key[0])
        return BAD(e, NULL,
                   "the body contains a NUL character (\\u0000), which tidald does not accept");
    return BAD(e, key, "'%s' contains a NUL character (\\u0000), which tidald does not accept",
               key);
}

/* ---- OpenAI fields tidald does not implement --------------------------- */

static bool is_one(const cJSON *v) {
    return cJSON_IsNumber(v) && v->valuedouble == 1;
}
static bool is_zero(const cJSON *v) {
    return cJSON_IsNumber(v) && v->valuedouble == 0;
}
static bool is_false(const cJSON *v) {
    return cJSON_IsFalse(v);
}
static bool is_bool(const cJSON *v) {
    return cJSON_IsBool(v);
}
static bool is_empty_string(const cJSON *v) {
    return cJSON_IsString(v) && !v->valuestring[0];
}
static bool is_empty_object(const cJSON *v) {
    return cJSON_IsObject(v) && !v->child;
}
static bool is_empty_array(const cJSON *v) {
    return cJSON_IsArray(v) && !v->child;
}
static bool is_none_or_auto(const cJSON *v) {
    /* "auto" with no tools (any tools are refused) means no tool call either */
    return cJSON_IsString(v) &&
           (!strcmp(v->valuestring, "none") || !strcmp(v->valuestring, "auto"));
}
static bool is_text_format(const cJSON *v) {
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(v, "type");
    return cJSON_IsObject(v) && cJSON_IsString(t) && !strcmp(t->valuestring, "text") && !t->next &&
           t == v->child;
}
static bool is_text_modalities(const cJSON *v) {
    if (!cJSON_IsArray(v)) return false;
    const cJSON *x;
    cJSON_ArrayForEach(x, v) if (!cJSON_IsString(x) || strcmp(x->valuestring, "text")) return false;
    return true;
}

#define K_CMPL (1u << API_COMPLETION)
#define K_CHAT (1u << API_CHAT)

/* Request fields (OpenAI's, and a few llama.cpp / vLLM extensions clients send) that ask for
 * behaviour tidald does not have. null, and the value given in `accepted` -- what clients send
 * by habit and which asks for nothing -- are accepted; anything else is a 400 naming the field
 * (code unsupported_parameter). README.md's API section lists them; keep the two in step. */
static const struct {
    const char *name;
    unsigned kinds;             /* K_CMPL | K_CHAT: the endpoints it is checked on */
    bool (*ok)(const cJSON *v); /* the accepted non-null value(s); NULL: only null */
    const char *accepted;       /* for the message */
} unsupported[] = {
    {"best_of", K_CMPL, is_one, "1"},
    {"suffix", K_CMPL, is_empty_string, "\"\""},
    {"logit_bias", K_CMPL | K_CHAT, is_empty_object, "{}"},
    {"response_format", K_CMPL | K_CHAT, is_text_format, "{\"type\": \"text\"}"},
    {"tools", K_CHAT, is_empty_array, "[]"},
    {"tool_choice", K_CHAT, is_none_or_auto, "\"none\" or \"auto\""},
    {"functions", K_CHAT, is_empty_array, "[]"},
    {"function_call", K_CHAT, is_none_or_auto, "\"none\" or \"auto\""},
    {"parallel_tool_calls", K_CHAT, is_bool, "true or false"},
    {"audio", K_CHAT, NULL, NULL},
    {"modalities", K_CHAT, is_text_modalities, "[\"text\"]"},
    {"prediction", K_CHAT, NULL, NULL},
    {"reasoning_effort", K_CHAT, NULL, NULL},
    {"verbosity", K_CHAT, NULL, NULL},
    {"web_search_options", K_CHAT, NULL, NULL},
    {"store", K_CHAT, is_false, "false"},
    {"echo", K_CHAT, is_false, "false"}, /* implemented for completions only */
    {"grammar", K_CMPL | K_CHAT, is_empty_string, "\"\""},
    {"json_schema", K_CMPL | K_CHAT, NULL, NULL},
    {"guided_json", K_CMPL | K_CHAT, NULL, NULL},
    {"guided_regex", K_CMPL | K_CHAT, NULL, NULL},
    {"guided_choice", K_CMPL | K_CHAT, NULL, NULL},
    {"guided_grammar", K_CMPL | K_CHAT, NULL, NULL},
    {"min_tokens", K_CMPL | K_CHAT, is_zero, "0"},
    {"typical_p", K_CMPL | K_CHAT, is_one, "1"},
    {"mirostat", K_CMPL | K_CHAT, is_zero, "0"},
};

static int refuse_unsupported(const cJSON *root, api_kind_t kind, api_error_t *e) {
    for (size_t i = 0; i < sizeof(unsupported) / sizeof(unsupported[0]); i++) {
        if (!(unsupported[i].kinds & (1u << kind))) continue;
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, unsupported[i].name);
        if (!v || cJSON_IsNull(v) || (unsupported[i].ok && unsupported[i].ok(v))) continue;
        if (!unsupported[i].accepted)
            return api_fail(e, 400, "invalid_request_error", unsupported[i].name,
                            "unsupported_parameter", "'%s' is not supported by tidald (only null)",
                            unsupported[i].name);
        return api_fail(e, 400, "invalid_request_error", unsupported[i].name,
                        "unsupported_parameter",
                        "'%s' is not supported by tidald (only null or %s is accepted)",
                        unsupported[i].name, unsupported[i].accepted);
    }
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
    if (refuse_nul(body, len, e) || refuse_unsupported(root, kind, e)) goto done;
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
        api_fail(e, 400, "invalid_request_error", "n", "unsupported_parameter",
                 "'n' greater than 1 is not supported; send separate requests");
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
        if (num_field(root, "logprobs", 0, SCHED_MAX_LOGPROBS, true, &d, &present, e)) goto done;
        if (present) r->logprobs = (int)d;
    } else {
        bool lp = false;
        if (bool_field(root, "logprobs", &lp, e)) goto done;
        if (num_field(root, "top_logprobs", 0, SCHED_MAX_LOGPROBS, true, &d, &present, e))
            goto done;
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
    window_t win = {.n = ctx->n_ctx, .from_request = false};
    if (num_field(root, "ctx_size", 1, 1 << 24, true, &d, &present, e)) goto done;
    if (present) {
        if (d > ctx->n_ctx) {
            BAD(e, "ctx_size", "'ctx_size' may be at most the server's context window of %u tokens",
                ctx->n_ctx);
            goto done;
        }
        win = (window_t){.n = (uint32_t)d, .from_request = true};
    }
    uint32_t window = win.n;
    if (prompt_tokens(ctx, root, &win, r, e)) goto done;
    const char *prompt_param = kind == API_CHAT ? "messages" : "prompt";
    if (r->eng.n_prompt == 0) {
        BAD(e, prompt_param, "the prompt has no tokens");
        goto done;
    }
    /* the prompt alone must leave room for one generated token, even with eviction */
    if (r->eng.n_prompt >= window) {
        api_fail(e, 400, "invalid_request_error", prompt_param, "context_length_exceeded",
                 "the prompt is %u tokens; %s is %u tokens, which must hold the prompt and at "
                 "least one generated token",
                 r->eng.n_prompt, window_name(&win), window);
        goto done;
    }
    /* with eviction the generation may run past the window; without, it must fit */
    if (max_given && !ctx->evict && (uint64_t)r->eng.n_prompt + r->eng.max_tokens > window) {
        api_fail(e, 400, "invalid_request_error", mt_name, "context_length_exceeded",
                 "%s is %u tokens; the request has %u prompt tokens and asks for %u more",
                 window_name(&win), window, r->eng.n_prompt, r->eng.max_tokens);
        goto done;
    }
    if (!max_given && !ctx->evict && r->eng.n_prompt + r->eng.max_tokens > window)
        r->eng.max_tokens = window - r->eng.n_prompt;
    /* a non-streamed reply is held whole until the end: bound what it may generate */
    uint32_t nonstream_max =
        ctx->max_nonstream_tokens ? ctx->max_nonstream_tokens : API_DEFAULT_MAX_NONSTREAM_TOKENS;
    if (!r->stream && r->eng.max_tokens > nonstream_max) {
        if (max_given) {
            BAD(e, mt_name,
                "'%s' is %u; a request without \"stream\": true may generate at most %u tokens "
                "(the server's max_nonstream_tokens); stream longer generations",
                mt_name, r->eng.max_tokens, nonstream_max);
            goto done;
        }
        r->eng.max_tokens = nonstream_max; /* the server's default_max_tokens, capped */
    }
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
    if (refuse_nul(body, len, e)) goto done;
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

/* s[0..n) as a quoted JSON string, malloc'd. Unlike cJSON_CreateString it takes a length, so
 * a NUL byte (a detokenized <0x00> byte token) is written as \u0000 instead of ending the text.
 * The text must be valid UTF-8 (the detokenizer guarantees it). */
char *api__json_quote(const char *s, size_t n) {
    size_t cap = n * 6 + 3; /* worst case: every byte a \u00XX escape */
    if (n > (SIZE_MAX - 3) / 6) return NULL;
    char *o = malloc(cap), *w = o;
    if (!o) return NULL;
    *w++ = '"';
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') {
            *w++ = '\\';
            *w++ = (char)c;
        } else if (c == '\n') {
            *w++ = '\\', *w++ = 'n';
        } else if (c == '\r') {
            *w++ = '\\', *w++ = 'r';
        } else if (c == '\t') {
            *w++ = '\\', *w++ = 't';
        } else if (c < 0x20) {
            w += sprintf(w, "\\u%04x", c);
        } else {
            *w++ = (char)c;
        }
    }
    *w++ = '"';
    *w = 0;
    return o;
}

char *api_detokenize(const api_ctx_t *ctx, const char *body, size_t len, api_error_t *e) {
    cJSON *root = cJSON_ParseWithLength(body, len);
    char *out = NULL, *text = NULL;
    if (!cJSON_IsObject(root)) {
        BAD(e, NULL, "the body must be a JSON object");
        goto done;
    }
    if (refuse_nul(body, len, e)) goto done;
    const cJSON *toks = cJSON_GetObjectItemCaseSensitive(root, "tokens");
    if (!cJSON_IsArray(toks)) {
        BAD(e, "tokens", "'tokens' must be a list of token ids");
        goto done;
    }
    const eng_tokenizer_t *tok = eng_model_tokenizer(ctx->model);
    uint32_t V = eng_tok_n_vocab(tok);
    size_t n = array_count(toks, API_MAX_DETOKENIZE_TOKENS);
    if (n > API_MAX_DETOKENIZE_TOKENS) {
        BAD(e, "tokens", "'tokens' may hold at most %u token ids", API_MAX_DETOKENIZE_TOKENS);
        goto done;
    }
    size_t cap = n * 16 + 16, w = 0, i = 0;
    text = malloc(cap);
    if (!text) {
        api_fail(e, 500, "server_error", NULL, NULL, "out of memory");
        goto done;
    }
    eng_detok_t d;
    eng_detok_init(&d, tok);
    const cJSON *v;
    cJSON_ArrayForEach(v, toks) {
        double x = cJSON_IsNumber(v) ? v->valuedouble : -1;
        if (!cJSON_IsNumber(v) || x != floor(x) || x < 0 || x >= V) {
            BAD(e, "tokens", "tokens[%zu] is not a token id in [0, %u)", i, V);
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
        i++;
    }
    w += eng_detok_flush(&d, text + w, 8);
    /* the text may hold NUL bytes: quote it with its length, not through cJSON_CreateString */
    char *quoted = api__json_quote(text, w);
    cJSON *res = cJSON_CreateObject();
    if (!quoted || !res || !cJSON_AddRawToObject(res, "content", quoted)) {
        free(quoted);
        cJSON_Delete(res);
        api_fail(e, 500, "server_error", NULL, NULL, "out of memory");
        goto done;
    }
    free(quoted);
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
