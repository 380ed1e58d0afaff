/* model.c - Llama-family hyper-parameters and weights from GGUF metadata.
 *
 * Accepts the `llama` architecture (Llama 2/3, TinyLlama, SmolLM, Mistral without sliding
 * window all convert to it), `mistral`, `gemma3`, `qwen2` and `qwen3`. Every tensor's shape is
 * checked against the hyper-parameters before use.
 */
#include "model.h"
#include "quant.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int get_u32(const gguf_t *g, const char *arch, const char *suffix, uint32_t *out,
                   bool required, char *msg) {
    char key[128];
    snprintf(key, sizeof(key), "%s.%s", arch, suffix);
    uint64_t v;
    int rc = gguf_get_u64(g, key, &v, msg);
    if (rc < 0) return rc;
    if (rc == 1) return required ? eng_fail(msg, ENG_EFORMAT, "missing metadata '%s'", key) : 0;
    if (v == 0 || v > (1u << 30))
        return eng_fail(msg, ENG_EFORMAT, "metadata '%s' = %llu is out of range", key,
                        (unsigned long long)v);
    *out = (uint32_t)v;
    return 0;
}

static int get_f32(const gguf_t *g, const char *arch, const char *suffix, float *out, char *msg) {
    char key[128];
    snprintf(key, sizeof(key), "%s.%s", arch, suffix);
    double v;
    int rc = gguf_get_f64(g, key, &v, msg);
    if (rc < 0) return rc;
    if (rc == 0) {
        if (!(v > 0) || !isfinite(v))
            return eng_fail(msg, ENG_EFORMAT, "metadata '%s' = %g must be positive", key, v);
        *out = (float)v;
    }
    return 0;
}

/* Find a 2-D tensor of shape [cols, rows] (ggml order) and describe it. */
static int weight(const gguf_t *g, const char *name, uint32_t cols, uint32_t rows,
                  eng_tensor_t *out, char *msg) {
    const gguf_tensor_t *t = gguf_tensor(g, name);
    if (!t) return eng_fail(msg, ENG_EFORMAT, "missing tensor '%s'", name);
    if (t->ne[0] != cols || t->ne[1] != rows || t->ne[2] != 1 || t->ne[3] != 1)
        return eng_fail(msg, ENG_EFORMAT,
                        "tensor '%s' has shape [%llu, %llu, %llu, %llu], expected [%u, %u]", name,
                        (unsigned long long)t->ne[0], (unsigned long long)t->ne[1],
                        (unsigned long long)t->ne[2], (unsigned long long)t->ne[3], cols, rows);
    if (!eng_q_block_elems(t->type))
        return eng_fail(msg, ENG_EUNSUPPORTED,
                        "tensor '%s' has type %s (%u); tidald computes with F32, F16, BF16, "
                        "Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL and "
                        "IQ4_XS weights",
                        name, gguf_type_name(t->type), t->type);
    /* quantized blocks are read bytewise; float types are read in place */
    size_t align = t->type == GGML_F32 ? 4 : (t->type == GGML_F16 || t->type == GGML_BF16) ? 2 : 1;
    if ((uintptr_t)t->data % align)
        return eng_fail(msg, ENG_EFORMAT, "tensor '%s' data is not %zu-byte aligned", name, align);
    out->type = t->type;
    out->rows = rows;
    out->cols = cols;
    out->row_bytes = gguf_row_bytes(t->type, cols);
    out->data = t->data;
    return 0;
}

/* A 1-D F32 vector of n elements. */
static int vector(const gguf_t *g, const char *name, uint32_t n, const float **out, bool required,
                  char *msg) {
    const gguf_tensor_t *t = gguf_tensor(g, name);
    if (!t) return required ? eng_fail(msg, ENG_EFORMAT, "missing tensor '%s'", name) : 0;
    if (t->type != GGML_F32 || t->ne[0] != n || t->n_dims != 1)
        return eng_fail(msg, ENG_EFORMAT, "tensor '%s' must be F32 of %u elements", name, n);
    if ((uintptr_t)t->data % 4)
        return eng_fail(msg, ENG_EFORMAT, "tensor '%s' is not 4-byte aligned", name);
    *out = t->data;
    return 0;
}

bool eng_layer_is_swa(const eng_hparams_t *hp, uint32_t l) {
    return hp->swa_window && hp->swa_pattern && l % hp->swa_pattern < hp->swa_pattern - 1;
}

/* Rope scaling the file declares: linear scaling becomes freq_scale; any other kind would
 * change the angles in ways tidald does not compute, so it is refused. */
static int load_rope_scaling(const gguf_t *g, const char *arch, eng_hparams_t *hp, char *msg) {
    char key[128];
    snprintf(key, sizeof(key), "%s.rope.scaling.type", arch);
    const char *type = gguf_get_str(g, key);
    hp->rope_freq_scale = 1.0f;
    if (!type || !strcmp(type, "none")) return 0;
    if (strcmp(type, "linear") != 0)
        return eng_fail(msg, ENG_EUNSUPPORTED,
                        "rope scaling '%s' is not supported (tidald computes none and linear)",
                        type);
    float factor = 1.0f;
    int rc = get_f32(g, arch, "rope.scaling.factor", &factor, msg);
    if (rc) return rc;
    hp->rope_freq_scale = 1.0f / factor;
    return 0;
}

/* Gemma 3: GeGLU, QK-norm and sandwich norms (tensors), embeddings scaled by sqrt(n_embd),
 * NEOX RoPE, and five sliding-window layers for every global one, which turn with their own
 * base (10000 unless the file says). */
static int load_gemma3(const gguf_t *g, const char *arch, eng_hparams_t *hp, char *msg) {
    int rc;
    hp->rope_neox = true;
    hp->gelu_ffn = true;
    hp->embd_scale = sqrtf((float)hp->n_embd);
    /* the 27B model scales queries by its embedding per head, the others by the head size */
    if (hp->n_layer == 62) hp->attn_scale = 1.0f / sqrtf((float)(hp->n_embd / hp->n_head));
    if ((rc = get_u32(g, arch, "attention.sliding_window", &hp->swa_window, false, msg))) return rc;
    hp->swa_pattern = 6;
    hp->rope_base_swa = 10000.0f;
    if ((rc = get_u32(g, arch, "attention.sliding_window_pattern", &hp->swa_pattern, false, msg)) ||
        (rc = get_f32(g, arch, "rope.freq_base_swa", &hp->rope_base_swa, msg)))
        return rc;
    char key[128];
    snprintf(key, sizeof(key), "%s.final_logit_softcapping", arch);
    double cap = 0;
    if (gguf_get_f64(g, key, &cap, NULL) == 0 && cap != 0)
        return eng_fail(msg, ENG_EUNSUPPORTED, "final logit soft-capping is not supported");
    return 0;
}

static int load_hparams(eng_model_t *m, char *msg) {
    const gguf_t *g = m->gguf;
    eng_hparams_t *hp = &m->hp;
    const char *arch = gguf_get_str(g, "general.architecture");
    if (!arch) return eng_fail(msg, ENG_EFORMAT, "missing metadata 'general.architecture'");
    bool gemma3 = !strcmp(arch, "gemma3"), qwen = !strcmp(arch, "qwen2") || !strcmp(arch, "qwen3");
    if (strcmp(arch, "llama") != 0 && strcmp(arch, "mistral") != 0 && !gemma3 && !qwen)
        return eng_fail(msg, ENG_EUNSUPPORTED,
                        "architecture '%s' is not supported (tidald runs llama, mistral, gemma3, "
                        "qwen2 and qwen3)",
                        arch);
    snprintf(hp->arch, sizeof(hp->arch), "%s", arch);
    const char *name = gguf_get_str(g, "general.name");
    snprintf(hp->name, sizeof(hp->name), "%s", name ? name : "model");
    int rc;
    if ((rc = get_u32(g, arch, "context_length", &hp->n_ctx_train, true, msg)) ||
        (rc = get_u32(g, arch, "embedding_length", &hp->n_embd, true, msg)) ||
        (rc = get_u32(g, arch, "block_count", &hp->n_layer, true, msg)) ||
        (rc = get_u32(g, arch, "feed_forward_length", &hp->n_ff, true, msg)) ||
        (rc = get_u32(g, arch, "attention.head_count", &hp->n_head, true, msg)))
        return rc;
    hp->n_head_kv = hp->n_head;
    if ((rc = get_u32(g, arch, "attention.head_count_kv", &hp->n_head_kv, false, msg))) return rc;
    if (hp->n_head % hp->n_head_kv)
        return eng_fail(msg, ENG_EFORMAT, "%u heads are not a multiple of %u KV heads", hp->n_head,
                        hp->n_head_kv);
    /* the head size is n_embd / n_head unless the file gives it (Gemma 3: 256 x 4 heads over
     * a 640-wide embedding); keys and values must be the same size */
    hp->head_dim = hp->n_embd / hp->n_head;
    if ((rc = get_u32(g, arch, "attention.key_length", &hp->head_dim, false, msg))) return rc;
    uint32_t v_dim = hp->head_dim;
    if ((rc = get_u32(g, arch, "attention.value_length", &v_dim, false, msg))) return rc;
    if (!hp->head_dim || v_dim != hp->head_dim)
        return eng_fail(msg, ENG_EUNSUPPORTED, "key size %u != value size %u", hp->head_dim, v_dim);
    if ((uint64_t)hp->head_dim * hp->n_head > (1u << 20))
        return eng_fail(msg, ENG_EFORMAT, "%u heads of %u are too wide", hp->n_head, hp->head_dim);
    hp->n_embd_q = hp->head_dim * hp->n_head;
    hp->n_rot = hp->head_dim;
    if ((rc = get_u32(g, arch, "rope.dimension_count", &hp->n_rot, false, msg))) return rc;
    if (hp->n_rot > hp->head_dim || hp->n_rot % 2)
        return eng_fail(msg, ENG_EFORMAT, "rope dimension count %u must be even and <= %u",
                        hp->n_rot, hp->head_dim);
    hp->rms_eps = 1e-5f;
    hp->rope_base = 10000.0f;
    hp->embd_scale = 1.0f;
    hp->attn_scale = 1.0f / sqrtf((float)hp->head_dim);
    if ((rc = get_f32(g, arch, "attention.layer_norm_rms_epsilon", &hp->rms_eps, msg)) ||
        (rc = get_f32(g, arch, "rope.freq_base", &hp->rope_base, msg)) ||
        (rc = load_rope_scaling(g, arch, hp, msg)))
        return rc;
    if (gemma3) {
        if ((rc = load_gemma3(g, arch, hp, msg))) return rc;
    } else if (qwen) {
        hp->rope_neox = true; /* Qwen2: QKV biases; Qwen3: QK-norm (the layer tensors) */
    } else {
        char key[128];
        snprintf(key, sizeof(key), "%s.attention.sliding_window", arch);
        uint64_t sw = 0;
        if (gguf_get_u64(g, key, &sw, NULL) == 0 && sw && sw < hp->n_ctx_train)
            fprintf(stderr,
                    "tidald: warning: model declares a %llu-token sliding window; tidald "
                    "attends densely, as llama.cpp does for this architecture, so outputs past "
                    "%llu tokens differ from windowed attention\n",
                    (unsigned long long)sw, (unsigned long long)sw);
    }
    const gguf_tensor_t *emb = gguf_tensor(g, "token_embd.weight");
    if (!emb) return eng_fail(msg, ENG_EFORMAT, "missing tensor 'token_embd.weight'");
    if (emb->ne[1] > (1u << 24))
        return eng_fail(msg, ENG_EFORMAT, "vocabulary of %llu tokens is too large",
                        (unsigned long long)emb->ne[1]);
    hp->n_vocab = (uint32_t)emb->ne[1];
    return 0;
}

static int load_weights(eng_model_t *m, char *msg) {
    const gguf_t *g = m->gguf;
    const eng_hparams_t *hp = &m->hp;
    uint32_t d = hp->n_embd, kvd = hp->n_head_kv * hp->head_dim, qd = hp->n_embd_q;
    bool gemma3 = !strcmp(hp->arch, "gemma3"), qwen2 = !strcmp(hp->arch, "qwen2"),
         qwen3 = !strcmp(hp->arch, "qwen3");
    int rc;
    if ((rc = weight(g, "token_embd.weight", d, hp->n_vocab, &m->tok_embd, msg))) return rc;
    if ((rc = vector(g, "output_norm.weight", d, &m->output_norm, true, msg))) return rc;
    if (gguf_tensor(g, "output.weight")) {
        if ((rc = weight(g, "output.weight", d, hp->n_vocab, &m->output, msg))) return rc;
    } else {
        m->output = m->tok_embd;
        m->hp.tied_output = true;
    }
    if ((rc = vector(g, "rope_freqs.weight", hp->n_rot / 2, &m->rope_freqs, false, msg))) return rc;
    m->layers = calloc(hp->n_layer, sizeof(eng_layer_t));
    if (!m->layers) return eng_fail(msg, ENG_ENOMEM, "out of memory");
    for (uint32_t l = 0; l < hp->n_layer; l++) {
        eng_layer_t *L = &m->layers[l];
        char n[96];
#define W(field, suffix, cols, rows)                                                               \
    snprintf(n, sizeof(n), "blk.%u.%s.weight", l, suffix);                                         \
    if ((rc = weight(g, n, cols, rows, &L->field, msg))) return rc;
#define V(field, suffix, len, required)                                                            \
    snprintf(n, sizeof(n), "blk.%u.%s.weight", l, suffix);                                         \
    if ((rc = vector(g, n, len, &L->field, required, msg))) return rc;
        V(attn_norm, "attn_norm", d, true)
        V(ffn_norm, "ffn_norm", d, true)
        V(q_norm, "attn_q_norm", hp->head_dim, gemma3 || qwen3)
        V(k_norm, "attn_k_norm", hp->head_dim, gemma3 || qwen3)
        V(post_attn_norm, "post_attention_norm", d, gemma3)
        V(post_ffn_norm, "post_ffw_norm", d, gemma3)
#define B(field, suffix, len)                                                                      \
    snprintf(n, sizeof(n), "blk.%u.%s.bias", l, suffix);                                           \
    if ((rc = vector(g, n, len, &L->field, qwen2, msg))) return rc;
        B(bq, "attn_q", qd)
        B(bk, "attn_k", kvd)
        B(bv, "attn_v", kvd)
#undef B
        W(wq, "attn_q", d, qd)
        W(wk, "attn_k", d, kvd)
        W(wv, "attn_v", d, kvd)
        W(wo, "attn_output", qd, d)
        W(w_gate, "ffn_gate", d, hp->n_ff)
        W(w_up, "ffn_up", d, hp->n_ff)
        W(w_down, "ffn_down", hp->n_ff, d)
#undef W
#undef V
    }
    m->hp.weight_type = m->layers[0].wq.type;
    return 0;
}

int eng_model_load(eng_model_t **out, const char *path, char *msg) {
    *out = NULL;
    eng_model_t *m = calloc(1, sizeof(*m));
    if (!m) return eng_fail(msg, ENG_ENOMEM, "out of memory");
    int rc = gguf_open(&m->gguf, path, msg);
    if (rc) goto fail;
    if ((rc = load_hparams(m, msg)) || (rc = load_weights(m, msg))) goto fail;
    if ((rc = eng__tokenizer_load(&m->tok, m->gguf, m->hp.n_vocab, msg))) goto fail;
    *out = m;
    return 0;
fail:
    eng_model_free(m);
    return rc;
}

void eng_model_free(eng_model_t *m) {
    if (!m) return;
    eng__tokenizer_free(m->tok);
    free(m->layers);
    gguf_close(m->gguf);
    free(m);
}

const eng_hparams_t *eng_model_hparams(const eng_model_t *m) {
    return &m->hp;
}
const eng_tokenizer_t *eng_model_tokenizer(const eng_model_t *m) {
    return m->tok;
}
