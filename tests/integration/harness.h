/* harness.h - integration-test harness: start the real daemon on a loopback port, talk raw
 * HTTP to it, stop it, and check what it printed. */
#ifndef TIDALD_TESTS_HARNESS_H
#define TIDALD_TESTS_HARNESS_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

typedef struct {
    pid_t pid;
    int port;
    int err_fd;        /* the daemon's stderr */
    char log[1 << 16]; /* what it printed so far (the tail, once it is longer) */
    size_t log_len;
    bool sanitizer_seen; /* a sanitizer report scrolled out of `log` */
} daemon_t;

/* Start TIDALD_BIN (default build/tidald) `serve --port 0` with extra args; waits for ready. */
void daemon_start(daemon_t *d, const char *const *args);
/* SIGTERM, wait; returns the exit status (or -1). Fails the test on a sanitizer report. */
int daemon_stop(daemon_t *d);
/* Read whatever the daemon has logged (non-blocking). */
void daemon_pump_log(daemon_t *d);

int tcp_connect(int port);
/* Send raw bytes; read until the server closes or `timeout_s`; returns the bytes (malloc'd). */
char *http_raw(int port, const char *req, size_t len, double timeout_s, size_t *out_len);
/* A request with Connection: close; returns status, body (malloc'd) and headers (malloc'd). */
int http_req(int port, const char *method, const char *path, const char *extra_headers,
             const char *body, char **resp_body, char **resp_head);
/* Decode a chunked body in place; returns its length. */
size_t dechunk(char *body);

/* Bound for anything that waits on the daemon: a hang guard only. Tests wait for events (an
 * answer, a log line, a metric), never for a fixed time, so a loaded machine is only slower. */
#define HARNESS_HANG_GUARD_S 120.0
/* CLOCK_MONOTONIC seconds. */
double harness_now(void);
/* Read from fd until `needle` has arrived; false on EOF or the hang guard. */
bool harness_read_until(int fd, const char *needle);
/* The synthetic model `name` (e.g. "tiny-f32"), written once per run into $TIDALD_TEST_TMP. */
const char *harness_synth_model(const char *name);
/* The value of a metric line of /metrics (the whole series name, labels included); -1 if the
 * daemon does not export it. */
double harness_metric(int port, const char *name);

#endif
