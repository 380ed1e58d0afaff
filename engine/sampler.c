/* sampler.c - token selection: penalties, top-k, top-p, min-p, temperature,
 * then a draw from a seeded xoshiro256** generator (llama.cpp's chain order).
 *
 * Cost per token: O(V) for penalties and the softmax, O(V log V) when top-k,
 * top-p or min-p needs the candidates sorted.
 */
#include "engine.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int32_t id;
    float logit;
    float p;
} cand_t;

struct eng_sampler {
    eng_sampler_params_t p;
    uint32_t n_vocab;
    cand_t *cand;
    int32_t *hist; /* ring of the last penalty_last_n tokens */
    uint32_t hist_n, hist_pos;
    uint32_t *count; /* occurrences in the window, per token */
    uint32_t *mark;  /* penalty pass stamp per token, so each is penalised once */
    uint32_t stamp;
    uint64_t rng[4];
};

void eng_sampler_params_default(eng_sampler_params_t *p) {
    memset(p, 0, sizeof(*p));
    p->temperature = 0.8f;
    p->top_k = 40;
    p->top_p = 0.95f;
    p->min_p = 0.05f;
    p->repetition_penalty = 1.0f;
    p->penalty_last_n = 64;
    p->seed = 0x5eed;
}

int eng_sampler_params_check(const eng_sampler_params_t *p, char *msg) {
    if (!(p->temperature >= 0 && p->temperature <= 100))
        return eng_fail(msg, ENG_EINVAL, "temperature must be between 0 and 100");
    if (!(p->top_p > 0 && p->top_p <= 1))
        return eng_fail(msg, ENG_EINVAL, "top_p must be in (0, 1]");
    if (!(p->min_p >= 0 && p->min_p <= 1))
        return eng_fail(msg, ENG_EINVAL, "min_p must be in [0, 1]");
    if (!(p->repetition_penalty > 0 && p->repetition_penalty <= 100))
        return eng_fail(msg, ENG_EINVAL, "repetition_penalty must be in (0, 100]");
    if (!(p->presence_penalty >= -2 && p->presence_penalty <= 2))
        return eng_fail(msg, ENG_EINVAL, "presence_penalty must be in [-2, 2]");
    if (!(p->frequency_penalty >= -2 && p->frequency_penalty <= 2))
        return eng_fail(msg, ENG_EINVAL, "frequency_penalty must be in [-2, 2]");
    if (p->penalty_last_n > (1u << 20))
        return eng_fail(msg, ENG_EINVAL, "penalty_last_n must be at most 1048576");
    return 0;
}

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t rotl(uint64_t x, int k) {
    return (x << k) | (x >> (64 - k));
}

static uint64_t next_u64(uint64_t *s) {
    uint64_t r = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return r;
}

int eng_sampler_create(eng_sampler_t **out, const eng_sampler_params_t *p, uint32_t n_vocab) {
    *out = NULL;
    eng_sampler_t *s = calloc(1, sizeof(*s));
    if (!s) return ENG_ENOMEM;
    s->p = *p;
    s->n_vocab = n_vocab;
    s->cand = malloc(sizeof(cand_t) * n_vocab);
    s->count = calloc(n_vocab, sizeof(uint32_t));
    s->mark = calloc(n_vocab, sizeof(uint32_t));
    s->hist = malloc(sizeof(int32_t) * (p->penalty_last_n ? p->penalty_last_n : 1));
    if (!s->cand || !s->count || !s->mark || !s->hist) {
        eng_sampler_free(s);
        return ENG_ENOMEM;
    }
    uint64_t x = p->seed;
    for (int i = 0; i < 4; i++) s->rng[i] = splitmix64(&x);
    *out = s;
    return 0;
}

void eng_sampler_free(eng_sampler_t *s) {
    if (!s) return;
    free(s->cand);
    free(s->count);
    free(s->mark);
    free(s->hist);
    free(s);
}

void eng_sampler_accept(eng_sampler_t *s, int32_t id) {
    uint32_t N = s->p.penalty_last_n;
    if (!N || id < 0 || (uint32_t)id >= s->n_vocab) return;
    if (s->hist_n == N) {
        s->count[s->hist[s->hist_pos]]--;
    } else {
        s->hist_n++;
    }
    s->hist[s->hist_pos] = id;
    s->count[id]++;
    s->hist_pos = (s->hist_pos + 1) % N;
}

static void apply_penalties(eng_sampler_t *s, float *logits) {
    const eng_sampler_params_t *p = &s->p;
    if (!s->hist_n ||
        (p->repetition_penalty == 1.0f && p->presence_penalty == 0 && p->frequency_penalty == 0))
        return;
    if (++s->stamp == 0) { /* wrapped: clear the stamps */
        memset(s->mark, 0, sizeof(uint32_t) * s->n_vocab);
        s->stamp = 1;
    }
    for (uint32_t i = 0; i < s->hist_n; i++) {
        int32_t id = s->hist[i];
        uint32_t c = s->count[id];
        if (s->mark[id] == s->stamp) continue;
        s->mark[id] = s->stamp;
        float l = logits[id];
        if (p->repetition_penalty != 1.0f)
            l = l <= 0 ? l * p->repetition_penalty : l / p->repetition_penalty;
        l -= (float)c * p->frequency_penalty + (c > 0 ? p->presence_penalty : 0.0f);
        logits[id] = l;
    }
}

static int cmp_desc(const void *a, const void *b) {
    float x = ((const cand_t *)a)->logit, y = ((const cand_t *)b)->logit;
    if (x > y) return -1;
    if (x < y) return 1;
    int32_t i = ((const cand_t *)a)->id, j = ((const cand_t *)b)->id;
    return (i > j) - (i < j);
}

/* Move the k best candidates (cmp_desc order) to c[0..k), unordered: quickselect, O(n) on
 * average, so a large vocabulary is not sorted for every token. */
static void select_top(cand_t *c, size_t n, size_t k) {
    if (k == 0 || k >= n) return;
    long lo = 0, hi = (long)n - 1, want = (long)k - 1;
    while (lo < hi) {
        cand_t pivot = c[lo + (hi - lo) / 2];
        long i = lo, j = hi;
        while (i <= j) {
            while (cmp_desc(&c[i], &pivot) < 0) i++;
            while (cmp_desc(&c[j], &pivot) > 0) j--;
            if (i <= j) {
                cand_t t = c[i];
                c[i++] = c[j];
                c[j--] = t;
            }
        }
        if (want <= j)
            hi = j;
        else if (want >= i)
            lo = i;
        else
            break;
    }
}

/* softmax over c[0..n) into .p (any order) */
static void softmax(cand_t *c, size_t n, float temp) {
    float mx = c[0].logit;
    for (size_t i = 1; i < n; i++) mx = c[i].logit > mx ? c[i].logit : mx;
    double sum = 0;
    for (size_t i = 0; i < n; i++) {
        c[i].p = expf((c[i].logit - mx) / temp);
        sum += c[i].p;
    }
    for (size_t i = 0; i < n; i++) c[i].p = (float)(c[i].p / sum);
}

/* The smallest descending prefix whose mass reaches top_p; c[0..result) ends up sorted. Only a
 * head of the candidates is sorted when that head already holds the mass. */
static size_t top_p_cut(cand_t *c, size_t n, float top_p) {
    softmax(c, n, 1.0f);
    size_t head = n;
    for (size_t h = 256; h < n; h *= 4) {
        select_top(c, n, h);
        double mass = 0;
        for (size_t i = 0; i < h; i++) mass += c[i].p;
        if (mass >= top_p) {
            head = h;
            break;
        }
    }
    qsort(c, head, sizeof(cand_t), cmp_desc);
    double cum = 0;
    for (size_t i = 0; i < head; i++) {
        cum += c[i].p;
        if (cum >= top_p) return i + 1;
    }
    return head;
}

int32_t eng_argmax(const float *x, uint32_t n) {
    int32_t best = -1;
    float bv = -INFINITY;
    for (uint32_t i = 0; i < n; i++) {
        float v = x[i];
        if (v != v || v == INFINITY) return -1;
        if (v > bv) bv = v, best = (int32_t)i;
    }
    return best;
}

int32_t eng_sampler_sample(eng_sampler_t *s, float *logits) {
    const eng_sampler_params_t *p = &s->p;
    uint32_t V = s->n_vocab;
    apply_penalties(s, logits);
    if (p->temperature <= 0) return eng_argmax(logits, V);
    size_t n = 0;
    float mx = -INFINITY;
    for (uint32_t i = 0; i < V; i++)
        if (logits[i] == logits[i] && logits[i] > -INFINITY) {
            s->cand[n++] = (cand_t){(int32_t)i, logits[i], 0};
            mx = logits[i] > mx ? logits[i] : mx;
        }
    if (!n) return -1; /* no finite logit */
    /* llama.cpp's order: top-k, top-p, min-p, then temperature */
    if (p->top_k > 0 && (size_t)p->top_k < n) {
        select_top(s->cand, n, (size_t)p->top_k);
        n = (size_t)p->top_k;
    }
    if (p->top_p < 1.0f) n = top_p_cut(s->cand, n, p->top_p);
    if (p->min_p > 0) {
        /* keep tokens whose probability is at least min_p times the top one's */
        float thresh = mx + logf(p->min_p);
        size_t keep = 0;
        for (size_t i = 0; i < n; i++)
            if (s->cand[i].logit >= thresh) s->cand[keep++] = s->cand[i];
        n = keep;
    }
    softmax(s->cand, n, p->temperature);
    double u = (double)(next_u64(s->rng) >> 11) * (1.0 / 9007199254740992.0);
    double cum = 0;
    for (size_t i = 0; i < n; i++) {
        cum += s->cand[i].p;
        if (u < cum) return s->cand[i].id;
    }
    return s->cand[n - 1].id;
}
