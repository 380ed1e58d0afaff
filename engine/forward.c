/* forward.c - the batched Llama forward pass over paged KV sequences.
 *
 * One call processes every token of a step: decode tokens of running
 * sequences and prefill chunks of new ones. Projections run as one matmul
 * over all T tokens (weights read once per step); attention runs per
 * sequence through its block table. Activations live in buffers sized once
 * for max_batch_tokens, so a step allocates nothing.
 */
#include "threadpool.h"
#include "../base/f16.h"
#include "model.h"

#include <math.h>
#include <stdio.h>
#include <unistd.h>
#include <stdlib.h>
#include <string.h>

struct eng_ctx {
    const eng_model_t *m;
    eng_backend_t *be;
    pool_t *host_pool; /* host threads for eng_ctx_parallel_for when the backend has none */
    kv_pool_t pool;
    void *pool_data;  /* backend memory behind the pool */
    kv_pool_t lpool;  /* sliding-window models: the local layers' pool (attached to pool) */
    void *lpool_data; /* its backend memory */
    eng_ctx_params_t p;
    /* the weights as the backend computes with them (the file's tensors on the CPU) */
    eng_tensor_t tok_embd, output;
    const float *output_norm, *rope_freqs;
    eng_layer_t *layers;
    bool own_weights; /* the backend made copies (load_weight): freed with the context */
    /* activations in backend memory, max_batch_tokens rows each */
    float *x, *xn, *q, *k, *v, *att, *ffg, *ffu;
    float *logit_in;      /* final-normed rows that want logits */
    float *logit_buf;     /* max_seqs rows of n_vocab: logits before they go to the caller */
    float *logit_host;    /* host copy of logit_buf */
    int32_t *argmax_dev;  /* backend memory: max_seqs greedy ids */
    int32_t *argmax_host; /* their host copy */
    /* host-side step metadata */
    uint32_t *pos;
    int32_t *ids;
    eng_attn_seq_t *aseq;
    uint8_t *kinds;        /* [n_layer][max_seqs]: the step's plan */
    eng_rope_t *rope;      /* [n_layer]: each layer's RoPE, fixed per context */
    uint32_t *sel, *n_sel; /* backend memory: max_seqs * n_head * sel_budget selections */
    uint32_t sel_budget;
};

void eng_ctx_params_default(eng_ctx_params_t *p) {
    memset(p, 0, sizeof(*p));
    p->block_size = 16;
    p->max_batch_tokens = 512;
    p->max_seqs = 16;
    p->sinks = 4;
}

int eng_device_parse(const char *s) {
    if (!s) return -1;
    if (!strcmp(s, "auto")) return ENG_DEVICE_AUTO;
    if (!strcmp(s, "cpu")) return ENG_DEVICE_CPU;
    if (!strcmp(s, "cuda")) return ENG_DEVICE_CUDA;
    return -1;
}

static float *alloc_f(eng_ctx_t *c, size_t rows, size_t cols) {
    return c->be->ops->alloc(c->be, sizeof(float) * rows * cols);
}

/* A norm vector in backend memory (the file's own on the CPU). */
static const float *load_vec(eng_ctx_t *c, const float *v, size_t n, bool *fail) {
    if (!c->own_weights || !v) return v;
    float *d = alloc_f(c, 1, n);
    if (!d) {
        *fail = true;
        return NULL;
    }
    c->be->ops->upload(c->be, d, v, sizeof(float) * n);
    return d;
}

static int load_weights(eng_ctx_t *c, char *msg) {
    const eng_model_t *m = c->m;
    const eng_backend_ops_t *op = c->be->ops;
    uint32_t n_layer = m->hp.n_layer, d = m->hp.n_embd;
    c->layers = calloc(n_layer, sizeof(eng_layer_t));
    if (!c->layers) return eng_fail(msg, ENG_ENOMEM, "out of memory");
    if (!op->load_weight) {
        memcpy(c->layers, m->layers, sizeof(eng_layer_t) * n_layer);
        c->tok_embd = m->tok_embd;
        c->output = m->output;
        c->output_norm = m->output_norm;
        c->rope_freqs = m->rope_freqs;
        return 0;
    }
    c->own_weights = true;
    int rc;
    bool fail = false;
    if ((rc = op->load_weight(c->be, &m->tok_embd, &c->tok_embd, msg))) return rc;
    if (m->hp.tied_output)
        c->output = c->tok_embd;
    else if ((rc = op->load_weight(c->be, &m->output, &c->output, msg)))
        return rc;
    c->output_norm = load_vec(c, m->output_norm, d, &fail);
    c->rope_freqs = load_vec(c, m->rope_freqs, m->hp.n_rot / 2, &fail);
    for (uint32_t l = 0; l < n_layer && !fail; l++) {
        const eng_layer_t *S = &m->layers[l];
        eng_layer_t *L = &c->layers[l];
        L->attn_norm = load_vec(c, S->attn_norm, d, &fail);
        L->ffn_norm = load_vec(c, S->ffn_norm, d, &fail);
        L->q_norm = load_vec(c, S->q_norm, m->hp.head_dim, &fail);
        L->k_norm = load_vec(c, S->k_norm, m->hp.head_dim, &fail);
        L->post_attn_norm = load_vec(c, S->post_attn_norm, d, &fail);
        L->post_ffn_norm = load_vec(c, S->post_ffn_norm, d, &fail);
        uint32_t kvd = m->hp.n_head_kv * m->hp.head_dim;
        L->bq = load_vec(c, S->bq, m->hp.n_embd_q, &fail);
        L->bk = load_vec(c, S->bk, kvd, &fail);
        L->bv = load_vec(c, S->bv, kvd, &fail);
        const eng_tensor_t *src[7] = {&S->wq,     &S->wk,   &S->wv,    &S->wo,
                                      &S->w_gate, &S->w_up, &S->w_down};
        eng_tensor_t *dst[7] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->w_gate, &L->w_up, &L->w_down};
        for (int i = 0; i < 7; i++)
            if ((rc = op->load_weight(c->be, src[i], dst[i], msg))) return rc;
    }
    if (fail) return eng_fail(msg, ENG_ENOMEM, "out of %s memory for the weights", op->name);
    return 0;
}

static void free_weights(eng_ctx_t *c) {
    if (!c->layers) return;
    if (c->own_weights) {
        eng_backend_t *be = c->be;
        for (uint32_t l = 0; l < c->m->hp.n_layer; l++) {
            eng_layer_t *L = &c->layers[l];
            eng_tensor_t *w[7] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->w_gate, &L->w_up, &L->w_down};
            for (int i = 0; i < 7; i++)
                if (w[i]->data) be->ops->free_weight(be, w[i]);
            const float *vecs[9] = {
                L->attn_norm,     L->ffn_norm, L->q_norm, L->k_norm, L->post_attn_norm,
                L->post_ffn_norm, L->bq,       L->bk,     L->bv};
            for (int i = 0; i < 9; i++) be->ops->release(be, (void *)vecs[i]);
        }
        if (c->tok_embd.data) be->ops->free_weight(be, &c->tok_embd);
        if (!c->m->hp.tied_output && c->output.data) be->ops->free_weight(be, &c->output);
        be->ops->release(be, (void *)c->output_norm);
        be->ops->release(be, (void *)c->rope_freqs);
    }
    free(c->layers);
    c->layers = NULL;
}

/* Layers of the model whose keys stay in the window: a split cache keeps them apart (none when
 * swa_full asks for every position, or when the window spans the whole context). */
static uint32_t split_local_layers(const eng_ctx_t *c) {
    const eng_hparams_t *hp = &c->m->hp;
    if (c->p.swa_full || !hp->swa_window || hp->swa_window >= c->p.n_ctx) return 0;
    uint32_t n = 0;
    for (uint32_t l = 0; l < hp->n_layer; l++) n += eng_layer_is_swa(hp, l);
    return n < hp->n_layer ? n : 0; /* every layer local: one pool, nothing to split */
}

/* Blocks of the local layers' pool that n_seqs sequences can hold live at once. A step's
 * query at p sees (p - window, p], so a sequence appending n tokens touches at most
 * (window + n - 2) / bs + 2 blocks, and the step appends max_batch_tokens at most; each
 * sequence also keeps its sink blocks. */
static uint64_t local_pool_blocks(const eng_ctx_t *c, uint32_t n_seqs) {
    uint64_t bs = c->p.block_size, W = c->m->hp.swa_window;
    return (uint64_t)n_seqs * ((W + bs - 1) / bs + 2 + (c->p.sinks + bs - 1) / bs) +
           (c->p.max_batch_tokens + bs - 1) / bs;
}

/* Blocks for the KV pool of n_layer layers: the budget asked for (less what the local pool
 * takes, local_bytes), else every sequence's full context capped by what the device has left
 * (GPU) or half the machine's memory (CPU), so with large models the scheduler's pressure
 * policy shares a smaller pool. */
static uint32_t pool_blocks(eng_ctx_t *c, uint32_t n_layer, uint32_t kvd, size_t local_bytes) {
    uint32_t elem = c->p.kv_f16 ? 2 : 4;
    if (c->p.kv_mem_bytes)
        return c->p.kv_mem_bytes <= local_bytes
                   ? 0
                   : kv_pool_blocks_for_bytes_typed(n_layer, kvd, c->p.block_size,
                                                    c->p.kv_mem_bytes - local_bytes, elem);
    /* a full context, and the two blocks at most whose slots eviction left partly empty */
    uint64_t per_seq = (c->p.n_ctx + c->p.block_size - 1) / c->p.block_size + 2;
    uint64_t nb = per_seq * c->p.max_seqs;
    size_t avail = c->be->ops->kv_budget ? c->be->ops->kv_budget(c->be) : 0;
    if (!avail) {
        long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
        if (pages > 0 && psz > 0) avail = (size_t)((uint64_t)pages * (uint64_t)psz / 2);
    }
    if (avail) {
        avail = avail > local_bytes ? avail - local_bytes : 0;
        uint64_t cap = kv_pool_blocks_for_bytes_typed(n_layer, kvd, c->p.block_size, avail, elem);
        if (cap < per_seq && !c->be->ops->kv_budget) cap = per_seq; /* one full context */
        if (nb > cap) nb = cap;
    }
    return nb > UINT32_MAX / 2 ? UINT32_MAX / 2 : (uint32_t)nb;
}

/* Allocate one pool's backend memory and set it up. */
static int make_pool(eng_ctx_t *c, kv_pool_t *pool, void **data, uint32_t n_layer, uint32_t kvd,
                     uint32_t n_blocks, char *msg) {
    const eng_backend_ops_t *op = c->be->ops;
    size_t bytes = kv_pool_bytes(n_layer, kvd, c->p.block_size, n_blocks, c->p.kv_f16);
    if (!bytes || !(*data = op->alloc(c->be, bytes)))
        return eng_fail(msg, ENG_ENOMEM, "cannot allocate a KV pool of %u blocks (%zu MiB) on %s",
                        n_blocks, bytes >> 20, op->name);
    return kv_pool_init_over(pool, n_layer, kvd, c->p.block_size, n_blocks, c->p.kv_f16, *data,
                             msg);
}

/* The KV cache: one pool, or for a sliding-window model the global layers' pool with the local
 * layers' pool attached. */
static int make_kv_cache(eng_ctx_t *c, uint32_t kvd, char *msg) {
    const eng_hparams_t *hp = &c->m->hp;
    uint32_t n_local = split_local_layers(c), n_full = hp->n_layer - n_local;
    uint32_t lblocks = 0;
    size_t lbytes = 0;
    if (n_local) {
        /* room for max_seqs sequences' windows, never more than the full pool could hold (both
         * share the logical blocks); under a KV budget at most half of it, but always one
         * sequence's window and a step's tokens, so a sequence alone always progresses (the
         * scheduler preempts for either pool) */
        uint64_t per_seq = (c->p.n_ctx + c->p.block_size - 1) / c->p.block_size + 2;
        uint64_t nb = local_pool_blocks(c, c->p.max_seqs);
        if (nb > per_seq * c->p.max_seqs) nb = per_seq * c->p.max_seqs;
        if (c->p.kv_mem_bytes) {
            uint64_t half = kv_pool_blocks_for_bytes_typed(
                n_local, kvd, c->p.block_size, c->p.kv_mem_bytes / 2, c->p.kv_f16 ? 2 : 4);
            uint64_t one = local_pool_blocks(c, 1);
            if (nb > half) nb = half > one ? half : one;
        }
        lblocks = nb > UINT32_MAX / 2 ? UINT32_MAX / 2 : (uint32_t)nb;
        lbytes = kv_pool_bytes(n_local, kvd, c->p.block_size, lblocks, c->p.kv_f16);
    }
    uint32_t n_blocks = pool_blocks(c, n_full, kvd, lbytes);
    if (n_blocks == 0)
        return eng_fail(msg, ENG_EINVAL, "KV memory budget is smaller than one block%s",
                        n_local ? " after the sliding-window layers' pool" : "");
    int rc = make_pool(c, &c->pool, &c->pool_data, n_full, kvd, n_blocks, msg);
    if (rc || !n_local) return rc;
    if ((rc = make_pool(c, &c->lpool, &c->lpool_data, n_local, kvd, lblocks, msg))) return rc;
    bool *is_local = malloc(sizeof(bool) * hp->n_layer);
    if (!is_local) return eng_fail(msg, ENG_ENOMEM, "out of memory");
    for (uint32_t l = 0; l < hp->n_layer; l++) is_local[l] = eng_layer_is_swa(hp, l);
    rc = kv_pool_attach_local(&c->pool, &c->lpool, hp->swa_window, is_local, hp->n_layer, msg);
    free(is_local);
    return rc;
}

int eng_ctx_create(eng_ctx_t **out, const eng_model_t *m, const eng_ctx_params_t *p, char *msg) {
    *out = NULL;
    const eng_hparams_t *hp = &m->hp;
    eng_ctx_t *c = calloc(1, sizeof(*c));
    if (!c) return eng_fail(msg, ENG_ENOMEM, "out of memory");
    c->m = m;
    c->p = *p;
    if (!c->p.block_size) c->p.block_size = 16;
    if (!c->p.max_batch_tokens) c->p.max_batch_tokens = 512;
    if (!c->p.max_seqs) c->p.max_seqs = 16;
    if (!c->p.n_ctx) c->p.n_ctx = hp->n_ctx_train;
    int rc;
    if (c->p.block_size > 4096 || c->p.max_batch_tokens > 65536 || c->p.max_seqs > 4096 ||
        c->p.n_ctx > (1u << 24)) {
        rc = eng_fail(msg, ENG_EINVAL, "context parameters out of range");
        goto fail;
    }
    uint32_t kvd = hp->n_head_kv * hp->head_dim;
    if ((rc = eng_backend_open(&c->be, c->p.device, c->p.n_threads, msg))) goto fail;
    const eng_backend_ops_t *op = c->be->ops;
    size_t widest = hp->n_ff > hp->n_embd ? hp->n_ff : hp->n_embd;
    if (hp->n_embd_q > widest) widest = hp->n_embd_q;
    if (op->reserve(c->be, widest, c->p.block_size, c->p.max_seqs, c->p.n_ctx) != 0) {
        rc = eng_fail(msg, ENG_ENOMEM, "out of memory for backend scratch");
        goto fail;
    }
    if ((rc = load_weights(c, msg))) goto fail;
    if (!op->parallel_for && c->p.max_seqs > 1) {
        /* host work per sequence (sampling) still wants the CPUs: up to 8 threads of them */
        long n = c->p.n_threads > 0 ? c->p.n_threads : sysconf(_SC_NPROCESSORS_ONLN);
        c->host_pool = pool_create((int)(n < 1 ? 1 : n > 8 ? 8 : n));
        if (!c->host_pool) {
            rc = eng_fail(msg, ENG_ENOMEM, "cannot start host threads");
            goto fail;
        }
    }
    size_t T = c->p.max_batch_tokens;
    c->x = alloc_f(c, T, hp->n_embd);
    c->xn = alloc_f(c, T, hp->n_embd);
    c->q = alloc_f(c, T, hp->n_embd_q);
    c->k = alloc_f(c, T, kvd);
    c->v = alloc_f(c, T, kvd);
    c->att = alloc_f(c, T, hp->n_embd_q);
    c->ffg = alloc_f(c, T, hp->n_ff);
    c->ffu = alloc_f(c, T, hp->n_ff);
    c->logit_in = alloc_f(c, T > c->p.max_seqs ? T : c->p.max_seqs, hp->n_embd);
    c->logit_buf = alloc_f(c, c->p.max_seqs, hp->n_vocab);
    c->n_sel = op->alloc(c->be, sizeof(uint32_t) * c->p.max_seqs * hp->n_head);
    c->logit_host = malloc(sizeof(float) * c->p.max_seqs * hp->n_vocab);
    c->argmax_host = malloc(sizeof(int32_t) * c->p.max_seqs);
    c->argmax_dev = op->alloc(c->be, sizeof(int32_t) * c->p.max_seqs);
    c->pos = malloc(sizeof(uint32_t) * T);
    c->ids = malloc(sizeof(int32_t) * T);
    c->aseq = malloc(sizeof(eng_attn_seq_t) * c->p.max_seqs);
    c->kinds = malloc((size_t)hp->n_layer * c->p.max_seqs);
    c->rope = malloc(sizeof(eng_rope_t) * hp->n_layer);
    if (!c->x || !c->xn || !c->q || !c->k || !c->v || !c->att || !c->ffg || !c->ffu ||
        !c->logit_in || !c->logit_buf || !c->pos || !c->ids || !c->aseq || !c->n_sel ||
        !c->logit_host || !c->argmax_host || !c->argmax_dev || !c->kinds || !c->rope) {
        rc = eng_fail(msg, ENG_ENOMEM, "out of %s memory for activations", op->name);
        goto fail;
    }
    /* sliding-window layers turn with their own base and no scaling */
    for (uint32_t l = 0; l < hp->n_layer; l++) {
        bool swa = eng_layer_is_swa(hp, l);
        c->rope[l] = (eng_rope_t){hp->n_rot, swa ? hp->rope_base_swa : hp->rope_base,
                                  swa ? 1.0f : hp->rope_freq_scale, hp->rope_neox, c->rope_freqs};
    }
    if ((rc = make_kv_cache(c, kvd, msg))) goto fail;
    *out = c;
    return 0;
fail:
    eng_ctx_free(c);
    return rc;
}

void eng_ctx_free(eng_ctx_t *c) {
    if (!c) return;
    kv_pool_close(&c->pool);
    kv_pool_close(&c->lpool);
    if (c->be) {
        eng_backend_t *be = c->be;
        free_weights(c);
        float *bufs[] = {c->x,   c->xn,  c->q,   c->k,        c->v,
                         c->att, c->ffg, c->ffu, c->logit_in, c->logit_buf};
        for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) be->ops->release(be, bufs[i]);
        be->ops->release(be, c->sel);
        be->ops->release(be, c->n_sel);
        be->ops->release(be, c->argmax_dev);
        be->ops->release(be, c->pool_data);
        be->ops->release(be, c->lpool_data);
        be->ops->destroy(be);
    }
    if (c->host_pool) pool_destroy(c->host_pool);
    free(c->layers);
    free(c->logit_host);
    free(c->argmax_host);
    free(c->pos);
    free(c->ids);
    free(c->aseq);
    free(c->kinds);
    free(c->rope);
    free(c);
}

void eng_ctx_device_info(const eng_ctx_t *c, eng_device_info_t *out) {
    memset(out, 0, sizeof(*out));
    if (c->be->ops->device_info) {
        c->be->ops->device_info(c->be, out);
        return;
    }
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    snprintf(out->name, sizeof(out->name), "%s (%s, %ld CPUs)", c->be->ops->name,
             eng_cpu_simd_name(), n);
}

double eng_ctx_measure_bandwidth(eng_ctx_t *c) {
    return c->be->ops->measure_bandwidth ? c->be->ops->measure_bandwidth(c->be) : 0;
}

static bool kv_span_ok(eng_ctx_t *c, size_t offset, size_t bytes) {
    const kv_pool_t *p = &c->pool;
    size_t total = kv_pool_bytes(p->n_layer, p->kv_dim, p->block_size, p->n_blocks, p->elem == 2);
    return offset <= total && bytes <= total - offset;
}

int eng_ctx_kv_upload(eng_ctx_t *c, size_t offset, const void *src, size_t bytes) {
    if (!kv_span_ok(c, offset, bytes)) return ENG_ERANGE;
    c->be->ops->upload(c->be, (char *)c->pool.data + offset, src, bytes);
    return 0;
}

int eng_ctx_kv_download(eng_ctx_t *c, size_t offset, void *dst, size_t bytes) {
    if (!kv_span_ok(c, offset, bytes)) return ENG_ERANGE;
    c->be->ops->download(c->be, dst, (char *)c->pool.data + offset, bytes);
    return 0;
}

kv_pool_t *eng_ctx_kv_pool(eng_ctx_t *c) {
    return &c->pool;
}

typedef struct {
    void (*fn)(void *arg, size_t i);
    void *arg;
} host_for_t;

static void host_for_range(void *arg, size_t b, size_t e, int worker) {
    (void)worker;
    host_for_t *h = arg;
    for (size_t i = b; i < e; i++) h->fn(h->arg, i);
}

void eng_ctx_parallel_for(eng_ctx_t *c, void (*fn)(void *arg, size_t i), void *arg, size_t n) {
    if (c->be->ops->parallel_for) {
        c->be->ops->parallel_for(c->be, fn, arg, n);
        return;
    }
    if (c->host_pool && n > 1) { /* e.g. the samplers of a GPU step's sequences */
        host_for_t h = {fn, arg};
        pool_run(c->host_pool, host_for_range, &h, n, 1);
        return;
    }
    for (size_t i = 0; i < n; i++) fn(arg, i);
}
uint32_t eng_ctx_n_ctx(const eng_ctx_t *c) {
    return c->p.n_ctx;
}
const char *eng_ctx_backend_name(const eng_ctx_t *c) {
    return c->be->ops->name;
}

void eng_attn_defaults(const eng_hparams_t *hp, eng_attn_params_t *a) {
    a->n_sel_layers = 0;
    if (hp->swa_window) {
        /* sliding-window layers always attend densely within their window; TidalDecode runs
         * on the global layers: the first global one selects, the later ones are sparse */
        for (uint32_t l = 0; l < hp->n_layer && !a->n_sel_layers; l++)
            if (!eng_layer_is_swa(hp, l)) a->sel_layers[a->n_sel_layers++] = l;
        return;
    }
    if (hp->n_layer > 2) a->sel_layers[a->n_sel_layers++] = 2;
    uint32_t re = (uint32_t)(0.4 * hp->n_layer + 0.5);
    if (re >= 4 && re < hp->n_layer)
        a->sel_layers[a->n_sel_layers++] = re; /* sparse layers between */
    if (!a->n_sel_layers && hp->n_layer > 0) a->sel_layers[a->n_sel_layers++] = 0;
}

int eng_attn_check(const eng_hparams_t *hp, const eng_attn_params_t *a, char *msg) {
    if (a->mode != ENG_ATTN_FULL && a->mode != ENG_ATTN_TIDAL)
        return eng_fail(msg, ENG_EINVAL, "attention.mode must be full or tidal");
    if (a->mode == ENG_ATTN_TIDAL && (a->token_budget < 1 || a->token_budget > (1u << 24)))
        return eng_fail(msg, ENG_EINVAL, "attention.token_budget must be at least 1");
    if (a->mode == ENG_ATTN_FULL && a->n_sel_layers == 0) return 0;
    if (a->n_sel_layers < 1 || a->n_sel_layers > ENG_MAX_SEL_LAYERS)
        return eng_fail(msg, ENG_EINVAL, "attention.selection_layers must list 1 to %d layers",
                        ENG_MAX_SEL_LAYERS);
    for (uint32_t i = 0; i < a->n_sel_layers; i++) {
        if (a->sel_layers[i] >= hp->n_layer)
            return eng_fail(msg, ENG_EINVAL,
                            "attention.selection_layers: layer %u is past the "
                            "model's %u layers",
                            a->sel_layers[i], hp->n_layer);
        if (i && a->sel_layers[i] <= a->sel_layers[i - 1])
            return eng_fail(msg, ENG_EINVAL, "attention.selection_layers must ascend");
        if (eng_layer_is_swa(hp, a->sel_layers[i]))
            return eng_fail(msg, ENG_EINVAL,
                            "attention.selection_layers: layer %u attends through a %u-token "
                            "sliding window; selection layers must be global layers",
                            a->sel_layers[i], hp->swa_window);
    }
    return 0;
}

/* TidalDecode roles of layer l: dense before the first selection layer, dense + top-k at each
 * selection layer, sparse over the latest selection after it. Decode items only. */
static eng_att_kind_t kind_of(const eng_hparams_t *hp, const eng_attn_seq_t *as,
                              const eng_attn_params_t *a, uint32_t l) {
    if (!as->sel || !a || eng_layer_is_swa(hp, l)) return ENG_ATT_DENSE;
    for (uint32_t k = 0; k < a->n_sel_layers; k++)
        if (a->sel_layers[k] == l) return ENG_ATT_SELECT;
    return l > a->sel_layers[0] ? ENG_ATT_SPARSE : ENG_ATT_DENSE;
}

/* The step's plan: every slice's kind in every layer (kinds[l * n_items + i]). */
static void plan_kinds(eng_ctx_t *c, const eng_batch_item_t *items, uint32_t n_items) {
    for (uint32_t l = 0; l < c->m->hp.n_layer; l++)
        for (uint32_t i = 0; i < n_items; i++)
            c->kinds[(size_t)l * n_items + i] =
                (uint8_t)kind_of(&c->m->hp, &c->aseq[i], items[i].attn, l);
}

static void set_layer_kinds(eng_ctx_t *c, const eng_batch_item_t *items, uint32_t n_items,
                            uint32_t l) {
    for (uint32_t i = 0; i < n_items; i++) {
        eng_attn_seq_t *as = &c->aseq[i];
        as->kind = (eng_att_kind_t)c->kinds[(size_t)l * n_items + i];
        eng_attn_tele_t *te = items[i].tele;
        uint32_t H = c->m->hp.n_head;
        if (te) {
            as->entropy = te->entropy + (size_t)l * H;
            as->sink_mass = te->sink_mass + (size_t)l * H;
            as->n_att = te->n_att + (size_t)l * H;
            te->sparse[l] = as->kind == ENG_ATT_SPARSE;
        } else {
            as->entropy = as->sink_mass = NULL;
            as->n_att = NULL;
        }
    }
}

uint32_t eng_seq_evict(eng_ctx_t *c, kv_seq_t *seq, uint32_t n) {
    const eng_hparams_t *hp = &c->m->hp;
    uint32_t gone = kv_seq_evict(seq, n);
    /* K-shift: every key after the sinks moves down by `gone` positions, turned back with its
     * own layer's RoPE */
    if (gone)
        c->be->ops->k_shift(c->be, seq, seq->n_sinks, seq->n_tokens, gone, hp->n_head_kv,
                            hp->head_dim, c->rope);
    return gone;
}

uint32_t eng_seq_make_room(eng_ctx_t *c, kv_seq_t *seq, uint32_t window, uint32_t need,
                           uint32_t chunk) {
    if ((uint64_t)seq->n_tokens + need <= window) return 0;
    uint32_t over = seq->n_tokens + need - window;
    if (!chunk) chunk = window / 8;
    return eng_seq_evict(c, seq, over > chunk ? over : chunk);
}

/* Check the whole batch and reserve KV space before anything is written. */
static int prepare(eng_ctx_t *c, eng_batch_item_t *items, uint32_t n_items, uint32_t *T_out,
                   char *msg) {
    const eng_hparams_t *hp = &c->m->hp;
    if (n_items == 0 || n_items > c->p.max_seqs)
        return eng_fail(msg, ENG_EINVAL, "batch of %u sequences (1..%u allowed)", n_items,
                        c->p.max_seqs);
    uint64_t T = 0;
    for (uint32_t i = 0; i < n_items; i++) {
        eng_batch_item_t *it = &items[i];
        if (!it->seq || it->seq->pool != &c->pool || !it->n_tokens || !it->tokens)
            return eng_fail(msg, ENG_EINVAL, "batch item %u is empty or foreign", i);
        for (uint32_t j = 0; j < i; j++)
            if (items[j].seq == it->seq)
                return eng_fail(msg, ENG_EINVAL, "sequence appears twice in one batch");
        if ((uint64_t)it->seq->n_tokens + it->n_tokens > c->p.n_ctx)
            return eng_fail(msg, ENG_ERANGE, "sequence of %u + %u tokens exceeds the context of %u",
                            it->seq->n_tokens, it->n_tokens, c->p.n_ctx);
        for (uint32_t j = 0; j < it->n_tokens; j++)
            if (it->tokens[j] < 0 || (uint32_t)it->tokens[j] >= hp->n_vocab)
                return eng_fail(msg, ENG_ERANGE, "token id %d is outside the vocabulary of %u",
                                it->tokens[j], hp->n_vocab);
        T += it->n_tokens;
    }
    if (T > c->p.max_batch_tokens)
        return eng_fail(msg, ENG_EINVAL, "batch of %llu tokens exceeds the step budget of %u",
                        (unsigned long long)T, c->p.max_batch_tokens);
    uint32_t budget = 0;
    for (uint32_t i = 0; i < n_items; i++) {
        const eng_attn_params_t *a = items[i].attn;
        if (a && a->mode == ENG_ATTN_TIDAL) {
            int rc = eng_attn_check(hp, a, msg);
            if (rc) return rc;
            if (a->token_budget > budget) budget = a->token_budget;
        }
    }
    if (budget > c->p.n_ctx) budget = c->p.n_ctx;
    if (budget > c->sel_budget) {
        eng_backend_t *be = c->be;
        uint32_t *sel = be->ops->alloc(be, sizeof(uint32_t) * c->p.max_seqs * hp->n_head * budget);
        if (!sel) return eng_fail(msg, ENG_ENOMEM, "out of memory for TidalDecode selections");
        be->ops->release(be, c->sel);
        c->sel = sel;
        c->sel_budget = budget;
    }
    uint32_t need = 0;
    for (uint32_t i = 0; i < n_items; i++) {
        kv_seq_t *s = items[i].seq;
        uint32_t want = kv_seq_blocks_for(s, s->n_tokens + items[i].n_tokens);
        if (want > s->n_blocks) need += want - s->n_blocks;
        kv_seq_drop_out_of_window(s); /* the local blocks no query of this step sees */
    }
    if (need > c->pool.n_free)
        return eng_fail(msg, ENG_ENOSPACE, "KV cache needs %u free blocks, has %u", need,
                        c->pool.n_free);
    /* a split cache's tables share the logical blocks: each new one takes a local block too */
    if (c->pool.local && need > c->lpool.n_free)
        return eng_fail(msg, ENG_ENOSPACE,
                        "KV cache needs %u free blocks for its sliding-window layers, has %u", need,
                        c->lpool.n_free);
    for (uint32_t i = 0; i < n_items; i++) {
        int rc = kv_seq_reserve(items[i].seq, items[i].seq->n_tokens + items[i].n_tokens);
        if (rc) return eng_fail(msg, rc, "KV reservation failed");
    }
    *T_out = (uint32_t)T;
    return 0;
}

int eng_forward(eng_ctx_t *c, eng_batch_item_t *items, uint32_t n_items, char *msg) {
    uint32_t T = 0;
    int rc = prepare(c, items, n_items, &T, msg);
    if (rc) return rc;
    const eng_model_t *m = c->m;
    const eng_hparams_t *hp = &m->hp;
    eng_backend_t *be = c->be;
    const eng_backend_ops_t *op = be->ops;
    uint32_t d = hp->n_embd;

    uint32_t t = 0;
    for (uint32_t i = 0; i < n_items; i++) {
        eng_batch_item_t *it = &items[i];
        const eng_attn_params_t *a = it->attn;
        c->aseq[i] = (eng_attn_seq_t){.seq = it->seq,
                                      .q_start = t,
                                      .n_q = it->n_tokens,
                                      .pos0 = it->seq->n_tokens,
                                      .n_sinks = it->seq->n_sinks};
        if (a && a->mode == ENG_ATTN_TIDAL && it->n_tokens == 1) {
            c->aseq[i].budget = a->token_budget < c->sel_budget ? a->token_budget : c->sel_budget;
            c->aseq[i].force_sinks = a->force_sinks;
            c->aseq[i].per_group = a->per_group;
            c->aseq[i].sel = c->sel + (size_t)i * hp->n_head * c->sel_budget;
            c->aseq[i].n_sel = c->n_sel + (size_t)i * hp->n_head;
        }
        for (uint32_t j = 0; j < it->n_tokens; j++, t++) {
            c->ids[t] = it->tokens[j];
            c->pos[t] = it->seq->n_tokens + j;
        }
    }
    plan_kinds(c, items, n_items);
    eng_step_t step = {c->ids,       c->pos,       T,
                       c->aseq,      n_items,      c->kinds,
                       hp->n_layer,  hp->n_head,   hp->n_head_kv,
                       hp->head_dim, T == n_items, 0};
    for (uint32_t i = 0; i < n_items; i++) {
        const eng_batch_item_t *it = &items[i];
        if (it->logits) step.n_logit_rows += it->all_logits ? it->n_tokens : 1;
        if (!it->logits && it->argmax) step.n_logit_rows++, step.n_argmax_rows++;
        /* replayable: one token each, every item wanting its last-token logits or every item
         * its argmax (so which rows go where follows from n_items) */
        if (it->all_logits || (!it->logits && !it->argmax)) step.decode_only = false;
    }
    if (step.n_argmax_rows && step.n_argmax_rows != n_items) step.decode_only = false;
    if (op->begin_step && (rc = op->begin_step(be, &step, msg))) return rc;
    op->get_rows(be, &c->tok_embd, c->ids, T, c->x);
    if (hp->embd_scale != 1.0f) op->scale(be, c->x, hp->embd_scale, (size_t)T * d);
    for (uint32_t l = 0; l < hp->n_layer; l++) {
        const eng_layer_t *L = &c->layers[l];
        bool swa = eng_layer_is_swa(hp, l);
        eng_attn_shape_t shape = {hp->n_head, hp->n_head_kv, hp->head_dim, hp->attn_scale,
                                  swa ? hp->swa_window : 0};
        set_layer_kinds(c, items, n_items, l);
        op->rmsnorm(be, c->x, L->attn_norm, c->xn, T, d, hp->rms_eps);
        op->matmul(be, &L->wq, c->xn, c->q, T);
        op->matmul(be, &L->wk, c->xn, c->k, T);
        op->matmul(be, &L->wv, c->xn, c->v, T);
        if (L->bq) op->add_bias(be, c->q, L->bq, T, hp->n_embd_q);
        if (L->bk) op->add_bias(be, c->k, L->bk, T, hp->n_head_kv * hp->head_dim);
        if (L->bv) op->add_bias(be, c->v, L->bv, T, hp->n_head_kv * hp->head_dim);
        /* QK-norm: every head's query and key RMS-normed before RoPE */
        if (L->q_norm)
            op->rmsnorm(be, c->q, L->q_norm, c->q, T * hp->n_head, hp->head_dim, hp->rms_eps);
        if (L->k_norm)
            op->rmsnorm(be, c->k, L->k_norm, c->k, T * hp->n_head_kv, hp->head_dim, hp->rms_eps);
        op->rope(be, c->q, c->pos, T, hp->n_head, hp->head_dim, &c->rope[l]);
        op->rope(be, c->k, c->pos, T, hp->n_head_kv, hp->head_dim, &c->rope[l]);
        /* append this step's keys and values through the block tables */
        op->kv_store(be, l, c->aseq, n_items, c->k, c->v);
        op->attention(be, &shape, l, c->q, c->aseq, n_items, c->att);
        op->matmul(be, &L->wo, c->att, c->xn, T);
        if (L->post_attn_norm) op->rmsnorm(be, c->xn, L->post_attn_norm, c->xn, T, d, hp->rms_eps);
        op->add(be, c->x, c->xn, (size_t)T * d);
        op->rmsnorm(be, c->x, L->ffn_norm, c->xn, T, d, hp->rms_eps);
        op->matmul(be, &L->w_gate, c->xn, c->ffg, T);
        op->matmul(be, &L->w_up, c->xn, c->ffu, T);
        if (hp->gelu_ffn)
            op->geglu(be, c->ffg, c->ffu, (size_t)T * hp->n_ff);
        else
            op->swiglu(be, c->ffg, c->ffu, (size_t)T * hp->n_ff);
        op->matmul(be, &L->w_down, c->ffg, c->xn, T);
        if (L->post_ffn_norm) op->rmsnorm(be, c->xn, L->post_ffn_norm, c->xn, T, d, hp->rms_eps);
        op->add(be, c->x, c->xn, (size_t)T * d);
    }
    for (uint32_t i = 0; i < n_items; i++) items[i].seq->n_tokens += items[i].n_tokens;

    /* Logits only for the rows that asked, through logit_buf (max_seqs rows) and then to the
     * caller's host buffer. Last-token rows of all items go through one output matmul (the
     * vocabulary projection is the largest weight); all-token items go in chunks. */
    size_t V = hp->n_vocab, LB = c->p.max_seqs;
    for (uint32_t i = 0; i < n_items; i++) {
        eng_batch_item_t *it = &items[i];
        if (!it->logits || !it->all_logits) continue;
        for (size_t r0 = 0; r0 < it->n_tokens; r0 += LB) {
            uint32_t n = (uint32_t)(it->n_tokens - r0 < LB ? it->n_tokens - r0 : LB);
            op->rmsnorm(be, c->x + (c->aseq[i].q_start + r0) * d, c->output_norm, c->logit_in, n, d,
                        hp->rms_eps);
            op->matmul(be, &c->output, c->logit_in, c->logit_buf, n);
            op->download(be, it->logits + r0 * V, c->logit_buf, sizeof(float) * n * V);
        }
    }
    /* last-token rows: first those that want logits, then those that want only the argmax */
    uint32_t R = 0, RA = 0;
    for (int pass = 0; pass < 2; pass++)
        for (uint32_t i = 0; i < n_items; i++) {
            eng_batch_item_t *it = &items[i];
            bool want = pass == 0 ? it->logits && !it->all_logits : !it->logits && it->argmax;
            if (!want) continue;
            size_t row = c->aseq[i].q_start + it->n_tokens - 1;
            op->rmsnorm(be, c->x + row * d, c->output_norm, c->logit_in + (size_t)(R + RA) * d, 1,
                        d, hp->rms_eps);
            *(pass == 0 ? &R : &RA) += 1;
        }
    if (R + RA) op->matmul(be, &c->output, c->logit_in, c->logit_buf, R + RA);
    if (RA && op->argmax) { /* only the ids cross over */
        op->argmax(be, c->logit_buf + (size_t)R * V, RA, (uint32_t)V, c->argmax_dev);
        op->download(be, c->argmax_host, c->argmax_dev, sizeof(int32_t) * RA);
    }
    /* one copy from the backend for all the logits (and the argmax rows without the op) */
    uint32_t down = R + (RA && !op->argmax ? RA : 0);
    if (down) op->download(be, c->logit_host, c->logit_buf, sizeof(float) * down * V);
    if (RA && !op->argmax)
        for (uint32_t k = 0; k < RA; k++)
            c->argmax_host[k] = eng_argmax(c->logit_host + (size_t)(R + k) * V, (uint32_t)V);
    uint32_t r = 0, ra = 0;
    for (uint32_t i = 0; i < n_items; i++) {
        eng_batch_item_t *it = &items[i];
        if (it->logits && !it->all_logits)
            memcpy(it->logits, c->logit_host + (size_t)r++ * V, sizeof(float) * V);
        else if (!it->logits && it->argmax)
            *it->argmax = c->argmax_host[ra++];
    }
    if (op->end_step) return op->end_step(be, msg);
    return 0;
}

int eng_perplexity_chunks(eng_ctx_t *c, const eng_model_t *m, int32_t *toks, size_t n,
                          uint32_t chunk, double *nll, uint64_t *count, char *msg) {
    const eng_tokenizer_t *tok = eng_model_tokenizer(m);
    uint32_t V = eng_model_hparams(m)->n_vocab, sub = 64;
    if (chunk < 2) return eng_fail(msg, ENG_EINVAL, "chunks of %u tokens: at least 2", chunk);
    float *logits = malloc(sizeof(float) * V * sub);
    if (!logits) return eng_fail(msg, ENG_ENOMEM, "out of memory");
    int rc = 0;
    for (size_t at0 = 0; at0 + chunk <= n && !rc; at0 += chunk) {
        int32_t *t = toks + at0, first = t[0];
        if (eng_tok_add_bos(tok) && eng_tok_bos(tok) >= 0) t[0] = eng_tok_bos(tok);
        kv_seq_t seq;
        kv_seq_init(&seq, eng_ctx_kv_pool(c));
        for (uint32_t at = 0; at < chunk && !rc; at += sub) {
            uint32_t k = chunk - at < sub ? chunk - at : sub;
            bool scored = at + k > chunk / 2; /* the first half only conditions */
            eng_batch_item_t it = {&seq, t + at, k, scored ? logits : NULL, scored};
            if ((rc = eng_forward(c, &it, 1, msg)) || !scored) continue;
            for (uint32_t j = 0; j < k; j++) {
                uint32_t pos = at + j;
                if (pos < chunk / 2 || pos + 1 >= chunk) continue;
                const float *row = logits + (size_t)j * V;
                float mx = row[0];
                for (uint32_t v = 1; v < V; v++) mx = row[v] > mx ? row[v] : mx;
                double z = 0;
                for (uint32_t v = 0; v < V; v++) z += exp((double)row[v] - mx);
                *nll += log(z) + mx - row[t[pos + 1]];
                (*count)++;
            }
        }
        kv_seq_close(&seq);
        t[0] = first;
    }
    free(logits);
    return rc;
}
