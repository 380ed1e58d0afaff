/* test_api.c - chat templates render each family exactly; request parsing defaults. */
#include "../../api/api.h"

#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

static const api_msg_t convo[] = {
    {"system", "Be brief."}, {"user", "Hi"}, {"assistant", "Hello!"}, {"user", "Bye"}};

Test(api, test_templates_are_recognised_from_their_markers) {
    cr_expect_eq(api_detect_template(NULL), API_TMPL_NONE);
    cr_expect_eq(api_detect_template("{{ bos_token }}{% for m in messages %}"), API_TMPL_NONE);
    cr_expect_eq(
        api_detect_template("...<|start_header_id|>' + message['role'] + '<|end_header_id|>..."),
        API_TMPL_LLAMA3);
    cr_expect_eq(api_detect_template("{{'<|im_start|>' + message['role'] + '\\n'}}"),
                 API_TMPL_CHATML);
    cr_expect_eq(
        api_detect_template("{{ '<|user|>\\n' + message['content'] + eos_token }}...<|assistant|>"),
        API_TMPL_ZEPHYR);
    cr_expect_eq(api_detect_template("{{ bos_token + '[INST] ' + content + ' [/INST]' }}"),
                 API_TMPL_LLAMA2);
    cr_expect_eq(api_detect_template("{{ '<start_of_turn>' + role + '\\n' }}"), API_TMPL_GEMMA);
}

static void expect_render(api_tmpl_t t, const char *want) {
    char *got = api_render_chat(t, convo, 4);
    cr_assert(got);
    cr_expect_str_eq(got, want);
    free(got);
}

Test(api, test_each_family_renders_like_its_reference_template) {
    expect_render(
        API_TMPL_LLAMA3,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n");
    expect_render(API_TMPL_CHATML,
                  "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                  "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
                  "<|im_start|>assistant\n");
    expect_render(API_TMPL_ZEPHYR,
                  "<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n"
                  "<|user|>\nBye</s>\n<|assistant|>\n");
    expect_render(API_TMPL_LLAMA2,
                  "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s>"
                  "<s>[INST] Bye [/INST]");
    /* Gemma 3's template: the system message opens the first user turn, the assistant is
     * "model", contents are trimmed */
    expect_render(API_TMPL_GEMMA, "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
                                  "<start_of_turn>model\nHello!<end_of_turn>\n"
                                  "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n");
    const api_msg_t padded[] = {{"user", "  What?\n"}};
    char *got = api_render_chat(API_TMPL_GEMMA, padded, 1);
    cr_expect_str_eq(got, "<bos><start_of_turn>user\nWhat?<end_of_turn>\n<start_of_turn>model\n");
    free(got);
    cr_expect_null(api_render_chat(API_TMPL_NONE, convo, 4));
}

Test(api, test_error_object_has_all_four_fields) {
    api_error_t e;
    api_fail(&e, 400, "invalid_request_error", "top_p", NULL, "'top_p' must be between %d and %d",
             0, 1);
    char *j = api_error_json(&e);
    cr_expect_str_eq(j, "{\"error\":{\"message\":\"'top_p' must be between 0 and 1\",\"type\":"
                        "\"invalid_request_error\",\"param\":\"top_p\",\"code\":null}}");
    free(j);
}

/* ---- request parsing over a real tokenizer --------------------------------------------- */

#include "helpers.h"

#include <stdio.h>

typedef struct {
    eng_model_t *model;
    api_ctx_t ctx;
} fixture_t;

/* stories260K (512-token context, no chat template) or the synthetic tiny model (ChatML,
 * 256-token context); the api context runs over the model's whole context. */
static void fx_open(fixture_t *f, const char *path) {
    char msg[ENG_ERRMSG_LEN];
    cr_assert_eq(eng_model_load(&f->model, path, msg), 0, "%s", msg);
    const eng_hparams_t *hp = eng_model_hparams(f->model);
    f->ctx = (api_ctx_t){.model = f->model,
                         .model_name = "test",
                         .n_ctx = hp->n_ctx_train,
                         .default_max_tokens = 16};
    eng_attn_defaults(hp, &f->ctx.attn);
}

static void fx_stories(fixture_t *f) {
    if (!have_stories()) cr_skip_test("no %s", STORIES_PATH);
    fx_open(f, STORIES_PATH);
}

static void fx_close(fixture_t *f) {
    eng_model_free(f->model);
}

/* Parse body as kind; returns rc, with r freed. */
static int parse_body(const fixture_t *f, api_kind_t kind, const char *body, api_error_t *e) {
    api_req_t r;
    memset(e, 0, sizeof(*e));
    int rc = api_parse_request(&f->ctx, kind, body, strlen(body), &r, e);
    if (rc == 0) api_req_free(&r);
    return rc;
}

/* body is refused with 400, param want_param, code want_code (NULL: any) and a message
 * holding want_text (NULL: any). */
static void expect_refused(const fixture_t *f, api_kind_t kind, const char *body,
                           const char *want_param, const char *want_code, const char *want_text) {
    api_error_t e;
    cr_expect_eq(parse_body(f, kind, body, &e), -1, "accepted: %.200s", body);
    cr_expect_eq(e.status, 400, "%.200s", body);
    cr_expect_str_eq(e.param, want_param, "%.200s: %s", body, e.message);
    if (want_code)
        cr_expect(e.code && !strcmp(e.code, want_code), "%.200s: code %s", body,
                  e.code ? e.code : "null");
    if (want_text)
        cr_expect(strstr(e.message, want_text), "%.200s: message '%s' lacks '%s'", body, e.message,
                  want_text);
}

static void expect_accepted(const fixture_t *f, api_kind_t kind, const char *body) {
    api_error_t e;
    cr_expect_eq(parse_body(f, kind, body, &e), 0, "%.200s: %s", body, e.message);
}

/* A JSON body: head, then n copies of item joined by commas, then tail (malloc'd). */
static char *repeat_body(const char *head, const char *item, size_t n, const char *tail) {
    size_t hl = strlen(head), il = strlen(item), tl = strlen(tail);
    char *b = malloc(hl + n * (il + 1) + tl + 1), *w = b;
    cr_assert(b);
    memcpy(w, head, hl), w += hl;
    for (size_t i = 0; i < n; i++) {
        if (i) *w++ = ',';
        memcpy(w, item, il), w += il;
    }
    memcpy(w, tail, tl + 1);
    return b;
}

/* 160,000 ids took 58 s through cJSON_GetArrayItem (O(n^2)); the list is now refused, once
 * counted past the window, without being walked. */
Test(api, test_prompt_ids_past_the_window_are_refused_without_a_quadratic_walk, .timeout = 20) {
    fixture_t f;
    fx_stories(&f);
    char *body = repeat_body("{\"prompt\":[", "100", 160000, "]}");
    char want[128];
    snprintf(want, sizeof(want),
             "the prompt has more than %u token ids; the server's context window is %u tokens",
             f.ctx.n_ctx, f.ctx.n_ctx);
    expect_refused(&f, API_COMPLETION, body, "prompt", "context_length_exceeded", want);
    free(body);
    fx_close(&f);
}

/* /detokenize walks its list once: 300,000 ids (quadratic: minutes) and a list past the limit. */
Test(api, test_detokenize_walks_a_long_list_once_and_bounds_it, .timeout = 20) {
    fixture_t f;
    fx_stories(&f);
    api_error_t e = {0};
    char *body = repeat_body("{\"tokens\":[", "300", 300000, "]}");
    char *out = api_detokenize(&f.ctx, body, strlen(body), &e);
    cr_assert(out, "%s", e.message);
    char piece[64];
    size_t k = eng_token_bytes(eng_model_tokenizer(f.model), 300, piece, sizeof(piece), NULL);
    cr_expect_gt(strlen(out), 300000 * k);
    free(out);
    free(body);
    body = repeat_body("{\"tokens\":[", "1", API_MAX_DETOKENIZE_TOKENS + 1, "]}");
    memset(&e, 0, sizeof(e));
    cr_expect_null(api_detokenize(&f.ctx, body, strlen(body), &e));
    cr_expect_str_eq(e.param, "tokens");
    cr_expect(strstr(e.message, "at most 1048576"), "%s", e.message);
    free(body);
    fx_close(&f);
}

/* chat messages are bounded by the window before they are walked (each takes >= 1 token) */
Test(api, test_chat_messages_past_the_window_are_refused_without_a_quadratic_walk, .timeout = 20) {
    fixture_t f;
    fx_open(&f, synth_path("tiny-f32"));
    char *body =
        repeat_body("{\"messages\":[", "{\"role\":\"user\",\"content\":\"hi\"}", 100000, "]}");
    char want[128];
    snprintf(want, sizeof(want), "'messages' holds more than %u messages", f.ctx.n_ctx);
    expect_refused(&f, API_CHAT, body, "messages", "context_length_exceeded", want);
    free(body);
    expect_accepted(&f, API_CHAT,
                    "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":"
                    "\"a\"},{\"type\":\"text\",\"text\":\"b\"}]}]}");
    fx_close(&f);
}

/* ---- NUL characters (\u0000) ------------------------------------------------------------ */

/* "a\u0000b" used to tokenize as "a": cJSON's strings end at the NUL. */
Test(api, test_tokenize_refuses_a_nul_instead_of_cutting_the_text) {
    fixture_t f;
    fx_stories(&f);
    const char *body = "{\"content\":\"a\\u0000b\"}";
    api_error_t e = {0};
    char *out = api_tokenize(&f.ctx, body, strlen(body), &e);
    cr_expect_null(out, "accepted: %s", out ? out : "");
    free(out);
    cr_expect_eq(e.status, 400);
    cr_expect_str_eq(e.param, "content");
    cr_expect(strstr(e.message, "NUL character (\\u0000)"), "%s", e.message);
    /* a raw zero byte inside the string is the same NUL */
    const char raw[] = "{\"content\":\"a\0b\"}";
    memset(&e, 0, sizeof(e));
    out = api_tokenize(&f.ctx, raw, sizeof(raw) - 1, &e);
    cr_expect_null(out);
    free(out);
    cr_expect_eq(e.status, 400);
    /* an escaped backslash before u0000 is text, not a NUL */
    body = "{\"content\":\"a\\\\u0000b\"}";
    out = api_tokenize(&f.ctx, body, strlen(body), &e);
    cr_expect(out, "%s", e.message);
    free(out);
    fx_close(&f);
}

Test(api, test_completion_and_chat_refuse_a_nul_naming_the_field) {
    fixture_t f;
    fx_open(&f, synth_path("tiny-f32"));
    expect_refused(&f, API_COMPLETION, "{\"prompt\":\"a\\u0000b\"}", "prompt", NULL,
                   "'prompt' contains a NUL character (\\u0000), which tidald does not accept");
    expect_refused(&f, API_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\\u0000y\"}]}",
                   "content", NULL, "NUL character");
    expect_refused(&f, API_COMPLETION, "{\"prompt\":\"ab\",\"stop\":[\"\\u0000\"]}", "stop", NULL,
                   "NUL character");
    expect_accepted(&f, API_COMPLETION, "{\"prompt\":\"a\\\\u0000b\"}");
    fx_close(&f);
}

/* A <0x00> byte token detokenizes to a NUL byte: the reply must carry it as \u0000 and keep
 * what follows (cJSON_CreateString stopped at it). */
Test(api, test_detokenize_escapes_a_nul_byte_and_keeps_the_rest) {
    fixture_t f;
    fx_stories(&f);
    const eng_tokenizer_t *tok = eng_model_tokenizer(f.model);
    int32_t nul = -1;
    for (uint32_t id = 0; id < eng_tok_n_vocab(tok) && nul < 0; id++) {
        char b[8];
        size_t need = 0;
        if (eng_token_bytes(tok, id, b, sizeof(b), &need) == 1 && need == 1 && b[0] == 0)
            nul = (int32_t)id;
    }
    if (nul < 0) cr_skip_test("no <0x00> byte token");
    int32_t *ids;
    size_t n;
    char msg[ENG_ERRMSG_LEN];
    cr_assert_eq(eng_tokenize(tok, "end", 3, false, &ids, &n, msg), 0, "%s", msg);
    char body[256];
    int w = snprintf(body, sizeof(body), "{\"tokens\":[%d", nul);
    for (size_t i = 0; i < n; i++) w += snprintf(body + w, sizeof(body) - (size_t)w, ",%d", ids[i]);
    snprintf(body + w, sizeof(body) - (size_t)w, "]}");
    free(ids);
    api_error_t e = {0};
    char *out = api_detokenize(&f.ctx, body, strlen(body), &e);
    cr_assert(out, "%s", e.message);
    cr_expect(strstr(out, "\\u0000") && strstr(out, "end\"}"), "%s", out);
    free(out);
    fx_close(&f);
}

Test(api, test_json_quote_escapes_control_bytes_quotes_and_backslashes) {
    char *q = api__json_quote("a\0\"\\\n\x01z", 7);
    cr_assert(q);
    cr_expect_str_eq(q, "\"a\\u0000\\\"\\\\\\n\\u0001z\"");
    free(q);
}

/* ---- OpenAI fields tidald does not implement -------------------------------------------- */

typedef struct {
    api_kind_t kind;
    const char *field, *value;
} field_case_t;

static char *with_field(api_kind_t kind, const char *field, const char *value) {
    char *b = malloc(strlen(field) + strlen(value) + 128);
    cr_assert(b);
    sprintf(b, "{%s,\"%s\":%s}",
            kind == API_CHAT ? "\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]"
                             : "\"prompt\":\"hi\"",
            field, value);
    return b;
}

/* A request asking for behaviour tidald does not have gets a 400 naming the field;
 * "logit_bias": "bad" used to get 200. */
Test(api, test_unsupported_fields_are_refused_naming_the_field) {
    fixture_t f;
    fx_open(&f, synth_path("tiny-f32"));
    static const field_case_t bad[] = {
        {API_COMPLETION, "logit_bias", "\"bad\""},
        {API_COMPLETION, "logit_bias", "{\"50256\": -100}"},
        {API_CHAT, "logit_bias", "{\"1\": 5}"},
        {API_COMPLETION, "best_of", "2"},
        {API_COMPLETION, "suffix", "\"tail\""},
        {API_COMPLETION, "n", "2"},
        {API_CHAT, "n", "3"},
        {API_COMPLETION, "response_format", "{\"type\":\"json_object\"}"},
        {API_CHAT, "response_format", "{\"type\":\"json_schema\",\"json_schema\":{}}"},
        {API_CHAT, "response_format", "\"text\""},
        {API_CHAT, "tools", "[{\"type\":\"function\",\"function\":{\"name\":\"f\"}}]"},
        {API_CHAT, "tools", "\"bad\""},
        {API_CHAT, "tool_choice", "\"required\""},
        {API_CHAT, "tool_choice", "{\"type\":\"function\",\"function\":{\"name\":\"f\"}}"},
        {API_CHAT, "functions", "[{\"name\":\"f\"}]"},
        {API_CHAT, "function_call", "{\"name\":\"f\"}"},
        {API_CHAT, "parallel_tool_calls", "\"yes\""},
        {API_CHAT, "audio", "{\"voice\":\"alloy\",\"format\":\"wav\"}"},
        {API_CHAT, "modalities", "[\"text\",\"audio\"]"},
        {API_CHAT, "prediction", "{\"type\":\"content\",\"content\":\"x\"}"},
        {API_CHAT, "reasoning_effort", "\"low\""},
        {API_CHAT, "verbosity", "\"low\""},
        {API_CHAT, "web_search_options", "{}"},
        {API_CHAT, "store", "true"},
        {API_CHAT, "echo", "true"},
        {API_COMPLETION, "grammar", "\"root ::= \\\"a\\\"\""},
        {API_CHAT, "json_schema", "{}"},
        {API_COMPLETION, "guided_json", "{}"},
        {API_COMPLETION, "guided_regex", "\"a+\""},
        {API_CHAT, "guided_choice", "[\"a\"]"},
        {API_CHAT, "guided_grammar", "\"x\""},
        {API_COMPLETION, "min_tokens", "5"},
        {API_COMPLETION, "typical_p", "0.5"},
        {API_CHAT, "mirostat", "2"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char *body = with_field(bad[i].kind, bad[i].field, bad[i].value);
        api_error_t e;
        cr_expect_eq(parse_body(&f, bad[i].kind, body, &e), -1, "accepted: %s", body);
        cr_expect_eq(e.status, 400, "%s", body);
        cr_expect_str_eq(e.type, "invalid_request_error", "%s", body);
        cr_expect(e.code && !strcmp(e.code, "unsupported_parameter"), "%s: code %s", body,
                  e.code ? e.code : "null");
        cr_expect_str_eq(e.param, bad[i].field, "%s: %s", body, e.message);
        cr_expect(strstr(e.message, bad[i].field), "%s: %s", body, e.message);
        free(body);
    }
    /* tool calls replayed in the history are not rendered either */
    expect_refused(
        &f, API_CHAT,
        "{\"messages\":[{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"id\":"
        "\"c\",\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":\"{}\"}}]"
        "}]}",
        "messages[0].tool_calls", "unsupported_parameter", "tool_calls");
    fx_close(&f);
}

/* null and the values clients send by habit ask for nothing and stay accepted. */
Test(api, test_unsupported_fields_accept_null_and_their_defaults) {
    fixture_t f;
    fx_open(&f, synth_path("tiny-f32"));
    static const field_case_t good[] = {
        {API_COMPLETION, "logit_bias", "{}"},
        {API_COMPLETION, "logit_bias", "null"},
        {API_CHAT, "logit_bias", "{}"},
        {API_COMPLETION, "best_of", "1"},
        {API_COMPLETION, "n", "1"},
        {API_CHAT, "n", "1"},
        {API_COMPLETION, "suffix", "null"},
        {API_COMPLETION, "suffix", "\"\""},
        {API_COMPLETION, "echo", "false"},
        {API_COMPLETION, "echo", "true"}, /* implemented for completions */
        {API_CHAT, "echo", "false"},
        {API_CHAT, "response_format", "{\"type\":\"text\"}"},
        {API_COMPLETION, "response_format", "null"},
        {API_CHAT, "tools", "[]"},
        {API_CHAT, "tools", "null"},
        {API_CHAT, "tool_choice", "\"none\""},
        {API_CHAT, "tool_choice", "\"auto\""},
        {API_CHAT, "functions", "[]"},
        {API_CHAT, "function_call", "\"none\""},
        {API_CHAT, "parallel_tool_calls", "true"},
        {API_CHAT, "parallel_tool_calls", "false"},
        {API_CHAT, "modalities", "[\"text\"]"},
        {API_CHAT, "audio", "null"},
        {API_CHAT, "store", "false"},
        {API_CHAT, "reasoning_effort", "null"},
        {API_COMPLETION, "user", "\"x\""},
        {API_CHAT, "user", "\"x\""},
        {API_CHAT, "stream_options", "null"},
        {API_COMPLETION, "seed", "42"},
        {API_CHAT, "metadata", "{\"k\":\"v\"}"},
        {API_CHAT, "service_tier", "\"auto\""},
        {API_COMPLETION, "grammar", "\"\""},
        {API_COMPLETION, "min_tokens", "0"},
        {API_COMPLETION, "typical_p", "1"},
        {API_COMPLETION, "mirostat", "0"},
        {API_CHAT, "logprobs", "true"},
        {API_CHAT, "top_logprobs", "null"},
        {API_COMPLETION, "logprobs", "2"},
    };
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        char *body = with_field(good[i].kind, good[i].field, good[i].value);
        expect_accepted(&f, good[i].kind, body);
        free(body);
    }
    expect_accepted(&f, API_CHAT,
                    "{\"messages\":[{\"role\":\"assistant\",\"content\":\"x\",\"tool_calls\":[]},"
                    "{\"role\":\"user\",\"content\":\"y\"}]}");
    fx_close(&f);
}

/* ---- limits in error messages ----------------------------------------------------------- */

/* "between 1 and 1.67772e+07" was %g on an integer limit */
Test(api, test_integer_limits_print_as_integers) {
    fixture_t f;
    fx_open(&f, synth_path("tiny-f32"));
    expect_refused(&f, API_COMPLETION, "{\"prompt\":\"hi\",\"max_tokens\":0}", "max_tokens", NULL,
                   "'max_tokens' must be an integer between 1 and 16777216");
    expect_refused(&f, API_COMPLETION, "{\"prompt\":\"hi\",\"ctx_size\":99999999}", "ctx_size",
                   NULL, "between 1 and 16777216");
    expect_refused(&f, API_COMPLETION, "{\"prompt\":\"hi\",\"top_k\":-5}", "top_k", NULL,
                   "between -1 and 16777216");
    expect_refused(&f, API_COMPLETION, "{\"prompt\":\"hi\",\"attention\":{\"token_budget\":0}}",
                   "attention.token_budget", NULL, "between 1 and 16777216");
    fx_close(&f);
}

/* A prompt of n tokens as a list of ids (BOS then "1"s). */
static char *ids_prompt(size_t n, const char *extra) {
    char head[64];
    snprintf(head, sizeof(head), "{%s%s\"prompt\":[", extra, *extra ? "," : "");
    return repeat_body(head, "5", n, "]}");
}

/* The prompt alone filling the window named max_tokens; it must name the prompt, and say
 * which window it is: the request's ctx_size or the server's context. */
Test(api, test_a_prompt_that_fills_the_window_names_the_prompt_and_the_window) {
    fixture_t f;
    fx_open(&f, synth_path("tiny-f32"));
    char want[160], *body;
    uint32_t n_ctx = f.ctx.n_ctx;
    body = ids_prompt(n_ctx, "\"max_tokens\":10");
    snprintf(want, sizeof(want),
             "the prompt is %u tokens; the server's context window is %u tokens", n_ctx, n_ctx);
    expect_refused(&f, API_COMPLETION, body, "prompt", "context_length_exceeded", want);
    free(body);
    /* a text prompt too: its tokens are counted after tokenizing */
    body = repeat_body("{\"max_tokens\":5,\"prompt\":\"", "once upon a time", n_ctx, "\"}");
    for (char *c = strstr(body, "once"); *c; c++) /* the joining commas become spaces */
        if (*c == ',') *c = ' ';
    expect_refused(&f, API_COMPLETION, body, "prompt", "context_length_exceeded",
                   "the server's context window");
    free(body);
    body = ids_prompt(20, "\"ctx_size\":16");
    expect_refused(&f, API_COMPLETION, body, "prompt", "context_length_exceeded",
                   "the request's ctx_size is 16 tokens");
    free(body);
    /* the prompt fits; prompt + max_tokens does not: that is max_tokens' fault */
    body = ids_prompt(10, "\"ctx_size\":16,\"max_tokens\":10");
    expect_refused(&f, API_COMPLETION, body, "max_tokens", "context_length_exceeded",
                   "the request's ctx_size is 16 tokens; the request has 10 prompt tokens and "
                   "asks for 10 more");
    free(body);
    body = ids_prompt(10, "\"max_tokens\":100000");
    snprintf(want, sizeof(want), "the server's context window is %u tokens", n_ctx);
    expect_refused(&f, API_COMPLETION, body, "max_tokens", "context_length_exceeded", want);
    free(body);
    expect_refused(
        &f, API_CHAT,
        "{\"ctx_size\":4,\"messages\":[{\"role\":\"user\",\"content\":\"hello there\"}]}",
        "messages", "context_length_exceeded", "the request's ctx_size is 4 tokens");
    fx_close(&f);
}

/* ---- non-streamed generation is bounded ------------------------------------------------- */

/* With eviction a non-streamed max_tokens of 2^24 grew memory until its deadline, then lost
 * the text in a 503; it is refused up front, naming max_tokens and the limit. */
Test(api, test_non_streamed_max_tokens_is_bounded) {
    fixture_t f;
    fx_open(&f, synth_path("tiny-f32"));
    f.ctx.evict = true;
    expect_refused(&f, API_COMPLETION, "{\"prompt\":\"hi\",\"max_tokens\":16777216}", "max_tokens",
                   NULL,
                   "'max_tokens' is 16777216; a request without \"stream\": true may generate at "
                   "most 16384 tokens");
    expect_refused(&f, API_CHAT,
                   "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],"
                   "\"max_completion_tokens\":20000}",
                   "max_completion_tokens", NULL, "stream");
    expect_accepted(&f, API_COMPLETION,
                    "{\"prompt\":\"hi\",\"max_tokens\":16777216,\"stream\":true}");
    expect_accepted(&f, API_COMPLETION, "{\"prompt\":\"hi\",\"max_tokens\":16384}");
    /* a configured limit; the server's default max_tokens is capped to it silently */
    f.ctx.max_nonstream_tokens = 100;
    f.ctx.default_max_tokens = 1000;
    expect_refused(&f, API_COMPLETION, "{\"prompt\":\"hi\",\"max_tokens\":101}", "max_tokens", NULL,
                   "at most 100 tokens");
    api_req_t r;
    api_error_t e;
    const char *body = "{\"prompt\":\"hi\"}";
    cr_assert_eq(api_parse_request(&f.ctx, API_COMPLETION, body, strlen(body), &r, &e), 0, "%s",
                 e.message);
    cr_expect_eq(r.eng.max_tokens, 100);
    api_req_free(&r);
    body = "{\"prompt\":\"hi\",\"stream\":true}";
    cr_assert_eq(api_parse_request(&f.ctx, API_COMPLETION, body, strlen(body), &r, &e), 0, "%s",
                 e.message);
    cr_expect_eq(r.eng.max_tokens, 1000);
    api_req_free(&r);
    fx_close(&f);
}

/* Generated text holding a NUL byte (a <0x00> token) is sent whole, the NUL as \u0000. */
Test(api, test_responses_carry_generated_nul_bytes_escaped) {
    api_req_t cmpl = {.kind = API_COMPLETION, .logprobs = -1},
              chat = {.kind = API_CHAT, .logprobs = -1};
    api_resp_ctx_t rc = {.id = "cmpl-1", .model = "m", .created = 1, .req = &cmpl};
    char bytes[] = "a\0b";
    sched_event_t ev = {.token = 7, .text = bytes, .text_len = 3};
    char *s = api_stream_chunk(&rc, &ev, true);
    cr_expect(strstr(s, "\"text\":\"a\\u0000b\""), "%s", s);
    free(s);
    rc.req = &chat;
    s = api_stream_chunk(&rc, &ev, true);
    cr_expect(strstr(s, "\"content\":\"a\\u0000b\""), "%s", s);
    free(s);
    api_acc_t acc = {0};
    cr_assert_eq(api_acc_add(&acc, &ev), 0);
    sched_event_t last = {
        .token = -1, .text = bytes + 2, .text_len = 1, .finish = SCHED_FINISH_STOP};
    cr_assert_eq(api_acc_add(&acc, &last), 0);
    s = api_final_response(&rc, &acc, SCHED_FINISH_STOP, 1, 1);
    cr_expect(strstr(s, "\"content\":\"a\\u0000bb\""), "%s", s);
    free(s);
    rc.req = &cmpl;
    s = api_final_response(&rc, &acc, SCHED_FINISH_STOP, 1, 1);
    cr_expect(strstr(s, "\"text\":\"a\\u0000bb\""), "%s", s);
    free(s);
    api_acc_free(&acc);
}
