/* synth_model.c - build synthetic Llama models of named shapes. */
#include "synth_model.h"
#include "gguf_writer.h"
#include "../engine/quant.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const synth_shape_t synth_shapes[] = {
    {"tiny", 512, 64, 2, 4, 2, 128, 256, 0, "unit tests: 2 layers, dim 64, GQA 4/2"},
    {"small", 4096, 256, 4, 8, 4, 704, 2048, 0, "default `make run` model: 4 layers, dim 256"},
    {"m100", 32000, 768, 12, 12, 4, 2048, 2048, 1,
     "~100M parameters for benchmarks: 12 layers, dim 768, GQA 12/4, tied output"},
    {"long", 32000, 512, 16, 8, 4, 1376, 32768, 1,
     "long-context benchmarks: 16 layers, dim 512, 32K context"},
    {"b1", 32000, 2048, 22, 32, 4, 5632, 4096, 0,
     "~1.1B parameters (TinyLlama's shape) for GPU benchmarks: 22 layers, dim 2048, GQA 32/4"},
    {"gemma", 512, 64, 12, 4, 1, 128, 256, 0,
     "gemma3 architecture for tests: 12 layers (10 with a 16-token window, 2 global), 4 heads "
     "of 32 over dim 64, one KV head, QK-norm, sandwich norms, GeGLU",
     "gemma3", 32, 16},
    {"qwen2", 512, 64, 2, 4, 2, 128, 256, 0,
     "qwen2 architecture for tests: 2 layers, dim 64, GQA 4/2, QKV biases, NEOX RoPE", "qwen2", 0,
     0},
    {"qwen3", 512, 64, 2, 4, 2, 128, 256, 0,
     "qwen3 architecture for tests: 2 layers, 4 heads of 32 over dim 64, GQA 4/2, QK-norm, NEOX "
     "RoPE",
     "qwen3", 32, 0},
    {"kq", 512, 256, 2, 4, 2, 512, 256, 0,
     "every quantized type for tests: rows of 256 and 512 (whole K-quant blocks), 2 layers, "
     "GQA 4/2"},
    {NULL, 0, 0, 0, 0, 0, 0, 0, 0, NULL, NULL, 0, 0},
};

static uint64_t rng_next(uint64_t *s) {
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

/* uniform in [-a, a] */
static float rng_uniform(uint64_t *s, float a) {
    return ((float)(rng_next(s) >> 40) / 16777216.0f * 2.0f - 1.0f) * a;
}

/* SentencePiece-style synthetic vocabulary: specials, 256 byte tokens, then
 * single characters, "▁"+characters and letter pairs, as many as fit. */
static char **make_vocab(uint32_t n, float **scores, int32_t **types) {
    char **v = calloc(n, sizeof(char *));
    *scores = calloc(n, sizeof(float));
    *types = calloc(n, sizeof(int32_t));
    if (!v || !*scores || !*types) return v;
    uint32_t i = 0;
    /* ChatML markers make the synthetic models usable with /v1/chat/completions */
    const char *spec[] = {"<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"};
    int32_t spec_t[] = {2, 3, 3, 3, 3};
    for (int k = 0; k < 5 && i < n; k++, i++) {
        v[i] = strdup(spec[k]);
        (*types)[i] = spec_t[k];
    }
    for (int b = 0; b < 256 && i < n; b++, i++) {
        char buf[8];
        snprintf(buf, sizeof(buf), "<0x%02X>", b);
        v[i] = strdup(buf);
        (*types)[i] = 6;
    }
    char buf[32];
    for (int c = 33; c < 127 && i < n; c++, i++) {
        snprintf(buf, sizeof(buf), "%c", c);
        v[i] = strdup(buf);
    }
    if (i < n) v[i++] = strdup("\xe2\x96\x81");
    for (int c = 33; c < 127 && i < n; c++, i++) {
        snprintf(buf, sizeof(buf), "\xe2\x96\x81%c", c);
        v[i] = strdup(buf);
    }
    for (int a = 'a'; a <= 'z' && i < n; a++)
        for (int b = 'a'; b <= 'z' && i < n; b++, i++) {
            snprintf(buf, sizeof(buf), "%c%c", a, b);
            v[i] = strdup(buf);
        }
    for (int a = 'a'; a <= 'z' && i < n; a++)
        for (int b = 'a'; b <= 'z' && i < n; b++, i++) {
            snprintf(buf, sizeof(buf), "\xe2\x96\x81%c%c", a, b);
            v[i] = strdup(buf);
        }
    for (int a = 'a'; a <= 'z' && i < n; a++)
        for (int b = 'a'; b <= 'z' && i < n; b++)
            for (int c = 'a'; c <= 'z' && i < n; c++, i++) {
                snprintf(buf, sizeof(buf), "%c%c%c", a, b, c);
                v[i] = strdup(buf);
            }
    for (int a = 'a'; a <= 'z' && i < n; a++)
        for (int b = 'a'; b <= 'z' && i < n; b++)
            for (int c = 'a'; c <= 'z' && i < n; c++, i++) {
                snprintf(buf, sizeof(buf), "\xe2\x96\x81%c%c%c", a, b, c);
                v[i] = strdup(buf);
            }
    for (; i < n; i++) { /* filler, never produced by merging */
        snprintf(buf, sizeof(buf), "<extra_%u>", i);
        v[i] = strdup(buf);
        (*types)[i] = 5;
    }
    for (uint32_t k = 0; k < n; k++) {
        if (!(*types)[k]) (*types)[k] = 1;
        /* longer pieces score higher so merges prefer them, like a trained vocab */
        (*scores)[k] = (*types)[k] == 1 ? -(float)k / (float)n + (float)strlen(v[k]) : 0.0f;
    }
    return v;
}

typedef struct {
    void **bufs;
    size_t n, cap;
} owned_t;

static void *own(owned_t *o, void *p) {
    if (!p) return NULL;
    if (o->n == o->cap) {
        o->cap = o->cap ? o->cap * 2 : 64;
        o->bufs = realloc(o->bufs, o->cap * sizeof(void *));
    }
    o->bufs[o->n++] = p;
    return p;
}

static int add_weight(gw_t *w, owned_t *o, const char *name, uint32_t cols, uint32_t rows,
                      uint32_t type, float scale, uint64_t *rng) {
    size_t n = (size_t)cols * rows;
    float *tmp = malloc(sizeof(float) * cols);
    void *data = own(o, malloc(gw_type_bytes(type, n)));
    if (!tmp || !data) {
        free(tmp);
        return -1;
    }
    size_t rb = gw_type_bytes(type, cols);
    for (uint32_t r = 0; r < rows; r++) {
        for (uint32_t c = 0; c < cols; c++) tmp[c] = rng_uniform(rng, scale);
        gw_convert(type, tmp, cols, (uint8_t *)data + (size_t)r * rb);
    }
    free(tmp);
    uint64_t ne[2] = {cols, rows};
    gw_tensor(w, name, 2, ne, type, data, gw_type_bytes(type, n));
    return 0;
}

static int add_norm(gw_t *w, owned_t *o, const char *name, uint32_t n, uint64_t *rng) {
    float *v = own(o, malloc(sizeof(float) * n));
    if (!v) return -1;
    for (uint32_t i = 0; i < n; i++) v[i] = 1.0f + rng_uniform(rng, 0.1f);
    uint64_t ne[1] = {n};
    gw_tensor(w, name, 1, ne, 0, v, sizeof(float) * n);
    return 0;
}

/* a bias vector: small values around zero */
static int add_bias(gw_t *w, owned_t *o, const char *name, uint32_t n, uint64_t *rng) {
    float *v = own(o, malloc(sizeof(float) * n));
    if (!v) return -1;
    for (uint32_t i = 0; i < n; i++) v[i] = rng_uniform(rng, 0.2f);
    uint64_t ne[1] = {n};
    gw_tensor(w, name, 1, ne, 0, v, sizeof(float) * n);
    return 0;
}

int synth_write(const char *name, const char *path, uint64_t seed, char *msg) {
    char shape_name[32];
    const char *dash = strrchr(name, '-');
    if (!dash || (size_t)(dash - name) >= sizeof(shape_name)) {
        snprintf(msg, 256, "model name '%s' must be SHAPE-TYPE (e.g. tiny-f32)", name);
        return -1;
    }
    memcpy(shape_name, name, (size_t)(dash - name));
    shape_name[dash - name] = 0;
    const synth_shape_t *sh = NULL;
    for (const synth_shape_t *s = synth_shapes; s->name; s++)
        if (strcmp(s->name, shape_name) == 0) sh = s;
    /* the weight type, and the llama.cpp file type a file of it records */
    static const struct {
        const char *name;
        uint32_t type, ftype;
    } wtypes[] = {{"f32", 0, 0},    {"f16", 1, 1},     {"bf16", 30, 32}, {"q8_0", 8, 7},
                  {"q4_0", 2, 2},   {"q4_1", 3, 3},    {"q5_0", 6, 8},   {"q5_1", 7, 9},
                  {"q2_k", 10, 10}, {"q3_k", 11, 12},  {"q4_k", 12, 15}, {"q5_k", 13, 17},
                  {"q6_k", 14, 18}, {"iq4_nl", 20, 25}};
    uint32_t type = 0, ftype = 0;
    bool known = false;
    for (size_t i = 0; i < sizeof(wtypes) / sizeof(wtypes[0]); i++)
        if (strcmp(dash + 1, wtypes[i].name) == 0)
            type = wtypes[i].type, ftype = wtypes[i].ftype, known = true;
    if (!known) sh = NULL;
    if (!sh) {
        snprintf(msg, 256,
                 "unknown model '%s' (shapes: tiny small m100 long b1 gemma kq; types: f32 f16 "
                 "bf16 q8_0 q4_0 q4_1 q5_0 q5_1 q2_k q3_k q4_k q5_k q6_k iq4_nl)",
                 name);
        return -1;
    }
    /* every 2-D weight in that type: its rows must tile the type's blocks */
    size_t blk = eng_q_block_elems(type);
    uint32_t hd0 = sh->head_dim ? sh->head_dim : sh->n_embd / sh->n_head;
    if (sh->n_embd % blk || sh->n_ff % blk || (hd0 * sh->n_head) % blk) {
        snprintf(msg, 256, "model '%s': rows of %u, %u and %u do not tile %zu-wide %s blocks", name,
                 sh->n_embd, sh->n_ff, hd0 * sh->n_head, blk, dash + 1);
        return -1;
    }
    uint64_t rng = seed ? seed : 0x7a11d;
    gw_t *w = gw_create();
    owned_t o = {0};
    float *scores = NULL;
    int32_t *types = NULL;
    char **vocab = make_vocab(sh->n_vocab, &scores, &types);
    int rc = -1;
    const char *arch = sh->arch ? sh->arch : "llama";
    bool gemma3 = strcmp(arch, "gemma3") == 0, qwen2 = strcmp(arch, "qwen2") == 0,
         qwen3 = strcmp(arch, "qwen3") == 0;
    uint32_t hd = sh->head_dim ? sh->head_dim : sh->n_embd / sh->n_head, kvd = hd * sh->n_head_kv;
    uint32_t qd = hd * sh->n_head;
    if (!w || !vocab || !scores || !types) goto done;
    char key[96];
#define KEY(suffix) (snprintf(key, sizeof(key), "%s.%s", arch, suffix), key)
    gw_kv_str(w, "general.architecture", arch);
    gw_kv_str(w, "general.name", name);
    gw_kv_u32(w, "general.alignment", 32);
    gw_kv_u32(w, "general.file_type", ftype);
    gw_kv_u32(w, KEY("context_length"), sh->n_ctx);
    gw_kv_u32(w, KEY("embedding_length"), sh->n_embd);
    gw_kv_u32(w, KEY("block_count"), sh->n_layer);
    gw_kv_u32(w, KEY("feed_forward_length"), sh->n_ff);
    gw_kv_u32(w, KEY("attention.head_count"), sh->n_head);
    gw_kv_u32(w, KEY("attention.head_count_kv"), sh->n_head_kv);
    if (qwen2 || qwen3) {
        if (qwen3) {
            gw_kv_u32(w, KEY("attention.key_length"), hd);
            gw_kv_u32(w, KEY("attention.value_length"), hd);
        }
        gw_kv_f32(w, KEY("rope.freq_base"), 1000000.0f);
        gw_kv_f32(w, KEY("attention.layer_norm_rms_epsilon"), 1e-6f);
    } else if (gemma3) {
        gw_kv_u32(w, KEY("attention.key_length"), hd);
        gw_kv_u32(w, KEY("attention.value_length"), hd);
        gw_kv_u32(w, KEY("attention.sliding_window"), sh->swa_window);
        gw_kv_f32(w, KEY("rope.freq_base"), 1000000.0f);
        gw_kv_f32(w, KEY("attention.layer_norm_rms_epsilon"), 1e-6f);
    } else {
        gw_kv_u32(w, KEY("rope.dimension_count"), hd);
        gw_kv_f32(w, KEY("rope.freq_base"), sh->n_ctx > 4096 ? 500000.0f : 10000.0f);
        gw_kv_f32(w, KEY("attention.layer_norm_rms_epsilon"), 1e-5f);
        gw_kv_u32(w, KEY("vocab_size"), sh->n_vocab);
    }
#undef KEY
    gw_kv_str(w, "tokenizer.ggml.model", "llama");
    gw_kv_arr_str(w, "tokenizer.ggml.tokens", (const char *const *)vocab, sh->n_vocab);
    gw_kv_arr_f32(w, "tokenizer.ggml.scores", scores, sh->n_vocab);
    gw_kv_arr_i32(w, "tokenizer.ggml.token_type", types, sh->n_vocab);
    gw_kv_u32(w, "tokenizer.ggml.bos_token_id", 1);
    gw_kv_u32(w, "tokenizer.ggml.eos_token_id", 2);
    gw_kv_u32(w, "tokenizer.ggml.unknown_token_id", 0);
    gw_kv_bool(w, "tokenizer.ggml.add_bos_token", true);
    gw_kv_bool(w, "tokenizer.ggml.add_eos_token", false);
    gw_kv_str(w, "tokenizer.chat_template",
              "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
              "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt "
              "%}{{ '<|im_start|>assistant\\n' }}{% endif %}");
    float s_in = 1.0f / sqrtf((float)sh->n_embd), s_ff = 1.0f / sqrtf((float)sh->n_ff);
    /* gemma3 multiplies embeddings by sqrt(n_embd): drawn that much smaller, they enter the
     * layers at the same size as the llama shapes' */
    float s_emb = gemma3 ? s_in : 1.0f;
    if (add_weight(w, &o, "token_embd.weight", sh->n_embd, sh->n_vocab, type, s_emb, &rng) ||
        add_norm(w, &o, "output_norm.weight", sh->n_embd, &rng))
        goto done;
    if (!sh->tied &&
        add_weight(w, &o, "output.weight", sh->n_embd, sh->n_vocab, type, s_in * 2, &rng))
        goto done;
    for (uint32_t l = 0; l < sh->n_layer; l++) {
        char n[64];
#define WT(suffix, cols, rows, sc)                                                                 \
    snprintf(n, sizeof(n), "blk.%u.%s.weight", l, suffix);                                         \
    if (add_weight(w, &o, n, cols, rows, type, sc, &rng)) goto done;
#define NORM(suffix, len)                                                                          \
    snprintf(n, sizeof(n), "blk.%u.%s.weight", l, suffix);                                         \
    if (add_norm(w, &o, n, len, &rng)) goto done;
        NORM("attn_norm", sh->n_embd)
        WT("attn_q", sh->n_embd, qd, s_in * 4)
        WT("attn_k", sh->n_embd, kvd, s_in * 4)
        WT("attn_v", sh->n_embd, kvd, s_in)
        WT("attn_output", qd, sh->n_embd, s_in)
        if (gemma3 || qwen3) {
            NORM("attn_q_norm", hd)
            NORM("attn_k_norm", hd)
        }
        if (gemma3) {
            NORM("post_attention_norm", sh->n_embd)
        }
        if (qwen2) {
            const char *bias[3] = {"attn_q", "attn_k", "attn_v"};
            uint32_t len[3] = {qd, kvd, kvd};
            for (int b = 0; b < 3; b++) {
                snprintf(n, sizeof(n), "blk.%u.%s.bias", l, bias[b]);
                if (add_bias(w, &o, n, len[b], &rng)) goto done;
            }
        }
        NORM("ffn_norm", sh->n_embd)
        WT("ffn_gate", sh->n_embd, sh->n_ff, s_in * 2)
        WT("ffn_down", sh->n_ff, sh->n_embd, s_ff)
        WT("ffn_up", sh->n_embd, sh->n_ff, s_in * 2)
        if (gemma3) {
            NORM("post_ffw_norm", sh->n_embd)
        }
#undef WT
#undef NORM
    }
    rc = gw_write(w, path, msg);
done:
    if (rc && msg[0] == 0) snprintf(msg, 256, "out of memory building '%s'", name);
    for (size_t i = 0; i < o.n; i++) free(o.bufs[i]);
    free(o.bufs);
    for (uint32_t i = 0; vocab && i < sh->n_vocab; i++) free(vocab[i]);
    free(vocab);
    free(scores);
    free(types);
    gw_free(w);
    return rc;
}
