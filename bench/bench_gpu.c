/* bench_gpu.c - decode throughput on a GPU against its memory-bandwidth roofline.
 *
 *   bench_gpu MODEL.gguf [--device cuda]
 *
 * MODEL may be F16 or quantized (b1-Q4_K_M: the quantized GEMV kernels).
 * Decodes batches of 1, 8 and 32 sequences (32-token prompts, then 64 timed steps) and
 * reports tokens/s, the bytes each step must read (every weight once, plus each sequence's
 * KV cache) and the bandwidth that implies, next to the card's nominal bandwidth and a
 * streaming read measured on the card in the same run. Batch-1 decode is memory bound, so
 * achieved / measured bandwidth is its roofline ratio. JSON lines on stdout, a table on stderr.
 */
#include "../engine/engine.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Bytes of the 2-D weights one step reads (F16: 2 per parameter; the embedding is gathered). */
static double weight_bytes(const eng_hparams_t *hp, double bytes_per_param) {
    double d = hp->n_embd, qd = (double)hp->n_head * hp->head_dim,
           kvd = (double)hp->n_head_kv * hp->head_dim, ff = hp->n_ff;
    double layer = d * qd + 2 * d * kvd + qd * d + 3 * d * ff;
    return (layer * hp->n_layer + (double)hp->n_vocab * d) * bytes_per_param;
}

int main(int argc, char **argv) {
    const char *path = NULL, *device = "cuda";
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--device") && i + 1 < argc)
            device = argv[++i];
        else
            path = argv[i];
    }
    int dev = eng_device_parse(device);
    if (!path || dev < 0) {
        fprintf(stderr, "usage: bench_gpu MODEL.gguf [--device auto|cpu|cuda]\n");
        return 2;
    }
    char msg[ENG_ERRMSG_LEN];
    eng_model_t *m;
    if (eng_model_load(&m, path, msg)) {
        fprintf(stderr, "bench_gpu: %s\n", msg);
        return 1;
    }
    const eng_hparams_t *hp = eng_model_hparams(m);
    enum { PROMPT = 32, STEPS = 64, MAXB = 32 };
    eng_ctx_params_t p;
    eng_ctx_params_default(&p);
    p.device = (eng_device_t)dev;
    p.max_seqs = MAXB;
    p.n_ctx = 1024;
    p.kv_f16 = true;
    p.max_batch_tokens = PROMPT * MAXB;
    p.kv_mem_bytes = (size_t)MAXB * p.n_ctx * hp->n_layer * 2 * hp->n_head_kv * hp->head_dim * 2;
    eng_ctx_t *c;
    if (eng_ctx_create(&c, m, &p, msg)) {
        fprintf(stderr, "bench_gpu: %s\n", msg);
        return 1;
    }
    eng_device_info_t info;
    eng_ctx_device_info(c, &info);
    double measured = eng_ctx_measure_bandwidth(c);
    /* F32 stays F32 and F16/BF16 are 2 bytes a parameter; quantized weights stay in their
     * blocks on the GPU, so a step reads about the file (less the gathered embedding) */
    double wbytes = weight_bytes(hp, hp->weight_type == 0 ? 4 : 2);
    if (hp->weight_type != 0 && hp->weight_type != 1 && hp->weight_type != 30) {
        struct stat stt;
        if (stat(path, &stt) == 0) wbytes = (double)stt.st_size;
    }
    fprintf(stderr,
            "device %s, backend %s\nmemory bandwidth: nominal %.0f GB/s, measured read %.0f "
            "GB/s\nmodel %s: %u layers, dim %u, %.2f GB of weights read per step\n\n",
            info.name, eng_ctx_backend_name(c), info.peak_gbps, measured, hp->name, hp->n_layer,
            hp->n_embd, wbytes / 1e9);
    fprintf(stderr, "%6s %12s %12s %14s %12s %12s\n", "batch", "step ms", "tok/s", "GB/s achieved",
            "of measured", "of nominal");
    float *logits = malloc(sizeof(float) * hp->n_vocab * MAXB);
    kv_seq_t seqs[MAXB];
    for (int i = 0; i < MAXB; i++) kv_seq_init(&seqs[i], eng_ctx_kv_pool(c));
    int32_t prompt[PROMPT * MAXB], next[MAXB];
    for (int i = 0; i < PROMPT * MAXB; i++) prompt[i] = 3 + (i * 131) % (int32_t)(hp->n_vocab - 3);
    const uint32_t batches[3] = {1, 8, 32};
    int rc = 0;
    for (int bi = 0; bi < 3 && !rc; bi++) {
        uint32_t B = batches[bi];
        eng_batch_item_t items[MAXB];
        for (uint32_t s = 0; s < B; s++) {
            kv_seq_reset(&seqs[s]);
            items[s] = (eng_batch_item_t){&seqs[s], prompt + s * PROMPT, PROMPT, NULL, false};
        }
        if ((rc = eng_forward(c, items, B, msg))) break;
        double t0 = 0;
        for (int step = -4; step < STEPS && !rc; step++) { /* 4 warm-up steps */
            if (step == 0) t0 = now_s();
            for (uint32_t s = 0; s < B; s++) {
                next[s] = prompt[(s * 7 + (uint32_t)step + 8) % (PROMPT * MAXB)];
                items[s] = (eng_batch_item_t){&seqs[s], &next[s], 1,
                                              logits + (size_t)s * hp->n_vocab, false};
            }
            rc = eng_forward(c, items, B, msg);
        }
        double step_s = (now_s() - t0) / STEPS;
        /* mean KV bytes read per step: each sequence's cache, F16 keys and values */
        double mean_len = PROMPT + 4 + STEPS / 2.0;
        double kv = B * mean_len * hp->n_layer * 2.0 * hp->n_head_kv * hp->head_dim * 2;
        double gbps = (wbytes + kv) / step_s / 1e9;
        fprintf(stderr, "%6u %12.3f %12.1f %14.0f %11.1f%% %11.1f%%\n", B, step_s * 1e3, B / step_s,
                gbps, measured > 0 ? 100 * gbps / measured : 0,
                info.peak_gbps > 0 ? 100 * gbps / info.peak_gbps : 0);
        printf("{\"bench\":\"gpu_decode\",\"device\":\"%s\",\"batch\":%u,\"step_ms\":%.4f,"
               "\"tokens_per_s\":%.2f,\"achieved_gbps\":%.1f,\"measured_gbps\":%.1f,"
               "\"nominal_gbps\":%.1f,\"roofline_ratio\":%.4f}\n",
               info.name, B, step_s * 1e3, B / step_s, gbps, measured, info.peak_gbps,
               measured > 0 ? gbps / measured : 0);
        fflush(stdout);
    }
    if (rc) fprintf(stderr, "bench_gpu: %s\n", msg);
    for (int i = 0; i < MAXB; i++) kv_seq_close(&seqs[i]);
    free(logits);
    eng_ctx_free(c);
    eng_model_free(m);
    return rc ? 1 : 0;
}
