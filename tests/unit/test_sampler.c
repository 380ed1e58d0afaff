/* test_sampler.c - greedy, truncation samplers, penalties and seeded reproducibility. */
#include "../../engine/engine.h"

#include <criterion/criterion.h>
#include <math.h>
#include <string.h>

#define V 50

static void make_logits(float *l) {
    for (int i = 0; i < V; i++) l[i] = -0.1f * (float)((i * 7) % V);
    l[13] = 5.0f; /* the argmax */
    l[27] = 4.5f;
}

static eng_sampler_t *mk(eng_sampler_params_t *p) {
    eng_sampler_t *s;
    cr_assert_eq(eng_sampler_params_check(p, NULL), 0);
    cr_assert_eq(eng_sampler_create(&s, p, V), 0);
    return s;
}

Test(sampler, test_greedy_and_degenerate_truncations_pick_the_argmax) {
    eng_sampler_params_t p;
    float l[V];
    eng_sampler_params_default(&p);
    p.temperature = 0;
    eng_sampler_t *s = mk(&p);
    make_logits(l);
    cr_expect_eq(eng_sampler_sample(s, l), 13);
    eng_sampler_free(s);
    eng_sampler_params_t variants[3];
    for (int k = 0; k < 3; k++) {
        eng_sampler_params_default(&variants[k]);
        variants[k].temperature = 1.5f;
        variants[k].top_k = 0;
        variants[k].top_p = 1;
        variants[k].min_p = 0;
    }
    variants[0].top_k = 1;
    variants[1].top_p = 1e-6f;
    variants[2].min_p = 1.0f;
    for (int k = 0; k < 3; k++)
        for (uint64_t seed = 0; seed < 50; seed++) {
            variants[k].seed = seed;
            s = mk(&variants[k]);
            make_logits(l);
            cr_expect_eq(eng_sampler_sample(s, l), 13, "variant %d seed %llu", k,
                         (unsigned long long)seed);
            eng_sampler_free(s);
        }
}

Test(sampler, test_same_seed_same_tokens_and_distribution_is_respected) {
    eng_sampler_params_t p;
    eng_sampler_params_default(&p);
    p.temperature = 1.0f;
    p.top_k = 0;
    p.top_p = 1;
    p.min_p = 0;
    p.seed = 77;
    eng_sampler_t *a = mk(&p), *b = mk(&p);
    int diff_seed_differs = 0, count13 = 0, count27 = 0;
    p.seed = 78;
    eng_sampler_t *c = mk(&p);
    float l[V];
    for (int i = 0; i < 2000; i++) {
        make_logits(l);
        int32_t x = eng_sampler_sample(a, l);
        make_logits(l);
        cr_assert_eq(eng_sampler_sample(b, l), x);
        make_logits(l);
        diff_seed_differs += eng_sampler_sample(c, l) != x;
        count13 += x == 13;
        count27 += x == 27;
    }
    cr_expect_gt(diff_seed_differs, 0);
    /* p(13)/p(27) = e^0.5 = 1.65: check the draw follows the softmax */
    double ratio = (double)count13 / count27;
    cr_expect(ratio > 1.3 && ratio < 2.1, "ratio %g", ratio);
    eng_sampler_free(a), eng_sampler_free(b), eng_sampler_free(c);
}

Test(sampler, test_top_k_keeps_only_the_k_best) {
    eng_sampler_params_t p;
    eng_sampler_params_default(&p);
    p.temperature = 100.0f; /* nearly uniform */
    p.top_k = 2;
    p.top_p = 1;
    p.min_p = 0;
    eng_sampler_t *s = mk(&p);
    float l[V];
    int seen[V] = {0};
    for (int i = 0; i < 500; i++) {
        make_logits(l);
        seen[eng_sampler_sample(s, l)]++;
    }
    cr_expect_gt(seen[13], 0);
    cr_expect_gt(seen[27], 0);
    cr_expect_eq(seen[13] + seen[27], 500);
    eng_sampler_free(s);
}

Test(sampler, test_penalties_follow_llama_cpp_formulas) {
    eng_sampler_params_t p;
    eng_sampler_params_default(&p);
    p.temperature = 0;
    p.repetition_penalty = 2.0f;
    eng_sampler_t *s = mk(&p);
    float l[V];
    make_logits(l);
    eng_sampler_accept(s, 13);
    eng_sampler_accept(s, 13);
    eng_sampler_accept(s, 0);                   /* logit 0: multiplied, stays 0 */
    cr_expect_eq(eng_sampler_sample(s, l), 27); /* 5/2 = 2.5 < 4.5 */
    cr_expect_float_eq(l[13], 2.5f, 1e-6);
    eng_sampler_free(s);

    eng_sampler_params_default(&p);
    p.temperature = 0;
    p.frequency_penalty = 0.5f;
    p.presence_penalty = 0.25f;
    s = mk(&p);
    make_logits(l);
    for (int i = 0; i < 3; i++) eng_sampler_accept(s, 27);
    eng_sampler_sample(s, l);
    cr_expect_float_eq(l[27], 4.5f - 3 * 0.5f - 0.25f, 1e-6);
    eng_sampler_free(s);

    /* the window forgets tokens older than penalty_last_n */
    eng_sampler_params_default(&p);
    p.temperature = 0;
    p.repetition_penalty = 10.0f;
    p.penalty_last_n = 2;
    s = mk(&p);
    eng_sampler_accept(s, 13);
    eng_sampler_accept(s, 1);
    eng_sampler_accept(s, 2);
    make_logits(l);
    cr_expect_eq(eng_sampler_sample(s, l), 13);
    eng_sampler_free(s);
}

Test(sampler, test_params_check_rejects_out_of_range_and_nan) {
    eng_sampler_params_t p;
    char msg[ENG_ERRMSG_LEN];
    float bad_t[] = {-1.0f, NAN, INFINITY};
    for (int i = 0; i < 3; i++) {
        eng_sampler_params_default(&p);
        p.temperature = bad_t[i];
        cr_expect_eq(eng_sampler_params_check(&p, msg), ENG_EINVAL);
        cr_expect(strstr(msg, "temperature"), "%s", msg);
    }
    eng_sampler_params_default(&p);
    p.top_p = 0;
    cr_expect_eq(eng_sampler_params_check(&p, msg), ENG_EINVAL);
    eng_sampler_params_default(&p);
    p.min_p = NAN;
    cr_expect_eq(eng_sampler_params_check(&p, msg), ENG_EINVAL);
    eng_sampler_params_default(&p);
    p.frequency_penalty = 3;
    cr_expect_eq(eng_sampler_params_check(&p, msg), ENG_EINVAL);
}

/* The quickselect/partial-sort truncation keeps exactly the sets a full sort would. */
Test(sampler, test_truncation_sets_match_a_full_sort_on_a_large_vocab) {
    enum { BIG = 5000 };
    static float l[BIG];
    uint64_t x = 99;
    for (int trial = 0; trial < 6; trial++) {
        eng_sampler_params_t p;
        eng_sampler_params_default(&p);
        p.temperature = 1;
        p.top_k = trial % 2 ? 37 : 0;
        p.top_p = trial < 2 ? 1.0f : trial < 4 ? 0.5f : 0.995f;
        p.min_p = trial == 5 ? 0.01f : 0;
        eng_sampler_t *s;
        cr_assert_eq(eng_sampler_create(&s, &p, BIG), 0);
        /* allowed set by brute force: sort indices by logit */
        for (int i = 0; i < BIG; i++) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            l[i] = (float)((x >> 40) % 100000) / 5000.0f; /* ties are possible */
        }
        static int order[BIG];
        for (int i = 0; i < BIG; i++) order[i] = i;
        for (int i = 1; i < BIG; i++) { /* insertion sort, descending, ties by id */
            int v = order[i], j = i - 1;
            while (j >= 0 && (l[order[j]] < l[v] || (l[order[j]] == l[v] && order[j] > v)))
                order[j + 1] = order[j], j--;
            order[j + 1] = v;
        }
        int n = p.top_k ? p.top_k : BIG;
        if (p.top_p < 1) {
            double z = 0, mx = l[order[0]], cum = 0;
            for (int i = 0; i < n; i++) z += exp(l[order[i]] - mx);
            for (int i = 0; i < n; i++) {
                cum += exp(l[order[i]] - mx) / z;
                if (cum >= p.top_p) {
                    n = i + 1;
                    break;
                }
            }
        }
        static bool allowed[BIG];
        for (int i = 0; i < BIG; i++) allowed[i] = false;
        for (int i = 0; i < n; i++)
            if (p.min_p == 0 || l[order[i]] >= l[order[0]] + logf(p.min_p))
                allowed[order[i]] = true;
        static float work[BIG];
        for (int d = 0; d < 300; d++) {
            memcpy(work, l, sizeof(l));
            int32_t t = eng_sampler_sample(s, work);
            cr_assert(allowed[t], "trial %d drew %d outside the allowed set", trial, t);
        }
        eng_sampler_free(s);
    }
}
