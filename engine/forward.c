/* forward.c - the batched Llama forward pass over paged KV sequences.
 *
 * One call processes every token of a step: decode tokens of running
 * sequences and prefill chunks of new ones. Projections run as one matmul
 * over all T tokens (weights read once per step); attention runs per
 * sequence through its block table. Activations live in buffers sized once
 * for max_batch_tokens, so a step allocates nothing.
 */
#include "f16.h"
#include "model.h"

#include <math.h>
#include <unistd.h>
#include <stdlib.h>
#include <string.h>

struct eng_ctx {
    const eng_model_t *m;
    eng_backend_t *be;
    kv_pool_t pool;
    eng_ctx_params_t p;
    /* activations, max_batch_tokens rows each */
    float *x, *xn, *q, *k, *v, *att, *ffg, *ffu;
    float *logit_in;  /* final-normed rows that want logits */
    float *logit_buf; /* max_seqs rows of n_vocab: last-token logits of a step */
    uint32_t *pos;
    int32_t *ids;
    eng_attn_seq_t *aseq;
    uint32_t *sel, *n_sel; /* TidalDecode selections: max_seqs * n_head * sel_budget */
    uint32_t sel_budget;
    float *tele_scratch; /* entropy/sink slots for decode items that asked for none */
};

void eng_ctx_params_default(eng_ctx_params_t *p) {
    memset(p, 0, sizeof(*p));
    p->block_size = 16;
    p->max_batch_tokens = 512;
    p->max_seqs = 16;
}

static void *alloc_f(size_t rows, size_t cols) {
    return malloc(sizeof(float) * rows * cols);
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
    uint32_t n_blocks;
    if (c->p.kv_mem_bytes) {
        n_blocks = kv_pool_blocks_for_bytes_typed(hp->n_layer, kvd, c->p.block_size,
                                                  c->p.kv_mem_bytes, c->p.kv_f16 ? 2 : 4);
    } else {
        /* every sequence's full context, but at most half the machine's memory: with large
         * models the scheduler's pressure policy then shares a smaller pool */
        uint64_t per_seq = (c->p.n_ctx + c->p.block_size - 1) / c->p.block_size;
        uint64_t nb = per_seq * c->p.max_seqs;
        long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
        if (pages > 0 && psz > 0) {
            uint64_t cap = kv_pool_blocks_for_bytes_typed(
                hp->n_layer, kvd, c->p.block_size, (size_t)((uint64_t)pages * (uint64_t)psz / 2),
                c->p.kv_f16 ? 2 : 4);
            if (cap < per_seq) cap = per_seq; /* one full context at least */
            if (nb > cap) nb = cap;
        }
        n_blocks = nb > UINT32_MAX / 2 ? UINT32_MAX / 2 : (uint32_t)nb;
    }
    if (n_blocks == 0) {
        rc = eng_fail(msg, ENG_EINVAL, "KV memory budget is smaller than one block");
        goto fail;
    }
    if ((rc = kv_pool_init_typed(&c->pool, hp->n_layer, kvd, c->p.block_size, n_blocks, c->p.kv_f16,
                                 msg)))
        goto fail;
    if ((rc = eng_cpu_backend_create(&c->be, c->p.n_threads, msg))) goto fail;
    size_t widest = hp->n_ff > hp->n_embd ? hp->n_ff : hp->n_embd;
    if (c->be->ops->reserve(c->be, widest, c->p.block_size, c->p.max_seqs, c->p.n_ctx) != 0) {
        rc = eng_fail(msg, ENG_ENOMEM, "out of memory for backend scratch");
        goto fail;
    }
    size_t T = c->p.max_batch_tokens;
    c->x = alloc_f(T, hp->n_embd);
    c->xn = alloc_f(T, hp->n_embd);
    c->q = alloc_f(T, hp->n_embd);
    c->k = alloc_f(T, kvd);
    c->v = alloc_f(T, kvd);
    c->att = alloc_f(T, hp->n_embd);
    c->ffg = alloc_f(T, hp->n_ff);
    c->ffu = alloc_f(T, hp->n_ff);
    c->logit_in = alloc_f(T > c->p.max_seqs ? T : c->p.max_seqs, hp->n_embd);
    c->logit_buf = alloc_f(c->p.max_seqs, hp->n_vocab);
    c->pos = malloc(sizeof(uint32_t) * T);
    c->ids = malloc(sizeof(int32_t) * T);
    c->aseq = malloc(sizeof(eng_attn_seq_t) * c->p.max_seqs);
    c->n_sel = malloc(sizeof(uint32_t) * c->p.max_seqs * hp->n_head);
    if (!c->x || !c->xn || !c->q || !c->k || !c->v || !c->att || !c->ffg || !c->ffu ||
        !c->logit_in || !c->logit_buf || !c->pos || !c->ids || !c->aseq || !c->n_sel) {
        rc = eng_fail(msg, ENG_ENOMEM, "out of memory for activations");
        goto fail;
    }
    *out = c;
    return 0;
fail:
    eng_ctx_free(c);
    return rc;
}

void eng_ctx_free(eng_ctx_t *c) {
    if (!c) return;
    if (c->be) c->be->ops->destroy(c->be);
    kv_pool_close(&c->pool);
    free(c->x);
    free(c->xn);
    free(c->q);
    free(c->k);
    free(c->v);
    free(c->att);
    free(c->ffg);
    free(c->ffu);
    free(c->logit_in);
    free(c->logit_buf);
    free(c->pos);
    free(c->ids);
    free(c->aseq);
    free(c->sel);
    free(c->n_sel);
    free(c);
}

kv_pool_t *eng_ctx_kv_pool(eng_ctx_t *c) {
    return &c->pool;
}

void eng_ctx_parallel_for(eng_ctx_t *c, void (*fn)(void *arg, size_t i), void *arg, size_t n) {
    if (c->be->ops->parallel_for) {
        c->be->ops->parallel_for(c->be, fn, arg, n);
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
    }
    return 0;
}

/* TidalDecode roles of layer l: dense before the first selection layer, dense + top-k at each
 * selection layer, sparse over the latest selection after it. Decode items only. */
static void set_layer_kinds(eng_ctx_t *c, const eng_batch_item_t *items, uint32_t n_items,
                            uint32_t l) {
    for (uint32_t i = 0; i < n_items; i++) {
        eng_attn_seq_t *as = &c->aseq[i];
        const eng_attn_params_t *a = items[i].attn;
        as->kind = ENG_ATT_DENSE;
        if (as->sel && a) {
            bool is_sel = false;
            for (uint32_t k = 0; k < a->n_sel_layers; k++) is_sel |= a->sel_layers[k] == l;
            if (is_sel)
                as->kind = ENG_ATT_SELECT;
            else if (l > a->sel_layers[0])
                as->kind = ENG_ATT_SPARSE;
        }
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

/* Write one key or value vector into the cache in its value type. */
static void store_kv(void *dst, const float *src, uint32_t n, uint32_t elem) {
    if (elem == 4) {
        memcpy(dst, src, sizeof(float) * n);
        return;
    }
    uint16_t *h = dst;
    for (uint32_t i = 0; i < n; i++) h[i] = eng_f32_to_f16(src[i]);
}

uint32_t eng_seq_evict(eng_ctx_t *c, kv_seq_t *seq, uint32_t n) {
    const eng_hparams_t *hp = &c->m->hp;
    uint32_t bs = seq->pool->block_size, keep = (seq->n_sinks + bs - 1) / bs * bs;
    uint32_t gone = kv_seq_evict(seq, n);
    /* K-shift: every key after the sink blocks moves down by `gone` positions */
    if (gone)
        c->be->ops->k_shift(c->be, seq, keep, seq->n_tokens, gone, hp->n_head_kv, hp->head_dim,
                            hp->n_rot, hp->rope_base, c->m->rope_freqs);
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
        uint32_t *sel = realloc(c->sel, sizeof(uint32_t) * c->p.max_seqs * hp->n_head * budget);
        if (!sel) return eng_fail(msg, ENG_ENOMEM, "out of memory for TidalDecode selections");
        c->sel = sel;
        c->sel_budget = budget;
    }
    uint32_t need = 0;
    for (uint32_t i = 0; i < n_items; i++) {
        kv_seq_t *s = items[i].seq;
        uint32_t want =
            (s->n_tokens + items[i].n_tokens + c->pool.block_size - 1) / c->pool.block_size;
        if (want > s->n_blocks) need += want - s->n_blocks;
    }
    if (need > c->pool.n_free)
        return eng_fail(msg, ENG_ENOSPACE, "KV cache needs %u free blocks, has %u", need,
                        c->pool.n_free);
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
    uint32_t d = hp->n_embd, kvd = hp->n_head_kv * hp->head_dim;

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
    op->get_rows(be, &m->tok_embd, c->ids, T, c->x);
    eng_attn_shape_t shape = {hp->n_head, hp->n_head_kv, hp->head_dim,
                              1.0f / sqrtf((float)hp->head_dim)};
    for (uint32_t l = 0; l < hp->n_layer; l++) {
        const eng_layer_t *L = &m->layers[l];
        set_layer_kinds(c, items, n_items, l);
        op->rmsnorm(be, c->x, L->attn_norm, c->xn, T, d, hp->rms_eps);
        op->matmul(be, &L->wq, c->xn, c->q, T);
        op->matmul(be, &L->wk, c->xn, c->k, T);
        op->matmul(be, &L->wv, c->xn, c->v, T);
        op->rope(be, c->q, c->pos, T, hp->n_head, hp->head_dim, hp->n_rot, hp->rope_base,
                 m->rope_freqs);
        op->rope(be, c->k, c->pos, T, hp->n_head_kv, hp->head_dim, hp->n_rot, hp->rope_base,
                 m->rope_freqs);
        /* append this step's keys and values through the block tables */
        for (uint32_t i = 0; i < n_items; i++) {
            const eng_attn_seq_t *a = &c->aseq[i];
            for (uint32_t j = 0; j < a->n_q; j++) {
                store_kv(kv_seq_kp(a->seq, l, a->pos0 + j), c->k + (size_t)(a->q_start + j) * kvd,
                         kvd, c->pool.elem);
                store_kv(kv_seq_vp(a->seq, l, a->pos0 + j), c->v + (size_t)(a->q_start + j) * kvd,
                         kvd, c->pool.elem);
            }
        }
        op->attention(be, &shape, l, c->q, c->aseq, n_items, c->att);
        op->matmul(be, &L->wo, c->att, c->xn, T);
        op->add(be, c->x, c->xn, (size_t)T * d);
        op->rmsnorm(be, c->x, L->ffn_norm, c->xn, T, d, hp->rms_eps);
        op->matmul(be, &L->w_gate, c->xn, c->ffg, T);
        op->matmul(be, &L->w_up, c->xn, c->ffu, T);
        op->swiglu(be, c->ffg, c->ffu, (size_t)T * hp->n_ff);
        op->matmul(be, &L->w_down, c->ffg, c->xn, T);
        op->add(be, c->x, c->xn, (size_t)T * d);
    }
    for (uint32_t i = 0; i < n_items; i++) items[i].seq->n_tokens += items[i].n_tokens;

    /* Logits only for the rows that asked. Last-token rows of all items go through one output
     * matmul (the vocabulary projection is the largest weight); all-token items get their own. */
    uint32_t R = 0;
    for (uint32_t i = 0; i < n_items; i++) {
        eng_batch_item_t *it = &items[i];
        if (!it->logits) continue;
        size_t row = c->aseq[i].q_start;
        if (it->all_logits) {
            op->rmsnorm(be, c->x + row * d, m->output_norm, c->logit_in, it->n_tokens, d,
                        hp->rms_eps);
            op->matmul(be, &m->output, c->logit_in, it->logits, it->n_tokens);
        }
    }
    for (uint32_t i = 0; i < n_items; i++) {
        eng_batch_item_t *it = &items[i];
        if (!it->logits || it->all_logits) continue;
        size_t row = c->aseq[i].q_start + it->n_tokens - 1;
        op->rmsnorm(be, c->x + row * d, m->output_norm, c->logit_in + (size_t)R * d, 1, d,
                    hp->rms_eps);
        R++;
    }
    if (R) {
        op->matmul(be, &m->output, c->logit_in, c->logit_buf, R);
        R = 0;
        for (uint32_t i = 0; i < n_items; i++) {
            eng_batch_item_t *it = &items[i];
            if (!it->logits || it->all_logits) continue;
            memcpy(it->logits, c->logit_buf + (size_t)R++ * hp->n_vocab,
                   sizeof(float) * hp->n_vocab);
        }
    }
    return 0;
}
