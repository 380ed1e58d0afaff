/* bench_attention.c - long-context decode: one decode step's time with full attention vs
 * TidalDecode (budget 256) at 1K, 4K, 16K and 32K cached tokens, and the cost of the fused
 * entropy telemetry (on vs off), side by side in one run on the same cache.
 *
 * The cache is filled with random keys and values (a 32K prefill on two cores would take
 * minutes); a decode step costs the same whatever the values are. Each measurement decodes
 * one token and rolls the cache back, so the length stays fixed.
 */
#include "../engine/engine.h"
#include "../base/f16.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* One decode step at the current length, rolled back afterwards. */
static double one_step(eng_ctx_t *c, kv_seq_t *s, const eng_attn_params_t *a, eng_attn_tele_t *t,
                       float *logits) {
    int32_t tok = 7;
    char msg[ENG_ERRMSG_LEN];
    eng_batch_item_t it = {s, &tok, 1, logits, false, a, t};
    double t0 = now_s();
    if (eng_forward(c, &it, 1, msg)) {
        fprintf(stderr, "bench_attention: %s\n", msg);
        exit(1);
    }
    double dt = now_s() - t0;
    s->n_tokens--; /* roll back: the length stays fixed */
    return dt;
}

static double median(double *v, int n) {
    for (int i = 1; i < n; i++)
        for (int j = i; j > 0 && v[j - 1] > v[j]; j--) {
            double x = v[j];
            v[j] = v[j - 1];
            v[j - 1] = x;
        }
    return v[n / 2];
}

int main(int argc, char **argv) {
    const char *path = argc > 1 ? argv[1] : "build/models/long-f16.gguf";
    uint32_t budget = argc > 2 ? (uint32_t)atoi(argv[2]) : 256;
    char msg[ENG_ERRMSG_LEN];
    eng_model_t *m;
    if (eng_model_load(&m, path, msg)) {
        fprintf(stderr, "bench_attention: %s\n", msg);
        return 1;
    }
    const eng_hparams_t *hp = eng_model_hparams(m);
    eng_ctx_params_t p;
    eng_ctx_params_default(&p);
    p.max_seqs = 1;
    p.n_ctx = hp->n_ctx_train;
    p.kv_f16 = !(argc > 3 && strcmp(argv[3], "f32") == 0); /* the server's default is F16 */
    int dev = eng_device_parse(argc > 4 ? argv[4] : "cpu");
    if (dev < 0) {
        fprintf(stderr, "bench_attention: device must be auto, cpu or cuda\n");
        return 1;
    }
    p.device = (eng_device_t)dev;
    /* a pool of exactly one full context, so its host image below stays that size */
    uint32_t kvd0 = hp->n_head_kv * hp->head_dim;
    size_t blocks = (p.n_ctx + p.block_size - 1) / p.block_size;
    p.kv_mem_bytes = kv_pool_bytes(hp->n_layer, kvd0, p.block_size, (uint32_t)blocks, p.kv_f16);
    eng_ctx_t *c;
    if (eng_ctx_create(&c, m, &p, msg)) {
        fprintf(stderr, "bench_attention: %s\n", msg);
        return 1;
    }
    kv_seq_t s;
    kv_seq_init(&s, eng_ctx_kv_pool(c));
    uint32_t max_len = hp->n_ctx_train - 1, kvd = hp->n_head_kv * hp->head_dim;
    if (kv_seq_reserve(&s, max_len + 1)) {
        fprintf(stderr, "bench_attention: KV cache too small\n");
        return 1;
    }
    /* fill a host image of the pool through the sequence's block table, then upload it (the
     * pool may live on a GPU) */
    kv_pool_t img = *eng_ctx_kv_pool(c);
    size_t img_bytes =
        kv_pool_bytes(img.n_layer, img.kv_dim, img.block_size, img.n_blocks, img.elem == 2);
    img.data = calloc(1, img_bytes);
    kv_seq_t si = s;
    si.pool = &img;
    if (!img.data) {
        fprintf(stderr, "bench_attention: out of memory\n");
        return 1;
    }
    uint64_t x = 88172645463325252ull;
    for (uint32_t l = 0; l < hp->n_layer; l++)
        for (uint32_t q = 0; q < max_len; q++) {
            void *k = kv_seq_kp(&si, l, q), *v = kv_seq_vp(&si, l, q);
            for (uint32_t i = 0; i < kvd; i++) {
                x ^= x << 13, x ^= x >> 7, x ^= x << 17;
                float kf = (float)((int32_t)(x >> 32)) * (1.0f / 2147483648.0f);
                float vf = (float)((int32_t)x) * (1.0f / 2147483648.0f);
                if (p.kv_f16) {
                    ((uint16_t *)k)[i] = eng_f32_to_f16(kf);
                    ((uint16_t *)v)[i] = eng_f32_to_f16(vf);
                } else {
                    ((float *)k)[i] = kf;
                    ((float *)v)[i] = vf;
                }
            }
        }
    if (eng_ctx_kv_upload(c, 0, img.data, img_bytes)) {
        fprintf(stderr, "bench_attention: cannot load the cache\n");
        return 1;
    }
    free(img.data);
    eng_attn_params_t full = {ENG_ATTN_FULL}, tidal = {ENG_ATTN_TIDAL, budget};
    eng_attn_defaults(hp, &tidal);
    size_t LH = (size_t)hp->n_layer * hp->n_head;
    float *tb = malloc(sizeof(float) * 3 * LH + hp->n_layer);
    eng_attn_tele_t tele = {tb, tb + LH, (uint32_t *)(tb + 2 * LH), (uint8_t *)(tb + 3 * LH)};
    float *logits = malloc(sizeof(float) * hp->n_vocab);
    const uint32_t lens[4] = {1024, 4096, 16384, 32767};
    fprintf(stderr, "model %s: %u layers, %u heads (%u KV), selection layers", hp->name,
            hp->n_layer, hp->n_head, hp->n_head_kv);
    for (uint32_t i = 0; i < tidal.n_sel_layers; i++) fprintf(stderr, " %u", tidal.sel_layers[i]);
    fprintf(stderr, ", budget %u, KV %s, backend %s, SIMD %s\n\n%8s %12s %12s %9s %14s %10s\n",
            budget, p.kv_f16 ? "f16" : "f32", eng_ctx_backend_name(c), eng_cpu_simd_name(),
            "cached", "full ms", "tidal ms", "speedup", "full+tele ms", "tele cost");
    for (int i = 0; i < 4; i++) {
        if (lens[i] > max_len) continue;
        s.n_tokens = lens[i];
        /* interleaved, so drift on a shared machine hits all three alike */
        enum { REPS = 9 };
        double f[REPS], td[REPS], te[REPS];
        one_step(c, &s, &full, NULL, logits); /* warm */
        for (int r = 0; r < REPS; r++) {
            f[r] = one_step(c, &s, &full, NULL, logits);
            td[r] = one_step(c, &s, &tidal, NULL, logits);
            te[r] = one_step(c, &s, &full, &tele, logits);
        }
        double base = median(f, REPS), tt = median(td, REPS), tel = median(te, REPS);
        fprintf(stderr, "%8u %12.2f %12.2f %8.2fx %14.2f %9.1f%%\n", lens[i], 1e3 * base, 1e3 * tt,
                base / tt, 1e3 * tel, 100 * (tel - base) / base);
        printf(
            "{\"bench\":\"long_decode\",\"backend\":\"%s\",\"cached_tokens\":%u,\"full_ms\":%.3f,"
            "\"tidal_ms\":%.3f,"
            "\"token_budget\":%u,\"speedup\":%.3f,\"telemetry_ms\":%.3f,\"telemetry_cost\":%.4f}\n",
            eng_ctx_backend_name(c), lens[i], 1e3 * base, 1e3 * tt, budget, base / tt, 1e3 * tel,
            (tel - base) / base);
        fflush(stdout);
    }
    free(tb);
    free(logits);
    kv_seq_close(&s);
    eng_ctx_free(c);
    eng_model_free(m);
    return 0;
}
