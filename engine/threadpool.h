/* threadpool.h - engine-internal: a fixed pool of workers that run one parallel-for at a time.
 *
 * pool_run() hands a range [0, n) to all workers plus the caller; items are
 * claimed in chunks through an atomic counter, so uneven work balances. Only
 * one thread (the engine thread) may call pool_run at a time.
 */
#ifndef TIDALD_CPU_THREADPOOL_H
#define TIDALD_CPU_THREADPOOL_H

#include <stddef.h>

typedef void (*pool_fn_t)(void *arg, size_t begin, size_t end, int worker);

typedef struct pool pool_t;

pool_t *pool_create(int n_threads);
void pool_destroy(pool_t *p);
int pool_size(const pool_t *p);
/* Run fn over [0, n) in chunks of `chunk` items; returns when every item is done. */
void pool_run(pool_t *p, pool_fn_t fn, void *arg, size_t n, size_t chunk);

#endif
