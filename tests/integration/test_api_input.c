/* test_api_input.c - hostile request bodies over loopback: huge JSON arrays are refused or
 * handled in one walk (the daemon stays responsive), NUL characters are refused, fields tidald
 * does not implement are refused naming the field, and non-streamed generation is bounded. */
#include "../../tools/synth_model.h"
#include "harness.h"

#include <cjson/cJSON.h>
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* The synthetic tiny model (ChatML, 256-token context). */
static const char *tiny_model(void) {
    return harness_synth_model("tiny-f32");
}

static void start_tiny(daemon_t *d, const char *extra) {
    const char *args[8] = {"--model", tiny_model(), extra, NULL};
    daemon_start(d, args);
}

/* POST body; the parsed JSON reply and its status. */
static cJSON *post(int port, const char *path, const char *body, int *status) {
    char *resp, *head;
    *status = http_req(port, "POST", path, NULL, body, &resp, &head);
    cJSON *j = cJSON_Parse(resp);
    cr_assert(j, "response is not JSON: %.300s", resp);
    free(resp);
    free(head);
    return j;
}

static const char *err_field(const cJSON *j, const char *name) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItem(j, "error"), name);
    return cJSON_IsString(v) ? v->valuestring : "";
}

/* head, n copies of item joined by commas, tail (malloc'd) */
static char *repeat(const char *head, const char *item, size_t n, const char *tail) {
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

/* 160,000 prompt ids froze the daemon for 58 s (an O(n^2) walk); they are refused at once and
 * the daemon keeps answering. */
Test(api_input, test_huge_arrays_are_refused_or_walked_once, .timeout = 60) {
    daemon_t d;
    start_tiny(&d, NULL);
    int st;
    char *body = repeat("{\"prompt\":[", "100", 160000, "]}");
    cJSON *j = post(d.port, "/v1/completions", body, &st);
    free(body);
    cr_expect_eq(st, 400);
    cr_expect_str_eq(err_field(j, "param"), "prompt");
    cr_expect_str_eq(err_field(j, "code"), "context_length_exceeded");
    cr_expect(strstr(err_field(j, "message"), "the prompt has more than 256 token ids"), "%s",
              err_field(j, "message"));
    cJSON_Delete(j);
    body = repeat("{\"messages\":[", "{\"role\":\"user\",\"content\":\"hi\"}", 60000, "]}");
    j = post(d.port, "/v1/chat/completions", body, &st);
    free(body);
    cr_expect_eq(st, 400);
    cr_expect_str_eq(err_field(j, "param"), "messages");
    cJSON_Delete(j);
    body = repeat("{\"tokens\":[", "300", 300000, "]}");
    j = post(d.port, "/detokenize", body, &st);
    free(body);
    cr_expect_eq(st, 200);
    const cJSON *c = cJSON_GetObjectItem(j, "content");
    cr_expect(cJSON_IsString(c) && strlen(c->valuestring) >= 300000);
    cJSON_Delete(j);
    char *resp, *head;
    cr_expect_eq(http_req(d.port, "GET", "/health", NULL, NULL, &resp, &head), 200);
    free(resp);
    free(head);
    cr_expect_eq(daemon_stop(&d), 0);
}

Test(api_input, test_nul_characters_are_refused, .timeout = 60) {
    daemon_t d;
    start_tiny(&d, NULL);
    int st;
    cJSON *j = post(d.port, "/tokenize", "{\"content\":\"a\\u0000b\"}", &st);
    cr_expect_eq(st, 400);
    cr_expect_str_eq(err_field(j, "param"), "content");
    cr_expect(strstr(err_field(j, "message"), "NUL character"), "%s", err_field(j, "message"));
    cJSON_Delete(j);
    j = post(d.port, "/v1/completions", "{\"prompt\":\"a\\u0000b\",\"max_tokens\":2}", &st);
    cr_expect_eq(st, 400);
    cr_expect_str_eq(err_field(j, "param"), "prompt");
    cJSON_Delete(j);
    cr_expect_eq(daemon_stop(&d), 0);
}

Test(api_input, test_unsupported_fields_get_a_400_naming_them, .timeout = 60) {
    daemon_t d;
    start_tiny(&d, NULL);
    int st;
    cJSON *j = post(d.port, "/v1/completions",
                    "{\"prompt\":\"hi\",\"max_tokens\":2,\"logit_bias\":\"bad\"}", &st);
    cr_expect_eq(st, 400);
    cr_expect_str_eq(err_field(j, "param"), "logit_bias");
    cr_expect_str_eq(err_field(j, "code"), "unsupported_parameter");
    cr_expect_str_eq(err_field(j, "type"), "invalid_request_error");
    cJSON_Delete(j);
    j = post(d.port, "/v1/chat/completions",
             "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":2,"
             "\"tools\":[],\"tool_choice\":\"auto\",\"logit_bias\":{},\"n\":1,"
             "\"response_format\":{\"type\":\"text\"}}",
             &st);
    cr_expect_eq(st, 200, "%s", err_field(j, "message"));
    cJSON_Delete(j);
    cr_expect_eq(daemon_stop(&d), 0);
}

/* With eviction a non-streamed max_tokens of 2^24 grew memory until its deadline and then lost
 * the text in a 503; it is a 400 up front. */
Test(api_input, test_non_streamed_generation_is_bounded, .timeout = 60) {
    daemon_t d;
    start_tiny(&d, "--kv-eviction");
    int st;
    cJSON *j = post(d.port, "/v1/completions", "{\"prompt\":\"hi\",\"max_tokens\":16777216}", &st);
    cr_expect_eq(st, 400);
    cr_expect_str_eq(err_field(j, "param"), "max_tokens");
    cr_expect(strstr(err_field(j, "message"), "at most 16384 tokens"), "%s",
              err_field(j, "message"));
    cJSON_Delete(j);
    cr_expect_eq(daemon_stop(&d), 0);
}

/* --max-nonstream-tokens reaches the server's limit, and a --ctx-size past the model's training
 * context (256 tokens for the tiny model) is clamped with a warning, not silently. */
Test(api_input, test_nonstream_limit_flag_and_ctx_size_clamp_are_applied, .timeout = 60) {
    daemon_t d;
    const char *args[] = {"--model", tiny_model(), "--max-nonstream-tokens", "8", "--ctx-size",
                          "100000",  NULL};
    daemon_start(&d, args);
    int st;
    cJSON *j = post(d.port, "/v1/completions", "{\"prompt\":\"hi\",\"max_tokens\":9}", &st);
    cr_expect_eq(st, 400);
    cr_expect_str_eq(err_field(j, "param"), "max_tokens");
    cr_expect(strstr(err_field(j, "message"), "at most 8 tokens"), "%s", err_field(j, "message"));
    cJSON_Delete(j);
    j = post(d.port, "/v1/completions", "{\"prompt\":\"hi\",\"max_tokens\":8}", &st);
    cr_expect_eq(st, 200);
    cJSON_Delete(j);
    daemon_pump_log(&d);
    cr_expect(strstr(d.log, "\"event\":\"ctx_size\"") && strstr(d.log, "100000"),
              "no warning about the clamped --ctx-size in: %.2000s", d.log);
    cr_expect_eq(daemon_stop(&d), 0);
}
