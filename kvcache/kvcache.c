/* kvcache.c - block pool (free-list stack, reference-counted blocks) and block tables. */
#include "kvcache.h"
#include "../base/err.h"

#include <stdlib.h>
#include <string.h>

static size_t block_floats(uint32_t n_layer, uint32_t kv_dim, uint32_t block_size) {
    return (size_t)n_layer * 2 * block_size * kv_dim;
}

uint32_t kv_pool_blocks_for_bytes(uint32_t n_layer, uint32_t kv_dim, uint32_t block_size,
                                  size_t mem_bytes) {
    return kv_pool_blocks_for_bytes_typed(n_layer, kv_dim, block_size, mem_bytes, 4);
}

uint32_t kv_pool_blocks_for_bytes_typed(uint32_t n_layer, uint32_t kv_dim, uint32_t block_size,
                                        size_t mem_bytes, uint32_t elem) {
    size_t per = block_floats(n_layer, kv_dim, block_size) * elem;
    if (!per) return 0;
    size_t n = mem_bytes / per;
    return n > UINT32_MAX - 1 ? UINT32_MAX - 1 : (uint32_t)n;
}

int kv_pool_init(kv_pool_t *p, uint32_t n_layer, uint32_t kv_dim, uint32_t block_size,
                 uint32_t n_blocks, char *msg) {
    return kv_pool_init_typed(p, n_layer, kv_dim, block_size, n_blocks, false, msg);
}

size_t kv_pool_bytes(uint32_t n_layer, uint32_t kv_dim, uint32_t block_size, uint32_t n_blocks,
                     bool f16) {
    size_t per = block_floats(n_layer, kv_dim, block_size), elem = f16 ? 2 : 4;
    if (!per || !n_blocks || per > SIZE_MAX / elem / n_blocks) return 0;
    return per * elem * n_blocks;
}

int kv_pool_init_over(kv_pool_t *p, uint32_t n_layer, uint32_t kv_dim, uint32_t block_size,
                      uint32_t n_blocks, bool f16, void *data, char *msg) {
    memset(p, 0, sizeof(*p));
    if (!n_layer || !kv_dim || !block_size || !n_blocks)
        return eng_fail(msg, ENG_EINVAL, "KV pool: every dimension must be positive");
    if (!kv_pool_bytes(n_layer, kv_dim, block_size, n_blocks, f16))
        return eng_fail(msg, ENG_ERANGE, "KV pool: size overflows");
    p->free_list = malloc(sizeof(uint32_t) * n_blocks);
    p->refs = calloc(n_blocks, sizeof(uint32_t));
    if (!p->free_list || !p->refs) {
        free(p->free_list);
        free(p->refs);
        p->free_list = p->refs = NULL;
        return eng_fail(msg, ENG_ENOMEM, "KV pool: cannot allocate the free list of %u blocks",
                        n_blocks);
    }
    p->data = data;
    p->elem = f16 ? 2 : 4;
    p->n_layer = n_layer;
    p->kv_dim = kv_dim;
    p->block_size = block_size;
    p->n_blocks = n_blocks;
    /* hand out low block ids first */
    for (uint32_t i = 0; i < n_blocks; i++) p->free_list[i] = n_blocks - 1 - i;
    p->n_free = n_blocks;
    return 0;
}

int kv_pool_init_typed(kv_pool_t *p, uint32_t n_layer, uint32_t kv_dim, uint32_t block_size,
                       uint32_t n_blocks, bool f16, char *msg) {
    /* the shape is checked once, by kv_pool_init_over; then the storage is ours */
    int rc = kv_pool_init_over(p, n_layer, kv_dim, block_size, n_blocks, f16, NULL, msg);
    if (rc) return rc;
    size_t bytes = kv_pool_bytes(n_layer, kv_dim, block_size, n_blocks, f16);
    if (!(p->data = calloc(1, bytes))) {
        free(p->free_list);
        free(p->refs);
        memset(p, 0, sizeof(*p));
        return eng_fail(msg, ENG_ENOMEM, "KV pool: cannot allocate %u blocks of %zu bytes",
                        n_blocks, bytes / n_blocks);
    }
    p->own_data = true;
    return 0;
}

void kv_pool_close(kv_pool_t *p) {
    if (p->own_data) free(p->data);
    free(p->free_list);
    free(p->refs);
    free(p->layer_slot);
    free(p->layer_local);
    memset(p, 0, sizeof(*p));
}

int kv_pool_attach_local(kv_pool_t *full, kv_pool_t *local, uint32_t window, const bool *is_local,
                         uint32_t n_model_layers, char *msg) {
    uint32_t n_local = 0;
    for (uint32_t l = 0; l < n_model_layers; l++) n_local += is_local[l];
    if (full->local || !window || n_local != local->n_layer ||
        n_model_layers - n_local != full->n_layer || local->kv_dim != full->kv_dim ||
        local->block_size != full->block_size || local->elem != full->elem)
        return eng_fail(msg, ENG_EINVAL,
                        "KV pool split: %u local of %u layers do not match pools of %u and %u "
                        "layers (or their shapes differ)",
                        n_local, n_model_layers, full->n_layer, local->n_layer);
    full->layer_slot = malloc(sizeof(uint32_t) * n_model_layers);
    full->layer_local = malloc(n_model_layers);
    if (!full->layer_slot || !full->layer_local) {
        free(full->layer_slot);
        free(full->layer_local);
        full->layer_slot = NULL;
        full->layer_local = NULL;
        return eng_fail(msg, ENG_ENOMEM, "KV pool split: out of memory");
    }
    uint32_t nf = 0, nl = 0;
    for (uint32_t l = 0; l < n_model_layers; l++) {
        full->layer_local[l] = is_local[l];
        full->layer_slot[l] = is_local[l] ? nl++ : nf++;
    }
    full->local = local;
    full->window = window;
    full->n_model_layers = n_model_layers;
    return 0;
}

int kv_block_alloc(kv_pool_t *p, uint32_t *block) {
    if (!p->n_free) return ENG_ENOSPACE;
    uint32_t b = p->free_list[--p->n_free];
    p->refs[b] = 1;
    *block = b;
    return 0;
}

void kv_block_ref(kv_pool_t *p, uint32_t block) {
    p->refs[block]++;
}

void kv_block_unref(kv_pool_t *p, uint32_t block) {
    if (p->refs[block] && --p->refs[block] == 0) p->free_list[p->n_free++] = block;
}

void kv_seq_init(kv_seq_t *s, kv_pool_t *pool) {
    memset(s, 0, sizeof(*s));
    s->pool = pool;
    s->n_sinks = 4;
}

/* Logical blocks whose slots all lie before the first one a query from position n_tokens on
 * sees in a local layer: positions at or before n_tokens - window, and the evicted slots. */
static uint32_t dead_blocks(const kv_seq_t *s) {
    const kv_pool_t *p = s->pool;
    uint32_t gone = s->n_tokens + 1 > p->window ? s->n_tokens + 1 - p->window : 0;
    uint64_t first_live =
        (uint64_t)s->n_sinks + s->skip + (gone > s->n_sinks ? gone - s->n_sinks : 0);
    uint64_t n = first_live / p->block_size;
    return n < s->n_blocks ? (uint32_t)n : s->n_blocks;
}

void kv_seq_drop_out_of_window(kv_seq_t *s) {
    if (!s->pool->local) return;
    /* the sink blocks stay: eviction K-shifts later tokens down next to them, back into the
     * window of the local layers */
    uint32_t sink_blocks = kv_seq_sink_blocks(s);
    uint32_t dead = dead_blocks(s);
    if (s->n_dead < sink_blocks) s->n_dead = sink_blocks;
    for (; s->n_dead < dead; s->n_dead++) {
        uint32_t *b = &s->lblocks[s->n_dead];
        if (*b != KV_NO_BLOCK) kv_block_unref(s->pool->local, *b);
        *b = KV_NO_BLOCK;
    }
}

uint32_t kv_seq_local_need(const kv_seq_t *s, uint32_t n_tokens) {
    const kv_pool_t *p = s->pool;
    if (!p->local) return 0;
    uint32_t want = kv_seq_blocks_for(s, n_tokens);
    return want > s->n_blocks ? want - s->n_blocks : 0;
}

/* Both tables hold at least `need` entries. */
static int grow_tables(kv_seq_t *s, uint32_t need) {
    if (need <= s->cap_blocks) return 0;
    uint32_t cap = s->cap_blocks ? s->cap_blocks : 8;
    while (cap < need) cap *= 2;
    uint32_t *nb = realloc(s->blocks, sizeof(uint32_t) * cap);
    if (!nb) return ENG_ENOMEM;
    s->blocks = nb;
    if (s->pool->local) {
        uint32_t *lb = realloc(s->lblocks, sizeof(uint32_t) * cap);
        if (!lb) return ENG_ENOMEM; /* cap_blocks unchanged: the next call grows both again */
        s->lblocks = lb;
    }
    s->cap_blocks = cap;
    return 0;
}

int kv_seq_reserve(kv_seq_t *s, uint32_t n_tokens) {
    kv_pool_t *p = s->pool;
    uint32_t need = kv_seq_blocks_for(s, n_tokens);
    int rc = grow_tables(s, need);
    if (rc) return rc;
    kv_seq_drop_out_of_window(s);
    while (s->n_blocks < need) {
        if ((rc = kv_block_alloc(p, &s->blocks[s->n_blocks]))) return rc;
        if (p->local && (rc = kv_block_alloc(p->local, &s->lblocks[s->n_blocks]))) {
            kv_block_unref(p, s->blocks[s->n_blocks]);
            return rc;
        }
        s->n_blocks++;
    }
    return 0;
}

uint32_t kv_seq_evict(kv_seq_t *s, uint32_t n) {
    kv_pool_t *p = s->pool;
    uint32_t bs = p->block_size, S = s->n_sinks;
    if (s->n_tokens <= S || n == 0) return 0;
    if (n > s->n_tokens - S) n = s->n_tokens - S;
    s->skip += n;
    s->n_tokens -= n;
    s->n_evicted += n;
    /* the blocks after the sink blocks that hold nothing but evicted slots go back */
    uint32_t first = kv_seq_sink_blocks(s), end = (S + s->skip) / bs;
    uint32_t k = end > first ? end - first : 0;
    if (k) {
        for (uint32_t i = 0; i < k; i++) kv_block_unref(p, s->blocks[first + i]);
        memmove(s->blocks + first, s->blocks + first + k,
                sizeof(uint32_t) * (s->n_blocks - first - k));
        if (p->local) {
            for (uint32_t i = 0; i < k; i++)
                if (s->lblocks[first + i] != KV_NO_BLOCK)
                    kv_block_unref(p->local, s->lblocks[first + i]);
            memmove(s->lblocks + first, s->lblocks + first + k,
                    sizeof(uint32_t) * (s->n_blocks - first - k));
            /* the out-of-window entries after the sinks lose those freed */
            if (s->n_dead > first) s->n_dead = s->n_dead - first > k ? s->n_dead - k : first;
        }
        s->n_blocks -= k;
        s->skip -= k * bs;
    }
    return n;
}

void kv_seq_reset(kv_seq_t *s) {
    kv_pool_t *p = s->pool;
    while (s->n_blocks) {
        --s->n_blocks;
        kv_block_unref(p, s->blocks[s->n_blocks]);
        if (p->local && s->lblocks[s->n_blocks] != KV_NO_BLOCK)
            kv_block_unref(p->local, s->lblocks[s->n_blocks]);
    }
    s->n_dead = 0;
    s->skip = 0;
    s->n_tokens = 0;
    s->n_evicted = 0;
}

void kv_seq_close(kv_seq_t *s) {
    if (s->pool) kv_seq_reset(s);
    free(s->blocks);
    free(s->lblocks);
    memset(s, 0, sizeof(*s));
}
