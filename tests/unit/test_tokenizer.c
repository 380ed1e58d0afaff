/* test_tokenizer.c - SentencePiece and byte-level BPE tokenization, pre-tokenization and
 * streaming detokenization. */
#include "../../engine/model.h"
#include "../../tools/gguf_writer.h"
#include "helpers.h"

#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

static eng_model_t *load_stories(void) {
    eng_model_t *m = NULL;
    char msg[ENG_ERRMSG_LEN];
    cr_assert_eq(eng_model_load(&m, STORIES_PATH, msg), 0, "%s", msg);
    return m;
}

static void expect_ids(const eng_tokenizer_t *t, const char *text, bool bos, const int32_t *want,
                       size_t n_want) {
    int32_t *ids;
    size_t n;
    char msg[ENG_ERRMSG_LEN];
    cr_assert_eq(eng_tokenize(t, text, strlen(text), bos, &ids, &n, msg), 0, "%s", msg);
    cr_expect_eq(n, n_want, "'%s': %zu tokens, want %zu", text, n, n_want);
    for (size_t i = 0; i < n && i < n_want; i++)
        cr_expect_eq(ids[i], want[i], "'%s' token %zu: %d, want %d", text, i, ids[i], want[i]);
    free(ids);
}

/* Detokenize ids one at a time, checking every emitted chunk is whole UTF-8. */
static char *stream_detok(const eng_tokenizer_t *t, const int32_t *ids, size_t n) {
    eng_detok_t d;
    eng_detok_init(&d, t);
    char *out = calloc(1, 64 * n + 64);
    size_t w = 0;
    for (size_t i = 0; i < n; i++) {
        char chunk[64];
        size_t k = eng_detok_push(&d, ids[i], chunk, sizeof(chunk));
        cr_assert(eng__utf8_valid(chunk, k), "chunk after token %zu is not whole UTF-8", i);
        memcpy(out + w, chunk, k);
        w += k;
    }
    w += eng_detok_flush(&d, out + w, 64);
    out[w] = 0;
    return out;
}

Test(tokenizer, test_spm_matches_llama_cpp_ids_on_stories260K) {
    if (!have_stories()) cr_skip_test("%s not present; skipping", STORIES_PATH);
    eng_model_t *m = load_stories();
    const eng_tokenizer_t *t = eng_model_tokenizer(m);
    cr_expect_eq(eng_tok_kind(t), ENG_TOK_SPM);
    cr_expect_eq(eng_tok_bos(t), 1);
    cr_expect_eq(eng_tok_eos(t), 2);
    cr_expect(eng_tok_add_bos(t));
    const int32_t want[] = {1, 403, 407, 261, 378};
    expect_ids(t, "Once upon a time", true, want, 5);
    const int32_t only_bos[] = {1};
    expect_ids(t, "", true, only_bos, 1);
    expect_ids(t, "", false, NULL, 0);
    eng_model_free(m);
}

Test(tokenizer, test_spm_round_trips_text_with_byte_fallback) {
    if (!have_stories()) cr_skip_test("%s not present; skipping", STORIES_PATH);
    eng_model_t *m = load_stories();
    const eng_tokenizer_t *t = eng_model_tokenizer(m);
    const char *texts[] = {"Once upon a time, there was a dog.",
                           "h\xc3\xa9llo w\xc3\xb6rld \xf0\x9f\x99\x82!",
                           "tabs\tand\nnewlines  and   spaces", "\xe6\x97\xa5\xe6\x9c\xac"};
    for (size_t k = 0; k < 4; k++) {
        int32_t *ids;
        size_t n;
        char msg[ENG_ERRMSG_LEN];
        cr_assert_eq(eng_tokenize(t, texts[k], strlen(texts[k]), false, &ids, &n, msg), 0);
        char *back = stream_detok(t, ids, n);
        /* SentencePiece adds one leading space */
        cr_expect(back[0] == ' ' && strcmp(back + 1, texts[k]) == 0, "'%s' came back as '%s'",
                  texts[k], back);
        free(back);
        free(ids);
    }
    eng_model_free(m);
}

Test(tokenizer, test_tokenize_rejects_invalid_utf8) {
    if (!have_stories()) cr_skip_test("%s not present; skipping", STORIES_PATH);
    eng_model_t *m = load_stories();
    const char *bad[] = {"\xff", "a\xc3", "\xed\xa0\x80", "\xc0\xaf", "\xf4\x90\x80\x80"};
    for (size_t k = 0; k < 5; k++) {
        int32_t *ids;
        size_t n;
        char msg[ENG_ERRMSG_LEN] = {0};
        cr_expect_eq(
            eng_tokenize(eng_model_tokenizer(m), bad[k], strlen(bad[k]), true, &ids, &n, msg),
            ENG_EINVAL);
        cr_expect(strstr(msg, "UTF-8"), "%s", msg);
    }
    eng_model_free(m);
}

Test(tokenizer, test_detok_holds_split_utf8_and_replaces_broken_sequences) {
    if (!have_stories()) cr_skip_test("%s not present; skipping", STORIES_PATH);
    eng_model_t *m = load_stories();
    const eng_tokenizer_t *t = eng_model_tokenizer(m);
    /* byte tokens <0xF0> <0x9F> <0x99> <0x82> (ids 3 + byte) spell one emoji */
    int32_t emoji[4] = {3 + 0xf0, 3 + 0x9f, 3 + 0x99, 3 + 0x82};
    eng_detok_t d;
    eng_detok_init(&d, t);
    char out[64];
    for (int i = 0; i < 3; i++) cr_expect_eq(eng_detok_push(&d, emoji[i], out, sizeof(out)), 0);
    cr_expect_eq(eng_detok_push(&d, emoji[3], out, sizeof(out)), 4);
    cr_expect(memcmp(out, "\xf0\x9f\x99\x82", 4) == 0);
    /* a lead byte followed by ASCII: U+FFFD then the ASCII */
    eng_detok_push(&d, 3 + 0xe2, out, sizeof(out));
    size_t k = eng_detok_push(&d, 3 + 'A', out, sizeof(out));
    cr_expect_eq(k, 4);
    cr_expect(memcmp(out,
                     "\xef\xbf\xbd"
                     "A",
                     4) == 0);
    /* a dangling lead byte at the end is flushed as U+FFFD */
    eng_detok_push(&d, 3 + 0xc3, out, sizeof(out));
    cr_expect_eq(eng_detok_flush(&d, out, sizeof(out)), 3);
    /* control tokens (BOS/EOS) render as nothing */
    cr_expect_eq(eng_detok_push(&d, 1, out, sizeof(out)), 0);
    cr_expect(eng_tok_is_eog(t, 2));
    cr_expect(!eng_tok_is_eog(t, 1));
    eng_model_free(m);
}

/* ---- byte-level BPE on a fixture vocabulary -------------------------- */

static uint32_t b2cp(unsigned b) {
    bool keep = (b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || b >= 0xae;
    if (keep) return b;
    unsigned k = 0;
    for (unsigned x = 0; x < b; x++)
        if (!((x >= '!' && x <= '~') || (x >= 0xa1 && x <= 0xac) || x >= 0xae)) k++;
    return 256 + k;
}

static void utf8(uint32_t cp, char *o) {
    if (cp < 0x80)
        o[0] = (char)cp, o[1] = 0;
    else
        o[0] = (char)(0xc0 | (cp >> 6)), o[1] = (char)(0x80 | (cp & 0x3f)), o[2] = 0;
}

typedef struct {
    gguf_t *g;
    uint8_t *buf;
    eng_tokenizer_t *t;
} bpe_fixture_t;

enum { ID_HE = 256, ID_LL, ID_HELL, ID_HELLO, ID_BOT, ID_EOT, N_BPE };

static void bpe_open(bpe_fixture_t *f, const char *pre) {
    static char pieces[N_BPE][24];
    const char *toks[N_BPE];
    int32_t types[N_BPE];
    for (unsigned b = 0; b < 256; b++) {
        utf8(b2cp(b), pieces[b]);
        toks[b] = pieces[b];
        types[b] = 1;
    }
    const char *extra[] = {"he", "ll", "hell", "hello", "<|begin_of_text|>", "<|eot_id|>"};
    for (int i = 0; i < 6; i++) toks[256 + i] = extra[i], types[256 + i] = i >= 4 ? 3 : 1;
    const char *merges[] = {"h e", "l l", "he ll", "hell o"};
    gw_t *w = gw_create();
    gw_kv_str(w, "tokenizer.ggml.model", "gpt2");
    gw_kv_str(w, "tokenizer.ggml.pre", pre);
    gw_kv_arr_str(w, "tokenizer.ggml.tokens", toks, N_BPE);
    gw_kv_arr_i32(w, "tokenizer.ggml.token_type", types, N_BPE);
    gw_kv_arr_str(w, "tokenizer.ggml.merges", merges, 4);
    gw_kv_u32(w, "tokenizer.ggml.bos_token_id", ID_BOT);
    gw_kv_u32(w, "tokenizer.ggml.eos_token_id", ID_EOT);
    gw_kv_bool(w, "tokenizer.ggml.add_bos_token", true);
    size_t len;
    cr_assert_eq(gw_write_mem(w, &f->buf, &len), 0);
    gw_free(w);
    char msg[ENG_ERRMSG_LEN];
    cr_assert_eq(gguf_parse(&f->g, f->buf, len, msg), 0, "%s", msg);
    cr_assert_eq(eng__tokenizer_load(&f->t, f->g, N_BPE, msg), 0, "%s", msg);
}

static void bpe_close(bpe_fixture_t *f) {
    eng__tokenizer_free(f->t);
    gguf_close(f->g);
    free(f->buf);
}

Test(tokenizer, test_bpe_merges_by_rank_and_round_trips) {
    bpe_fixture_t f;
    bpe_open(&f, "llama-bpe");
    cr_expect_eq(eng_tok_kind(f.t), ENG_TOK_BPE);
    const int32_t a[] = {ID_BOT, ID_HELLO, ' ', ID_HELLO};
    expect_ids(f.t, "hello hello", true, a, 4);
    const int32_t b[] = {ID_HELL};
    expect_ids(f.t, "hell", false, b, 1);
    const int32_t c[] = {ID_HE, 'l'};
    expect_ids(f.t, "hel", false, c, 2);
    /* bytes outside ASCII map through the GPT-2 byte table */
    const int32_t d[] = {'h', 0xc3, 0xa9};
    expect_ids(f.t, "h\xc3\xa9", false, d, 3);
    cr_expect(eng_tok_is_eog(f.t, ID_EOT));
    const char *texts[] = {"hello world's 123456 !!\n\n  x", "h\xc3\xa9llo \xf0\x9f\x99\x82"};
    for (int k = 0; k < 2; k++) {
        int32_t *ids;
        size_t n;
        char msg[ENG_ERRMSG_LEN];
        cr_assert_eq(eng_tokenize(f.t, texts[k], strlen(texts[k]), true, &ids, &n, msg), 0);
        char *back = stream_detok(f.t, ids, n);
        cr_expect_str_eq(back, texts[k]);
        free(back);
        free(ids);
    }
    bpe_close(&f);
}

static void expect_split(const char *text, int pre, const char *const *want, size_t n_want) {
    size_t *ends, n;
    cr_assert_eq(eng__pretokenize(text, strlen(text), pre, &ends, &n), 0);
    cr_expect_eq(n, n_want, "'%s' split into %zu words, want %zu", text, n, n_want);
    for (size_t i = 0, start = 0; i < n && i < n_want; start = ends[i++]) {
        size_t len = ends[i] - start;
        cr_expect(len == strlen(want[i]) && memcmp(text + start, want[i], len) == 0,
                  "'%s' word %zu is '%.*s', want '%s'", text, i, (int)len, text + start, want[i]);
    }
    free(ends);
}

Test(tokenizer, test_llama3_pretokenizer_splits_like_its_regex) {
    const char *a[] = {"Hello", " world", "'s", " ", "123", "456", " !!"};
    expect_split("Hello world's 123456 !!", ENG_PRE_LLAMA3, a, 7);
    const char *b[] = {"a", "\n\n", " b"};
    expect_split("a\n\n b", ENG_PRE_LLAMA3, b, 3);
    const char *c[] = {"x", "  ", " y", "   "};
    expect_split("x   y   ", ENG_PRE_LLAMA3, c, 4);
    const char *d[] = {"I", "'M", " don", "'t"};
    expect_split("I'M don't", ENG_PRE_LLAMA3, d, 4);
    const char *e[] = {"\xe6\x97\xa5\xe6\x9c\xac"
                       "abc",
                       " \xc3\xa9t\xc3\xa9", "?\n"};
    expect_split("\xe6\x97\xa5\xe6\x9c\xac"
                 "abc \xc3\xa9t\xc3\xa9?\n",
                 ENG_PRE_LLAMA3, e, 3);
    const char *f[] = {"$hello"}; /* one optional non-letter joins the letters */
    expect_split("$hello", ENG_PRE_LLAMA3, f, 1);
}

Test(tokenizer, test_gpt2_pretokenizer_splits_like_its_regex) {
    const char *a[] = {"Hello", " world", " 123456", "'s"};
    expect_split("Hello world 123456's", ENG_PRE_GPT2, a, 4);
    const char *b[] = {"I", "'", "M"};
    expect_split("I'M", ENG_PRE_GPT2, b, 3);
}

/* SmolLM2's (and StarCoder's): each digit is a word of its own, GPT-2's pattern between. */
Test(tokenizer, test_smollm_pretokenizer_splits_digits_then_gpt2) {
    const char *a[] = {"In", " ", "1", "9", "6", "9", ",", " the", " ", "1", "0", "0", " apples"};
    expect_split("In 1969, the 100 apples", ENG_PRE_SMOLLM, a, 13);
    const char *b[] = {"x", "2", "'s", " (", "a", ")"}; /* GPT-2, not Llama 3: "(" alone */
    expect_split("x2's (a)", ENG_PRE_SMOLLM, b, 6);
}

/* Qwen2's: Llama 3's pattern with one digit per word. */
Test(tokenizer, test_qwen2_pretokenizer_splits_single_digits) {
    const char *a[] = {"abc", " ", "1", "2", "3", "4", "'S"};
    expect_split("abc 1234'S", ENG_PRE_QWEN2, a, 7);
}

Test(tokenizer, test_pretokenizer_names) {
    cr_expect_eq(eng__pre_from_name("smollm"), ENG_PRE_SMOLLM);
    cr_expect_eq(eng__pre_from_name("llama-bpe"), ENG_PRE_LLAMA3);
    cr_expect_eq(eng__pre_from_name("qwen2"), ENG_PRE_QWEN2);
    cr_expect_eq(eng__pre_from_name("gpt2"), ENG_PRE_GPT2);
    cr_expect_eq(eng__pre_from_name("deepseek-coder"), -1);
}
