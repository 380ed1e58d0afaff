/* loadgen.c - serving benchmark: drives /v1/completions with streaming requests at a fixed
 * concurrency or with Poisson arrivals, and reports TTFT, inter-token latency and end-to-end
 * latency (p50/p90/p99), request throughput and output tokens/s.
 *
 * One thread per in-flight request, blocking sockets, loopback only. Prints a human summary on
 * stderr and one JSON object on stdout.
 */
#include <arpa/inet.h>
#include <math.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    const char *host;
    int port;
    int concurrency;
    double rate; /* requests/s for Poisson arrivals; 0: closed loop at `concurrency` */
    int requests;
    int prompt_words, max_tokens;
    unsigned seed;
} opts_t;

typedef struct {
    double ttft, e2e;
    double *itl;
    int n_itl, tokens;
    int ok;
} sample_t;

static opts_t O;
static sample_t *samples;
static int next_req;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static char *body;
static size_t body_len;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Send one streaming request and time its events. */
static void run_one(sample_t *s) {
    memset(s, 0, sizeof(*s));
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)O.port)};
    inet_pton(AF_INET, O.host, &a.sin_addr);
    double t0 = now_s();
    if (connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0) {
        close(fd);
        return;
    }
    char head[256];
    int hn = snprintf(head, sizeof(head),
                      "POST /v1/completions HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n"
                      "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n",
                      O.host, body_len);
    if (send(fd, head, (size_t)hn, MSG_NOSIGNAL) != hn ||
        send(fd, body, body_len, MSG_NOSIGNAL) != (ssize_t)body_len) {
        close(fd);
        return;
    }
    s->itl = malloc(sizeof(double) * (size_t)(O.max_tokens + 8));
    char buf[16384];
    size_t have = 0;
    double last = 0;
    bool done = false, status_ok = false;
    for (;;) {
        ssize_t r = recv(fd, buf + have, sizeof(buf) - 1 - have, 0);
        if (r <= 0) break;
        double t = now_s();
        have += (size_t)r;
        buf[have] = 0;
        if (!status_ok && strncmp(buf, "HTTP/1.1 200", 12) == 0) status_ok = true;
        /* count token events: each "data: {" with a non-empty "text" */
        char *p = buf, *ev;
        while ((ev = strstr(p, "data: ")) && strstr(ev, "\n\n")) {
            char *end = strstr(ev, "\n\n");
            *end = 0;
            if (strncmp(ev + 6, "[DONE]", 6) == 0)
                done = true;
            else if (strstr(ev, "\"text\":\"") && !strstr(ev, "\"text\":\"\"")) {
                if (!s->tokens)
                    s->ttft = t - t0;
                else if (s->n_itl < O.max_tokens + 8)
                    s->itl[s->n_itl++] = t - last;
                last = t;
                s->tokens++;
            }
            p = end + 2;
        }
        size_t rest = have - (size_t)(p - buf);
        memmove(buf, p, rest);
        have = rest;
        if (have > sizeof(buf) - 4096) have = 0; /* an absurd event: drop it */
    }
    close(fd);
    s->e2e = now_s() - t0;
    s->ok = status_ok && done;
}

static void *closed_loop(void *arg) {
    (void)arg;
    for (;;) {
        pthread_mutex_lock(&mu);
        int i = next_req < O.requests ? next_req++ : -1;
        pthread_mutex_unlock(&mu);
        if (i < 0) return NULL;
        run_one(&samples[i]);
    }
}

static void *one_shot(void *arg) {
    run_one(arg);
    return NULL;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double pct(double *v, int n, double p) {
    if (!n) return NAN;
    qsort(v, (size_t)n, sizeof(double), cmp);
    int k = (int)ceil(p / 100.0 * n) - 1;
    return v[k < 0 ? 0 : k >= n ? n - 1 : k];
}

static void usage(void) {
    fprintf(stderr, "usage: loadgen --port N [--host IP] [--concurrency C | --rate R] "
                    "[--requests M] [--prompt-words W] [--max-tokens T] [--seed S]\n");
}

int main(int argc, char **argv) {
    O = (opts_t){"127.0.0.1", 0, 1, 0, 8, 32, 64, 1};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) {
            usage();
            return 2;
        }
        if (!strcmp(a, "--host"))
            O.host = v;
        else if (!strcmp(a, "--port"))
            O.port = atoi(v);
        else if (!strcmp(a, "--concurrency"))
            O.concurrency = atoi(v);
        else if (!strcmp(a, "--rate"))
            O.rate = atof(v);
        else if (!strcmp(a, "--requests"))
            O.requests = atoi(v);
        else if (!strcmp(a, "--prompt-words"))
            O.prompt_words = atoi(v);
        else if (!strcmp(a, "--max-tokens"))
            O.max_tokens = atoi(v);
        else if (!strcmp(a, "--seed"))
            O.seed = (unsigned)atoi(v);
        else {
            usage();
            return 2;
        }
        i++;
    }
    if (O.port <= 0 || O.concurrency < 1 || O.requests < 1 || O.max_tokens < 1 || O.rate < 0) {
        usage();
        return 2;
    }
    body = malloc((size_t)O.prompt_words * 8 + 256);
    size_t w = (size_t)sprintf(body, "{\"prompt\":\"");
    for (int i = 0; i < O.prompt_words; i++)
        w += (size_t)sprintf(body + w, "%s ", i % 2 ? "world" : "hello");
    w += (size_t)sprintf(body + w,
                         "\",\"max_tokens\":%d,\"temperature\":0.8,\"stream\":true,"
                         "\"ignore_eos\":true}",
                         O.max_tokens);
    body_len = w;
    samples = calloc((size_t)O.requests, sizeof(sample_t));
    double t0 = now_s();
    if (O.rate > 0) {
        pthread_t *th = calloc((size_t)O.requests, sizeof(pthread_t));
        srand(O.seed);
        double t = t0;
        for (int i = 0; i < O.requests; i++) {
            double u = (rand() + 1.0) / ((double)RAND_MAX + 2.0);
            t += -log(u) / O.rate; /* exponential gaps: Poisson arrivals */
            double wait = t - now_s();
            if (wait > 0) usleep((useconds_t)(wait * 1e6));
            pthread_create(&th[i], NULL, one_shot, &samples[i]);
        }
        for (int i = 0; i < O.requests; i++) pthread_join(th[i], NULL);
        free(th);
    } else {
        pthread_t *th = calloc((size_t)O.concurrency, sizeof(pthread_t));
        for (int i = 0; i < O.concurrency; i++) pthread_create(&th[i], NULL, closed_loop, NULL);
        for (int i = 0; i < O.concurrency; i++) pthread_join(th[i], NULL);
        free(th);
    }
    double wall = now_s() - t0;
    int ok = 0, tokens = 0, n_itl = 0;
    for (int i = 0; i < O.requests; i++) n_itl += samples[i].n_itl;
    double *ttft = malloc(sizeof(double) * (size_t)O.requests),
           *e2e = malloc(sizeof(double) * (size_t)O.requests);
    double *itl = malloc(sizeof(double) * (size_t)(n_itl + 1));
    n_itl = 0;
    for (int i = 0; i < O.requests; i++) {
        sample_t *s = &samples[i];
        if (!s->ok) continue;
        ttft[ok] = s->ttft;
        e2e[ok++] = s->e2e;
        tokens += s->tokens;
        for (int k = 0; k < s->n_itl; k++) itl[n_itl++] = s->itl[k];
    }
    double tps = tokens / wall, rps = ok / wall;
    fprintf(stderr,
            "loadgen: %s %g, %d/%d ok, %.1f s\n"
            "  TTFT  p50 %7.1f ms  p90 %7.1f ms  p99 %7.1f ms\n"
            "  ITL   p50 %7.1f ms  p90 %7.1f ms  p99 %7.1f ms\n"
            "  E2E   p50 %7.2f s   p90 %7.2f s   p99 %7.2f s\n"
            "  throughput %.2f req/s, %.1f output tok/s\n",
            O.rate > 0 ? "rate" : "concurrency", O.rate > 0 ? O.rate : O.concurrency, ok,
            O.requests, wall, 1e3 * pct(ttft, ok, 50), 1e3 * pct(ttft, ok, 90),
            1e3 * pct(ttft, ok, 99), 1e3 * pct(itl, n_itl, 50), 1e3 * pct(itl, n_itl, 90),
            1e3 * pct(itl, n_itl, 99), pct(e2e, ok, 50), pct(e2e, ok, 90), pct(e2e, ok, 99), rps,
            tps);
    printf("{\"bench\":\"serve\",\"mode\":\"%s\",\"level\":%g,\"requests\":%d,\"ok\":%d,"
           "\"max_tokens\":%d,\"wall_s\":%.3f,\"ttft_p50_s\":%.4f,\"ttft_p90_s\":%.4f,"
           "\"ttft_p99_s\":%.4f,\"itl_p50_s\":%.4f,\"itl_p90_s\":%.4f,\"itl_p99_s\":%.4f,"
           "\"e2e_p50_s\":%.4f,\"e2e_p90_s\":%.4f,\"e2e_p99_s\":%.4f,\"req_per_s\":%.3f,"
           "\"output_tok_per_s\":%.2f}\n",
           O.rate > 0 ? "rate" : "concurrency", O.rate > 0 ? O.rate : O.concurrency, O.requests, ok,
           O.max_tokens, wall, pct(ttft, ok, 50), pct(ttft, ok, 90), pct(ttft, ok, 99),
           pct(itl, n_itl, 50), pct(itl, n_itl, 90), pct(itl, n_itl, 99), pct(e2e, ok, 50),
           pct(e2e, ok, 90), pct(e2e, ok, 99), rps, tps);
    for (int i = 0; i < O.requests; i++) free(samples[i].itl);
    free(samples), free(ttft), free(e2e), free(itl), free(body);
    return ok == O.requests ? 0 : 1;
}
