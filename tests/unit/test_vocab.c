/* test_vocab.c - `tidald convert-tokenizer` (tools/hf_vocab.c) and vocabulary-only loading.
 *
 * The real-vocabulary cases round-trip SmolLM2's and Gemma 3's vocabularies: `make
 * hf-tokenizers` rebuilds each model's tokenizer.json with Hugging Face's `tokenizers` library
 * (scripts/hf_tokenizer_json.py, which checks that library encodes the fixture texts to
 * llama.cpp's ids), the converter turns it back into a GGUF vocabulary, and every tokenizer.*
 * key must equal the model file's, and the texts tokenize to llama.cpp's ids. The small cases
 * cover each layout and each refusal on handwritten files.
 */
#include "../../engine/engine.h"
#include "../../engine/gguf.h"
#include "../../tools/hf_vocab.h"
#include "../../tools/synth_model.h"
#include "helpers.h"

#include <cjson/cJSON.h>
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char *tmp_path(const char *name) {
    static char path[4][512];
    static int k;
    const char *dir = getenv("TIDALD_TEST_TMP");
    char *p = path[k++ & 3];
    snprintf(p, 512, "%s/vocab-%d-%s", dir && *dir ? dir : "/tmp", (int)getpid(), name);
    return p;
}

static const char *write_text(const char *name, const char *text) {
    const char *p = tmp_path(name);
    FILE *f = fopen(p, "w");
    cr_assert(f, "cannot write %s", p);
    fputs(text, f);
    fclose(f);
    return p;
}

/* Convert a handwritten tokenizer.json (and config, if any); the output path, or NULL with
 * *rc and msg set. */
static const char *convert(const char *json, const char *config, const char *pre, uint32_t size,
                           int *rc, char *msg) {
    hf_vocab_opts_t o = {.input = write_text("tokenizer.json", json),
                         .config = config ? write_text("config.json", config) : NULL,
                         .pre = pre,
                         .vocab_size = size};
    const char *out = tmp_path("out.gguf");
    *rc = hf_vocab_convert(&o, out, NULL, msg);
    return *rc ? NULL : out;
}

static const gguf_kv_t *key(const gguf_t *g, const char *k) {
    const gguf_kv_t *kv = gguf_find(g, k);
    cr_assert(kv, "the output has '%s'", k);
    return kv;
}

static void expect_strings(const gguf_t *g, const char *k, const char *const *want, size_t n) {
    const gguf_kv_t *kv = key(g, k);
    cr_assert_eq(kv->arr_n, n, "%s has %zu entries", k, n);
    for (size_t i = 0; i < n; i++)
        cr_expect(
            kv->arr_slen[i] == strlen(want[i]) && !memcmp(kv->arr_s[i], want[i], kv->arr_slen[i]),
            "%s[%zu] is '%.*s', want '%s'", k, i, (int)kv->arr_slen[i], kv->arr_s[i], want[i]);
}

static int32_t i32_at(const gguf_kv_t *kv, size_t i) {
    int32_t v;
    memcpy(&v, kv->arr + 4 * i, 4);
    return v;
}

static uint64_t u64(const gguf_t *g, const char *k) {
    uint64_t v = 0;
    cr_assert_eq(gguf_get_u64(g, k, &v, NULL), 0, "the output has '%s'", k);
    return v;
}

static bool flag(const gguf_t *g, const char *k) {
    bool v = false;
    cr_assert_eq(gguf_get_bool(g, k, &v, NULL), 0, "the output has '%s'", k);
    return v;
}

/* ===== the real vocabularies =========================================== */

/* Two GGUF keys hold the same value: type, and every byte of every element. */
static bool same_value(const gguf_kv_t *a, const gguf_kv_t *b) {
    if (a->type != b->type) return false;
    if (a->type == GGUF_STRING)
        return a->str_len == b->str_len && !memcmp(a->str, b->str, a->str_len);
    if (a->type == GGUF_BOOL) return a->v.b == b->v.b;
    if (a->type != GGUF_ARRAY) return a->v.u == b->v.u;
    if (a->arr_type != b->arr_type || a->arr_n != b->arr_n) return false;
    if (a->arr_type != GGUF_STRING)
        return !memcmp(a->arr, b->arr, a->arr_n * gguf_scalar_size(a->arr_type));
    for (uint64_t i = 0; i < a->arr_n; i++)
        if (a->arr_slen[i] != b->arr_slen[i] || memcmp(a->arr_s[i], b->arr_s[i], a->arr_slen[i]))
            return false;
    return true;
}

/* SentencePiece scores: a tokenizer.json has none, so the converter ranks the pieces in
 * vocabulary order. Every piece a merge can produce (two characters or more) gets exactly the
 * model's score; a single character's score orders no merge (SentencePiece merges by the merged
 * piece's score) and only its order is checked. */
static void expect_scores(const gguf_t *orig, const gguf_kv_t *a, const gguf_kv_t *b) {
    const gguf_kv_t *toks = gguf_find(orig, "tokenizer.ggml.tokens");
    size_t single = 0;
    float last_a = 0, last_b = 0;
    for (uint64_t i = 0; i < a->arr_n; i++) {
        float sa, sb;
        memcpy(&sa, a->arr + 4 * i, 4);
        memcpy(&sb, b->arr + 4 * i, 4);
        size_t chars = 0;
        for (uint64_t k = 0; k < toks->arr_slen[i]; k++)
            chars += ((uint8_t)toks->arr_s[i][k] & 0xC0) != 0x80;
        if (chars > 1 || sa == 0 || sa == -1000) {
            cr_expect_eq(sa, sb, "score of token %llu is %g, the model's %g", (unsigned long long)i,
                         sb, sa);
        } else {
            cr_expect((sa < last_a) == (sb < last_b), "token %llu's score keeps its order",
                      (unsigned long long)i);
            single += sa != sb;
        }
        if (sa != 0 && sa != -1000) last_a = sa, last_b = sb;
    }
    fprintf(stderr, "vocab: %zu single-character piece scores differ only by offset\n", single);
}

static void round_trip(const char *model_name, const char *fixture) {
    char dir[256];
    snprintf(dir, sizeof(dir), "hf/%.*s/tokenizer.json", (int)(strlen(model_name) - 5), model_name);
    const char *src = real_model_path(dir);
    if (!src)
        cr_skip_test("%s not there: `make hf-tokenizers` rebuilds it from the model with "
                     "Hugging Face's tokenizers (needs `make models` and PyPI)",
                     dir);
    char json[512], msg[ENG_ERRMSG_LEN];
    snprintf(json, sizeof(json), "%s", src);
    const char *orig_path = real_model_path(model_name);
    cr_assert(orig_path, "%s is there when its tokenizer.json is", model_name);
    char model[512];
    snprintf(model, sizeof(model), "%s", orig_path);
    hf_vocab_opts_t o = {.input = json};
    const char *out = tmp_path("real.gguf");
    cr_assert_eq(hf_vocab_convert(&o, out, NULL, msg), 0, "%s", msg);

    gguf_t *a = NULL, *b = NULL;
    cr_assert_eq(gguf_open(&a, model, msg), 0, "%s", msg);
    cr_assert_eq(gguf_open(&b, out, msg), 0, "%s", msg);
    int n_keys = 0;
    for (size_t i = 0; i < a->n_kv; i++) {
        const gguf_kv_t *ka = &a->kv[i];
        if (strncmp(ka->key, "tokenizer.", 10)) continue;
        const gguf_kv_t *kb = gguf_find(b, ka->key);
        cr_expect(kb, "the converted vocabulary has '%s'", ka->key);
        if (!kb) continue;
        n_keys++;
        if (!strcmp(ka->key, "tokenizer.ggml.scores") && kb->type == GGUF_ARRAY &&
            kb->arr_n == ka->arr_n)
            expect_scores(a, ka, kb);
        else
            cr_expect(same_value(ka, kb), "'%s' differs from the model's", ka->key);
    }
    for (size_t i = 0; i < b->n_kv; i++)
        cr_expect(gguf_find(a, b->kv[i].key), "the converter adds '%s', which the model lacks",
                  b->kv[i].key);
    fprintf(stderr, "vocab %s: %d tokenizer keys equal the model's\n", model_name, n_keys);
    gguf_close(a);
    gguf_close(b);

    /* and the vocabulary-only file tokenizes as llama.cpp does */
    eng_tokenizer_t *t = NULL;
    cr_assert_eq(eng_vocab_load(&t, out, msg), 0, "%s", msg);
    size_t len;
    char *text = (char *)test_slurp(fixture, &len);
    cJSON *fx = cJSON_Parse(text);
    free(text);
    cr_assert(fx);
    const cJSON *e;
    int n = 0, same = 0;
    cJSON_ArrayForEach(e, cJSON_GetObjectItem(fx, "tokenize")) {
        const char *s = cJSON_GetObjectItem(e, "text")->valuestring;
        const cJSON *want = cJSON_GetObjectItem(e, "ids");
        int32_t *ids = NULL;
        size_t n_ids = 0;
        cr_assert_eq(eng_tokenize(t, s, strlen(s), false, &ids, &n_ids, msg), 0, "%s", msg);
        bool eq = n_ids == (size_t)cJSON_GetArraySize(want);
        for (size_t i = 0; eq && i < n_ids; i++)
            eq = ids[i] == (int32_t)cJSON_GetArrayItem(want, (int)i)->valuedouble;
        cr_expect(eq, "'%.40s' tokenizes to llama.cpp's ids", s);
        same += eq, n++;
        free(ids);
    }
    cr_expect_gt(n, 0);
    fprintf(stderr, "vocab %s: %d of %d fixture texts give llama.cpp's ids\n", model_name, same, n);
    cJSON_Delete(fx);
    eng_vocab_free(t);
    unlink(out);
}

Test(vocab, test_smollm2_vocabulary_round_trips_through_tokenizer_json) {
    round_trip(SMOLLM2_GGUF, "tests/fixtures/reference/SmolLM2-135M-Instruct.Q4_1.json");
}

Test(vocab, test_gemma3_vocabulary_round_trips_through_tokenizer_json) {
    round_trip(GEMMA3_GGUF, "tests/fixtures/reference/gemma-3-270m-q4_k_m.json");
}

/* ===== byte-level BPE ================================================== */

/* ids 0..6 with 2 missing; 5 and 6 added; merges in the pair form, one part holding a space */
static const char BPE_JSON[] =
    "{\"version\": \"1.0\", \"normalizer\": null,\n"
    " \"pre_tokenizer\": {\"type\": \"ByteLevel\", \"add_prefix_space\": false, "
    "\"use_regex\": true},\n"
    " \"post_processor\": {\"type\": \"TemplateProcessing\", \"single\": [{\"SpecialToken\": "
    "{\"id\": \"<s>\", \"type_id\": 0}}, {\"Sequence\": {\"id\": \"A\", \"type_id\": 0}}]},\n"
    " \"decoder\": {\"type\": \"ByteLevel\"},\n"
    " \"added_tokens\": [{\"id\": 5, \"content\": \"<s>\", \"special\": true},\n"
    "                  {\"id\": 6, \"content\": \"<|user|>\", \"special\": false},\n"
    "                  {\"id\": 7, \"content\": \"hello world\", \"special\": false}],\n"
    " \"model\": {\"type\": \"BPE\", \"byte_fallback\": false,\n"
    "   \"vocab\": {\"a\": 0, \"b\": 1, \"ab\": 3, \"a b\": 4},\n"
    "   \"merges\": [[\"a\", \"b\"], [\"a \", \"b\"]]}}\n";

Test(vocab, test_byte_level_bpe_vocabulary_as_llama_cpp_writes_it) {
    char msg[ENG_ERRMSG_LEN];
    int rc;
    const char *cfg = "{\"eos_token\": {\"content\": \"<s>\"}, \"chat_template\": \"{{ x }}\"}";
    const char *out = convert(BPE_JSON, cfg, NULL, 10, &rc, msg);
    cr_assert(out, "%s", msg);
    gguf_t *g = NULL;
    cr_assert_eq(gguf_open(&g, out, msg), 0, "%s", msg);
    cr_expect_str_eq(gguf_get_str(g, "tokenizer.ggml.model"), "gpt2");
    cr_expect_str_eq(gguf_get_str(g, "tokenizer.ggml.pre"), "gpt2");
    const char *tokens[] = {"a",   "b",        "[PAD2]",      "ab",     "a b",
                            "<s>", "<|user|>", "hello world", "[PAD8]", "[PAD9]"};
    expect_strings(g, "tokenizer.ggml.tokens", tokens, 10);
    const gguf_kv_t *ty = key(g, "tokenizer.ggml.token_type");
    /* <|user|> is not marked special but looks it, as llama.cpp judges; padding is unused */
    int32_t want_types[] = {1, 1, 5, 1, 1, 3, 3, 4, 5, 5};
    for (int i = 0; i < 10; i++) cr_expect_eq(i32_at(ty, i), want_types[i], "type of token %d", i);
    const char *merges[] = {"a b", "a\xc4\xa0 b"};
    expect_strings(g, "tokenizer.ggml.merges", merges, 2);
    cr_expect_null(gguf_find(g, "tokenizer.ggml.scores"), "byte-level vocabularies carry none");
    /* BOS from the post-processor template, which also says to add it; EOS from the config */
    cr_expect_eq(u64(g, "tokenizer.ggml.bos_token_id"), 5);
    cr_expect_eq(u64(g, "tokenizer.ggml.eos_token_id"), 5);
    cr_expect(flag(g, "tokenizer.ggml.add_bos_token"));
    cr_expect_not(flag(g, "tokenizer.ggml.add_space_prefix"));
    cr_expect_str_eq(gguf_get_str(g, "tokenizer.chat_template"), "{{ x }}");
    gguf_close(g);

    /* it loads as a vocabulary and tokenizes with its merges and added tokens */
    eng_tokenizer_t *t = NULL;
    cr_assert_eq(eng_vocab_load(&t, out, msg), 0, "%s", msg);
    cr_expect_eq(eng_tok_n_vocab(t), 10);
    cr_expect_eq(eng_tok_bos(t), 5);
    int32_t *ids = NULL;
    size_t n = 0;
    cr_assert_eq(eng_tokenize_ex(t, "ab<|user|>hello world", 21, true, true, &ids, &n, msg), 0,
                 "%s", msg);
    cr_assert_eq(n, 4, "%zu tokens", n);
    cr_expect(ids[0] == 5 && ids[1] == 3 && ids[2] == 6 && ids[3] == 7, "%d %d %d %d", ids[0],
              ids[1], ids[2], ids[3]);
    free(ids);
    eng_vocab_free(t);
    unlink(out);
}

/* Each pre-tokenizer structure the families ship is recognised by name. */
Test(vocab, test_pre_tokenizer_structures_are_recognised) {
    static const char LLAMA3[] =
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\\\r\\\\n\\\\p{L}\\\\p{N}]?\\\\p{L}+|\\\\p{N}{1,3}| "
        "?[^\\\\s\\\\p{L}\\\\p{N}]+[\\\\r\\\\n]*|\\\\s*[\\\\r\\\\n]+|\\\\s+(?!\\\\S)|\\\\s+";
    static const char QWEN2[] =
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\\\r\\\\n\\\\p{L}\\\\p{N}]?"
        "\\\\p{L}+|\\\\p{N}| ?[^\\\\s\\\\p{L}\\\\p{N}]+[\\\\r\\\\n]*|\\\\s*[\\\\r\\\\n]+|\\\\s+(?!"
        "\\\\S)|\\\\s+";
    char split[1024];
    struct {
        const char *pre_tokenizer, *want;
    } cases[] = {
        {"{\"type\": \"Sequence\", \"pretokenizers\": [{\"type\": \"Digits\", "
         "\"individual_digits\": true}, {\"type\": \"ByteLevel\", \"use_regex\": true}]}",
         "smollm"},
        {NULL, "llama-bpe"},
        {NULL, "qwen2"},
        {"{\"type\": \"ByteLevel\"}", "gpt2"},
    };
    for (int k = 0; k < 4; k++) {
        if (!cases[k].pre_tokenizer) {
            snprintf(split, sizeof(split),
                     "{\"type\": \"Sequence\", \"pretokenizers\": [{\"type\": \"Split\", "
                     "\"pattern\": {\"Regex\": \"%s\"}, \"behavior\": \"Isolated\", \"invert\": "
                     "false}, {\"type\": \"ByteLevel\", \"use_regex\": false}]}",
                     k == 1 ? LLAMA3 : QWEN2);
            cases[k].pre_tokenizer = split;
        }
        char json[2048], msg[ENG_ERRMSG_LEN];
        snprintf(json, sizeof(json),
                 "{\"pre_tokenizer\": %s, \"decoder\": {\"type\": \"ByteLevel\"}, \"model\": "
                 "{\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []}}",
                 cases[k].pre_tokenizer);
        int rc;
        const char *out = convert(json, NULL, NULL, 0, &rc, msg);
        cr_assert(out, "%s: %s", cases[k].want, msg);
        gguf_t *g = NULL;
        cr_assert_eq(gguf_open(&g, out, msg), 0, "%s", msg);
        cr_expect_str_eq(gguf_get_str(g, "tokenizer.ggml.pre"), cases[k].want);
        cr_expect(eng_tok_pre_supported(cases[k].want));
        gguf_close(g);
        unlink(out);
    }
}

/* A structure tidald does not know is refused, naming it, unless --pre names it. */
Test(vocab, test_unknown_pre_tokenizer_is_refused_unless_named) {
    const char *json = "{\"pre_tokenizer\": {\"type\": \"Sequence\", \"pretokenizers\": "
                       "[{\"type\": \"Split\", \"pattern\": {\"Regex\": \"\\\\w+\"}}, "
                       "{\"type\": \"ByteLevel\", \"use_regex\": false}]}, \"model\": {\"type\": "
                       "\"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []}}";
    char msg[ENG_ERRMSG_LEN];
    int rc;
    cr_expect_null(convert(json, NULL, NULL, 0, &rc, msg));
    cr_expect_eq(rc, ENG_EUNSUPPORTED);
    cr_expect(strstr(msg, "Split") && strstr(msg, "--pre"), "%s", msg);
    const char *out = convert(json, NULL, "llama-bpe", 0, &rc, msg);
    cr_assert(out, "%s", msg);
    gguf_t *g = NULL;
    cr_assert_eq(gguf_open(&g, out, msg), 0, "%s", msg);
    cr_expect_str_eq(gguf_get_str(g, "tokenizer.ggml.pre"), "llama-bpe");
    gguf_close(g);
    unlink(out);
}

/* ===== SentencePiece BPE =============================================== */

Test(vocab, test_sentencepiece_vocabulary_gets_scores_and_byte_pieces) {
    const char *json =
        "{\"normalizer\": null, \"pre_tokenizer\": {\"type\": \"Metaspace\", \"replacement\": "
        "\"\\u2581\", \"prepend_scheme\": \"first\", \"split\": false},\n"
        " \"added_tokens\": [{\"id\": 0, \"content\": \"<unk>\", \"special\": true},\n"
        "   {\"id\": 1, \"content\": \"<s>\", \"special\": true},\n"
        "   {\"id\": 2, \"content\": \"</s>\", \"special\": true}],\n"
        " \"model\": {\"type\": \"BPE\", \"byte_fallback\": true, \"unk_token\": \"<unk>\",\n"
        "   \"vocab\": {\"<unk>\": 0, \"<s>\": 1, \"</s>\": 2, \"<0x0A>\": 3, \"<0xE2>\": 4,\n"
        "     \"\\u2581h\": 5, \"\\u2581hi\": 6, \"\\u2581\": 7, \"h\": 8, \"i\": 9},\n"
        "   \"merges\": [\"\\u2581 h\", \"\\u2581h i\"]}}";
    const char *cfg = "{\"bos_token\": \"<s>\", \"eos_token\": \"</s>\", \"add_bos_token\": true, "
                      "\"chat_template\": [{\"name\": \"default\", \"template\": \"D\"}, "
                      "{\"name\": \"tool_use\", \"template\": \"T\"}]}";
    char msg[ENG_ERRMSG_LEN];
    int rc;
    const char *out = convert(json, cfg, NULL, 0, &rc, msg);
    cr_assert(out, "%s", msg);
    gguf_t *g = NULL;
    cr_assert_eq(gguf_open(&g, out, msg), 0, "%s", msg);
    cr_expect_str_eq(gguf_get_str(g, "tokenizer.ggml.model"), "llama");
    cr_expect_str_eq(gguf_get_str(g, "tokenizer.ggml.pre"), "default");
    cr_expect_null(gguf_find(g, "tokenizer.ggml.merges"), "SentencePiece merges by score");
    const gguf_kv_t *ty = key(g, "tokenizer.ggml.token_type"),
                    *sc = key(g, "tokenizer.ggml.scores");
    int32_t want_types[] = {3, 3, 3, 6, 6, 1, 1, 1, 1, 1};
    float want_scores[] = {-1000, -1000, -1000, 0, 0, 0, -1, -2, -3, -4};
    for (int i = 0; i < 10; i++) {
        float s;
        memcpy(&s, sc->arr + 4 * i, 4);
        cr_expect_eq(i32_at(ty, i), want_types[i], "type of token %d", i);
        cr_expect_eq(s, want_scores[i], "score of token %d is %g", i, s);
    }
    cr_expect_eq(u64(g, "tokenizer.ggml.bos_token_id"), 1);
    cr_expect_eq(u64(g, "tokenizer.ggml.eos_token_id"), 2);
    cr_expect_eq(u64(g, "tokenizer.ggml.unknown_token_id"), 0);
    cr_expect(flag(g, "tokenizer.ggml.add_bos_token"));
    cr_expect(flag(g, "tokenizer.ggml.add_space_prefix"), "Metaspace prepends a space");
    cr_expect_str_eq(gguf_get_str(g, "tokenizer.chat_template"), "D");
    cr_expect_str_eq(gguf_get_str(g, "tokenizer.chat_template.tool_use"), "T");
    gguf_close(g);

    eng_tokenizer_t *t = NULL;
    cr_assert_eq(eng_vocab_load(&t, out, msg), 0, "%s", msg);
    int32_t *ids = NULL;
    size_t n = 0;
    cr_assert_eq(eng_tokenize(t, "hi\n", 3, true, &ids, &n, msg), 0, "%s", msg);
    cr_assert_eq(n, 3, "%zu tokens", n); /* <s> ▁hi <0x0A> */
    cr_expect(ids[0] == 1 && ids[1] == 6 && ids[2] == 3, "%d %d %d", ids[0], ids[1], ids[2]);
    free(ids);
    eng_vocab_free(t);
    unlink(out);
}

/* ===== refusals ======================================================== */

Test(vocab, test_bad_files_get_clear_errors) {
    char msg[ENG_ERRMSG_LEN];
    int rc;
    struct {
        const char *json, *cfg;
        uint32_t size;
        int rc;
        const char *says;
    } cases[] = {
        {"{\"model\": {\"type\": \"BPE\",\n \"vocab\": {\"a\": 0,}}}", NULL, 0, ENG_EFORMAT,
         "line 2"},
        {"{\"model\": {\"type\": \"Unigram\", \"vocab\": [[\"a\", 0.0]]}}", NULL, 0,
         ENG_EUNSUPPORTED, "'Unigram'"},
        {"{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []}}", NULL, 0,
         ENG_EUNSUPPORTED, "byte-level"},
        {"{\"decoder\": {\"type\": \"ByteLevel\"}, \"model\": {\"type\": \"BPE\", \"vocab\": "
         "{\"a\": 0, \"b\": 0}, \"merges\": []}}",
         NULL, 0, ENG_EFORMAT, "both 'a' and 'b'"},
        {"{\"decoder\": {\"type\": \"ByteLevel\"}, \"model\": {\"type\": \"BPE\", \"vocab\": "
         "{\"a\": -1}, \"merges\": []}}",
         NULL, 0, ENG_EFORMAT, "not a token id"},
        {"{\"decoder\": {\"type\": \"ByteLevel\"}, \"model\": {\"type\": \"BPE\", \"vocab\": "
         "{\"a\": 99999999999}, \"merges\": []}}",
         NULL, 0, ENG_EFORMAT, "not a token id"},
        {"{\"decoder\": {\"type\": \"ByteLevel\"}, \"model\": {\"type\": \"BPE\", \"vocab\": "
         "{\"a\": 3}, \"merges\": []}}",
         NULL, 2, ENG_EINVAL, "--vocab-size 2"},
        {"{\"decoder\": {\"type\": \"ByteLevel\"}, \"model\": {\"type\": \"BPE\", \"vocab\": "
         "{\"a\": 0}}}",
         NULL, 0, ENG_EFORMAT, "merges"},
        {"{\"decoder\": {\"type\": \"ByteLevel\"}, \"model\": {\"type\": \"BPE\", \"vocab\": "
         "{\"a\": 0}, \"merges\": [\"ab\"]}}",
         NULL, 0, ENG_EFORMAT, "merges[0]"},
        {"{\"normalizer\": {\"type\": \"NFC\"}, \"decoder\": {\"type\": \"ByteLevel\"}, "
         "\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []}}",
         NULL, 0, ENG_EUNSUPPORTED, "'NFC' normalizer"},
        {"{\"added_tokens\": [{\"id\": \"x\"}], \"decoder\": {\"type\": \"ByteLevel\"}, "
         "\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []}}",
         NULL, 0, ENG_EFORMAT, "added_tokens"},
        {"[1, 2]", NULL, 0, ENG_EFORMAT, "not a tokenizer.json"},
        {"{\"decoder\": {\"type\": \"ByteLevel\"}, \"model\": {\"type\": \"BPE\", \"vocab\": "
         "{\"a\": 0}, \"merges\": []}}",
         "{\"bos_token\": ", 0, ENG_EFORMAT, "not valid JSON"},
    };
    for (size_t k = 0; k < sizeof(cases) / sizeof(cases[0]); k++) {
        msg[0] = 0;
        cr_expect_null(convert(cases[k].json, cases[k].cfg, NULL, cases[k].size, &rc, msg),
                       "case %zu is refused", k);
        cr_expect_eq(rc, cases[k].rc, "case %zu: %s", k, msg);
        cr_expect(strstr(msg, cases[k].says), "case %zu: '%s' says '%s'", k, msg, cases[k].says);
    }
    hf_vocab_opts_t o = {.input = tmp_path("missing.json")};
    cr_expect_eq(hf_vocab_convert(&o, tmp_path("x.gguf"), NULL, msg), ENG_EIO);
    cr_expect(strstr(msg, "cannot open"), "%s", msg);
}

/* With --model the model's tensors and metadata are carried over and its vocabulary replaced;
 * one whose embedding does not match the vocabulary is refused. */
Test(vocab, test_vocabulary_replaces_a_models_own) {
    const char *model = synth_path("tiny-f32");
    char msg[ENG_ERRMSG_LEN];
    gguf_t *g = NULL;
    cr_assert_eq(gguf_open(&g, model, msg), 0, "%s", msg);
    uint32_t n_vocab = (uint32_t)gguf_tensor(g, "token_embd.weight")->ne[1];
    gguf_close(g);
    hf_vocab_opts_t o = {.input = write_text("tokenizer.json", BPE_JSON), .model = model};
    const char *out = tmp_path("model.gguf");
    cr_expect_eq(hf_vocab_convert(&o, out, NULL, msg), ENG_EINVAL);
    cr_expect(strstr(msg, "embedding has") && strstr(msg, "--vocab-size"), "%s", msg);
    o.vocab_size = n_vocab;
    cr_assert_eq(hf_vocab_convert(&o, out, NULL, msg), 0, "%s", msg);
    eng_model_t *m = NULL;
    cr_assert_eq(eng_model_load(&m, out, msg), 0, "%s", msg);
    const eng_tokenizer_t *t = eng_model_tokenizer(m);
    cr_expect_eq(eng_tok_kind(t), ENG_TOK_BPE);
    cr_expect_eq(eng_tok_find(t, "<|user|>"), 6);
    cr_expect_eq(eng_model_hparams(m)->n_layer > 0, true);
    eng_model_free(m);
    unlink(out);
}
