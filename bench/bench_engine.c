/* bench_engine.c - engine benchmarks, side by side in one run:
 *   - the machine's own memory read bandwidth (the decode roofline);
 *   - prefill tokens/s (one 512-token pass, as llama-bench's pp512);
 *   - decode tokens/s at batch 1, 4 and 16 (batched vs single);
 *   - batch-1 decode weight bandwidth as a fraction of the measured bandwidth;
 *   - the SIMD kernels vs the portable scalar path on the same model.
 * Prints a human table on stderr and one JSON object per result on stdout.
 */
#include "../engine/engine.h"

#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <pthread.h>
#include <time.h>
#include <unistd.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

typedef struct {
    const float *p;
    size_t n;
    double sum;
} bw_arg_t;

/* Read a buffer as fast as the core can: AVX2 loads into four independent OR chains (no FP
 * dependency limits the rate), a plain 64-bit loop where AVX2 is missing. */
__attribute__((target("avx2"))) static uint64_t read_avx2(const float *p, size_t n) {
    __m256i a = _mm256_setzero_si256(), b = a, c = a, d = a;
    for (size_t i = 0; i + 32 <= n; i += 32) {
        a = _mm256_or_si256(a, _mm256_loadu_si256((const __m256i *)(p + i)));
        b = _mm256_or_si256(b, _mm256_loadu_si256((const __m256i *)(p + i + 8)));
        c = _mm256_or_si256(c, _mm256_loadu_si256((const __m256i *)(p + i + 16)));
        d = _mm256_or_si256(d, _mm256_loadu_si256((const __m256i *)(p + i + 24)));
    }
    a = _mm256_or_si256(_mm256_or_si256(a, b), _mm256_or_si256(c, d));
    uint64_t out[4];
    _mm256_storeu_si256((__m256i *)out, a);
    return out[0] | out[1] | out[2] | out[3];
}

static void *bw_read(void *arg) {
    bw_arg_t *b = arg;
    if (__builtin_cpu_supports("avx2")) {
        b->sum = (double)read_avx2(b->p, b->n);
    } else {
        const uint64_t *q = (const uint64_t *)b->p;
        uint64_t x = 0;
        for (size_t i = 0; i < b->n / 2; i++) x |= q[i];
        b->sum = (double)x;
    }
    return NULL;
}

/* Best of 5 passes reading 1 GiB with one thread per CPU, in GB/s. */
static double measure_bandwidth(int threads) {
    size_t n = (size_t)1 << 28; /* floats */
    float *buf = malloc(n * sizeof(float));
    if (!buf) return 0;
    for (size_t i = 0; i < n; i++) buf[i] = (float)(i & 7);
    double best = 0;
    for (int rep = 0; rep < 5; rep++) {
        pthread_t th[64];
        bw_arg_t args[64];
        double t0 = now_s();
        for (int t = 0; t < threads; t++) {
            args[t] = (bw_arg_t){buf + n / threads * t, n / threads, 0};
            pthread_create(&th[t], NULL, bw_read, &args[t]);
        }
        for (int t = 0; t < threads; t++) pthread_join(th[t], NULL);
        double gbs = n * sizeof(float) / (now_s() - t0) / 1e9;
        if (gbs > best) best = gbs;
    }
    free(buf);
    return best;
}

typedef struct {
    double prefill_tps;
    double decode_tps[3]; /* batch 1, 4, 16 aggregate tokens/s */
    double step_s1;
} result_t;

static const uint32_t batches[3] = {1, 4, 16};

static int run_model(const char *path, eng_model_t *m, int threads, result_t *r) {
    char msg[ENG_ERRMSG_LEN];
    const eng_hparams_t *hp = eng_model_hparams(m);
    eng_ctx_params_t p;
    eng_ctx_params_default(&p);
    p.n_threads = threads;
    p.max_seqs = 16;
    p.n_ctx = 1024;
    eng_ctx_t *c;
    if (eng_ctx_create(&c, m, &p, msg)) {
        fprintf(stderr, "bench: %s: %s\n", path, msg);
        return -1;
    }
    float *logits = malloc(sizeof(float) * hp->n_vocab * 16);
    int32_t prompt[512];
    for (int i = 0; i < 512; i++) prompt[i] = 3 + (i * 31) % (int32_t)(hp->n_vocab - 3);
    kv_seq_t seqs[16];
    for (int i = 0; i < 16; i++) kv_seq_init(&seqs[i], eng_ctx_kv_pool(c));

    /* prefill: 512 tokens in one pass (after one warm-up) */
    eng_batch_item_t it = {&seqs[0], prompt, 512, logits, false};
    eng_forward(c, &it, 1, msg);
    kv_seq_reset(&seqs[0]);
    double t0 = now_s();
    eng_forward(c, &it, 1, msg);
    r->prefill_tps = 512 / (now_s() - t0);
    kv_seq_reset(&seqs[0]);

    for (int b = 0; b < 3; b++) {
        uint32_t B = batches[b];
        eng_batch_item_t items[16];
        int32_t next[16];
        for (uint32_t s = 0; s < B; s++) {
            kv_seq_reset(&seqs[s]);
            eng_batch_item_t pre = {&seqs[s], prompt + s, 32, NULL, false};
            eng_forward(c, &pre, 1, msg);
            next[s] = prompt[s + 40];
        }
        int steps = B == 1 ? 24 : 12;
        for (uint32_t s = 0; s < B; s++)
            items[s] = (eng_batch_item_t){&seqs[s], &next[s], 1, logits + s * hp->n_vocab, false};
        eng_forward(c, items, B, msg); /* warm-up */
        t0 = now_s();
        for (int k = 0; k < steps; k++)
            if (eng_forward(c, items, B, msg)) {
                fprintf(stderr, "bench: %s\n", msg);
                break;
            }
        double dt = now_s() - t0;
        r->decode_tps[b] = (double)B * steps / dt;
        if (B == 1) r->step_s1 = dt / steps;
    }
    for (int i = 0; i < 16; i++) kv_seq_close(&seqs[i]);
    free(logits);
    eng_ctx_free(c);
    return 0;
}

int main(int argc, char **argv) {
    const char *models[8];
    int n_models = 0, threads = 0, simd_only = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--model") == 0 && i + 1 < argc && n_models < 8)
            models[n_models++] = argv[++i];
        else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc)
            threads = atoi(argv[++i]);
        else if (strcmp(argv[i], "--simd-only") == 0)
            simd_only = 1;
        else {
            fprintf(stderr, "usage: bench_engine --model PATH [--model PATH ...] [--threads N] "
                            "[--simd-only]\n");
            return 2;
        }
    }
    if (threads <= 0) threads = (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (threads > 64) threads = 64;
    double bw = measure_bandwidth(threads);
    const char *simd = eng_cpu_simd_name();
    printf("{\"bench\":\"memory_bandwidth\",\"threads\":%d,\"gb_per_s\":%.2f}\n", threads, bw);
    fprintf(stderr, "machine: %d threads, measured read bandwidth %.1f GB/s, SIMD %s\n\n", threads,
            bw, simd);
    fprintf(stderr, "%-28s %-7s %9s %9s %9s %9s %7s %7s %8s\n", "model", "simd", "prefill",
            "dec b1", "dec b4", "dec b16", "b16/b1", "GB/s", "roofline");
    for (int i = 0; i < n_models; i++) {
        char msg[ENG_ERRMSG_LEN];
        eng_model_t *m;
        if (eng_model_load(&m, models[i], msg)) {
            fprintf(stderr, "bench: %s\n", msg);
            return 1;
        }
        struct stat st;
        stat(models[i], &st);
        double weight_bytes = (double)st.st_size; /* every weight is read once per decode step */
        const char *paths[2] = {simd, "scalar"};
        for (int k = 0; k < 2; k++) {
            if (k == 1 && (simd_only || strcmp(simd, "scalar") == 0)) break;
            eng_cpu_force_simd(paths[k]);
            result_t r = {0};
            if (run_model(models[i], m, threads, &r)) return 1;
            double gbs = weight_bytes / r.step_s1 / 1e9;
            const char *base = strrchr(models[i], '/') ? strrchr(models[i], '/') + 1 : models[i];
            fprintf(stderr, "%-28s %-7s %9.1f %9.2f %9.2f %9.2f %6.2fx %7.1f %7.0f%%\n", base,
                    paths[k], r.prefill_tps, r.decode_tps[0], r.decode_tps[1], r.decode_tps[2],
                    r.decode_tps[2] / r.decode_tps[0], gbs, 100 * gbs / bw);
            printf("{\"bench\":\"engine\",\"model\":\"%s\",\"simd\":\"%s\",\"threads\":%d,"
                   "\"prefill_tok_s\":%.2f,\"decode_tok_s_b1\":%.3f,\"decode_tok_s_b4\":%.3f,"
                   "\"decode_tok_s_b16\":%.3f,\"batch16_gain\":%.3f,\"decode_weight_gb_s\":%.2f,"
                   "\"bandwidth_fraction\":%.3f}\n",
                   base, paths[k], threads, r.prefill_tps, r.decode_tps[0], r.decode_tps[1],
                   r.decode_tps[2], r.decode_tps[2] / r.decode_tps[0], gbs, gbs / bw);
            fflush(stdout);
        }
        eng_cpu_force_simd(simd);
        eng_model_free(m);
    }
    return 0;
}
