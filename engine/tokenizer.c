/* tokenizer.c - SentencePiece-style and GPT-2 byte-level BPE tokenizers built
 * from a GGUF vocabulary, with llama.cpp's semantics.
 *
 * SPM (`tokenizer.ggml.model = llama`): spaces become U+2581, an optional
 * space prefix, then highest-score bigram merging over UTF-8 characters and
 * byte fallback (<0xNN>) for characters the vocabulary lacks.
 * BPE (`gpt2`): pre-tokenization with the Llama-3 (or GPT-2) split pattern,
 * bytes mapped to printable code points, then lowest-rank merging.
 * Both merge loops use a binary heap over a linked list of symbols, so a
 * prompt of n characters costs O(n log n).
 */
#include "model.h"

#include <locale.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <wctype.h>

enum { TT_NORMAL = 1, TT_UNKNOWN = 2, TT_CONTROL = 3, TT_USER = 4, TT_UNUSED = 5, TT_BYTE = 6 };

typedef struct {
    const char *s;
    uint32_t len;
    int32_t val;
} hent_t;

typedef struct {
    hent_t *e;
    size_t cap; /* power of two */
} hmap_t;

struct eng_tokenizer {
    eng_tok_kind_t kind;
    uint32_t n;
    char **piece; /* NUL-terminated copies */
    uint32_t *piece_len;
    float *score;
    int32_t *type;
    hmap_t vocab;  /* piece -> id */
    hmap_t merges; /* "left right" -> rank (BPE) */
    char **merge_str;
    size_t n_merges;
    int32_t byte_tok[256]; /* SPM <0xNN> tokens, or BPE single-byte-char tokens; -1 if none */
    int32_t bos, eos, unk;
    bool add_bos, add_space_prefix;
    int pre;
    bool *eog;
    int32_t *special; /* control and user-defined tokens, for parse_special */
    size_t n_special;
    int32_t *user; /* user-defined tokens alone: matched in any text, as llama.cpp does */
    size_t n_user;
    bool special_first[256], user_first[256]; /* first bytes of those pieces */
    char *chat_template;
};

/* ---- hash map ------------------------------------------------------ */

static uint64_t hash_bytes(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 1099511628211ull;
    return h;
}

static int hmap_init(hmap_t *m, size_t n) {
    size_t cap = 16;
    while (cap < n * 2) cap *= 2;
    m->e = calloc(cap, sizeof(hent_t));
    m->cap = cap;
    return m->e ? 0 : ENG_ENOMEM;
}

/* Insert unless present (first wins, as in llama.cpp). */
static void hmap_put(hmap_t *m, const char *s, uint32_t len, int32_t val) {
    size_t i = hash_bytes(s, len) & (m->cap - 1);
    while (m->e[i].s) {
        if (m->e[i].len == len && memcmp(m->e[i].s, s, len) == 0) return;
        i = (i + 1) & (m->cap - 1);
    }
    m->e[i] = (hent_t){s, len, val};
}

static int32_t hmap_get(const hmap_t *m, const char *s, size_t len) {
    if (!m->e) return -1;
    size_t i = hash_bytes(s, len) & (m->cap - 1);
    while (m->e[i].s) {
        if (m->e[i].len == len && memcmp(m->e[i].s, s, len) == 0) return m->e[i].val;
        i = (i + 1) & (m->cap - 1);
    }
    return -1;
}

/* ---- UTF-8 --------------------------------------------------------- */

/* Length of a valid UTF-8 sequence at s (n bytes left), or 0 if invalid. */
static size_t utf8_valid_len(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    size_t len;
    uint32_t cp;
    if (c < 0x80) return 1;
    if (c >= 0xc2 && c <= 0xdf)
        len = 2, cp = c & 0x1f;
    else if (c >= 0xe0 && c <= 0xef)
        len = 3, cp = c & 0x0f;
    else if (c >= 0xf0 && c <= 0xf4)
        len = 4, cp = c & 0x07;
    else
        return 0;
    if (len > n) return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80) return 0;
        cp = (cp << 6) | (s[i] & 0x3f);
    }
    if ((len == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) ||
        (len == 4 && (cp < 0x10000 || cp > 0x10ffff)))
        return 0;
    return len;
}

static uint32_t utf8_decode(const unsigned char *s, size_t len) {
    if (len == 1) return s[0];
    uint32_t cp = s[0] & (0xff >> (len + 1));
    for (size_t i = 1; i < len; i++) cp = (cp << 6) | (s[i] & 0x3f);
    return cp;
}

static size_t utf8_encode(uint32_t cp, char *out) {
    if (cp < 0x80) return out[0] = (char)cp, 1;
    if (cp < 0x800) {
        out[0] = (char)(0xc0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3f));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xe0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        out[2] = (char)(0x80 | (cp & 0x3f));
        return 3;
    }
    out[0] = (char)(0xf0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
    out[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}

bool eng__utf8_valid(const char *s, size_t n) {
    for (size_t i = 0; i < n;) {
        size_t l = utf8_valid_len((const unsigned char *)s + i, n - i);
        if (!l) return false;
        i += l;
    }
    return true;
}

bool eng_utf8_valid(const char *s, size_t n) {
    return n == 0 || eng__utf8_valid(s, n);
}

/* ---- GPT-2 byte <-> code point map ---------------------------------- */

/* Printable bytes map to themselves; the others to 256 + k in byte order. */
static uint32_t byte_to_cp(uint8_t b) {
    if ((b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || (b >= 0xae)) return b;
    uint32_t k = 0;
    for (unsigned x = 0; x < b; x++)
        if (!((x >= '!' && x <= '~') || (x >= 0xa1 && x <= 0xac) || (x >= 0xae))) k++;
    return 256 + k;
}

static int16_t g_inv[324]; /* code point -> byte, -1 if none; written once */

static void init_inv(void) {
    for (int i = 0; i < 324; i++) g_inv[i] = -1;
    for (int b = 0; b < 256; b++) g_inv[byte_to_cp((uint8_t)b)] = (int16_t)b;
}

static int cp_to_byte(uint32_t cp) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, init_inv);
    return cp < 324 ? g_inv[cp] : -1;
}

/* ---- Unicode classes for pre-tokenization ---------------------------- */

static locale_t g_utf8_locale;
static void init_locale(void) {
    g_utf8_locale = newlocale(LC_CTYPE_MASK, "C.UTF-8", (locale_t)0);
}

static bool cp_is_number(uint32_t c) {
    if (c >= '0' && c <= '9') return true;
    if (c < 0x80) return false;
    /* common non-ASCII decimal digits and numeric signs (\p{N}) */
    static const uint32_t r[][2] = {
        {0xb2, 0xb3},     {0xb9, 0xb9},     {0xbc, 0xbe},     {0x660, 0x669},   {0x6f0, 0x6f9},
        {0x966, 0x96f},   {0x9e6, 0x9ef},   {0xe50, 0xe59},   {0x2070, 0x2079}, {0x2080, 0x2089},
        {0x2150, 0x2189}, {0x2460, 0x249b}, {0x3007, 0x3007}, {0x3021, 0x3029}, {0xff10, 0xff19},
    };
    for (size_t i = 0; i < sizeof(r) / sizeof(r[0]); i++)
        if (c >= r[i][0] && c <= r[i][1]) return true;
    return false;
}

static bool cp_is_letter(uint32_t c) {
    if (c < 0x80) return (c | 0x20) >= 'a' && (c | 0x20) <= 'z';
    if (cp_is_number(c)) return false;
    return g_utf8_locale ? iswalpha_l((wint_t)c, g_utf8_locale) != 0 : false;
}

static bool cp_is_space(uint32_t c) {
    if (c < 0x80) return c == ' ' || (c >= 9 && c <= 13);
    if (c == 0x85 || c == 0xa0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200a) || c == 0x2028 ||
        c == 0x2029 || c == 0x202f || c == 0x205f || c == 0x3000)
        return true;
    return false;
}

/* A pre-tokenizer word: [off, off+len) of the text. The text is decoded into code points first. */
typedef struct {
    uint32_t *cp;
    size_t *off; /* byte offset of each code point, plus one past the end */
    size_t n;
} cps_t;

#define CP(i) (i < n ? c[i] : 0)
#define IS_L(i) (i < n && cp_is_letter(c[i]))
#define IS_N(i) (i < n && cp_is_number(c[i]))
#define IS_S(i) (i < n && cp_is_space(c[i]))
#define IS_NL(i) (i < n && (c[i] == '\r' || c[i] == '\n'))

/* Length in code points of the pre-tokenizer match at i (always >= 1). */
static size_t pre_match(const cps_t *t, size_t i, int pre) {
    const uint32_t *c = t->cp;
    size_t n = t->n, j;
    /* contractions */
    if (c[i] == '\'' && i + 1 < n) {
        uint32_t a = c[i + 1], b = CP(i + 2);
        if (pre == ENG_PRE_LLAMA3 || pre == ENG_PRE_QWEN2) {
            a = a < 0x80 ? (a | 0x20) : a;
            b = b < 0x80 ? (b | 0x20) : b;
        }
        if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
        if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
    }
    if (pre == ENG_PRE_LLAMA3 || pre == ENG_PRE_QWEN2) {
        /* [^\r\n\p{L}\p{N}]?\p{L}+ */
        j = i;
        if (!IS_L(j) && !IS_NL(j) && !IS_N(j) && IS_L(j + 1)) j++;
        if (IS_L(j)) {
            while (IS_L(j)) j++;
            return j - i;
        }
        /* \p{N}{1,3} (Qwen2: \p{N}) */
        if (IS_N(i)) {
            size_t most = pre == ENG_PRE_QWEN2 ? 1 : 3;
            j = i;
            while (j < n && j - i < most && IS_N(j)) j++;
            return j - i;
        }
        /* ' ?[^\s\p{L}\p{N}]+[\r\n]*' */
        j = i + (c[i] == ' ' ? 1 : 0);
        if (j < n && !IS_S(j) && !IS_L(j) && !IS_N(j)) {
            while (j < n && !IS_S(j) && !IS_L(j) && !IS_N(j)) j++;
            while (IS_NL(j)) j++;
            return j - i;
        }
        /* \s*[\r\n]+ : the whitespace run up to its last newline */
        j = i;
        size_t last_nl = 0;
        bool has_nl = false;
        while (IS_S(j)) {
            if (IS_NL(j)) last_nl = j, has_nl = true;
            j++;
        }
        if (has_nl) return last_nl + 1 - i;
    } else {
        /* ' ?\p{L}+', ' ?\p{N}+', ' ?[^\s\p{L}\p{N}]+' */
        j = i + (c[i] == ' ' ? 1 : 0);
        if (IS_L(j)) {
            while (IS_L(j)) j++;
            return j - i;
        }
        if (IS_N(j)) {
            while (IS_N(j)) j++;
            return j - i;
        }
        if (j < n && !IS_S(j) && !IS_L(j) && !IS_N(j)) {
            while (j < n && !IS_S(j) && !IS_L(j) && !IS_N(j)) j++;
            return j - i;
        }
    }
    /* \s+(?!\S) then \s+ */
    j = i;
    while (IS_S(j)) j++;
    if (j > i) {
        if (j < n && j - i > 1) return j - i - 1; /* leave one space to prefix the next word */
        return j - i;
    }
    return 1; /* a lone character no alternative takes */
}

int eng__pre_from_name(const char *name) {
    static const struct {
        const char *name;
        int pre;
    } names[] = {
        {"llama-bpe", ENG_PRE_LLAMA3}, {"llama3", ENG_PRE_LLAMA3},    {"llama-v3", ENG_PRE_LLAMA3},
        {"gpt2", ENG_PRE_GPT2},        {"gpt-2", ENG_PRE_GPT2},       {"qwen2", ENG_PRE_QWEN2},
        {"smollm", ENG_PRE_SMOLLM},    {"starcoder", ENG_PRE_SMOLLM}, {"refact", ENG_PRE_SMOLLM},
        {"codeshell", ENG_PRE_SMOLLM},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (strcmp(name, names[i].name) == 0) return names[i].pre;
    return -1;
}

bool eng_tok_pre_supported(const char *name) {
    return name && eng__pre_from_name(name) >= 0;
}

int eng__pretokenize(const char *text, size_t len, int pre, size_t **ends, size_t *n_out) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, init_locale);
    *ends = NULL;
    *n_out = 0;
    if (!eng__utf8_valid(text, len)) return ENG_EINVAL;
    cps_t cps = {0};
    cps.cp = malloc(sizeof(uint32_t) * (len + 1));
    cps.off = malloc(sizeof(size_t) * (len + 1));
    size_t *e = malloc(sizeof(size_t) * (len + 1));
    if (!cps.cp || !cps.off || !e) {
        free(cps.cp), free(cps.off), free(e);
        return ENG_ENOMEM;
    }
    for (size_t i = 0; i < len;) {
        size_t l = utf8_valid_len((const unsigned char *)text + i, len - i);
        cps.off[cps.n] = i;
        cps.cp[cps.n++] = utf8_decode((const unsigned char *)text + i, l);
        i += l;
    }
    cps.off[cps.n] = len;
    size_t n = 0, all = cps.n;
    for (size_t i = 0; i < all;) {
        if (pre == ENG_PRE_SMOLLM) {
            /* each digit alone; GPT-2's pattern within each stretch between digits, which
             * must not look past the stretch */
            if (cp_is_number(cps.cp[i])) {
                e[n++] = cps.off[++i];
                continue;
            }
            size_t end = i;
            while (end < all && !cp_is_number(cps.cp[end])) end++;
            cps.n = end;
            while (i < end) {
                i += pre_match(&cps, i, ENG_PRE_GPT2);
                e[n++] = cps.off[i];
            }
            cps.n = all;
            continue;
        }
        i += pre_match(&cps, i, pre);
        e[n++] = cps.off[i];
    }
    free(cps.cp);
    free(cps.off);
    *ends = e;
    *n_out = n;
    return 0;
}

/* ---- symbol merging ---------------------------------------------------- */

typedef struct {
    int32_t prev, next;
    const char *text;
    size_t len;
} sym_t;

typedef struct {
    int32_t left, right;
    float key;  /* SPM: score (max first); BPE: -rank */
    size_t len; /* merged length, to detect stale entries */
} bigram_t;

typedef struct {
    bigram_t *a;
    size_t n, cap;
} heap_t;

static bool bg_before(const bigram_t *x, const bigram_t *y) {
    return x->key > y->key || (x->key == y->key && x->left < y->left);
}

static int heap_push(heap_t *h, bigram_t b) {
    if (h->n == h->cap) {
        size_t cap = h->cap ? h->cap * 2 : 64;
        bigram_t *a = realloc(h->a, cap * sizeof(*a));
        if (!a) return ENG_ENOMEM;
        h->a = a;
        h->cap = cap;
    }
    size_t i = h->n++;
    h->a[i] = b;
    while (i && bg_before(&h->a[i], &h->a[(i - 1) / 2])) {
        bigram_t t = h->a[i];
        h->a[i] = h->a[(i - 1) / 2];
        h->a[(i - 1) / 2] = t;
        i = (i - 1) / 2;
    }
    return 0;
}

static bigram_t heap_pop(heap_t *h) {
    bigram_t top = h->a[0];
    h->a[0] = h->a[--h->n];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < h->n && bg_before(&h->a[l], &h->a[m])) m = l;
        if (r < h->n && bg_before(&h->a[r], &h->a[m])) m = r;
        if (m == i) break;
        bigram_t t = h->a[i];
        h->a[i] = h->a[m];
        h->a[m] = t;
        i = m;
    }
    return top;
}

typedef struct {
    int32_t *v;
    size_t n, cap;
} ids_t;

static int ids_push(ids_t *o, int32_t id) {
    if (o->n == o->cap) {
        size_t cap = o->cap ? o->cap * 2 : 64;
        int32_t *v = realloc(o->v, cap * sizeof(int32_t));
        if (!v) return ENG_ENOMEM;
        o->v = v;
        o->cap = cap;
    }
    o->v[o->n++] = id;
    return 0;
}

/* Key of merging symbols l and r, or no candidate (returns false). */
static bool bigram_key(const eng_tokenizer_t *t, const sym_t *s, int32_t l, int32_t r, float *key) {
    if (t->kind == ENG_TOK_SPM) {
        int32_t id = hmap_get(&t->vocab, s[l].text, s[l].len + s[r].len);
        if (id < 0) return false;
        *key = t->score[id];
        return true;
    }
    /* BPE merges are keyed "left right" */
    char stackbuf[256];
    size_t need = s[l].len + 1 + s[r].len;
    char *k = need <= sizeof(stackbuf) ? stackbuf : malloc(need);
    if (!k) return false;
    memcpy(k, s[l].text, s[l].len);
    k[s[l].len] = ' ';
    memcpy(k + s[l].len + 1, s[r].text, s[r].len);
    int32_t rank = hmap_get(&t->merges, k, need);
    if (k != stackbuf) free(k);
    if (rank < 0) return false;
    *key = -(float)rank;
    return true;
}

static int try_pair(const eng_tokenizer_t *t, heap_t *h, const sym_t *s, int32_t l, int32_t r) {
    if (l < 0 || r < 0) return 0;
    float key;
    if (!bigram_key(t, s, l, r, &key)) return 0;
    return heap_push(h, (bigram_t){l, r, key, s[l].len + s[r].len});
}

/* Merge the symbols of one word (text, already split into code points) and emit token ids. */
static int merge_word(const eng_tokenizer_t *t, const char *text, size_t len, ids_t *out) {
    size_t ns = 0;
    sym_t *s = malloc(sizeof(sym_t) * (len ? len : 1));
    heap_t h = {0};
    int rc = 0;
    if (!s) return ENG_ENOMEM;
    for (size_t i = 0; i < len;) {
        size_t l = utf8_valid_len((const unsigned char *)text + i, len - i);
        if (!l) l = 1;
        s[ns] = (sym_t){(int32_t)ns - 1, (int32_t)ns + 1, text + i, l};
        ns++;
        i += l;
    }
    if (ns) s[ns - 1].next = -1;
    for (size_t i = 1; i < ns && !rc; i++) rc = try_pair(t, &h, s, (int32_t)i - 1, (int32_t)i);
    while (h.n && !rc) {
        bigram_t b = heap_pop(&h);
        sym_t *L = &s[b.left], *R = &s[b.right];
        if (!L->len || !R->len || L->len + R->len != b.len || L->next != b.right) continue;
        L->len += R->len;
        R->len = 0;
        L->next = R->next;
        if (R->next >= 0) s[R->next].prev = b.left;
        rc = try_pair(t, &h, s, L->prev, b.left);
        if (!rc) rc = try_pair(t, &h, s, b.left, L->next);
    }
    for (int32_t i = ns ? 0 : -1; i >= 0 && !rc; i = s[i].next) {
        int32_t id = hmap_get(&t->vocab, s[i].text, s[i].len);
        if (id >= 0) {
            rc = ids_push(out, id);
            continue;
        }
        /* byte fallback (SPM <0xNN>; BPE: single mapped characters) */
        for (size_t k = 0; k < s[i].len && !rc; k++) {
            int32_t bt = -1;
            if (t->kind == ENG_TOK_SPM) {
                bt = t->byte_tok[(uint8_t)s[i].text[k]];
            } else {
                size_t cl = utf8_valid_len((const unsigned char *)s[i].text + k, s[i].len - k);
                if (!cl) cl = 1;
                bt = hmap_get(&t->vocab, s[i].text + k, cl);
                k += cl - 1;
            }
            rc = ids_push(out, bt >= 0 ? bt : t->unk);
        }
    }
    free(h.a);
    free(s);
    return rc;
}

/* ---- tokenize -------------------------------------------------------- */

static int tokenize_spm(const eng_tokenizer_t *t, const char *text, size_t len, ids_t *out) {
    if (!len) return 0;
    /* escape: optional leading space, then every ' ' becomes U+2581 (3 bytes) */
    size_t cap = (len + 1) * 3;
    char *buf = malloc(cap);
    if (!buf) return ENG_ENOMEM;
    size_t n = 0;
    if (t->add_space_prefix) memcpy(buf, "\xe2\x96\x81", 3), n = 3;
    for (size_t i = 0; i < len; i++) {
        if (text[i] == ' ')
            memcpy(buf + n, "\xe2\x96\x81", 3), n += 3;
        else
            buf[n++] = text[i];
    }
    int rc = merge_word(t, buf, n, out);
    free(buf);
    return rc;
}

static int tokenize_bpe(const eng_tokenizer_t *t, const char *text, size_t len, ids_t *out) {
    size_t *ends = NULL, n_words = 0;
    char *word = malloc(len * 2 + 4); /* each byte maps to at most 2 UTF-8 bytes */
    int rc = word ? eng__pretokenize(text, len, t->pre, &ends, &n_words) : ENG_ENOMEM;
    for (size_t w = 0, start = 0; w < n_words && !rc; start = ends[w++]) {
        size_t wn = 0;
        for (size_t b = start; b < ends[w]; b++)
            wn += utf8_encode(byte_to_cp((uint8_t)text[b]), word + wn);
        rc = merge_word(t, word, wn, out);
    }
    free(ends);
    free(word);
    return rc;
}

/* Tokenize one plain fragment (no special tokens inside). */
static int tokenize_fragment(const eng_tokenizer_t *t, const char *text, size_t len,
                             bool space_prefix, ids_t *o) {
    if (t->kind == ENG_TOK_BPE) return tokenize_bpe(t, text, len, o);
    eng_tokenizer_t tmp = *t; /* shallow: only the flag differs */
    tmp.add_space_prefix = t->add_space_prefix && space_prefix;
    return tokenize_spm(&tmp, text, len, o);
}

/* The longest of the listed tokens spelled at text[0..len), or -1. */
static int32_t special_at(const eng_tokenizer_t *t, const int32_t *list, size_t n, const char *text,
                          size_t len) {
    int32_t best = -1;
    for (size_t k = 0; k < n; k++) {
        int32_t id = list[k];
        uint32_t pl = t->piece_len[id];
        if (pl <= len && memcmp(text, t->piece[id], pl) == 0 &&
            (best < 0 || pl > t->piece_len[best]))
            best = id;
    }
    return best;
}

int eng_tokenize_ex(const eng_tokenizer_t *t, const char *text, size_t len, bool add_bos,
                    bool parse_special, int32_t **out, size_t *n_out, char *msg) {
    *out = NULL;
    *n_out = 0;
    if (!eng__utf8_valid(text, len)) return eng_fail(msg, ENG_EINVAL, "text is not valid UTF-8");
    if (len > (SIZE_MAX / 8) - 8) return eng_fail(msg, ENG_ERANGE, "text too long");
    ids_t o = {0};
    int rc = 0;
    if (add_bos && t->bos >= 0) rc = ids_push(&o, t->bos);
    /* split at special tokens (user-defined ones always, control ones with parse_special, as
     * llama.cpp does); SentencePiece adds its space prefix after each of them */
    size_t start = 0;
    bool after_special = true;
    const int32_t *list = parse_special ? t->special : t->user;
    size_t n_list = parse_special ? t->n_special : t->n_user;
    const bool *first = parse_special ? t->special_first : t->user_first;
    for (size_t i = 0; i < len && !rc && n_list;) {
        int32_t sp = first[(uint8_t)text[i]] ? special_at(t, list, n_list, text + i, len - i) : -1;
        if (sp < 0) {
            i++;
            continue;
        }
        if (i > start) rc = tokenize_fragment(t, text + start, i - start, after_special, &o);
        if (!rc) rc = ids_push(&o, sp);
        i += t->piece_len[sp];
        start = i;
        after_special = true;
    }
    if (!rc && len > start) rc = tokenize_fragment(t, text + start, len - start, after_special, &o);
    if (!rc && !o.v) rc = ids_push(&o, 0), o.n = 0; /* a valid empty array */
    if (rc) {
        free(o.v);
        return eng_fail(msg, rc, "out of memory while tokenizing");
    }
    *out = o.v;
    *n_out = o.n;
    return 0;
}

int eng_tokenize(const eng_tokenizer_t *t, const char *text, size_t len, bool add_bos,
                 int32_t **out, size_t *n_out, char *msg) {
    return eng_tokenize_ex(t, text, len, add_bos, false, out, n_out, msg);
}

const char *eng_tok_chat_template(const eng_tokenizer_t *t) {
    return t->chat_template;
}

int32_t eng_tok_find(const eng_tokenizer_t *t, const char *piece) {
    return hmap_get(&t->vocab, piece, strlen(piece));
}

/* ---- detokenize -------------------------------------------------------- */

size_t eng_token_bytes(const eng_tokenizer_t *t, int32_t id, char *buf, size_t cap,
                       size_t *needed) {
    char tmp[8];
    const char *src = "";
    size_t n = 0;
    size_t w = 0;
    if (id < 0 || (uint32_t)id >= t->n) goto out;
    int ty = t->type[id];
    const char *p = t->piece[id];
    size_t pl = t->piece_len[id];
    if (ty == TT_CONTROL || ty == TT_UNUSED) goto out;
    if (ty == TT_UNKNOWN) {
        src = "\xe2\x96\x85", n = 3;
        goto out;
    }
    if (t->kind == ENG_TOK_SPM) {
        unsigned v;
        if (ty == TT_BYTE && pl == 6 && sscanf(p, "<0x%2X>", &v) == 1) {
            tmp[0] = (char)v;
            src = tmp, n = 1;
            goto out;
        }
        /* copy with U+2581 -> ' ' */
        for (size_t i = 0; i < pl;) {
            if (pl - i >= 3 && memcmp(p + i, "\xe2\x96\x81", 3) == 0) {
                if (w < cap) buf[w] = ' ';
                w++, i += 3;
            } else {
                if (w < cap) buf[w] = p[i];
                w++, i++;
            }
        }
        if (needed) *needed = w;
        return w < cap ? w : cap;
    }
    if (ty == TT_USER) {
        src = p, n = pl;
        goto out;
    }
    for (size_t i = 0; i < pl;) {
        size_t l = utf8_valid_len((const unsigned char *)p + i, pl - i);
        int b = l ? cp_to_byte(utf8_decode((const unsigned char *)p + i, l)) : -1;
        if (b >= 0) {
            if (w < cap) buf[w] = (char)b;
            w++;
        } else {
            size_t k = l ? l : 1;
            for (size_t j = 0; j < k; j++, w++)
                if (w < cap) buf[w] = p[i + j];
        }
        i += l ? l : 1;
    }
    if (needed) *needed = w;
    return w < cap ? w : cap;
out:
    if (needed) *needed = n;
    if (n > cap) n = cap;
    memcpy(buf, src, n);
    return n;
}

void eng_detok_init(eng_detok_t *d, const eng_tokenizer_t *t) {
    memset(d, 0, sizeof(*d));
    d->tok = t;
}

/* Expected length of a UTF-8 sequence from its lead byte; 0 for a byte that cannot start one. */
static size_t lead_len(unsigned char c) {
    if (c < 0x80) return 1;
    if (c >= 0xc2 && c <= 0xdf) return 2;
    if (c >= 0xe0 && c <= 0xef) return 3;
    if (c >= 0xf0 && c <= 0xf4) return 4;
    return 0;
}

static size_t put(char *out, size_t cap, size_t w, const char *s, size_t n) {
    if (w + n > cap) n = w < cap ? cap - w : 0;
    memcpy(out + w, s, n);
    return w + n;
}

/* Feed bytes through the pending buffer, emitting complete, valid sequences. */
static size_t detok_bytes(eng_detok_t *d, const char *b, size_t nb, char *out, size_t cap) {
    size_t w = 0;
    for (size_t i = 0; i < nb; i++) {
        unsigned char c = (unsigned char)b[i];
        if (d->n_pending == 0) {
            size_t l = lead_len(c);
            if (l == 1) {
                w = put(out, cap, w, (const char *)&b[i], 1);
            } else if (l == 0) {
                w = put(out, cap, w, "\xef\xbf\xbd", 3);
            } else {
                d->pending[d->n_pending++] = (char)c;
            }
            continue;
        }
        size_t need = lead_len((unsigned char)d->pending[0]);
        if ((c & 0xc0) != 0x80) {
            /* broken sequence: replace it, then reprocess this byte */
            w = put(out, cap, w, "\xef\xbf\xbd", 3);
            d->n_pending = 0;
            i--;
            continue;
        }
        d->pending[d->n_pending++] = (char)c;
        if (d->n_pending == need) {
            if (utf8_valid_len((const unsigned char *)d->pending, need) == need)
                w = put(out, cap, w, d->pending, need);
            else
                w = put(out, cap, w, "\xef\xbf\xbd", 3);
            d->n_pending = 0;
        }
    }
    return w;
}

size_t eng_detok_push(eng_detok_t *d, int32_t id, char *out, size_t cap) {
    char stackbuf[256];
    size_t need;
    size_t n = eng_token_bytes(d->tok, id, stackbuf, sizeof(stackbuf), &need);
    if (need <= sizeof(stackbuf)) return detok_bytes(d, stackbuf, n, out, cap);
    char *big = malloc(need);
    if (!big) return detok_bytes(d, stackbuf, n, out, cap);
    n = eng_token_bytes(d->tok, id, big, need, NULL);
    size_t w = detok_bytes(d, big, n, out, cap);
    free(big);
    return w;
}

size_t eng_detok_flush(eng_detok_t *d, char *out, size_t cap) {
    if (!d->n_pending) return 0;
    d->n_pending = 0;
    return put(out, cap, 0, "\xef\xbf\xbd", 3);
}

/* ---- loading ----------------------------------------------------------- */

static const gguf_kv_t *arr(const gguf_t *g, const char *key, uint32_t type, uint64_t n,
                            bool required, int *rc, char *msg) {
    const gguf_kv_t *kv = gguf_find(g, key);
    *rc = 0;
    if (!kv) {
        if (required) *rc = eng_fail(msg, ENG_EFORMAT, "missing metadata '%s'", key);
        return NULL;
    }
    if (kv->type != GGUF_ARRAY || kv->arr_type != type || (n && kv->arr_n != n)) {
        *rc =
            eng_fail(msg, ENG_EFORMAT, "metadata '%s' must be an array of %llu elements of type %u",
                     key, (unsigned long long)n, type);
        return NULL;
    }
    return kv;
}

static int token_id(const gguf_t *g, const char *key, uint32_t n, int32_t *out, char *msg) {
    uint64_t v;
    int rc = gguf_get_u64(g, key, &v, msg);
    if (rc < 0) return rc;
    if (rc == 1) return 0;
    if (v == 0xffffffffull) {
        *out = -1;
        return 0;
    }
    if (v >= n)
        return eng_fail(msg, ENG_EFORMAT, "'%s' = %llu is outside the vocabulary of %u", key,
                        (unsigned long long)v, n);
    *out = (int32_t)v;
    return 0;
}

int eng__tokenizer_load(eng_tokenizer_t **out, const gguf_t *g, uint32_t n_vocab, char *msg) {
    *out = NULL;
    const char *model = gguf_get_str(g, "tokenizer.ggml.model");
    if (!model) return eng_fail(msg, ENG_EFORMAT, "missing metadata 'tokenizer.ggml.model'");
    eng_tok_kind_t kind;
    if (strcmp(model, "llama") == 0)
        kind = ENG_TOK_SPM;
    else if (strcmp(model, "gpt2") == 0)
        kind = ENG_TOK_BPE;
    else
        return eng_fail(msg, ENG_EUNSUPPORTED,
                        "tokenizer model '%s' is not supported (llama and gpt2 are)", model);
    int rc;
    const gguf_kv_t *toks = arr(g, "tokenizer.ggml.tokens", GGUF_STRING, 0, true, &rc, msg);
    if (!toks) return rc;
    if (toks->arr_n != n_vocab)
        return eng_fail(msg, ENG_EFORMAT, "vocabulary has %llu tokens but the embedding has %u",
                        (unsigned long long)toks->arr_n, n_vocab);
    const gguf_kv_t *scores = arr(g, "tokenizer.ggml.scores", GGUF_F32, n_vocab, false, &rc, msg);
    if (rc) return rc;
    if (kind == ENG_TOK_SPM && !scores)
        return eng_fail(msg, ENG_EFORMAT, "SentencePiece vocabulary lacks 'tokenizer.ggml.scores'");
    const gguf_kv_t *types =
        arr(g, "tokenizer.ggml.token_type", GGUF_I32, n_vocab, false, &rc, msg);
    if (rc) return rc;
    const gguf_kv_t *merges = NULL;
    if (kind == ENG_TOK_BPE) {
        merges = arr(g, "tokenizer.ggml.merges", GGUF_STRING, 0, true, &rc, msg);
        if (!merges) return rc;
    }

    eng_tokenizer_t *t = calloc(1, sizeof(*t));
    if (!t) return eng_fail(msg, ENG_ENOMEM, "out of memory");
    t->kind = kind;
    t->n = n_vocab;
    t->piece = calloc(n_vocab, sizeof(char *));
    t->piece_len = calloc(n_vocab, sizeof(uint32_t));
    t->score = calloc(n_vocab, sizeof(float));
    t->type = calloc(n_vocab, sizeof(int32_t));
    t->eog = calloc(n_vocab, sizeof(bool));
    if (!t->piece || !t->piece_len || !t->score || !t->type || !t->eog ||
        hmap_init(&t->vocab, n_vocab)) {
        rc = eng_fail(msg, ENG_ENOMEM, "out of memory");
        goto fail;
    }
    for (int i = 0; i < 256; i++) t->byte_tok[i] = -1;
    for (uint32_t i = 0; i < n_vocab; i++) {
        uint64_t pl = toks->arr_slen[i];
        if (pl > 4096) {
            rc = eng_fail(msg, ENG_EFORMAT, "token %u is %llu bytes long", i,
                          (unsigned long long)pl);
            goto fail;
        }
        t->piece[i] = malloc(pl + 1);
        if (!t->piece[i]) {
            rc = eng_fail(msg, ENG_ENOMEM, "out of memory");
            goto fail;
        }
        memcpy(t->piece[i], toks->arr_s[i], pl);
        t->piece[i][pl] = 0;
        t->piece_len[i] = (uint32_t)pl;
        if (scores) memcpy(&t->score[i], scores->arr + 4 * (size_t)i, 4);
        int32_t ty = TT_NORMAL;
        if (types) memcpy(&ty, types->arr + 4 * (size_t)i, 4);
        t->type[i] = ty;
        hmap_put(&t->vocab, t->piece[i], (uint32_t)pl, (int32_t)i);
        unsigned v;
        if (kind == ENG_TOK_SPM && ty == TT_BYTE && pl == 6 &&
            sscanf(t->piece[i], "<0x%2X>", &v) == 1)
            t->byte_tok[v & 0xff] = (int32_t)i;
    }
    if (merges) {
        t->n_merges = merges->arr_n;
        t->merge_str = calloc(t->n_merges ? t->n_merges : 1, sizeof(char *));
        if (!t->merge_str || hmap_init(&t->merges, t->n_merges)) {
            rc = eng_fail(msg, ENG_ENOMEM, "out of memory");
            goto fail;
        }
        for (size_t i = 0; i < t->n_merges; i++) {
            uint64_t ml = merges->arr_slen[i];
            t->merge_str[i] = malloc(ml + 1);
            if (!t->merge_str[i]) {
                rc = eng_fail(msg, ENG_ENOMEM, "out of memory");
                goto fail;
            }
            memcpy(t->merge_str[i], merges->arr_s[i], ml);
            t->merge_str[i][ml] = 0;
            hmap_put(&t->merges, t->merge_str[i], (uint32_t)ml, (int32_t)i);
        }
        const char *pre = gguf_get_str(g, "tokenizer.ggml.pre");
        t->pre = eng__pre_from_name(pre ? pre : "(none)");
        if (t->pre < 0) {
            fprintf(stderr,
                    "tidald: warning: pre-tokenizer '%s' (tokenizer.ggml.pre) is unknown to "
                    "tidald; splitting with the Llama 3 pattern, so some texts may tokenize "
                    "differently from the model's own tokenizer\n",
                    pre);
            t->pre = ENG_PRE_LLAMA3;
        }
    }
    t->bos = t->eos = t->unk = -1;
    if (kind == ENG_TOK_SPM)
        t->bos = 1 < n_vocab ? 1 : -1, t->eos = 2 < n_vocab ? 2 : -1, t->unk = 0;
    if ((rc = token_id(g, "tokenizer.ggml.bos_token_id", n_vocab, &t->bos, msg)) ||
        (rc = token_id(g, "tokenizer.ggml.eos_token_id", n_vocab, &t->eos, msg)) ||
        (rc = token_id(g, "tokenizer.ggml.unknown_token_id", n_vocab, &t->unk, msg)))
        goto fail;
    if (t->unk < 0) t->unk = 0;
    t->add_bos = kind == ENG_TOK_SPM;
    t->add_space_prefix = kind == ENG_TOK_SPM;
    if ((rc = gguf_get_bool(g, "tokenizer.ggml.add_bos_token", &t->add_bos, msg)) < 0 ||
        (rc = gguf_get_bool(g, "tokenizer.ggml.add_space_prefix", &t->add_space_prefix, msg)) < 0)
        goto fail;
    /* end of generation: EOS, EOT/EOM ids, and control tokens with well-known end texts */
    if (t->eos >= 0) t->eog[t->eos] = true;
    int32_t extra = -1;
    if ((rc = token_id(g, "tokenizer.ggml.eot_token_id", n_vocab, &extra, msg))) goto fail;
    if (extra >= 0) t->eog[extra] = true;
    extra = -1;
    if ((rc = token_id(g, "tokenizer.ggml.eom_token_id", n_vocab, &extra, msg))) goto fail;
    if (extra >= 0) t->eog[extra] = true;
    static const char *const ends[] = {"<|eot_id|>",    "<|im_end|>",    "<|end|>",
                                       "<end_of_turn>", "<|endoftext|>", "<|eom_id|>"};
    for (uint32_t i = 0; i < n_vocab; i++)
        if (t->type[i] == TT_CONTROL)
            for (size_t k = 0; k < sizeof(ends) / sizeof(ends[0]); k++)
                if (strcmp(t->piece[i], ends[k]) == 0) t->eog[i] = true;
    t->special = malloc(sizeof(int32_t) * n_vocab);
    if (!t->special) {
        rc = eng_fail(msg, ENG_ENOMEM, "out of memory");
        goto fail;
    }
    t->user = malloc(sizeof(int32_t) * n_vocab);
    if (!t->user) {
        rc = eng_fail(msg, ENG_ENOMEM, "out of memory");
        goto fail;
    }
    for (uint32_t i = 0; i < n_vocab; i++) {
        if ((t->type[i] != TT_CONTROL && t->type[i] != TT_USER) || t->piece_len[i] == 0) continue;
        t->special[t->n_special++] = (int32_t)i;
        t->special_first[(uint8_t)t->piece[i][0]] = true;
        if (t->type[i] == TT_USER) {
            t->user[t->n_user++] = (int32_t)i;
            t->user_first[(uint8_t)t->piece[i][0]] = true;
        }
    }
    const char *tmpl = gguf_get_str(g, "tokenizer.chat_template");
    if (tmpl && !(t->chat_template = strdup(tmpl))) {
        rc = eng_fail(msg, ENG_ENOMEM, "out of memory");
        goto fail;
    }
    *out = t;
    return 0;
fail:
    eng__tokenizer_free(t);
    return rc;
}

void eng__tokenizer_free(eng_tokenizer_t *t) {
    if (!t) return;
    for (uint32_t i = 0; t->piece && i < t->n; i++) free(t->piece[i]);
    for (size_t i = 0; t->merge_str && i < t->n_merges; i++) free(t->merge_str[i]);
    free(t->piece);
    free(t->piece_len);
    free(t->score);
    free(t->type);
    free(t->eog);
    free(t->special);
    free(t->user);
    free(t->chat_template);
    free(t->merge_str);
    free(t->vocab.e);
    free(t->merges.e);
    free(t);
}

int eng_vocab_load(eng_tokenizer_t **out, const char *path, char *msg) {
    *out = NULL;
    gguf_t *g = NULL;
    int rc = gguf_open(&g, path, msg);
    if (rc) return rc;
    const gguf_kv_t *toks = gguf_find(g, "tokenizer.ggml.tokens");
    if (!toks || toks->type != GGUF_ARRAY || toks->arr_n == 0 || toks->arr_n > UINT32_MAX)
        rc = eng_fail(msg, ENG_EFORMAT, "%s: no vocabulary ('tokenizer.ggml.tokens')", path);
    else
        rc = eng__tokenizer_load(out, g, (uint32_t)toks->arr_n, msg);
    gguf_close(g); /* the tokenizer holds copies of everything it keeps */
    return rc;
}

void eng_vocab_free(eng_tokenizer_t *t) {
    eng__tokenizer_free(t);
}

eng_tok_kind_t eng_tok_kind(const eng_tokenizer_t *t) {
    return t->kind;
}
uint32_t eng_tok_n_vocab(const eng_tokenizer_t *t) {
    return t->n;
}
int32_t eng_tok_bos(const eng_tokenizer_t *t) {
    return t->bos;
}
int32_t eng_tok_eos(const eng_tokenizer_t *t) {
    return t->eos;
}
bool eng_tok_add_bos(const eng_tokenizer_t *t) {
    return t->add_bos;
}
bool eng_tok_is_eog(const eng_tokenizer_t *t, int32_t id) {
    return id >= 0 && (uint32_t)id < t->n && t->eog[id];
}
