/* test_kvcache.c - the paged block pool and block tables. */
#include "../../base/err.h"
#include "../../kvcache/kvcache.h"

#include <criterion/criterion.h>

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
