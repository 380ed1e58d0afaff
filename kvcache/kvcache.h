/* kvcache.h - the paged KV block pool and per-sequence block tables.
 *
 * One pool of fixed-size blocks is sized at start-up. A block holds
 * `block_size` token slots for every layer: keys and values of kv_dim floats
 * each. A sequence owns a block table mapping its logical blocks to physical
 * ones; attention reads keys and values through that table. Blocks are handed
 * out from a free list in O(1) and carry a reference count: a block table holds
 * one reference per entry, and a block returns to the free list when its last
 * reference goes (so several sequences may share a block: the prefix cache and
 * forked sequences build on this; a block shared by more than one holder is
 * read-only, and whoever would change it copies it first).
 *
 * Sliding-window models (Gemma 3's local layers) split the cache in two pools: the full pool
 * holds the layers that see every position, and a second pool, attached to it with
 * kv_pool_attach_local(), holds the local layers, which see only the last `window`
 * positions. A sequence then has a second block table over the same logical blocks, and a
 * local block whose every position has left the window of the next query returns to its pool
 * (its table entry becomes KV_NO_BLOCK): the local layers hold about window tokens (and the
 * sink blocks) per sequence however long it grows, as llama.cpp's iSWA cache does.
 *
 * Not thread-safe: the engine thread owns the pool. Attention kernels may read
 * concurrently while no allocation is in progress.
 */
#ifndef TIDALD_KVCACHE_H
#define TIDALD_KVCACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define KV_NO_BLOCK UINT32_MAX /* a local table's entry whose block left the window */

typedef struct kv_pool {
    uint32_t n_layer;
    uint32_t kv_dim;     /* n_head_kv * head_dim */
    uint32_t block_size; /* tokens per block */
    uint32_t n_blocks;
    uint32_t elem;       /* bytes per stored value: 4 (F32) or 2 (F16) */
    void *data;          /* n_blocks * n_layer * 2 * block_size * kv_dim values */
    bool own_data;       /* data was allocated here (else a backend owns it) */
    uint32_t *free_list; /* stack of free block ids */
    uint32_t n_free;
    uint32_t *refs; /* per block: the references held (0: on the free list) */
    /* Split layout (kv_pool_attach_local): the local layers' pool, or NULL when this pool
     * holds every layer. Then layer l of the model is stored as layer layer_slot[l] of this
     * pool, or of `local` when layer_local[l]. */
    struct kv_pool *local;
    uint32_t window;         /* local layers: a query at p sees keys (p - window, p] */
    uint32_t n_model_layers; /* layers of the model (n_layer + local->n_layer) */
    uint32_t *layer_slot;
    uint8_t *layer_local;
} kv_pool_t;

typedef struct {
    kv_pool_t *pool;
    uint32_t *blocks;  /* block table: logical -> physical */
    uint32_t *lblocks; /* split pools: the local layers' table (KV_NO_BLOCK: out of window) */
    uint32_t n_dead;   /* split pools: lblocks[sink blocks..n_dead) are all KV_NO_BLOCK */
    uint32_t n_blocks, cap_blocks;
    uint32_t n_tokens;  /* tokens whose K/V are stored (cache-relative positions 0..n_tokens-1) */
    uint32_t n_sinks;   /* attention sinks: the first tokens eviction never drops */
    uint32_t skip;      /* slots after the sinks whose tokens were evicted but whose block still
                           holds live tokens too (kv_seq_slot); below 2 blocks */
    uint64_t n_evicted; /* tokens evicted over the sequence's life */
} kv_seq_t;

/* Size a pool of n_blocks blocks of F32 values. Returns 0 or a negative eng_err_t (msg
 * filled). */
int kv_pool_init(kv_pool_t *p, uint32_t n_layer, uint32_t kv_dim, uint32_t block_size,
                 uint32_t n_blocks, char *msg);
/* The same with a choice of value type: F16 halves the memory and the bytes attention reads. */
int kv_pool_init_typed(kv_pool_t *p, uint32_t n_layer, uint32_t kv_dim, uint32_t block_size,
                       uint32_t n_blocks, bool f16, char *msg);
/* The same over `data` that the caller allocated (e.g. device memory from a backend) and
 * frees after kv_pool_close(); it must hold kv_pool_bytes() zeroed bytes. */
int kv_pool_init_over(kv_pool_t *p, uint32_t n_layer, uint32_t kv_dim, uint32_t block_size,
                      uint32_t n_blocks, bool f16, void *data, char *msg);
/* Bytes of value storage for a pool of this shape (0 on overflow). */
size_t kv_pool_bytes(uint32_t n_layer, uint32_t kv_dim, uint32_t block_size, uint32_t n_blocks,
                     bool f16);
/* Close the pool (not an attached local pool: its owner closes that too). */
void kv_pool_close(kv_pool_t *p);
/* Split the cache: `full` keeps the layers l with !is_local[l] (full->n_layer of them, in
 * order), `local` the others (local->n_layer), which see the last `window` positions. Both
 * pools must have the same kv_dim, block size and value type; `local` stays the caller's.
 * Sequences must be initialised after this. ENG_EINVAL on a mismatch (msg filled). */
int kv_pool_attach_local(kv_pool_t *full, kv_pool_t *local, uint32_t window, const bool *is_local,
                         uint32_t n_model_layers, char *msg);
/* The model's layers the cache holds, in one pool or split over two. */
static inline uint32_t kv_pool_layers(const kv_pool_t *p) {
    return p->local ? p->n_model_layers : p->n_layer;
}
/* How many blocks fit in mem_bytes for the given shape (at least 0). */
uint32_t kv_pool_blocks_for_bytes(uint32_t n_layer, uint32_t kv_dim, uint32_t block_size,
                                  size_t mem_bytes);
uint32_t kv_pool_blocks_for_bytes_typed(uint32_t n_layer, uint32_t kv_dim, uint32_t block_size,
                                        size_t mem_bytes, uint32_t elem);
static inline double kv_pool_usage(const kv_pool_t *p) {
    return p->n_blocks ? (double)(p->n_blocks - p->n_free) / p->n_blocks : 0.0;
}

/* Take a free block with one reference, held by the caller; ENG_ENOSPACE when none is free. */
int kv_block_alloc(kv_pool_t *p, uint32_t *block);
/* Add a reference to an allocated block (a second holder shares it). */
void kv_block_ref(kv_pool_t *p, uint32_t block);
/* Drop a reference; the last one returns the block to the free list. */
void kv_block_unref(kv_pool_t *p, uint32_t block);
/* True while more than one holder references the block (it must not be written then). */
static inline bool kv_block_shared(const kv_pool_t *p, uint32_t block) {
    return p->refs[block] > 1;
}

void kv_seq_init(kv_seq_t *s, kv_pool_t *pool);
/* Ensure capacity for n_tokens total; allocates blocks (one reference each, held by the
 * table). ENG_ENOSPACE if the pool is exhausted (already allocated blocks are kept, so the
 * caller may retry after freeing others); ENG_ENOMEM if the table cannot grow. */
int kv_seq_reserve(kv_seq_t *s, uint32_t n_tokens);
/* Sink-aware eviction, token-exact (StreamingLLM, arXiv 2309.17453): drop the n oldest tokens
 * after the first n_sinks (fewer when fewer are there). Positions after the sinks move down by
 * the count returned, and the caller re-rotates their keys (K-shift). The sinks cost exactly
 * n_sinks slots of the window at any block size: the dropped tokens' slots become `skip`, and
 * every block that only they occupied returns to the pool (its table entry is removed). */
uint32_t kv_seq_evict(kv_seq_t *s, uint32_t n);
/* The blocks at the front of the table that hold sink slots: eviction never frees them. */
static inline uint32_t kv_seq_sink_blocks(const kv_seq_t *s) {
    uint32_t bs = s->pool->block_size;
    return (s->n_sinks + bs - 1) / bs;
}
/* The tokens kv_seq_evict must drop for one more block to go back to the pool (the first block
 * after the sink blocks); more than the sequence holds past its sinks when it cannot. */
static inline uint32_t kv_seq_evict_for_block(const kv_seq_t *s) {
    uint32_t bs = s->pool->block_size;
    return (kv_seq_sink_blocks(s) + 1) * bs - s->n_sinks - s->skip;
}
/* The slot of position pos across the table's blocks: the sinks keep theirs, the positions after
 * them sit `skip` slots further on (0 until something is evicted). */
static inline uint32_t kv_seq_slot(const kv_seq_t *s, uint32_t pos) {
    return pos < s->n_sinks ? pos : pos + s->skip;
}
/* The end (exclusive) of the run of positions from pos that lie side by side in one block:
 * kernels read keys and values in such runs. */
static inline uint32_t kv_seq_run_end(const kv_seq_t *s, uint32_t pos) {
    uint32_t bs = s->pool->block_size;
    if (!s->skip) return (pos / bs + 1) * bs;
    if (pos < s->n_sinks) {
        uint32_t e = (pos / bs + 1) * bs;
        return e < s->n_sinks ? e : s->n_sinks;
    }
    return ((pos + s->skip) / bs + 1) * bs - s->skip;
}
/* The most evicted slots a sequence with n_sinks sinks carries (skip stays below the end of the
 * first block after the sink blocks): what eviction may add to a full window's blocks. */
static inline uint32_t kv_skip_max(uint32_t block_size, uint32_t n_sinks) {
    return ((n_sinks + block_size - 1) / block_size + 1) * block_size - n_sinks - 1;
}
/* Table entries a sequence of n_tokens tokens needs (n_tokens at least its current count). */
static inline uint32_t kv_seq_blocks_for(const kv_seq_t *s, uint32_t n_tokens) {
    uint32_t bs = s->pool->block_size;
    return (uint32_t)(((uint64_t)n_tokens + s->skip + bs - 1) / bs);
}

/* Split pools: return to the local pool every local block whose positions are all out of the
 * window of the next query (position n_tokens): those at or before n_tokens - window, except
 * the sink blocks, which eviction brings back into the window. Safe at any time
 * (kv_seq_reserve does it first); a no-op without a local pool. */
void kv_seq_drop_out_of_window(kv_seq_t *s);
/* Local blocks a reservation for n_tokens in total would take after dropping those out of the
 * window (0 without a local pool), for checking both pools before reserving. */
uint32_t kv_seq_local_need(const kv_seq_t *s, uint32_t n_tokens);

/* Drop all tokens and the table's reference to every block. */
void kv_seq_reset(kv_seq_t *s);
void kv_seq_close(kv_seq_t *s);

/* The pool that stores the model's layer `layer` (a split cache's local pool for its
 * sliding-window layers) and, in *slot, the layer's index there. */
static inline const kv_pool_t *kv_pool_of_layer(const kv_pool_t *p, uint32_t layer,
                                                uint32_t *slot) {
    if (!p->local) {
        *slot = layer;
        return p;
    }
    *slot = p->layer_slot[layer];
    return p->layer_local[layer] ? p->local : p;
}

/* Address of the key (or value) vector of token `pos` in `layer` (pos < capacity), in the
 * pool's value type. */
static inline void *kv_seq_kp(const kv_seq_t *s, uint32_t layer, uint32_t pos) {
    const kv_pool_t *p = kv_pool_of_layer(s->pool, layer, &layer);
    const uint32_t *tab = p == s->pool ? s->blocks : s->lblocks;
    pos = kv_seq_slot(s, pos);
    uint32_t b = tab[pos / p->block_size];
    size_t slab = (size_t)p->block_size * p->kv_dim;
    size_t idx =
        ((size_t)b * p->n_layer + layer) * 2 * slab + (size_t)(pos % p->block_size) * p->kv_dim;
    return (char *)p->data + idx * p->elem;
}
static inline void *kv_seq_vp(const kv_seq_t *s, uint32_t layer, uint32_t pos) {
    return (char *)kv_seq_kp(s, layer, pos) +
           (size_t)s->pool->block_size * s->pool->kv_dim * s->pool->elem;
}
/* False when position pos of the model's layer `layer` is no longer stored: a local layer's
 * block out of the window (only a split cache drops any). */
static inline bool kv_seq_has(const kv_seq_t *s, uint32_t layer, uint32_t pos) {
    const kv_pool_t *p = s->pool;
    return !p->local || !p->layer_local[layer] ||
           s->lblocks[kv_seq_slot(s, pos) / p->block_size] != KV_NO_BLOCK;
}
/* The same as floats: F32 pools only. */
static inline float *kv_seq_k(const kv_seq_t *s, uint32_t layer, uint32_t pos) {
    return (float *)kv_seq_kp(s, layer, pos);
}
static inline float *kv_seq_v(const kv_seq_t *s, uint32_t layer, uint32_t pos) {
    return (float *)kv_seq_vp(s, layer, pos);
}

#endif
