/* chat.c - chat templates. GGUF files carry a Jinja template in
 * tokenizer.chat_template; rather than run Jinja, tidald recognises the common
 * families by their marker tokens and renders them in C:
 *   Llama 3  <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>
 *   ChatML   <|im_start|>role\ncontent<|im_end|>\n
 *   Zephyr   <|role|>\ncontent</s>\n
 *   Llama 2  <s>[INST] <<SYS>>\nsystem\n<</SYS>>\n\nuser [/INST] assistant </s>
 *   Gemma    <bos><start_of_turn>user\nsystem\n\ncontent<end_of_turn>\n (the assistant's role
 *            is "model"; contents trimmed; the system message opens the first user turn)
 * Each ends with the assistant's opening so the model writes the reply. A ChatML template that
 * opens a conversation without a system message with a literal one of its own (SmolLM2's) gets
 * it too.
 */
#include "api.h"

#include <stdlib.h>
#include <string.h>

api_tmpl_t api_detect_template(const char *t) {
    if (!t) return API_TMPL_NONE;
    if (strstr(t, "<|start_header_id|>")) return API_TMPL_LLAMA3;
    if (strstr(t, "<|im_start|>")) return API_TMPL_CHATML;
    if (strstr(t, "<|user|>") && strstr(t, "<|assistant|>")) return API_TMPL_ZEPHYR;
    if (strstr(t, "[INST]")) return API_TMPL_LLAMA2;
    if (strstr(t, "<start_of_turn>")) return API_TMPL_GEMMA;
    return API_TMPL_NONE;
}

api_tmpl_t api_model_template(const eng_tokenizer_t *t) {
    const char *tmpl = eng_tok_chat_template(t);
    if (tmpl) return api_detect_template(tmpl);
    if (eng_tok_find(t, "<start_of_turn>") >= 0 && eng_tok_find(t, "<end_of_turn>") >= 0)
        return API_TMPL_GEMMA;
    return API_TMPL_NONE;
}

typedef struct {
    char *s;
    size_t len, cap;
    bool oom;
} sb_t;

static void sb_addn(sb_t *b, const char *t, size_t n) {
    if (b->oom) return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = (b->len + n + 1) * 2;
        char *ns = realloc(b->s, cap);
        if (!ns) {
            b->oom = true;
            return;
        }
        b->s = ns;
        b->cap = cap;
    }
    memcpy(b->s + b->len, t, n);
    b->len += n;
    b->s[b->len] = 0;
}

static void sb_add(sb_t *b, const char *t) {
    sb_addn(b, t, strlen(t));
}

/* t without leading and trailing white space (Jinja's trim) */
static void sb_add_trimmed(sb_t *b, const char *t) {
    size_t n = strlen(t);
    while (n && strchr(" \t\n\r", t[0])) t++, n--;
    while (n && strchr(" \t\n\r", t[n - 1])) n--;
    sb_addn(b, t, n);
}

char *api_template_default_system(const char *tmpl) {
    static const char open[] = "<|im_start|>system\n";
    if (!tmpl) return NULL;
    for (const char *p = strstr(tmpl, open); p; p = strstr(p + 1, open)) {
        const char *body = p + strlen(open), *end = strstr(body, "<|im_end|>");
        if (!end || end == body) continue;
        /* a literal only: an expression ({{ ... }}) or a quote is the caller's message */
        size_t len = (size_t)(end - body);
        if (memchr(body, '{', len) || memchr(body, '\'', len) || memchr(body, '"', len)) continue;
        char *out = malloc(len + 1);
        if (!out) return NULL;
        memcpy(out, body, len);
        out[len] = 0;
        return out;
    }
    return NULL;
}

char *api_render_chat(api_tmpl_t t, const api_msg_t *m, size_t n) {
    return api_render_chat_ex(t, NULL, m, n);
}

char *api_render_chat_ex(api_tmpl_t t, const char *default_system, const api_msg_t *m, size_t n) {
    sb_t b = {0};
    sb_add(&b, "");
    switch (t) {
    case API_TMPL_LLAMA3:
        sb_add(&b, "<|begin_of_text|>");
        for (size_t i = 0; i < n; i++) {
            sb_add(&b, "<|start_header_id|>");
            sb_add(&b, m[i].role);
            sb_add(&b, "<|end_header_id|>\n\n");
            sb_add(&b, m[i].content);
            sb_add(&b, "<|eot_id|>");
        }
        sb_add(&b, "<|start_header_id|>assistant<|end_header_id|>\n\n");
        break;
    case API_TMPL_CHATML:
        if (default_system && (n == 0 || strcmp(m[0].role, "system") != 0)) {
            sb_add(&b, "<|im_start|>system\n");
            sb_add(&b, default_system);
            sb_add(&b, "<|im_end|>\n");
        }
        for (size_t i = 0; i < n; i++) {
            sb_add(&b, "<|im_start|>");
            sb_add(&b, m[i].role);
            sb_add(&b, "\n");
            sb_add(&b, m[i].content);
            sb_add(&b, "<|im_end|>\n");
        }
        sb_add(&b, "<|im_start|>assistant\n");
        break;
    case API_TMPL_ZEPHYR:
        for (size_t i = 0; i < n; i++) {
            sb_add(&b, "<|");
            sb_add(&b, m[i].role);
            sb_add(&b, "|>\n");
            sb_add(&b, m[i].content);
            sb_add(&b, "</s>\n");
        }
        sb_add(&b, "<|assistant|>\n");
        break;
    case API_TMPL_LLAMA2: {
        /* the system prompt folds into the first user turn */
        const char *sys = NULL;
        bool first = true;
        for (size_t i = 0; i < n; i++) {
            if (strcmp(m[i].role, "system") == 0) {
                sys = m[i].content;
            } else if (strcmp(m[i].role, "user") == 0) {
                sb_add(&b, "<s>[INST] ");
                if (sys && first) {
                    sb_add(&b, "<<SYS>>\n");
                    sb_add(&b, sys);
                    sb_add(&b, "\n<</SYS>>\n\n");
                }
                first = false;
                sb_add(&b, m[i].content);
                sb_add(&b, " [/INST]");
            } else {
                sb_add(&b, " ");
                sb_add(&b, m[i].content);
                sb_add(&b, " </s>");
            }
        }
        break;
    }
    case API_TMPL_GEMMA: {
        sb_add(&b, "<bos>");
        size_t i = 0;
        const char *sys = NULL;
        if (n && strcmp(m[0].role, "system") == 0) sys = m[i++].content;
        for (bool first = true; i < n; i++, first = false) {
            sb_add(&b, "<start_of_turn>");
            sb_add(&b, strcmp(m[i].role, "assistant") == 0 ? "model" : m[i].role);
            sb_add(&b, "\n");
            if (first && sys) {
                sb_add(&b, sys); /* as Gemma's template: untrimmed */
                sb_add(&b, "\n\n");
            }
            sb_add_trimmed(&b, m[i].content);
            sb_add(&b, "<end_of_turn>\n");
        }
        sb_add(&b, "<start_of_turn>model\n");
        break;
    }
    case API_TMPL_NONE:
        free(b.s);
        return NULL;
    }
    if (b.oom) {
        free(b.s);
        return NULL;
    }
    return b.s;
}
