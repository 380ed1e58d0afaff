/* metrics.c - the process-wide Prometheus registry and its text exposition (format 0.0.4).
 *
 * Histograms and counters are written by the loop thread only, so they need no
 * lock; engine-side figures (running, waiting, KV usage, token counts, batch
 * sizes) come from a scheduler stats snapshot taken at scrape time.
 */
#include "api.h"

#include <dirent.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_BUCKETS 24

/* Count v in the first bucket whose upper bound holds it (the last slot is +Inf). */
static void bucket(uint64_t *count, const double *le, size_t n_le, double v) {
    size_t i = 0;
    while (i < n_le && v > le[i]) i++;
    count[i]++;
}

typedef struct {
    const char *name, *help;
    double le[MAX_BUCKETS];
    int n_le;
    uint64_t count[MAX_BUCKETS + 1];
    double sum;
    uint64_t total;
} hist_t;

static hist_t hists[API_H_COUNT] = {
    [API_H_TTFT] = {"tidald_time_to_first_token_seconds",
                    "Time from request arrival to its first generated token.",
                    {0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5,
                     7.5, 10, 20, 40, 80},
                    19,
                    {0},
                    0,
                    0},
    [API_H_ITL] = {"tidald_inter_token_latency_seconds",
                   "Time between consecutive generated tokens of a request.",
                   {0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1,
                    2.5},
                   15,
                   {0},
                   0,
                   0},
    [API_H_E2E] = {"tidald_e2e_request_latency_seconds",
                   "Time from request arrival to its last token.",
                   {0.3, 0.5, 0.8, 1,  1.5, 2,   2.5, 5,   10,  15,
                    20,  30,  40,  50, 60,  120, 240, 480, 960, 1920},
                   20,
                   {0},
                   0,
                   0},
    [API_H_QUEUE] = {"tidald_request_queue_time_seconds",
                     "Time a request waited before the scheduler admitted it.",
                     {0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300},
                     14,
                     {0},
                     0,
                     0},
    [API_H_ENTROPY] = {"tidald_token_entropy_bits",
                       "Entropy of the sampling distribution of each generated token.",
                       {0.25, 0.5, 1, 1.5, 2, 3, 4, 5, 6, 8, 10, 12, 16},
                       13,
                       {0},
                       0,
                       0},
};

static const char *finish_reasons[] = {"stop", "length", "cancelled", "timeout", "error"};
static uint64_t finished[5];
static const char *reject_reasons[] = {"queue_full",  "invalid_request", "unauthorized",
                                       "too_large",   "not_found",       "method_not_allowed",
                                       "unavailable", "context_length"};
#define N_REJECT (sizeof(reject_reasons) / sizeof(reject_reasons[0]))
static uint64_t rejected[N_REJECT];
static double start_time;
/* per-layer attention histograms, and the entropy-collapse counter */
static const double att_le[] = {0.25, 0.5, 1, 1.5, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16};
static const double sink_le[] = {0.01, 0.05, 0.1, 0.2, 0.3,  0.4, 0.5,
                                 0.6,  0.7,  0.8, 0.9, 0.95, 0.99};
#define N_ATT_LE (sizeof(att_le) / sizeof(att_le[0]))
#define N_SINK_LE (sizeof(sink_le) / sizeof(sink_le[0]))
typedef struct {
    uint64_t att[N_ATT_LE + 1], sink[N_SINK_LE + 1], n, collapses;
    double att_sum, sink_sum;
} layer_hist_t;
static layer_hist_t *layers;
static uint32_t n_layers;

void api_metrics_layers(uint32_t n) {
    free(layers);
    layers = calloc(n, sizeof(layer_hist_t));
    n_layers = layers ? n : 0;
}

void api_metrics_attention(const sched_attn_stats_t *a) {
    for (uint32_t l = 0; l < a->n_layer && l < n_layers; l++) {
        layer_hist_t *h = &layers[l];
        bucket(h->att, att_le, N_ATT_LE, a->entropy_bits[l]);
        bucket(h->sink, sink_le, N_SINK_LE, a->sink_mass[l]);
        h->att_sum += a->entropy_bits[l];
        h->sink_sum += a->sink_mass[l];
        h->n++;
    }
}

void api_metrics_collapse(uint32_t layer) {
    if (layer < n_layers) layers[layer].collapses++;
}

void api_metrics_init(double start_time_unix) {
    start_time = start_time_unix;
}

void api_metrics_observe(api_hist_id_t id, double v) {
    hist_t *h = &hists[id];
    bucket(h->count, h->le, (size_t)h->n_le, v);
    h->sum += v;
    h->total++;
}

void api_metrics_finished(const char *reason) {
    for (int i = 0; i < 5; i++)
        if (strcmp(reason, finish_reasons[i]) == 0) finished[i]++;
}

void api_metrics_rejected(const char *reason) {
    for (size_t i = 0; i < N_REJECT; i++)
        if (strcmp(reason, reject_reasons[i]) == 0) rejected[i]++;
}

typedef struct {
    char *s;
    size_t len, cap;
    bool oom;
} out_t;

static void emit(out_t *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void emit(out_t *o, const char *fmt, ...) {
    if (o->oom) return;
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(o->s + o->len, o->cap - o->len, fmt, ap);
        va_end(ap);
        if (n < 0) {
            o->oom = true;
            return;
        }
        if ((size_t)n < o->cap - o->len) {
            o->len += (size_t)n;
            return;
        }
        size_t cap = (o->cap + (size_t)n + 1) * 2;
        char *ns = realloc(o->s, cap);
        if (!ns) {
            o->oom = true;
            return;
        }
        o->s = ns;
        o->cap = cap;
    }
}

/* One histogram series: cumulative buckets, sum and count; `labels` is "" or `k="v",`. */
static void emit_series(out_t *o, const char *name, const char *labels, const double *le,
                        size_t n_le, const uint64_t *count, double sum, uint64_t total) {
    uint64_t cum = 0;
    for (size_t i = 0; i < n_le; i++) {
        cum += count[i];
        emit(o, "%s_bucket{%sle=\"%g\"} %llu\n", name, labels, le[i], (unsigned long long)cum);
    }
    emit(o, "%s_bucket{%sle=\"+Inf\"} %llu\n", name, labels, (unsigned long long)total);
    size_t nl = strlen(labels);
    /* the same labels without the trailing comma for _sum and _count */
    emit(o, "%s_sum%s%.*s%s %.9g\n%s_count%s%.*s%s %llu\n", name, nl ? "{" : "",
         (int)(nl ? nl - 1 : 0), labels, nl ? "}" : "", sum, name, nl ? "{" : "",
         (int)(nl ? nl - 1 : 0), labels, nl ? "}" : "", (unsigned long long)total);
}

static void emit_hist(out_t *o, const char *name, const char *help, const double *le, int n_le,
                      const uint64_t *count, double sum, uint64_t total) {
    emit(o, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
    emit_series(o, name, "", le, (size_t)n_le, count, sum, total);
}

static void process_facts(double *rss, int *fds) {
    *rss = 0;
    *fds = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (f) {
        unsigned long size, res;
        if (fscanf(f, "%lu %lu", &size, &res) == 2)
            *rss = (double)res * (double)sysconf(_SC_PAGESIZE);
        fclose(f);
    }
    DIR *d = opendir("/proc/self/fd");
    if (d) {
        struct dirent *e;
        while ((e = readdir(d)))
            if (e->d_name[0] != '.') (*fds)++;
        closedir(d);
        (*fds)--; /* the directory handle itself */
    }
}

char *api_metrics_render(const sched_stats_t *st, const api_server_facts_t *srv) {
    out_t o = {0};
    emit(&o,
         "# HELP tidald_requests_running Requests decoding now.\n"
         "# TYPE tidald_requests_running gauge\ntidald_requests_running %u\n",
         st->running);
    emit(&o,
         "# HELP tidald_requests_waiting Requests queued for admission.\n"
         "# TYPE tidald_requests_waiting gauge\ntidald_requests_waiting %u\n",
         st->waiting);
    emit(&o,
         "# HELP tidald_kv_cache_usage_ratio Fraction of KV cache blocks in use.\n"
         "# TYPE tidald_kv_cache_usage_ratio gauge\ntidald_kv_cache_usage_ratio %.6f\n",
         st->kv_usage);
    emit(&o,
         "# HELP tidald_prompt_tokens_total Prompt tokens processed.\n"
         "# TYPE tidald_prompt_tokens_total counter\ntidald_prompt_tokens_total %llu\n",
         (unsigned long long)st->prompt_tokens);
    emit(&o,
         "# HELP tidald_generation_tokens_total Tokens generated.\n"
         "# TYPE tidald_generation_tokens_total counter\ntidald_generation_tokens_total %llu\n",
         (unsigned long long)st->generation_tokens);
    emit(&o, "# HELP tidald_requests_total Requests finished, by finish reason.\n"
             "# TYPE tidald_requests_total counter\n");
    for (int i = 0; i < 5; i++)
        emit(&o, "tidald_requests_total{finish_reason=\"%s\"} %llu\n", finish_reasons[i],
             (unsigned long long)finished[i]);
    emit(&o, "# HELP tidald_requests_rejected_total Requests refused before generation, by "
             "reason.\n# TYPE tidald_requests_rejected_total counter\n");
    for (size_t i = 0; i < N_REJECT; i++)
        emit(&o, "tidald_requests_rejected_total{reason=\"%s\"} %llu\n", reject_reasons[i],
             (unsigned long long)rejected[i]);
    for (int h = 0; h < API_H_COUNT; h++)
        emit_hist(&o, hists[h].name, hists[h].help, hists[h].le, hists[h].n_le, hists[h].count,
                  hists[h].sum, hists[h].total);
    static const double batch_le[7] = {1, 2, 4, 8, 16, 32, 64};
    emit_hist(&o, "tidald_batch_size", "Sequences in each engine step.", batch_le, 7,
              st->batch_hist, (double)st->batch_sum, st->batch_count);
    emit(&o,
         "# HELP tidald_kv_evicted_tokens_total Tokens evicted from KV caches (sink-aware).\n"
         "# TYPE tidald_kv_evicted_tokens_total counter\ntidald_kv_evicted_tokens_total %llu\n",
         (unsigned long long)st->evicted_tokens);
    emit(&o,
         "# HELP tidald_preemptions_total Requests preempted and requeued under KV memory "
         "pressure.\n# TYPE tidald_preemptions_total counter\ntidald_preemptions_total %llu\n",
         (unsigned long long)st->preemptions);
    const char *names[2] = {"tidald_attention_entropy_bits", "tidald_sink_mass"};
    const char *helps[2] = {"Head-mean attention entropy of each generated token, by layer.",
                            "Head-mean attention mass on the sink tokens, by layer."};
    for (int k = 0; k < 2; k++) {
        emit(&o, "# HELP %s %s\n# TYPE %s histogram\n", names[k], helps[k], names[k]);
        const double *le = k ? sink_le : att_le;
        size_t n_le = k ? N_SINK_LE : N_ATT_LE;
        for (uint32_t l = 0; l < n_layers; l++) {
            char labels[32];
            snprintf(labels, sizeof(labels), "layer=\"%u\",", l);
            emit_series(&o, names[k], labels, le, n_le, k ? layers[l].sink : layers[l].att,
                        k ? layers[l].sink_sum : layers[l].att_sum, layers[l].n);
        }
    }
    emit(&o, "# HELP tidald_entropy_collapse_total Runs of tokens whose normalised attention "
             "entropy stayed under the collapse threshold, by layer.\n"
             "# TYPE tidald_entropy_collapse_total counter\n");
    for (uint32_t l = 0; l < n_layers; l++)
        emit(&o, "tidald_entropy_collapse_total{layer=\"%u\"} %llu\n", l,
             (unsigned long long)layers[l].collapses);
    emit(&o,
         "# HELP tidald_http_connections Open client connections.\n"
         "# TYPE tidald_http_connections gauge\ntidald_http_connections %zu\n",
         srv->connections);
    emit(&o,
         "# HELP tidald_http_request_buffer_bytes Bytes held for requests (bodies and pipelined "
         "input) over all connections.\n"
         "# TYPE tidald_http_request_buffer_bytes gauge\ntidald_http_request_buffer_bytes %zu\n",
         srv->request_buffer_bytes);
    double rss;
    int fds;
    process_facts(&rss, &fds);
    const char *pfx[2] = {"tidald_", ""};
    for (int k = 0; k < 2; k++) {
        emit(&o,
             "# HELP %sprocess_resident_memory_bytes Resident memory size in bytes.\n"
             "# TYPE %sprocess_resident_memory_bytes gauge\n%sprocess_resident_memory_bytes %.0f\n",
             pfx[k], pfx[k], pfx[k], rss);
        emit(&o,
             "# HELP %sprocess_open_fds Open file descriptors.\n"
             "# TYPE %sprocess_open_fds gauge\n%sprocess_open_fds %d\n",
             pfx[k], pfx[k], pfx[k], fds);
        emit(&o,
             "# HELP %sprocess_start_time_seconds Start time of the process since the Unix "
             "epoch in seconds.\n# TYPE %sprocess_start_time_seconds gauge\n"
             "%sprocess_start_time_seconds %.3f\n",
             pfx[k], pfx[k], pfx[k], start_time);
    }
    if (o.oom) {
        free(o.s);
        return NULL;
    }
    return o.s;
}
