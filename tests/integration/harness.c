/* harness.c - see harness.h. */
#define _GNU_SOURCE /* strcasestr */
#include "harness.h"
#include "../../tools/synth_model.h"

#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

void daemon_pump_log(daemon_t *d) {
    for (;;) {
        if (d->log_len + 1 >= sizeof(d->log)) { /* keep the tail, but not lose a report */
            if (strstr(d->log, "Sanitizer") || strstr(d->log, "runtime error"))
                d->sanitizer_seen = true;
            d->log_len = 0;
        }
        ssize_t n = read(d->err_fd, d->log + d->log_len, sizeof(d->log) - 1 - d->log_len);
        if (n <= 0) break;
        d->log_len += (size_t)n;
        d->log[d->log_len] = 0;
    }
}

void daemon_start(daemon_t *d, const char *const *args) {
    memset(d, 0, sizeof(*d));
    const char *bin = getenv("TIDALD_BIN");
    if (!bin || !*bin) bin = "build/tidald";
    int pipefd[2];
    cr_assert_eq(pipe(pipefd), 0);
    const char *argv[64] = {bin, "serve", "--port", "0", "--host", "127.0.0.1"};
    int n = 6;
    for (int i = 0; args && args[i] && n < 62; i++) argv[n++] = args[i];
    argv[n] = NULL;
    pid_t pid = fork();
    cr_assert_neq(pid, -1);
    if (pid == 0) {
        dup2(pipefd[1], 2);
        int devnull = open("/dev/null", O_RDWR);
        dup2(devnull, 0);
        dup2(devnull, 1);
        close(pipefd[0]);
        execv(bin, (char *const *)argv);
        _exit(127);
    }
    close(pipefd[1]);
    d->pid = pid;
    d->err_fd = pipefd[0];
    fcntl(d->err_fd, F_SETFL, O_NONBLOCK);
    double t0 = now_s();
    while (now_s() - t0 < 30) {
        daemon_pump_log(d);
        const char *p = strstr(d->log, "(port ");
        if (p && !d->port) d->port = atoi(p + 6);
        if (d->port && strstr(d->log, "\"event\":\"ready\"")) return;
        if (strstr(d->log, "load_failed") || waitpid(pid, NULL, WNOHANG) == pid) break;
        usleep(5000);
    }
    cr_assert_fail("daemon did not become ready; it printed:\n%s", d->log);
}

int daemon_stop(daemon_t *d) {
    int status = -1;
    if (d->pid > 0) {
        kill(d->pid, SIGTERM);
        double t0 = now_s();
        while (now_s() - t0 < 60) {
            daemon_pump_log(d);
            if (waitpid(d->pid, &status, WNOHANG) == d->pid) break;
            usleep(5000);
        }
        daemon_pump_log(d);
        d->pid = 0;
    }
    close(d->err_fd);
    cr_expect(!d->sanitizer_seen && !strstr(d->log, "Sanitizer") &&
                  !strstr(d->log, "runtime error"),
              "sanitizer report from the daemon:\n%s", d->log);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

int tcp_connect(int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    if (connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

char *http_raw(int port, const char *req, size_t len, double timeout_s, size_t *out_len) {
    int fd = tcp_connect(port);
    cr_assert_geq(fd, 0, "connect to port %d failed", port);
    size_t off = 0;
    while (off < len) {
        ssize_t w = send(fd, req + off, len - off, MSG_NOSIGNAL);
        if (w <= 0) break;
        off += (size_t)w;
    }
    size_t cap = 65536, n = 0;
    char *buf = malloc(cap);
    double t0 = now_s();
    for (;;) {
        struct pollfd p = {fd, POLLIN, 0};
        double left = timeout_s - (now_s() - t0);
        if (left <= 0 || poll(&p, 1, (int)(left * 1000) + 1) <= 0) break;
        if (n + 4096 > cap) buf = realloc(buf, cap *= 2);
        ssize_t r = recv(fd, buf + n, cap - n - 1, 0);
        if (r <= 0) break;
        n += (size_t)r;
    }
    close(fd);
    buf[n] = 0;
    if (out_len) *out_len = n;
    return buf;
}

int http_req(int port, const char *method, const char *path, const char *extra_headers,
             const char *body, char **resp_body, char **resp_head) {
    size_t bl = body ? strlen(body) : 0;
    size_t cap = bl + 1024 + (extra_headers ? strlen(extra_headers) : 0);
    char *req = malloc(cap);
    int n = snprintf(req, cap,
                     "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n%s"
                     "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n",
                     method, path, extra_headers ? extra_headers : "", bl);
    memcpy(req + n, body ? body : "", bl);
    size_t len;
    char *resp = http_raw(port, req, (size_t)n + bl, 30, &len);
    free(req);
    int status = 0;
    sscanf(resp, "HTTP/1.1 %d", &status);
    char *sep = strstr(resp, "\r\n\r\n");
    if (resp_head) {
        size_t hl = sep ? (size_t)(sep - resp) : len;
        *resp_head = strndup(resp, hl);
    }
    if (resp_body) *resp_body = strdup(sep ? sep + 4 : "");
    if (resp_body && resp_head && strcasestr(*resp_head, "transfer-encoding: chunked"))
        dechunk(*resp_body);
    free(resp);
    return status;
}

size_t dechunk(char *body) {
    char *r = body, *w = body;
    for (;;) {
        char *end;
        unsigned long n = strtoul(r, &end, 16);
        if (end == r || strncmp(end, "\r\n", 2) != 0) break;
        r = end + 2;
        if (n == 0) break;
        memmove(w, r, n);
        w += n;
        r += n + 2;
    }
    *w = 0;
    return (size_t)(w - body);
}

double harness_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

bool harness_read_until(int fd, const char *needle) {
    static char buf[1 << 16];
    size_t n = 0;
    double t0 = harness_now();
    while (harness_now() - t0 < HARNESS_HANG_GUARD_S) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, 1000) <= 0) continue;
        if (n + 1 >= sizeof(buf)) n = 0;
        ssize_t r = recv(fd, buf + n, sizeof(buf) - 1 - n, 0);
        if (r <= 0) return false;
        n += (size_t)r;
        buf[n] = 0;
        if (strstr(buf, needle)) return true;
    }
    return false;
}

double harness_metric(int port, const char *name) {
    char *body, *head;
    http_req(port, "GET", "/metrics", NULL, NULL, &body, &head);
    double v = -1;
    char *p = strstr(body, name);
    while (p && p > body && p[-1] != '\n') p = strstr(p + 1, name);
    if (p) v = atof(p + strlen(name) + 1);
    free(body);
    free(head);
    return v;
}

const char *harness_synth_model(const char *name) {
    static struct { char name[32], path[512]; } cache[8];
    size_t i = 0;
    while (i < 8 && cache[i].name[0] && strcmp(cache[i].name, name) != 0) i++;
    cr_assert_lt(i, 8, "too many synthetic models");
    if (!cache[i].name[0]) {
        const char *dir = getenv("TIDALD_TEST_TMP");
        snprintf(cache[i].path, sizeof(cache[i].path), "%s/%s.gguf", dir && *dir ? dir : "/tmp",
                 name);
        snprintf(cache[i].name, sizeof(cache[i].name), "%s", name);
    }
    const char *path = cache[i].path;
    if (access(path, R_OK) != 0) { /* written once per run; a rename makes it whole at once */
        char tmp[600], msg[256] = {0};
        snprintf(tmp, sizeof(tmp), "%s.%d.tmp", path, (int)getpid());
        cr_assert_eq(synth_write(name, tmp, 0, msg), 0, "%s", msg);
        cr_assert_eq(rename(tmp, path), 0);
    }
    return path;
}
