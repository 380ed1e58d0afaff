/* hf_vocab.c - a Hugging Face tokenizer.json to a GGUF vocabulary (see hf_vocab.h). */
#include "hf_vocab.h"
#include "../base/err.h"
#include "../engine/engine.h"
#include "../engine/gguf.h"
#include "gguf_writer.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* GGUF token types (tokenizer.ggml.token_type), as llama.cpp numbers them */
enum { TT_NORMAL = 1, TT_CONTROL = 3, TT_USER = 4, TT_UNUSED = 5, TT_BYTE = 6 };

#define MAX_VOCAB (1u << 22) /* far above any real vocabulary; bounds what a hostile file asks */

typedef struct {
    uint32_t n;
    char **tok;     /* n strings (NULL until filled) */
    int32_t *type;  /* n token types */
    bool *added;    /* from added_tokens */
    bool *special;  /* an added token marked special */
    uint32_t *slot; /* open-addressing table of id + 1 by token text; cap slots */
    uint32_t cap;
} vocab_t;

typedef struct {
    const hf_vocab_opts_t *o;
    FILE *log;
    char *msg;
    cJSON *json, *config;
    char *chat_jinja; /* chat_template.jinja beside the input, if the config has no template */
    vocab_t v;
    bool spm;
    char **merges;
    size_t n_merges;
    float *score;
    const char *pre;
    bool add_space_prefix;
    int32_t bos, eos, unk, pad;
    int add_bos, add_eos, add_sep; /* -1: not said */
} conv_t;

/* ===== small helpers ================================================== */

static char *slurp(const char *path, size_t *len, char *msg, int *rc) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        *rc = eng_fail(msg, ENG_EIO, "cannot open %s: %s", path, strerror(errno));
        return NULL;
    }
    char *buf = NULL;
    size_t n = 0, cap = 0;
    for (;;) {
        if (n + 65536 > cap) {
            cap = cap ? cap * 2 : 1 << 20;
            char *nb = realloc(buf, cap + 1);
            if (!nb) {
                free(buf);
                fclose(f);
                *rc = eng_fail(msg, ENG_ENOMEM, "out of memory reading %s", path);
                return NULL;
            }
            buf = nb;
        }
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (got == 0) break;
    }
    bool bad = ferror(f);
    fclose(f);
    if (bad) {
        free(buf);
        *rc = eng_fail(msg, ENG_EIO, "cannot read %s", path);
        return NULL;
    }
    buf[n] = 0;
    *len = n;
    return buf;
}

static bool is_file(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* Parse a JSON file; a syntax error names the line and column. */
static cJSON *parse_json(const char *path, char *msg, int *rc) {
    size_t len = 0;
    char *text = slurp(path, &len, msg, rc);
    if (!text) return NULL;
    cJSON *j = cJSON_ParseWithLength(text, len);
    if (!j) {
        const char *at = cJSON_GetErrorPtr();
        size_t off = at && at >= text && at <= text + len ? (size_t)(at - text) : 0, line = 1,
               col = 1;
        for (size_t i = 0; i < off; i++)
            line += text[i] == '\n', col = text[i] == '\n' ? 1 : col + 1;
        *rc = eng_fail(msg, ENG_EFORMAT, "%s is not valid JSON (line %zu, column %zu)", path, line,
                       col);
    }
    free(text);
    return j;
}

static uint32_t fnv1a(const char *s) {
    uint32_t h = 2166136261u;
    for (; *s; s++) h = (h ^ (uint8_t)*s) * 16777619u;
    return h;
}

/* The id of the token spelled s, or -1. */
static int32_t vocab_find(const vocab_t *v, const char *s) {
    for (uint32_t i = fnv1a(s) & (v->cap - 1);; i = (i + 1) & (v->cap - 1)) {
        uint32_t e = v->slot[i];
        if (!e) return -1;
        if (strcmp(v->tok[e - 1], s) == 0) return (int32_t)(e - 1);
    }
}

static void vocab_index(vocab_t *v) {
    memset(v->slot, 0, sizeof(uint32_t) * v->cap);
    for (uint32_t id = 0; id < v->n; id++) {
        if (!v->tok[id]) continue;
        uint32_t i = fnv1a(v->tok[id]) & (v->cap - 1);
        while (v->slot[i] && strcmp(v->tok[v->slot[i] - 1], v->tok[id]) != 0)
            i = (i + 1) & (v->cap - 1);
        if (!v->slot[i]) v->slot[i] = id + 1; /* the first id keeps a text two ids share */
    }
}

static bool json_id(const cJSON *j, uint32_t *out) {
    if (!cJSON_IsNumber(j) || j->valuedouble < 0 || j->valuedouble >= MAX_VOCAB ||
        j->valuedouble != floor(j->valuedouble))
        return false;
    *out = (uint32_t)j->valuedouble;
    return true;
}

static const char *json_type(const cJSON *j) {
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(j, "type");
    return cJSON_IsString(t) ? t->valuestring : "";
}

static bool json_true(const cJSON *j, const char *key) {
    return cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(j, key));
}

/* The parts of a pre-tokenizer or normalizer: its Sequence's members, or itself. */
static const cJSON *parts(const cJSON *j, const char *seq_key) {
    if (!strcmp(json_type(j), "Sequence")) return cJSON_GetObjectItemCaseSensitive(j, seq_key);
    return NULL;
}

/* True if j, or a member of its Sequence, is of the given type; *found gets it. */
static bool has_part(const cJSON *j, const char *seq_key, const char *type, const cJSON **found) {
    if (!j || cJSON_IsNull(j)) return false;
    const cJSON *seq = parts(j, seq_key), *e;
    if (!seq) {
        if (strcmp(json_type(j), type)) return false;
        if (found) *found = j;
        return true;
    }
    cJSON_ArrayForEach(e, seq) if (has_part(e, seq_key, type, found)) return true;
    return false;
}

/* As llama.cpp judges added tokens that files forget to mark special. */
static bool looks_special(const char *s) {
    size_t n = strlen(s);
    if (!strcmp(s, "<pad>") || !strcmp(s, "<mask>") || !strcmp(s, "<2mass>") ||
        !strcmp(s, "[@BOS@]"))
        return true;
    if (n >= 4 && !strncmp(s, "<|", 2) && !strcmp(s + n - 2, "|>")) return true;
    static const char fw_open[] = "<\xef\xbd\x9c", fw_close[] = "\xef\xbd\x9c>"; /* <｜ ｜> */
    if (n >= 8 && !strncmp(s, fw_open, 4) && !strcmp(s + n - 4, fw_close)) return true;
    return n >= 8 && !strncmp(s, "<unused", 7) && s[n - 1] == '>';
}

static bool is_byte_piece(const char *s) {
    static const char hex[] = "0123456789ABCDEFabcdef";
    return strlen(s) == 6 && !strncmp(s, "<0x", 3) && s[5] == '>' && strchr(hex, s[3]) &&
           strchr(hex, s[4]);
}

/* ===== the vocabulary ================================================= */

static int set_token(conv_t *c, uint32_t id, const char *s) {
    if (c->v.tok[id] && !strcmp(c->v.tok[id], s)) return 0;
    free(c->v.tok[id]);
    if (!(c->v.tok[id] = strdup(s))) return eng_fail(c->msg, ENG_ENOMEM, "out of memory");
    return 0;
}

static int read_vocab(conv_t *c, const cJSON *model, const cJSON *added) {
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab"), *e;
    if (!cJSON_IsObject(vocab))
        return eng_fail(c->msg, ENG_EFORMAT, "model.vocab must be an object of token: id");
    uint32_t top = 0, id;
    cJSON_ArrayForEach(e, vocab) {
        if (!json_id(e, &id))
            return eng_fail(c->msg, ENG_EFORMAT, "model.vocab: the id of '%.64s' is not a token id",
                            e->string);
        if (id + 1 > top) top = id + 1;
    }
    if (cJSON_IsArray(added)) cJSON_ArrayForEach(e, added) {
            if (!json_id(cJSON_GetObjectItemCaseSensitive(e, "id"), &id) ||
                !cJSON_IsString(cJSON_GetObjectItemCaseSensitive(e, "content")))
                return eng_fail(c->msg, ENG_EFORMAT,
                                "added_tokens: every entry needs an integer id and a content");
            if (id + 1 > top) top = id + 1;
        }
    else if (added && !cJSON_IsNull(added))
        return eng_fail(c->msg, ENG_EFORMAT, "added_tokens must be an array");
    if (!top) return eng_fail(c->msg, ENG_EFORMAT, "the vocabulary is empty");
    if (c->o->vocab_size && c->o->vocab_size < top)
        return eng_fail(c->msg, ENG_EINVAL,
                        "--vocab-size %u is smaller than the file's vocabulary (ids up to %u)",
                        c->o->vocab_size, top - 1);
    vocab_t *v = &c->v;
    v->n = c->o->vocab_size ? c->o->vocab_size : top;
    for (v->cap = 16; v->cap < 2 * v->n;) v->cap *= 2;
    v->tok = calloc(v->n, sizeof(char *));
    v->type = calloc(v->n, sizeof(int32_t));
    v->added = calloc(v->n, sizeof(bool));
    v->special = calloc(v->n, sizeof(bool));
    v->slot = calloc(v->cap, sizeof(uint32_t));
    if (!v->tok || !v->type || !v->added || !v->special || !v->slot)
        return eng_fail(c->msg, ENG_ENOMEM, "out of memory for %u tokens", v->n);
    int rc;
    cJSON_ArrayForEach(e, vocab) {
        json_id(e, &id);
        if (v->tok[id])
            return eng_fail(c->msg, ENG_EFORMAT,
                            "model.vocab gives id %u to both '%.64s' and '%.64s'", id, v->tok[id],
                            e->string);
        if ((rc = set_token(c, id, e->string))) return rc;
    }
    if (cJSON_IsArray(added))
        cJSON_ArrayForEach(e, added) { /* an added token takes its id, as transformers' get_vocab */
            json_id(cJSON_GetObjectItemCaseSensitive(e, "id"), &id);
            if ((rc =
                     set_token(c, id, cJSON_GetObjectItemCaseSensitive(e, "content")->valuestring)))
                return rc;
            v->added[id] = true;
            v->special[id] = json_true(e, "special");
        }
    char pad[32];
    uint32_t n_pad = 0, n_control = 0, n_user = 0, n_byte = 0;
    for (id = 0; id < v->n; id++) {
        if (!v->tok[id]) { /* as llama.cpp fills ids a file leaves out */
            snprintf(pad, sizeof(pad), "[PAD%u]", id);
            if ((rc = set_token(c, id, pad))) return rc;
            v->type[id] = TT_UNUSED;
            n_pad++;
        } else if (v->added[id]) {
            bool control = v->special[id] || looks_special(v->tok[id]);
            v->type[id] = control ? TT_CONTROL : TT_USER;
            n_control += control, n_user += !control;
        } else if (c->spm && is_byte_piece(v->tok[id])) {
            v->type[id] = TT_BYTE;
            n_byte++;
        } else {
            v->type[id] = TT_NORMAL;
        }
    }
    vocab_index(v);
    if (c->log)
        fprintf(c->log,
                "tidald convert-tokenizer: %u tokens: %u control, %u user-defined, %u byte, %u "
                "unused\n",
                v->n, n_control, n_user, n_byte, n_pad);
    return 0;
}

/* A merge as GGUF stores it: "left right", a space inside a part written as U+0120 as the gguf
 * package does (byte-level parts never hold one). */
static void put_part(char **p, const char *s) {
    for (; *s; s++)
        if (*s == ' ')
            *(*p)++ = (char)0xC4, *(*p)++ = (char)0xA0;
        else
            *(*p)++ = *s;
}

static char *merge_text(const cJSON *m) {
    if (cJSON_IsString(m)) return strchr(m->valuestring, ' ') ? strdup(m->valuestring) : NULL;
    if (!cJSON_IsArray(m) || cJSON_GetArraySize(m) != 2) return NULL;
    const cJSON *a = cJSON_GetArrayItem(m, 0), *b = cJSON_GetArrayItem(m, 1);
    if (!cJSON_IsString(a) || !cJSON_IsString(b)) return NULL;
    char *s = malloc(2 * (strlen(a->valuestring) + strlen(b->valuestring)) + 2), *p = s;
    if (!s) return NULL;
    put_part(&p, a->valuestring);
    *p++ = ' ';
    put_part(&p, b->valuestring);
    *p = 0;
    return s;
}

static int read_merges(conv_t *c, const cJSON *model) {
    const cJSON *merges = cJSON_GetObjectItemCaseSensitive(model, "merges"), *m;
    if (!c->spm && !cJSON_IsArray(merges))
        return eng_fail(c->msg, ENG_EFORMAT, "a byte-level BPE vocabulary needs model.merges");
    if (!cJSON_IsArray(merges)) return 0;
    size_t n = (size_t)cJSON_GetArraySize(merges), i = 0;
    if (c->spm) {
        /* SentencePiece merges only by piece score, which comes from the vocabulary order: say
         * so when the file's merges would apply in another order */
        size_t out_of_order = 0;
        int32_t last = -1;
        char *joined;
        cJSON_ArrayForEach(m, merges) {
            if (!(joined = merge_text(m))) continue;
            char *sp = strchr(joined, ' ');
            memmove(sp, sp + 1, strlen(sp));
            int32_t id = vocab_find(&c->v, joined);
            free(joined);
            if (id >= 0 && id < last) out_of_order++;
            if (id > last) last = id;
        }
        if (out_of_order && c->log)
            fprintf(c->log,
                    "tidald convert-tokenizer: warning: %zu of %zu merges are out of vocabulary "
                    "order; piece scores follow the vocabulary order, so those pairs may merge in "
                    "another order than Hugging Face's tokenizer merges them\n",
                    out_of_order, n);
        return 0;
    }
    if (!(c->merges = calloc(n ? n : 1, sizeof(char *))))
        return eng_fail(c->msg, ENG_ENOMEM, "out of memory for %zu merges", n);
    cJSON_ArrayForEach(m, merges) {
        if (!(c->merges[i] = merge_text(m)))
            return eng_fail(c->msg, ENG_EFORMAT,
                            "model.merges[%zu] is neither \"left right\" nor [\"left\", \"right\"]",
                            i);
        c->n_merges = ++i;
    }
    return 0;
}

/* SentencePiece scores: byte pieces 0, added and unused tokens -1000, normal pieces minus their
 * rank in vocabulary order (SentencePiece's own scores for a BPE model). */
static int make_scores(conv_t *c) {
    if (!(c->score = malloc(sizeof(float) * c->v.n)))
        return eng_fail(c->msg, ENG_ENOMEM, "out of memory");
    float rank = 0;
    for (uint32_t id = 0; id < c->v.n; id++) {
        int32_t t = c->v.type[id];
        c->score[id] = t == TT_BYTE ? 0.0f : t == TT_NORMAL ? -rank : -1000.0f;
        if (t == TT_NORMAL) rank += 1;
    }
    return 0;
}

/* ===== the pre-tokenizer ============================================== */

/* The Split regexes of the Llama 3 and Qwen2 tokenizer.json files, in both spellings. */
static const char *const LLAMA3_RE[] = {
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"
    "\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"};
static const char *const QWEN2_RE[] = {
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"
    "\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"};

static bool byte_level(const cJSON *j, bool use_regex) {
    if (strcmp(json_type(j), "ByteLevel")) return false;
    const cJSON *r = cJSON_GetObjectItemCaseSensitive(j, "use_regex");
    return (r ? cJSON_IsTrue(r) : true) == use_regex; /* the library's default is true */
}

static bool split_regex(const cJSON *j, const char *const re[2]) {
    if (strcmp(json_type(j), "Split")) return false;
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(j, "pattern");
    const cJSON *r = cJSON_GetObjectItemCaseSensitive(p, "Regex");
    const cJSON *b = cJSON_GetObjectItemCaseSensitive(j, "behavior");
    if (!cJSON_IsString(r) || json_true(j, "invert") ||
        (cJSON_IsString(b) && strcmp(b->valuestring, "Isolated")))
        return false;
    return !strcmp(r->valuestring, re[0]) || !strcmp(r->valuestring, re[1]);
}

/* The pre-tokenizer name llama.cpp gives the structure, or NULL for one tidald does not know. */
static const char *detect_pre(const cJSON *pt) {
    if (!pt || cJSON_IsNull(pt)) return NULL;
    if (byte_level(pt, true)) return "gpt2";
    const cJSON *seq = parts(pt, "pretokenizers");
    if (cJSON_GetArraySize(seq) != 2) return NULL;
    const cJSON *a = cJSON_GetArrayItem(seq, 0), *b = cJSON_GetArrayItem(seq, 1);
    if (!strcmp(json_type(a), "Digits") && json_true(a, "individual_digits") && byte_level(b, true))
        return "smollm";
    if (byte_level(b, false) && split_regex(a, LLAMA3_RE)) return "llama-bpe";
    if (byte_level(b, false) && split_regex(a, QWEN2_RE)) return "qwen2";
    return NULL;
}

static int read_pre(conv_t *c) {
    const cJSON *pt = cJSON_GetObjectItemCaseSensitive(c->json, "pre_tokenizer");
    const cJSON *norm = cJSON_GetObjectItemCaseSensitive(c->json, "normalizer"), *found = NULL;
    if (c->spm) {
        /* spaces are written U+2581 by a Replace normalizer or a Metaspace pre-tokenizer; a
         * prefix space by Prepend, or Metaspace's prepend_scheme / add_prefix_space */
        bool metaspace = has_part(pt, "pretokenizers", "Metaspace", &found);
        if (metaspace) {
            const cJSON *ps = cJSON_GetObjectItemCaseSensitive(found, "prepend_scheme");
            c->add_space_prefix = cJSON_IsString(ps) ? strcmp(ps->valuestring, "never") != 0
                                                     : json_true(found, "add_prefix_space");
        }
        if (has_part(norm, "normalizers", "Prepend", NULL)) c->add_space_prefix = true;
        if (!metaspace && !has_part(norm, "normalizers", "Replace", NULL) && c->log)
            fprintf(c->log, "tidald convert-tokenizer: warning: the file neither replaces spaces "
                            "nor has a Metaspace pre-tokenizer; tidald's SentencePiece tokenizer "
                            "writes spaces as U+2581\n");
        c->pre = c->o->pre ? c->o->pre : "default";
        return 0;
    }
    if (norm && !cJSON_IsNull(norm))
        return eng_fail(c->msg, ENG_EUNSUPPORTED,
                        "the byte-level vocabulary has a '%s' normalizer, which tidald does not "
                        "apply",
                        json_type(norm));
    if (has_part(pt, "pretokenizers", "ByteLevel", &found))
        c->add_space_prefix = json_true(found, "add_prefix_space");
    const char *name = detect_pre(pt);
    if (c->o->pre) {
        if (name && strcmp(name, c->o->pre) && c->log)
            fprintf(c->log,
                    "tidald convert-tokenizer: warning: the pre-tokenizer looks like '%s'; "
                    "recording '%s' as asked\n",
                    name, c->o->pre);
        if (!eng_tok_pre_supported(c->o->pre) && c->log)
            fprintf(c->log,
                    "tidald convert-tokenizer: warning: tidald does not know pre-tokenizer '%s'; "
                    "it will warn when it loads the file\n",
                    c->o->pre);
        c->pre = c->o->pre;
        return 0;
    }
    if (!name) {
        char *s = pt ? cJSON_PrintUnformatted(pt) : NULL;
        int rc = eng_fail(c->msg, ENG_EUNSUPPORTED,
                          "pre-tokenizer %.160s is not one tidald recognises (smollm, llama-bpe, "
                          "qwen2, gpt2); name it with --pre NAME",
                          s ? s : "(none)");
        free(s);
        return rc;
    }
    c->pre = name;
    return 0;
}

/* ===== tokenizer_config.json ========================================== */

/* The content of a special-token entry: a string, or an object with "content". */
static const char *token_content(const cJSON *e) {
    if (cJSON_IsString(e)) return e->valuestring;
    const cJSON *ct = cJSON_GetObjectItemCaseSensitive(e, "content");
    return cJSON_IsString(ct) ? ct->valuestring : NULL;
}

static int32_t special_id(conv_t *c, const char *what, const char *content) {
    if (!content) return -1;
    int32_t id = vocab_find(&c->v, content);
    if (id < 0 && c->log)
        fprintf(c->log,
                "tidald convert-tokenizer: warning: %s '%.64s' is not in the vocabulary; not "
                "recorded\n",
                what, content);
    return id;
}

/* The special token a TemplateProcessing step names, or NULL. */
static const char *template_special(const cJSON *step) {
    const cJSON *st = cJSON_GetObjectItemCaseSensitive(step, "SpecialToken");
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(st, "id");
    return cJSON_IsString(id) ? id->valuestring : NULL;
}

static void read_specials(conv_t *c) {
    const cJSON *cfg = c->config;
    const char *bos = token_content(cJSON_GetObjectItemCaseSensitive(cfg, "bos_token"));
    const char *eos = token_content(cJSON_GetObjectItemCaseSensitive(cfg, "eos_token"));
    const char *unk = token_content(cJSON_GetObjectItemCaseSensitive(cfg, "unk_token"));
    const char *pad = token_content(cJSON_GetObjectItemCaseSensitive(cfg, "pad_token"));
    if (!bos) bos = token_content(cJSON_GetObjectItemCaseSensitive(cfg, "cls_token"));
    if (!eos) eos = token_content(cJSON_GetObjectItemCaseSensitive(cfg, "sep_token"));
    if (!unk)
        unk = token_content(cJSON_GetObjectItemCaseSensitive(
            cJSON_GetObjectItemCaseSensitive(c->json, "model"), "unk_token"));
    c->add_bos = c->add_eos = c->add_sep = -1;
    const cJSON *b;
    if (cJSON_IsBool(b = cJSON_GetObjectItemCaseSensitive(cfg, "add_bos_token")))
        c->add_bos = cJSON_IsTrue(b);
    if (cJSON_IsBool(b = cJSON_GetObjectItemCaseSensitive(cfg, "add_eos_token")))
        c->add_eos = cJSON_IsTrue(b);
    if (cJSON_IsBool(b = cJSON_GetObjectItemCaseSensitive(cfg, "add_sep_token")))
        c->add_sep = cJSON_IsTrue(b);
    /* without a config saying so, a post-processor template that opens with a special token
     * adds it (BOS), and one that closes with one adds that (EOS) */
    const cJSON *pp = cJSON_GetObjectItemCaseSensitive(c->json, "post_processor"), *tp = NULL;
    if (has_part(pp, "processors", "TemplateProcessing", &tp)) {
        const cJSON *single = cJSON_GetObjectItemCaseSensitive(tp, "single");
        int n = cJSON_GetArraySize(single);
        const char *first = n > 1 ? template_special(cJSON_GetArrayItem(single, 0)) : NULL;
        const char *last = n > 1 ? template_special(cJSON_GetArrayItem(single, n - 1)) : NULL;
        if (first && !bos) bos = first;
        if (last && !eos) eos = last;
        if (c->add_bos < 0 && first) c->add_bos = !strcmp(first, bos);
        if (c->add_eos < 0 && last) c->add_eos = !strcmp(last, eos);
    }
    c->bos = special_id(c, "bos_token", bos);
    c->eos = special_id(c, "eos_token", eos);
    c->unk = special_id(c, "unk_token", unk);
    c->pad = special_id(c, "pad_token", pad);
    if (c->add_bos < 0) c->add_bos = c->spm; /* what the loaders assume when a file is silent */
}

/* ===== writing ======================================================== */

static void write_chat_templates(conv_t *c, gw_t *w) {
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(c->config, "chat_template"), *e;
    if (cJSON_IsString(t)) {
        gw_kv_str(w, "tokenizer.chat_template", t->valuestring);
    } else if (cJSON_IsArray(t)) { /* named templates: "default", and tokenizer.chat_template.X */
        cJSON_ArrayForEach(e, t) {
            const cJSON *name = cJSON_GetObjectItemCaseSensitive(e, "name");
            const cJSON *body = cJSON_GetObjectItemCaseSensitive(e, "template");
            if (!cJSON_IsString(name) || !cJSON_IsString(body)) continue;
            char key[256];
            if (!strcmp(name->valuestring, "default"))
                snprintf(key, sizeof(key), "tokenizer.chat_template");
            else
                snprintf(key, sizeof(key), "tokenizer.chat_template.%.200s", name->valuestring);
            gw_kv_str(w, key, body->valuestring);
        }
    } else if (c->chat_jinja) {
        gw_kv_str(w, "tokenizer.chat_template", c->chat_jinja);
    }
}

static void write_vocab(conv_t *c, gw_t *w) {
    gw_kv_str(w, "tokenizer.ggml.model", c->spm ? "llama" : "gpt2");
    gw_kv_str(w, "tokenizer.ggml.pre", c->pre);
    gw_kv_arr_str(w, "tokenizer.ggml.tokens", (const char *const *)c->v.tok, c->v.n);
    if (c->spm) gw_kv_arr_f32(w, "tokenizer.ggml.scores", c->score, c->v.n);
    gw_kv_arr_i32(w, "tokenizer.ggml.token_type", c->v.type, c->v.n);
    if (!c->spm)
        gw_kv_arr_str(w, "tokenizer.ggml.merges", (const char *const *)c->merges, c->n_merges);
    if (c->bos >= 0) gw_kv_u32(w, "tokenizer.ggml.bos_token_id", (uint32_t)c->bos);
    if (c->eos >= 0) gw_kv_u32(w, "tokenizer.ggml.eos_token_id", (uint32_t)c->eos);
    if (c->unk >= 0) gw_kv_u32(w, "tokenizer.ggml.unknown_token_id", (uint32_t)c->unk);
    if (c->pad >= 0) gw_kv_u32(w, "tokenizer.ggml.padding_token_id", (uint32_t)c->pad);
    gw_kv_bool(w, "tokenizer.ggml.add_bos_token", c->add_bos);
    if (c->add_sep >= 0) gw_kv_bool(w, "tokenizer.ggml.add_sep_token", c->add_sep);
    if (c->add_eos >= 0) gw_kv_bool(w, "tokenizer.ggml.add_eos_token", c->add_eos);
    gw_kv_bool(w, "tokenizer.ggml.add_space_prefix", c->add_space_prefix);
    write_chat_templates(c, w);
}

/* The model's tensors and non-tokenizer metadata; its embedding must have a row per token. */
static int carry_model(conv_t *c, gw_t *w, const gguf_t *g) {
    const gguf_tensor_t *emb = gguf_tensor(g, "token_embd.weight");
    if (emb && (emb->n_dims < 2 || emb->ne[1] != c->v.n))
        return eng_fail(
            c->msg, ENG_EINVAL, "%s: the embedding has %llu rows but the vocabulary %u tokens%s",
            c->o->model, emb->n_dims < 2 ? 1ull : (unsigned long long)emb->ne[1], c->v.n,
            emb->n_dims >= 2 && emb->ne[1] > c->v.n ? " (see --vocab-size)" : "");
    for (size_t i = 0; i < g->n_kv; i++) {
        const gguf_kv_t *kv = &g->kv[i];
        if (!strncmp(kv->key, "tokenizer.", 10)) continue;
        if (gw_kv_copy(w, kv))
            return eng_fail(c->msg, ENG_EUNSUPPORTED, "%s: metadata '%s' cannot be copied",
                            c->o->model, kv->key);
    }
    for (size_t i = 0; i < g->n_tensors; i++) {
        const gguf_tensor_t *t = &g->tensors[i];
        gw_tensor(w, t->name, t->n_dims, t->ne, t->type, t->data, t->nbytes);
    }
    return 0;
}

/* ===== the conversion ================================================= */

static int open_inputs(conv_t *c) {
    const hf_vocab_opts_t *o = c->o;
    char path[4096], dir[4096];
    struct stat st;
    if (stat(o->input, &st))
        return eng_fail(c->msg, ENG_EIO, "cannot open %s: %s", o->input, strerror(errno));
    if (S_ISDIR(st.st_mode)) {
        snprintf(dir, sizeof(dir), "%s", o->input);
        snprintf(path, sizeof(path), "%s/tokenizer.json", o->input);
    } else {
        snprintf(path, sizeof(path), "%s", o->input);
        const char *slash = strrchr(o->input, '/');
        snprintf(dir, sizeof(dir), "%.*s", slash ? (int)(slash - o->input) : 1,
                 slash ? o->input : ".");
    }
    int rc = 0;
    if (!(c->json = parse_json(path, c->msg, &rc))) return rc;
    if (!cJSON_IsObject(c->json))
        return eng_fail(c->msg, ENG_EFORMAT, "%s is not a tokenizer.json (not an object)", path);
    char cfg[4096 + 32];
    snprintf(cfg, sizeof(cfg), "%s/tokenizer_config.json", dir);
    const char *cfg_path = o->config ? o->config : is_file(cfg) ? cfg : NULL;
    if (cfg_path && !(c->config = parse_json(cfg_path, c->msg, &rc))) return rc;
    if (c->config && !cJSON_IsObject(c->config))
        return eng_fail(c->msg, ENG_EFORMAT, "%s is not an object", cfg_path);
    char jinja[4096 + 32];
    snprintf(jinja, sizeof(jinja), "%s/chat_template.jinja", dir);
    size_t len;
    if (!cJSON_GetObjectItemCaseSensitive(c->config, "chat_template") && is_file(jinja) &&
        !(c->chat_jinja = slurp(jinja, &len, c->msg, &rc)))
        return rc;
    if (c->log)
        fprintf(c->log, "tidald convert-tokenizer: %s%s%s\n", path, cfg_path ? " + " : "",
                cfg_path ? cfg_path : "");
    return 0;
}

static int convert(conv_t *c, const char *out) {
    int rc = open_inputs(c);
    if (rc) return rc;
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(c->json, "model");
    const char *type = json_type(model);
    if (strcmp(type, "BPE"))
        return eng_fail(c->msg, ENG_EUNSUPPORTED,
                        "tokenizer model '%s' is not supported: tidald reads BPE vocabularies, "
                        "byte-level (GPT-2's) or with byte fallback (SentencePiece's)",
                        *type ? type : "(none)");
    c->spm = json_true(model, "byte_fallback");
    if (!c->spm &&
        !has_part(cJSON_GetObjectItemCaseSensitive(c->json, "pre_tokenizer"), "pretokenizers",
                  "ByteLevel", NULL) &&
        strcmp(json_type(cJSON_GetObjectItemCaseSensitive(c->json, "decoder")), "ByteLevel"))
        return eng_fail(c->msg, ENG_EUNSUPPORTED,
                        "a BPE vocabulary without byte fallback must be byte-level (a ByteLevel "
                        "pre-tokenizer or decoder)");
    if ((rc = read_vocab(c, model, cJSON_GetObjectItemCaseSensitive(c->json, "added_tokens"))) ||
        (rc = read_merges(c, model)) || (rc = read_pre(c)) || (c->spm && (rc = make_scores(c))))
        return rc;
    read_specials(c);

    gguf_t *g = NULL;
    if (c->o->model && (rc = gguf_open(&g, c->o->model, c->msg))) return rc;
    gw_t *w = gw_create();
    if (!w) {
        gguf_close(g);
        return eng_fail(c->msg, ENG_ENOMEM, "out of memory");
    }
    if (g) rc = carry_model(c, w, g);
    if (!rc) {
        write_vocab(c, w);
        char wmsg[256] = {0};
        if (gw_write(w, out, wmsg)) rc = eng_fail(c->msg, ENG_EIO, "%s", wmsg);
    }
    gw_free(w);
    gguf_close(g);
    if (!rc && c->log)
        fprintf(c->log,
                "tidald convert-tokenizer: wrote %s: %s vocabulary, pre-tokenizer %s, %zu "
                "merges, bos %d, eos %d%s\n",
                out, c->spm ? "SentencePiece (llama)" : "byte-level BPE (gpt2)", c->pre,
                c->n_merges, c->bos, c->eos, c->o->model ? ", with the model's tensors" : "");
    return rc;
}

int hf_vocab_convert(const hf_vocab_opts_t *o, const char *out, FILE *log, char *msg) {
    conv_t c = {.o = o, .log = log, .msg = msg};
    int rc = convert(&c, out);
    for (uint32_t i = 0; c.v.tok && i < c.v.n; i++) free(c.v.tok[i]);
    free(c.v.tok);
    free(c.v.type);
    free(c.v.added);
    free(c.v.special);
    free(c.v.slot);
    for (size_t i = 0; i < c.n_merges; i++) free(c.merges[i]);
    free(c.merges);
    free(c.score);
    free(c.chat_jinja);
    cJSON_Delete(c.json);
    cJSON_Delete(c.config);
    return rc;
}
