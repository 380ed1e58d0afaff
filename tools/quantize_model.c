/* quantize_model.c - convert a float GGUF model with the engine's quantizers. */
#include "quantize_model.h"
#include "../base/err.h"
#include "../engine/gguf.h"
#include "../engine/quant.h"
#include "../engine/threadpool.h"
#include "gguf_writer.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct {
    const gguf_tensor_t *t;
    uint32_t to;
    uint8_t *dst;
    size_t src_row, dst_row;
    atomic_int failed;
    float **rows; /* one row buffer per worker */
} job_t;

static void convert_rows(void *arg, size_t b, size_t e, int worker) {
    job_t *j = arg;
    uint64_t n = j->t->ne[0];
    for (size_t r = b; r < e; r++) {
        const uint8_t *src = (const uint8_t *)j->t->data + r * j->src_row;
        if (eng_q_dequantize_row(j->t->type, src, j->rows[worker], n) ||
            eng_q_quantize_row(j->to, j->rows[worker], j->dst + r * j->dst_row, n))
            atomic_store(&j->failed, 1);
    }
}

static uint32_t kv_u32(const gguf_t *g, const char *arch, const char *suffix, uint32_t dflt) {
    char key[128];
    uint64_t v;
    snprintf(key, sizeof(key), "%s.%s", arch, suffix);
    return gguf_get_u64(g, key, &v, NULL) == 0 ? (uint32_t)v : dflt;
}

void quantize_describe(const gguf_t *g, const gguf_tensor_t *t, eng_qmix_tensor_t *d) {
    const char *arch = gguf_get_str(g, "general.architecture");
    arch = arch ? arch : "llama";
    uint32_t n_head = kv_u32(g, arch, "attention.head_count", 1);
    uint32_t n_kv = kv_u32(g, arch, "attention.head_count_kv", n_head);
    unsigned layer = 0;
    sscanf(t->name, "blk.%u.", &layer);
    *d = (eng_qmix_tensor_t){t->name,
                             t->n_dims,
                             t->type,
                             t->ne[0],
                             layer,
                             kv_u32(g, arch, "block_count", 0),
                             n_kv ? n_head / n_kv : 1,
                             !gguf_tensor(g, "output.weight")};
}

static bool is_float(uint32_t t) {
    return t == GGML_F32 || t == GGML_F16 || t == GGML_BF16;
}

int quantize_model(const char *in, const char *out, const char *type, int n_threads, FILE *log,
                   char *msg) {
    const eng_qmix_t *mix = eng_q_mix(type);
    if (!mix)
        return eng_fail(msg, ENG_EINVAL, "unknown type '%s' (types: %s)", type, eng_q_mix_names());
    gguf_t *g = NULL;
    int rc = gguf_open(&g, in, msg);
    if (rc) return rc;
    gw_t *w = gw_create();
    pool_t *pool = NULL;
    uint8_t **bufs = calloc(g->n_tensors ? g->n_tensors : 1, sizeof(uint8_t *));
    float **rows = NULL;
    if (n_threads <= 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads = n > 0 ? (int)n : 1;
    }
    const char *arch = gguf_get_str(g, "general.architecture");
    if (!w || !bufs) {
        rc = eng_fail(msg, ENG_ENOMEM, "out of memory");
        goto done;
    }
    if (!arch) {
        rc = eng_fail(msg, ENG_EFORMAT, "%s: missing metadata 'general.architecture'", in);
        goto done;
    }
    /* float tensors only: a quantized one would be rounded twice */
    uint64_t widest = 0;
    for (size_t i = 0; i < g->n_tensors; i++) {
        const gguf_tensor_t *t = &g->tensors[i];
        if (!is_float(t->type)) {
            rc = eng_fail(msg, ENG_EUNSUPPORTED,
                          "%s: tensor '%s' is %s already; tidald quantize converts F32, F16 and "
                          "BF16 models",
                          in, t->name, gguf_type_name(t->type));
            goto done;
        }
        if (t->ne[0] > widest) widest = t->ne[0];
    }
    for (size_t i = 0; i < g->n_kv; i++) {
        const gguf_kv_t *kv = &g->kv[i];
        if (!strcmp(kv->key, "general.file_type") ||
            !strcmp(kv->key, "general.quantization_version"))
            continue;
        if (gw_kv_copy(w, kv)) {
            rc = eng_fail(msg, ENG_EUNSUPPORTED, "%s: metadata '%s' cannot be copied", in, kv->key);
            goto done;
        }
    }
    gw_kv_u32(w, "general.file_type", mix->ftype);
    gw_kv_u32(w, "general.quantization_version", 2);
    pool = pool_create(n_threads);
    rows = calloc((size_t)n_threads + 1, sizeof(float *));
    if (!pool || !rows) {
        rc = eng_fail(msg, ENG_ENOMEM, "out of memory");
        goto done;
    }
    for (int k = 0; k <= n_threads; k++)
        if (!(rows[k] = malloc(sizeof(float) * (widest ? widest : 1)))) {
            rc = eng_fail(msg, ENG_ENOMEM, "out of memory");
            goto done;
        }
    size_t before = 0, after = 0;
    for (size_t i = 0; i < g->n_tensors; i++) {
        const gguf_tensor_t *t = &g->tensors[i];
        eng_qmix_tensor_t d;
        quantize_describe(g, t, &d);
        uint32_t to = eng_q_mix_type(mix, &d);
        size_t n_rows = t->nbytes / gguf_row_bytes(t->type, t->ne[0]);
        size_t dst_row = gguf_row_bytes(to, t->ne[0]), bytes = dst_row * n_rows;
        if (!(bufs[i] = malloc(bytes ? bytes : 1))) {
            rc = eng_fail(msg, ENG_ENOMEM, "out of memory for tensor '%s'", t->name);
            goto done;
        }
        job_t j = {t, to, bufs[i], gguf_row_bytes(t->type, t->ne[0]), dst_row, 0, rows};
        pool_run(pool, convert_rows, &j, n_rows, 16);
        if (atomic_load(&j.failed)) {
            rc = eng_fail(msg, ENG_EINVAL, "tensor '%s' cannot be converted to %s", t->name,
                          gguf_type_name(to));
            goto done;
        }
        gw_tensor(w, t->name, t->n_dims, t->ne, to, bufs[i], bytes);
        before += t->nbytes, after += bytes;
        if (log)
            fprintf(log, "[%zu/%zu] %-32s %-5s -> %-5s %8.2f MiB\n", i + 1, g->n_tensors, t->name,
                    gguf_type_name(t->type), gguf_type_name(to), (double)bytes / (1 << 20));
    }
    char wmsg[256] = {0};
    if (gw_write(w, out, wmsg)) {
        rc = eng_fail(msg, ENG_EIO, "%s", wmsg);
        goto done;
    }
    if (log)
        fprintf(log, "tidald quantize: %s: %.2f MiB -> %.2f MiB (%s)\n", out,
                (double)before / (1 << 20), (double)after / (1 << 20), mix->name);
done:
    for (size_t i = 0; bufs && i < g->n_tensors; i++) free(bufs[i]);
    free(bufs);
    for (int k = 0; rows && k <= n_threads; k++) free(rows[k]);
    free(rows);
    if (pool) pool_destroy(pool);
    gw_free(w);
    gguf_close(g);
    return rc;
}
