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
    const char *cases[][2] = {
        {"--temperature", "nan"}, {"--temperature", "-1"}, {"--top-p", "0"},
        {"--max-tokens", "12x"},  {"--top-k", "1e99"},     {"--seed", "-3"},
        {"--threads", "9999"},    {"--min-p", ""},         {"--device", "gpu"}};
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

/* ---- serve configuration: flag > env > file > default -------------- */

#include <stdio.h>
#include <unistd.h>

static int load(cfg_t *c, char **env, char *msg, int n, ...) {
    char *argv[32] = {"serve"};
    va_list ap;
    va_start(ap, n);
    for (int i = 0; i < n; i++) argv[i + 1] = va_arg(ap, char *);
    va_end(ap);
    return cfg_load(c, n + 1, argv, env, msg);
}

static const char *write_file(const char *text) {
    static char path[64];
    snprintf(path, sizeof(path), "/tmp/tidald-cfg-%d.json", (int)getpid());
    FILE *f = fopen(path, "w");
    fputs(text, f);
    fclose(f);
    return path;
}

Test(config, test_serve_precedence_is_flag_env_file_default) {
    cfg_t c;
    char msg[CFG_ERRMSG_LEN];
    const char *path = write_file("{\"model\":\"file.gguf\",\"port\":1111,\"max_running\":3,"
                                  "\"request_timeout_s\":2.5,\"auth_health\":true}");
    char cfgenv[128];
    snprintf(cfgenv, sizeof(cfgenv), "TIDALD_CONFIG=%s", path);
    char *env[] = {cfgenv, "TIDALD_PORT=2222", "TIDALD_MAX_RUNNING=4", NULL};
    cr_assert_eq(load(&c, env, msg, 2, "--port", "3333"), 0, "%s", msg);
    cr_expect_str_eq(c.model, "file.gguf"); /* file */
    cr_expect_eq(c.port, 3333);             /* flag beats env and file */
    cr_expect_eq(c.max_running, 4);         /* env beats file */
    cr_expect_float_eq(c.request_timeout_s, 2.5, 1e-9);
    cr_expect(c.auth_health);
    cr_expect_eq(c.max_waiting, 64); /* default */
    cr_expect_str_eq(c.host, "127.0.0.1");
    cfg_free(&c);
    remove(path);
}

Test(config, test_serve_rejects_bad_values_naming_value_and_source) {
    cfg_t c;
    char msg[CFG_ERRMSG_LEN];
    char *noenv[] = {NULL};
    cr_expect_eq(load(&c, noenv, msg, 0), -1);
    cr_expect(strstr(msg, "model"), "%s", msg);
    char *env[] = {"TIDALD_PORT=70000", NULL};
    cr_expect_eq(load(&c, env, msg, 2, "--model", "m"), -1);
    cr_expect(strstr(msg, "TIDALD_PORT"), "%s", msg);
    cr_expect_eq(load(&c, noenv, msg, 4, "--model", "m", "--max-running", "0"), -1);
    cr_expect(strstr(msg, "--max-running"), "%s", msg);
    cr_expect_eq(load(&c, noenv, msg, 4, "--model", "m", "--log-level", "loud"), -1);
    cr_expect(strstr(msg, "log_level"), "%s", msg);
    char *dev_env[] = {"TIDALD_DEVICE=tpu", NULL};
    cr_expect_eq(load(&c, dev_env, msg, 2, "--model", "m"), -1);
    cr_expect(strstr(msg, "device") && strstr(msg, "auto, cpu or cuda"), "%s", msg);
    cr_assert_eq(load(&c, noenv, msg, 4, "--model", "m", "--device", "cpu"), 0, "%s", msg);
    cr_expect_str_eq(c.device, "cpu");
    cfg_free(&c);
    cr_assert_eq(load(&c, noenv, msg, 2, "--model", "m"), 0, "%s", msg);
    cr_expect_str_eq(c.device, "auto");
    cfg_free(&c);
    const char *path = write_file("{\"model\":\"m\",\"portt\":1}");
    cr_expect_eq(load(&c, noenv, msg, 2, "--config", (char *)path), -1);
    cr_expect(strstr(msg, "\"portt\" is not a known setting"), "%s", msg);
    path = write_file("{\"model\":\"m\",\"port\":\"80\"}");
    cr_expect_eq(load(&c, noenv, msg, 2, "--config", (char *)path), -1);
    cr_expect(strstr(msg, "wrong type"), "%s", msg);
    path = write_file("{\"model\":\"m\",\"threads\":1.5}");
    cr_expect_eq(load(&c, noenv, msg, 2, "--config", (char *)path), -1);
    cr_expect(strstr(msg, "integer"), "%s", msg);
    path = write_file("not json");
    cr_expect_eq(load(&c, noenv, msg, 2, "--config", (char *)path), -1);
    cr_expect(strstr(msg, "not a JSON object"), "%s", msg);
    remove(path);
    cr_expect_eq(load(&c, noenv, msg, 2, "--config", "/nonexistent.json"), -1);
    cr_expect(strstr(msg, "cannot open"), "%s", msg);
}

Test(config, test_serve_help_lists_every_value_with_env_and_default) {
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    cfg_help(f);
    fclose(f);
    const char *names[] = {"--host",           "TIDALD_HOST",       "--port",
                           "TIDALD_PORT",      "--max-running",     "TIDALD_MAX_RUNNING",
                           "--max-waiting",    "--max-body-bytes",  "--header-timeout-s",
                           "--idle-timeout-s", "--max-connections", "--drain-timeout-s",
                           "--api-keys",       "--api-key-file",    "--auth-health",
                           "--log-level",      "--kv-mem-mb",       "--request-timeout-s",
                           "TIDALD_CONFIG",    "(default: 8080)"};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        cr_expect(strstr(buf, names[i]), "help lacks %s", names[i]);
    free(buf);
}

/* The non-streamed generation bound is a setting like the others: flag, env, JSON key. */
Test(config, test_max_nonstream_tokens_from_flag_env_and_file) {
    cfg_t c;
    char msg[CFG_ERRMSG_LEN];
    char *noenv[] = {NULL};
    cr_assert_eq(load(&c, noenv, msg, 2, "--model", "m"), 0, "%s", msg);
    cr_expect_eq(c.max_nonstream_tokens, 16384);
    cfg_free(&c);
    cr_assert_eq(load(&c, noenv, msg, 4, "--model", "m", "--max-nonstream-tokens", "100"), 0, "%s",
                 msg);
    cr_expect_eq(c.max_nonstream_tokens, 100);
    cfg_free(&c);
    char *env[] = {"TIDALD_MAX_NONSTREAM_TOKENS=200", NULL};
    cr_assert_eq(load(&c, env, msg, 2, "--model", "m"), 0, "%s", msg);
    cr_expect_eq(c.max_nonstream_tokens, 200);
    cfg_free(&c);
    const char *path = write_file("{\"model\":\"m\",\"max_nonstream_tokens\":300}");
    cr_assert_eq(load(&c, noenv, msg, 2, "--config", (char *)path), 0, "%s", msg);
    cr_expect_eq(c.max_nonstream_tokens, 300);
    cfg_free(&c);
    remove(path);
    cr_expect_eq(load(&c, noenv, msg, 4, "--model", "m", "--max-nonstream-tokens", "0"), -1);
    cr_expect(strstr(msg, "--max-nonstream-tokens"), "%s", msg);
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    cfg_help(f);
    fclose(f);
    cr_expect(strstr(buf, "--max-nonstream-tokens") && strstr(buf, "TIDALD_MAX_NONSTREAM_TOKENS"),
              "help lacks the setting");
    free(buf);
}

/* "not an integer in [0, 1.67772e+07]": integer limits print as integers */
Test(config, test_integer_limits_print_as_integers) {
    cfg_t c;
    char msg[CFG_ERRMSG_LEN];
    char *noenv[] = {NULL};
    cr_expect_eq(load(&c, noenv, msg, 4, "--model", "m", "--ctx-size", "99999999"), -1);
    cr_expect(strstr(msg, "--ctx-size: '99999999' is not an integer in [0, 16777216]"), "%s", msg);
    cfg_generate_t g;
    cr_expect_eq(parse(&g, msg, 6, "--model", "m", "--prompt", "p", "--ctx-size", "99999999"), -1);
    cr_expect(strstr(msg, "[0, 16777216]"), "%s", msg);
}

/* config validates the device name itself (it includes nothing of the engine) */
Test(config, test_device_names_are_validated_in_config) {
    cr_expect(cfg_device_valid("auto"));
    cr_expect(cfg_device_valid("cpu"));
    cr_expect(cfg_device_valid("cuda"));
    cr_expect_not(cfg_device_valid("gpu"));
    cr_expect_not(cfg_device_valid(""));
    cr_expect_not(cfg_device_valid(NULL));
}
