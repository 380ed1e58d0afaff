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
