/* server.h - the daemon: libuv loop, HTTP/1.1 connections on llhttp, routing, SSE, limits,
 * signals and graceful drain; plus JSON-lines logging. */
#ifndef TIDALD_SERVER_H
#define TIDALD_SERVER_H

#include "../config/config.h"
#include "../engine/engine.h"

typedef enum { SRV_DEBUG = 0, SRV_INFO, SRV_WARN, SRV_ERROR } srv_level_t;

/* Set the minimum level from its name (debug, info, warn, error). */
void srv_log_level(const char *name);
/* One JSON line on stderr: {"time","level","event","request_id"?, "msg"}. */
void srv_log(srv_level_t level, const char *request_id, const char *event, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Attention settings from configuration values (mode "full"/"tidal", budget, comma-separated
 * selection layers or "" for the defaults, options), validated for the model. 0, or -1 with
 * msg (ENG_ERRMSG_LEN) naming the problem. Shared by serve, generate and perplexity. */
int srv_attn_params(const char *mode, int64_t budget, const char *layers, bool force_sinks,
                    bool per_group, const eng_hparams_t *hp, eng_attn_params_t *a, char *msg);

/* Serve until SIGTERM/SIGINT and the drain end. Returns the process exit code. */
int srv_run(const cfg_t *cfg);

#endif
