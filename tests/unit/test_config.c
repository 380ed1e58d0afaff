/* test_config.c - command-line parsing is strict and names the flag it rejects. */
#include "../../config/config.h"

#include <criterion/criterion.h>
#include <stdarg.h>
#include <string.h>

static int parse(cfg_generate_t *c, char *msg, int n, ...) {
    char *argv[32] = {"generate"};
    va_list ap;
    va_start(ap, n);
    for (int i = 0; i < n; i++) argv[i + 1] = va_arg(ap, char *);
    va_end(ap);
    return cfg_generate_parse(c, n + 1, argv, msg);
}

Test(config, test_generate_flags_parse_with_defaults) {
    cfg_generate_t c;
    char msg[CFG_ERRMSG_LEN];
    cr_assert_eq(
        parse(&c, msg, 7, "--model", "m.gguf", "--prompt=hi", "--temperature", "0", "--seed", "42"),
        0, "%s", msg);
    cr_expect_str_eq(c.model, "m.gguf");
    cr_expect_str_eq(c.prompt, "hi");
    cr_expect_eq(c.temperature, 0.0f);
    cr_expect_eq(c.seed, 42);
    cr_expect(c.seed_set);
    cr_expect_eq(c.max_tokens, 128);
    cr_expect_eq(c.top_k, 40);
}

Test(config, test_generate_rejects_bad_values_naming_the_flag) {
    cfg_generate_t c;
    char msg[CFG_ERRMSG_LEN];
    const char *cases[][2] = {{"--temperature", "nan"}, {"--temperature", "-1"}, {"--top-p", "0"},
                              {"--max-tokens", "12x"},  {"--top-k", "1e99"},     {"--seed", "-3"},
                              {"--threads", "9999"},    {"--min-p", ""}};
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        msg[0] = 0;
        cr_expect_eq(parse(&c, msg, 6, "--model", "m", "--prompt", "p", cases[i][0], cases[i][1]),
                     -1, "%s %s accepted", cases[i][0], cases[i][1]);
        cr_expect(strstr(msg, cases[i][0]), "message '%s' lacks %s", msg, cases[i][0]);
    }
    cr_expect_eq(parse(&c, msg, 2, "--prompt", "p"), -1);
    cr_expect(strstr(msg, "--model"), "%s", msg);
    cr_expect_eq(parse(&c, msg, 1, "--bogus"), -1);
    cr_expect(strstr(msg, "--bogus"), "%s", msg);
    cr_expect_eq(parse(&c, msg, 3, "--model", "m", "--prompt"), -1);
    cr_expect(strstr(msg, "needs a value"), "%s", msg);
}
