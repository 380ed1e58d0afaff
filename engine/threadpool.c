/* threadpool.c - generation-counted parallel-for over pthreads.
 *
 * A decode step is hundreds of small jobs back to back (a 135M model's step is ~200 matmuls
 * of well under a millisecond), so sleeping on a condition variable after each one made the
 * futex wake-ups cost about a third of the step. Workers therefore spin for a short while
 * (POOL_SPIN pauses, tens of microseconds) on the job counter before they sleep, and the
 * caller spins the same way for the last worker to finish. Publishing and sleeping meet in a
 * Dekker pattern of sequentially consistent atomics: a worker counts itself as a sleeper and
 * then rereads the generation; the caller bumps the generation and then reads the sleepers;
 * one of them sees the other, so a wake-up is never lost.
 */
#include "threadpool.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

#define POOL_SPIN 4096

struct pool {
    int n_threads; /* including the caller */
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t cv_work, cv_done;
    atomic_ulong generation;
    atomic_bool stop;
    atomic_int sleepers;      /* workers about to wait, or waiting, on cv_work */
    atomic_bool caller_waits; /* the caller is about to wait, or waiting, on cv_done */
    /* current job, written before the generation is bumped */
    pool_fn_t fn;
    void *arg;
    size_t n, chunk;
    atomic_size_t next;
    atomic_int active; /* workers still inside the job */
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
    for (;;) {
        for (int i = 0;
             i < POOL_SPIN && atomic_load(&p->generation) == seen && !atomic_load(&p->stop); i++)
            cpu_relax();
        if (atomic_load(&p->generation) == seen && !atomic_load(&p->stop)) {
            pthread_mutex_lock(&p->mu);
            atomic_fetch_add(&p->sleepers, 1);
            while (!atomic_load(&p->stop) && atomic_load(&p->generation) == seen)
                pthread_cond_wait(&p->cv_work, &p->mu);
            atomic_fetch_sub(&p->sleepers, 1);
            pthread_mutex_unlock(&p->mu);
        }
        if (atomic_load(&p->stop)) break;
        seen = atomic_load(&p->generation);
        run_chunks(p, id);
        if (atomic_fetch_sub(&p->active, 1) == 1 && atomic_load(&p->caller_waits)) {
            pthread_mutex_lock(&p->mu);
            pthread_cond_signal(&p->cv_done);
            pthread_mutex_unlock(&p->mu);
        }
    }
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
    atomic_store(&p->stop, true);
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
    p->fn = fn;
    p->arg = arg;
    p->n = n;
    p->chunk = chunk;
    atomic_store(&p->next, 0);
    atomic_store(&p->active, p->n_threads - 1);
    atomic_fetch_add(&p->generation, 1);
    if (atomic_load(&p->sleepers) > 0) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->cv_work);
        pthread_mutex_unlock(&p->mu);
    }
    run_chunks(p, 0);
    for (int i = 0; i < POOL_SPIN && atomic_load(&p->active) > 0; i++) cpu_relax();
    if (atomic_load(&p->active) > 0) {
        pthread_mutex_lock(&p->mu);
        atomic_store(&p->caller_waits, true);
        while (atomic_load(&p->active) > 0) pthread_cond_wait(&p->cv_done, &p->mu);
        atomic_store(&p->caller_waits, false);
        pthread_mutex_unlock(&p->mu);
    }
}
