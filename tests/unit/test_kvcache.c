/* test_kvcache.c - the paged block pool and block tables. */
#include "../../base/err.h"
#include "../../kvcache/kvcache.h"

#include <criterion/criterion.h>
#include <string.h>

Test(kvcache, test_reserve_allocates_whole_blocks_and_reset_returns_them) {
    kv_pool_t p;
    char msg[ENG_ERRMSG_LEN];
    cr_assert_eq(kv_pool_init(&p, 2, 8, 4, 10, msg), 0);
    kv_seq_t a, b;
    kv_seq_init(&a, &p);
    kv_seq_init(&b, &p);
    cr_assert_eq(kv_seq_reserve(&a, 5), 0);
    cr_expect_eq(a.n_blocks, 2);
    cr_expect_eq(p.n_free, 8);
    cr_assert_eq(kv_seq_reserve(&b, 24), 0);
    cr_expect_eq(b.n_blocks, 6);
    cr_expect_eq(kv_seq_reserve(&a, 17), ENG_ENOSPACE); /* needs 3 more, 2 free: keeps them */
    cr_expect_eq(p.n_free, 0);
    cr_expect_float_eq(kv_pool_usage(&p), 1.0, 1e-9);
    kv_seq_reset(&b);
    cr_expect_eq(p.n_free, 6);
    cr_expect_eq(kv_seq_reserve(&a, 17), 0);
    kv_seq_close(&a);
    kv_seq_close(&b);
    cr_expect_eq(p.n_free, 10);
    cr_expect_float_eq(kv_pool_usage(&p), 0.0, 1e-9);
    kv_pool_close(&p);
}

Test(kvcache, test_slots_of_different_sequences_never_alias) {
    kv_pool_t p;
    char msg[ENG_ERRMSG_LEN];
    cr_assert_eq(kv_pool_init(&p, 3, 4, 2, 16, msg), 0);
    kv_seq_t s[3];
    for (int i = 0; i < 3; i++) {
        kv_seq_init(&s[i], &p);
        cr_assert_eq(kv_seq_reserve(&s[i], 7), 0);
    }
    /* write a distinct tag into every (seq, layer, pos, k/v) slot, then read all back */
    for (int i = 0; i < 3; i++)
        for (uint32_t l = 0; l < 3; l++)
            for (uint32_t pos = 0; pos < 7; pos++)
                for (int j = 0; j < 4; j++) {
                    kv_seq_k(&s[i], l, pos)[j] = (float)(i * 1000 + l * 100 + pos * 10 + j);
                    kv_seq_v(&s[i], l, pos)[j] = -(float)(i * 1000 + l * 100 + pos * 10 + j);
                }
    for (int i = 0; i < 3; i++)
        for (uint32_t l = 0; l < 3; l++)
            for (uint32_t pos = 0; pos < 7; pos++)
                for (int j = 0; j < 4; j++) {
                    cr_assert_eq(kv_seq_k(&s[i], l, pos)[j],
                                 (float)(i * 1000 + l * 100 + pos * 10 + j));
                    cr_assert_eq(kv_seq_v(&s[i], l, pos)[j],
                                 -(float)(i * 1000 + l * 100 + pos * 10 + j));
                }
    for (int i = 0; i < 3; i++) kv_seq_close(&s[i]);
    kv_pool_close(&p);
}

Test(kvcache, test_pool_rejects_zero_and_overflowing_sizes) {
    kv_pool_t p;
    char msg[ENG_ERRMSG_LEN];
    cr_expect_eq(kv_pool_init(&p, 0, 8, 4, 10, msg), ENG_EINVAL);
    cr_expect_eq(kv_pool_init(&p, 1 << 20, 1 << 20, 1 << 10, 1 << 20, msg), ENG_ERANGE);
    cr_expect_eq(kv_pool_blocks_for_bytes(2, 8, 4, 2 * 2 * 8 * 4 * 4 * 3 + 5), 3);
}

/* A block shared by two holders returns to the pool only when both have let go. */
Test(kvcache, test_shared_block_returns_only_with_its_last_reference) {
    kv_pool_t p;
    char msg[ENG_ERRMSG_LEN];
    cr_assert_eq(kv_pool_init(&p, 1, 4, 4, 3, msg), 0);
    kv_seq_t a;
    kv_seq_init(&a, &p);
    cr_assert_eq(kv_seq_reserve(&a, 8), 0);
    uint32_t shared = a.blocks[0];
    cr_expect_not(kv_block_shared(&p, shared));
    kv_block_ref(&p, shared); /* a second holder, as a prefix cache or a fork would be */
    cr_expect(kv_block_shared(&p, shared));
    kv_seq_close(&a);
    cr_expect_eq(p.n_free, 2, "the shared block went back while still referenced");
    cr_expect_not(kv_block_shared(&p, shared));
    uint32_t b;
    cr_assert_eq(kv_block_alloc(&p, &b), 0);
    cr_expect_neq(b, shared);
    kv_block_unref(&p, shared);
    cr_expect_eq(p.n_free, 2);
    kv_block_unref(&p, b);
    cr_expect_eq(p.n_free, 3);
    cr_expect_eq(kv_block_alloc(&p, &b), 0);
    uint32_t c, d;
    cr_expect_eq(kv_block_alloc(&p, &c), 0);
    cr_expect_eq(kv_block_alloc(&p, &d), 0);
    cr_expect_eq(kv_block_alloc(&p, &d), ENG_ENOSPACE);
    kv_pool_close(&p);
}

/* A sliding-window split: layers 0, 1, 3 and 4 of five are local with a window of 6 and live in
 * a pool of their own, layer 2 sees everything. Local blocks return once every position in
 * them is out of the next query's window, but for the sink block; the local layers keep their
 * own slots, a full layer's key stays where it was, and eviction and reset release both
 * tables. */
Test(kvcache, test_split_pool_frees_local_blocks_out_of_the_window) {
    kv_pool_t full, local;
    char msg[ENG_ERRMSG_LEN];
    const bool is_local[5] = {true, true, false, true, true};
    cr_assert_eq(kv_pool_init(&full, 1, 2, 4, 16, msg), 0);
    cr_assert_eq(kv_pool_init(&local, 4, 2, 4, 4, msg), 0);
    kv_pool_t odd;
    cr_assert_eq(kv_pool_init(&odd, 3, 2, 4, 4, msg), 0);
    cr_expect_eq(kv_pool_attach_local(&full, &odd, 6, is_local, 5, msg), ENG_EINVAL,
                 "3 local layers where the model has 4");
    kv_pool_close(&odd);
    cr_assert_eq(kv_pool_attach_local(&full, &local, 6, is_local, 5, msg), 0, "%s", msg);
    cr_expect_eq(kv_pool_layers(&full), 5);
    kv_seq_t s;
    kv_seq_init(&s, &full);
    s.n_sinks = 4; /* block 0 */
    /* a prompt of 13 tokens: positions 0..12 in blocks 0..3 of both tables */
    cr_assert_eq(kv_seq_reserve(&s, 13), 0);
    cr_expect_eq(s.n_blocks, 4);
    cr_expect_eq(local.n_free, 0);
    for (uint32_t p = 0; p < 13; p++)
        for (uint32_t l = 0; l < 5; l++) {
            cr_assert(kv_seq_has(&s, l, p));
            kv_seq_k(&s, l, p)[0] = (float)(100 * l + p);
            kv_seq_v(&s, l, p)[1] = -(float)(100 * l + p);
        }
    for (uint32_t p = 0; p < 13; p++) /* no layer's slot was overwritten by another's */
        for (uint32_t l = 0; l < 5; l++) {
            cr_expect_eq(kv_seq_k(&s, l, p)[0], (float)(100 * l + p));
            cr_expect_eq(kv_seq_v(&s, l, p)[1], -(float)(100 * l + p));
        }
    s.n_tokens = 13;
    /* the next query (position 13) sees (7, 13]: block 1 (positions 4..7) is out, block 0
     * holds the sinks and stays */
    cr_assert_eq(kv_seq_reserve(&s, 14), 0);
    cr_expect_eq(s.lblocks[1], KV_NO_BLOCK);
    cr_expect_neq(s.lblocks[0], KV_NO_BLOCK);
    cr_expect_not(kv_seq_has(&s, 0, 7));
    cr_expect(kv_seq_has(&s, 2, 7), "the global layer keeps every position");
    cr_expect(kv_seq_has(&s, 0, 8));
    cr_expect(kv_seq_has(&s, 0, 3));
    cr_expect_eq(local.n_free, 1);
    cr_expect_eq(kv_seq_k(&s, 2, 5)[0], 205.0f);
    cr_expect_eq(kv_seq_k(&s, 3, 2)[0], 302.0f);
    /* 14 more tokens: the sink block and three more at most, however long it grows */
    for (uint32_t n = 15; n <= 28; n++) {
        s.n_tokens = n - 1;
        cr_assert_eq(kv_seq_reserve(&s, n), 0, "%u tokens: %s", n, "the local pool ran dry");
    }
    s.n_tokens = 28;
    cr_expect_eq(s.n_blocks, 7);
    cr_expect_eq(full.n_free, 9);
    /* evict 8 tokens after the sink block: both tables lose logical blocks 1 and 2 */
    cr_expect_eq(kv_seq_evict(&s, 8), 8);
    cr_expect_eq(s.n_blocks, 5);
    cr_expect_eq(full.n_free, 11);
    cr_expect_neq(s.lblocks[0], KV_NO_BLOCK);
    uint32_t live = 0;
    for (uint32_t b = 0; b < s.n_blocks; b++) live += s.lblocks[b] != KV_NO_BLOCK;
    cr_expect_eq(live + local.n_free, local.n_blocks, "every local block is held or free");
    /* 20 tokens now: the next query sees (14, 20], in blocks 3 and 4, which held (22, 28] */
    cr_expect(kv_seq_has(&s, 0, 15));
    cr_expect_not(kv_seq_has(&s, 0, 11));
    kv_seq_close(&s);
    cr_expect_eq(full.n_free, 16);
    cr_expect_eq(local.n_free, 4);
    kv_pool_close(&full);
    kv_pool_close(&local);
}

/* Exact eviction with sinks that fill part of a block (2 sinks, blocks of 4) in a split cache
 * (layers 0, 1, 3 and 4 local with a window of 6): evicting 1 to 7 tokens at a time, with
 * tokens appended in between, every position the next query sees holds its own token's K/V
 * (tagged with the token) in every layer; the sinks stay; the evicted tokens cost no slot of
 * the window; blocks that only evicted slots occupied go back to both pools, and nothing else
 * does. */
Test(kvcache, test_exact_eviction_keeps_each_token_and_frees_only_dead_blocks) {
    kv_pool_t full, local;
    char msg[ENG_ERRMSG_LEN];
    const bool is_local[5] = {true, true, false, true, true};
    enum { W = 6, BS = 4, S = 2 };
    cr_assert_eq(kv_pool_init(&full, 1, 2, BS, 32, msg), 0);
    cr_assert_eq(kv_pool_init(&local, 4, 2, BS, 8, msg), 0);
    cr_assert_eq(kv_pool_attach_local(&full, &local, W, is_local, 5, msg), 0, "%s", msg);
    kv_seq_t s;
    kv_seq_init(&s, &full);
    s.n_sinks = S;
    float tok[64]; /* the token each position holds */
    float next = 1;
    const uint32_t evict[] = {1, 3, 5, 2, 7, 4, 6};
    for (size_t round = 0; round <= sizeof(evict) / sizeof(evict[0]); round++) {
        for (int a = 0; a < 5; a++) { /* append 5 tokens */
            cr_assert_eq(kv_seq_reserve(&s, s.n_tokens + 1), 0, "round %zu", round);
            for (uint32_t l = 0; l < 5; l++)
                if (kv_seq_has(&s, l, s.n_tokens)) kv_seq_k(&s, l, s.n_tokens)[0] = next;
            tok[s.n_tokens++] = next++;
        }
        if (round < sizeof(evict) / sizeof(evict[0])) {
            uint32_t before = s.n_tokens, gone = kv_seq_evict(&s, evict[round]);
            cr_assert_eq(gone, evict[round] < before - S ? evict[round] : before - S);
            memmove(tok + S, tok + S + gone, sizeof(float) * (before - S - gone));
            kv_seq_drop_out_of_window(&s);
        }
        for (uint32_t p = 0; p < s.n_tokens; p++)
            for (uint32_t l = 0; l < 5; l++) {
                bool seen = !is_local[l] || p < S || p + W > s.n_tokens;
                if (!seen) continue;
                cr_assert(kv_seq_has(&s, l, p), "round %zu: layer %u lost position %u", round, l,
                          p);
                cr_assert_eq(kv_seq_k(&s, l, p)[0], tok[p], "round %zu layer %u position %u", round,
                             l, p);
            }
        cr_assert_leq(s.skip, kv_skip_max(BS, S));
        cr_assert_eq(s.n_blocks, kv_seq_blocks_for(&s, s.n_tokens));
        cr_assert_eq(full.n_free, full.n_blocks - s.n_blocks);
        uint32_t live = 0;
        for (uint32_t b = 0; b < s.n_blocks; b++) live += s.lblocks[b] != KV_NO_BLOCK;
        cr_assert_eq(live + local.n_free, local.n_blocks, "every local block is held or free");
        cr_assert_leq(live, 1 + (W + BS - 1) / BS + 1, "round %zu: %u local blocks", round, live);
    }
    kv_seq_close(&s);
    cr_expect_eq(full.n_free, 32);
    cr_expect_eq(local.n_free, 8);
    kv_pool_close(&full);
    kv_pool_close(&local);
}
