/* threadpool.c - generation-counted parallel-for over pthreads.
 *
 * Workers sleep on a condition variable between jobs; a job costs one
 * broadcast and one wake-up per worker, which is small next to a matmul.
 */
#include "threadpool.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>

struct pool {
    int n_threads; /* including the caller */
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t cv_work, cv_done;
    unsigned long generation;
    bool stop;
    /* current job, guarded by mu when published */
    pool_fn_t fn;
    void *arg;
    size_t n, chunk;
    atomic_size_t next;
    int active; /* workers still inside the job */
};

typedef struct {
    pool_t *p;
    int id;
} worker_arg_t;

static void run_chunks(pool_t *p, int id) {
    for (;;) {
        size_t b = atomic_fetch_add(&p->next, p->chunk);
        if (b >= p->n) break;
        size_t e = b + p->chunk < p->n ? b + p->chunk : p->n;
        p->fn(p->arg, b, e, id);
    }
}

static void *worker_main(void *a) {
    worker_arg_t *wa = a;
    pool_t *p = wa->p;
    int id = wa->id;
    free(wa);
    unsigned long seen = 0;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->stop && p->generation == seen) pthread_cond_wait(&p->cv_work, &p->mu);
        if (p->stop) break;
        seen = p->generation;
        pthread_mutex_unlock(&p->mu);
        run_chunks(p, id);
        pthread_mutex_lock(&p->mu);
        if (--p->active == 0) pthread_cond_signal(&p->cv_done);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

pool_t *pool_create(int n_threads) {
    if (n_threads < 1) n_threads = 1;
    pool_t *p = calloc(1, sizeof(*p));
    if (!p) return NULL;
    p->n_threads = n_threads;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv_work, NULL);
    pthread_cond_init(&p->cv_done, NULL);
    p->threads = calloc((size_t)n_threads, sizeof(pthread_t));
    if (!p->threads) goto fail;
    p->n_threads = 1;
    for (int i = 1; i < n_threads; i++) {
        worker_arg_t *wa = malloc(sizeof(*wa));
        if (!wa) goto fail;
        wa->p = p;
        wa->id = i;
        if (pthread_create(&p->threads[i], NULL, worker_main, wa) != 0) {
            free(wa);
            goto fail;
        }
        p->n_threads = i + 1; /* threads started so far, for cleanup */
    }
    p->n_threads = n_threads;
    return p;
fail:
    pool_destroy(p);
    return NULL;
}

void pool_destroy(pool_t *p) {
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    p->stop = true;
    pthread_cond_broadcast(&p->cv_work);
    pthread_mutex_unlock(&p->mu);
    for (int i = 1; i < p->n_threads; i++)
        if (p->threads && p->threads[i]) pthread_join(p->threads[i], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv_work);
    pthread_cond_destroy(&p->cv_done);
    free(p->threads);
    free(p);
}

int pool_size(const pool_t *p) {
    return p->n_threads;
}

void pool_run(pool_t *p, pool_fn_t fn, void *arg, size_t n, size_t chunk) {
    if (!n) return;
    if (!chunk) chunk = 1;
    if (p->n_threads == 1 || n <= chunk) {
        fn(arg, 0, n, 0);
        return;
    }
    pthread_mutex_lock(&p->mu);
    p->fn = fn;
    p->arg = arg;
    p->n = n;
    p->chunk = chunk;
    atomic_store(&p->next, 0);
    p->active = p->n_threads - 1;
    p->generation++;
    pthread_cond_broadcast(&p->cv_work);
    pthread_mutex_unlock(&p->mu);
    run_chunks(p, 0);
    pthread_mutex_lock(&p->mu);
    while (p->active > 0) pthread_cond_wait(&p->cv_done, &p->mu);
    pthread_mutex_unlock(&p->mu);
}
