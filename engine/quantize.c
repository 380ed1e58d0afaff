/* quantize.c - float rows to GGUF's quantized types, and the tensor types a quantized model
 * mixes (llama.cpp's choices for its Q*_K_S/_M/_L files).
 *
 * The block layouts are the ones quant.c decodes. Legacy types take their scale (and minimum)
 * from the block's extremes; the K-quants fit each sub-block's scale (and minimum) by trying a
 * few scales around the extremes' and solving least squares for the levels each gives, then
 * quantize the sub-block scales against the super-block's F16 scale and round every element
 * once more against the scale it will be decoded with.
 */
#include "quant.h"
#include "../base/err.h"
#include "../base/f16.h"
#include "gguf.h"

#include <math.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#define QK 32
#define QK_K 256

static void wr_f16(uint8_t *p, float v) {
    uint16_t h = eng_f32_to_f16(v);
    p[0] = (uint8_t)h;
    p[1] = (uint8_t)(h >> 8);
}

static int clampi(int v, int lo, int hi) {
    return v < lo ? lo : v > hi ? hi : v;
}

/* the element of largest magnitude, with its sign (the first of equals) */
static float signed_max(const float *x, int n) {
    float m = 0, a = 0;
    for (int i = 0; i < n; i++)
        if (fabsf(x[i]) > a) a = fabsf(x[i]), m = x[i];
    return m;
}

/* ---- legacy types ---- */

/* Q4_0 / Q5_0: x = d * (q - half), the largest-magnitude element at level 0 */
static void q_sym_legacy(const float *x, uint8_t *b, int bits) {
    int half = 1 << (bits - 1), top = (1 << bits) - 1;
    float d = signed_max(x, QK) / (float)-half, id = d ? 1.0f / d : 0.0f;
    wr_f16(b, d);
    uint8_t *qs = b + (bits == 4 ? 2 : 6);
    uint32_t qh = 0;
    for (int j = 0; j < QK / 2; j++) {
        int lo = clampi((int)(x[j] * id + (float)half + 0.5f), 0, top);
        int hi = clampi((int)(x[j + QK / 2] * id + (float)half + 0.5f), 0, top);
        qs[j] = (uint8_t)((lo & 15) | (hi & 15) << 4);
        qh |= (uint32_t)(lo >> 4) << j | (uint32_t)(hi >> 4) << (j + QK / 2);
    }
    if (bits == 5) memcpy(b + 2, (uint8_t[4]){qh, qh >> 8, qh >> 16, qh >> 24}, 4);
}

/* Q4_1 / Q5_1: x = d * q + m over the block's range */
static void q_min_legacy(const float *x, uint8_t *b, int bits) {
    int top = (1 << bits) - 1;
    float lo = x[0], hi = x[0];
    for (int i = 1; i < QK; i++) lo = fminf(lo, x[i]), hi = fmaxf(hi, x[i]);
    float d = (hi - lo) / (float)top, id = d ? 1.0f / d : 0.0f;
    wr_f16(b, d);
    wr_f16(b + 2, lo);
    uint8_t *qs = b + (bits == 4 ? 4 : 8);
    uint32_t qh = 0;
    for (int j = 0; j < QK / 2; j++) {
        int a = clampi((int)((x[j] - lo) * id + 0.5f), 0, top);
        int c = clampi((int)((x[j + QK / 2] - lo) * id + 0.5f), 0, top);
        qs[j] = (uint8_t)((a & 15) | (c & 15) << 4);
        qh |= (uint32_t)(a >> 4) << j | (uint32_t)(c >> 4) << (j + QK / 2);
    }
    if (bits == 5) memcpy(b + 4, (uint8_t[4]){qh, qh >> 8, qh >> 16, qh >> 24}, 4);
}

static void q8_0(const float *x, uint8_t *b) {
    float amax = 0;
    for (int i = 0; i < QK; i++) amax = fmaxf(amax, fabsf(x[i]));
    float d = amax / 127.0f, id = d ? 1.0f / d : 0.0f;
    wr_f16(b, d);
    for (int i = 0; i < QK; i++) b[2 + i] = (uint8_t)(int8_t)roundf(x[i] * id);
}

static const int8_t kvalues[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                   1,    13,   25,  38,  53,  69,  89,  113};

static int nearest_kvalue(float v) {
    int best = 0;
    for (int k = 1; k < 16; k++)
        if (fabsf(v - kvalues[k]) < fabsf(v - kvalues[best])) best = k;
    return best;
}

/* IQ4_NL: x = d * kvalues[q]; d fitted by least squares over a few starting scales */
static void iq4_nl(const float *x, uint8_t *b) {
    float m = signed_max(x, QK), best_d = 0, best_err = INFINITY;
    for (int step = -4; step <= 4 && m != 0; step++) {
        float d0 = m / ((float)kvalues[0] + (float)step), num = 0, den = 0;
        for (int i = 0; i < QK; i++) {
            float k = kvalues[nearest_kvalue(x[i] / d0)];
            num += x[i] * k, den += k * k;
        }
        float d = den > 0 ? num / den : 0, err = 0;
        if (d == 0) continue;
        for (int i = 0; i < QK; i++) {
            float e = x[i] - d * kvalues[nearest_kvalue(x[i] / d)];
            err += e * e;
        }
        if (err < best_err) best_err = err, best_d = d;
    }
    float d = eng_f16_to_f32(eng_f32_to_f16(best_d));
    wr_f16(b, d);
    for (int j = 0; j < QK / 2; j++) {
        int lo = d ? nearest_kvalue(x[j] / d) : 8, hi = d ? nearest_kvalue(x[j + QK / 2] / d) : 8;
        b[2 + j] = (uint8_t)(lo | hi << 4);
    }
}

/* ---- K-quants ---- */

/* Fit x ~ s * q - mn over n elements, q in 0..nmax, mn >= 0; returns s (0 for a constant
 * block, which then decodes as -mn). */
static float fit_min(const float *x, int n, int nmax, float *mn) {
    float lo = x[0], hi = x[0];
    for (int i = 1; i < n; i++) lo = fminf(lo, x[i]), hi = fmaxf(hi, x[i]);
    if (lo > 0) lo = 0;
    *mn = -lo;
    if (hi == lo) return 0;
    float best_s = (hi - lo) / (float)nmax, best_o = lo, best_err = INFINITY;
    for (int step = -6; step <= 6; step++) {
        float is = ((float)nmax + 0.1f * (float)step) / (hi - lo);
        double sq = 0, sq2 = 0, sx = 0, sxq = 0;
        for (int i = 0; i < n; i++) {
            int q = clampi((int)nearbyintf((x[i] - lo) * is), 0, nmax);
            sq += q, sq2 += (double)q * q, sx += x[i], sxq += (double)x[i] * q;
        }
        double D = n * sq2 - sq * sq;
        if (D <= 0) continue;
        double s = (n * sxq - sq * sx) / D, o = (sx - s * sq) / n;
        if (o > 0) o = 0, s = sq2 > 0 ? sxq / sq2 : 0;
        if (s <= 0) continue;
        double err = 0;
        for (int i = 0; i < n; i++) {
            int q = clampi((int)nearbyint((x[i] - o) / s), 0, nmax);
            double e = x[i] - (s * q + o);
            err += e * e;
        }
        if (err < best_err) best_err = err, best_s = (float)s, best_o = (float)o;
    }
    *mn = -best_o;
    return best_s;
}

/* Fit x ~ s * q over n elements, q in -nneg..npos; s carries the sign that puts the
 * largest-magnitude element at -nneg. */
static float fit_sym(const float *x, int n, int nneg, int npos) {
    float m = signed_max(x, n), best_s = 0, best_err = INFINITY;
    if (m == 0) return 0;
    for (int step = -6; step <= 6; step++) {
        float is = -((float)nneg + 0.1f * (float)step) / m;
        double sq2 = 0, sxq = 0;
        for (int i = 0; i < n; i++) {
            int q = clampi((int)nearbyintf(x[i] * is), -nneg, npos);
            sq2 += (double)q * q, sxq += (double)x[i] * q;
        }
        if (sq2 <= 0) continue;
        double s = sxq / sq2, err = 0;
        for (int i = 0; i < n; i++) {
            int q = clampi((int)nearbyint(x[i] / s), -nneg, npos);
            double e = x[i] - s * q;
            err += e * e;
        }
        if (err < best_err) best_err = err, best_s = (float)s;
    }
    return best_s;
}

/* A super-block scale for sub-block scales s[0..n): d = the largest / top, F16-rounded; each
 * sub-block's integer scale in 0..top (or, signed, -top-1..top with the largest at -top-1). */
static float super_scale(const float *s, int n, int top, bool is_signed, int *out) {
    float m = is_signed ? signed_max(s, n) : 0;
    if (!is_signed)
        for (int i = 0; i < n; i++) m = fmaxf(m, s[i]);
    float d = eng_f16_to_f32(eng_f32_to_f16(is_signed ? m / (float)-(top + 1) : m / (float)top));
    for (int i = 0; i < n; i++)
        out[i] = d ? clampi((int)nearbyintf(s[i] / d), is_signed ? -top - 1 : 0, top) : 0;
    return d;
}

/* Levels of n elements against decoded scale dl and min ml: q = round((x + ml) / dl). */
static void levels(const float *x, int n, float dl, float ml, int lo, int hi, int *q) {
    for (int i = 0; i < n; i++) q[i] = dl ? clampi((int)nearbyintf((x[i] + ml) / dl), lo, hi) : 0;
}

/* Q2_K / Q4_K / Q5_K: n_sub sub-blocks with a scale and a min each. */
static void fit_k_min(const float *x, int n_sub, int nmax, int stop, float *d, float *dmin, int *sc,
                      int *mn, int *q) {
    int sub = QK_K / n_sub;
    float s[16] = {0}, m[16] = {0};
    for (int j = 0; j < n_sub; j++) s[j] = fit_min(x + j * sub, sub, nmax, &m[j]);
    *d = super_scale(s, n_sub, stop, false, sc);
    *dmin = super_scale(m, n_sub, stop, false, mn);
    for (int j = 0; j < n_sub; j++)
        levels(x + j * sub, sub, *d * (float)sc[j], *dmin * (float)mn[j], 0, nmax, q + j * sub);
}

static void q2_k(const float *x, uint8_t *b) {
    int sc[16], mn[16], q[QK_K];
    float d, dmin;
    fit_k_min(x, 16, 3, 15, &d, &dmin, sc, mn, q);
    memset(b, 0, 84);
    for (int j = 0; j < 16; j++) b[j] = (uint8_t)(sc[j] | mn[j] << 4);
    for (int i = 0; i < QK_K; i++)
        b[16 + (i / 128) * 32 + i % 32] |= (uint8_t)(q[i] << (2 * ((i % 128) / 32)));
    wr_f16(b + 80, d);
    wr_f16(b + 82, dmin);
}

/* the 12 scale bytes of Q4_K and Q5_K (quant.c's k_scale_min, inverted) */
static void pack_k_scales(uint8_t *s, const int *sc, const int *mn) {
    memset(s, 0, 12);
    for (int j = 0; j < 8; j++) {
        if (j < 4) {
            s[j] |= (uint8_t)(sc[j] & 63);
            s[j + 4] |= (uint8_t)(mn[j] & 63);
        } else {
            s[j + 4] = (uint8_t)((sc[j] & 15) | (mn[j] & 15) << 4);
            s[j - 4] |= (uint8_t)((sc[j] >> 4) << 6);
            s[j] |= (uint8_t)((mn[j] >> 4) << 6);
        }
    }
}

static void q45_k(const float *x, uint8_t *b, int bits) {
    int sc[8], mn[8], q[QK_K];
    float d, dmin;
    fit_k_min(x, 8, (1 << bits) - 1, 63, &d, &dmin, sc, mn, q);
    memset(b, 0, bits == 4 ? 144 : 176);
    wr_f16(b, d);
    wr_f16(b + 2, dmin);
    pack_k_scales(b + 4, sc, mn);
    uint8_t *qs = b + (bits == 4 ? 16 : 48), *qh = b + 16;
    for (int i = 0; i < QK_K; i++) {
        int sub = i / 32, l = i % 32;
        qs[(sub / 2) * 32 + l] |= (uint8_t)((q[i] & 15) << (4 * (sub % 2)));
        if (bits == 5) qh[l] |= (uint8_t)((q[i] >> 4) << sub);
    }
}

/* Q3_K / Q6_K: 16 sub-blocks of 16 with signed scales. */
static float fit_k_sym(const float *x, int nneg, int npos, int stop, int *sc, int *q) {
    float s[16] = {0};
    for (int j = 0; j < 16; j++) s[j] = fit_sym(x + j * 16, 16, nneg, npos);
    float d = super_scale(s, 16, stop, true, sc);
    for (int j = 0; j < 16; j++)
        levels(x + j * 16, 16, d * (float)sc[j], 0, -nneg, npos, q + j * 16);
    return d;
}

static void q3_k(const float *x, uint8_t *b) {
    int sc[16], q[QK_K];
    float d = fit_k_sym(x, 4, 3, 31, sc, q);
    memset(b, 0, 110);
    uint8_t *hmask = b, *qs = b + 32, *s = b + 96;
    for (int j = 0; j < 16; j++) {
        int v = sc[j] + 32;
        s[j % 8] |= (uint8_t)((v & 15) << (j < 8 ? 0 : 4));
        s[8 + j % 4] |= (uint8_t)((v >> 4) << (2 * (j / 4)));
    }
    for (int i = 0; i < QK_K; i++) {
        int u = q[i] + 4;
        qs[(i / 128) * 32 + i % 32] |= (uint8_t)((u & 3) << (2 * ((i % 128) / 32)));
        if (u & 4) hmask[i % 32] |= (uint8_t)(1 << (i / 32));
    }
    wr_f16(b + 108, d);
}

static void q6_k(const float *x, uint8_t *b) {
    int sc[16], q[QK_K];
    float d = fit_k_sym(x, 32, 31, 127, sc, q);
    memset(b, 0, 210);
    uint8_t *ql = b, *qh = b + 128;
    for (int i = 0; i < QK_K; i++) {
        int u = q[i] + 32, half = i / 128, r = i % 128;
        ql[half * 64 + r % 64] |= (uint8_t)((u & 15) << (4 * (r / 64)));
        qh[half * 32 + r % 32] |= (uint8_t)((u >> 4) << (2 * (r / 32)));
    }
    for (int j = 0; j < 16; j++) b[192 + j] = (uint8_t)(int8_t)sc[j];
    wr_f16(b + 208, d);
}

int eng_q_quantize_row(uint32_t type, const float *x, void *dst, size_t n) {
    size_t be = eng_q_block_elems(type), bb = eng_q_block_bytes(type);
    if (!be || type == GGML_IQ4_XS) return ENG_EUNSUPPORTED;
    if (n % be) return ENG_EINVAL;
    uint8_t *o = dst;
    for (size_t k = 0; k < n / be; k++, x += be, o += bb) {
        switch (type) {
        case GGML_F32:
            memcpy(o, x, 4);
            break;
        case GGML_F16:
            wr_f16(o, *x);
            break;
        case GGML_BF16: {
            uint16_t h = eng_f32_to_bf16(*x);
            o[0] = (uint8_t)h, o[1] = (uint8_t)(h >> 8);
            break;
        }
        case GGML_Q4_0:
            q_sym_legacy(x, o, 4);
            break;
        case GGML_Q5_0:
            q_sym_legacy(x, o, 5);
            break;
        case GGML_Q4_1:
            q_min_legacy(x, o, 4);
            break;
        case GGML_Q5_1:
            q_min_legacy(x, o, 5);
            break;
        case GGML_Q8_0:
            q8_0(x, o);
            break;
        case GGML_IQ4_NL:
            iq4_nl(x, o);
            break;
        case GGML_Q2_K:
            q2_k(x, o);
            break;
        case GGML_Q3_K:
            q3_k(x, o);
            break;
        case GGML_Q4_K:
            q45_k(x, o, 4);
            break;
        case GGML_Q5_K:
            q45_k(x, o, 5);
            break;
        case GGML_Q6_K:
            q6_k(x, o);
            break;
        default:
            return ENG_EUNSUPPORTED;
        }
    }
    return 0;
}

/* ---- the mixtures ---- */

static const eng_qmix_t mixes[] = {
    {"F32", 0, GGML_F32},      {"F16", 1, GGML_F16},      {"BF16", 32, GGML_BF16},
    {"Q4_0", 2, GGML_Q4_0},    {"Q4_1", 3, GGML_Q4_1},    {"Q5_0", 8, GGML_Q5_0},
    {"Q5_1", 9, GGML_Q5_1},    {"Q8_0", 7, GGML_Q8_0},    {"Q2_K", 10, GGML_Q2_K},
    {"Q3_K_S", 11, GGML_Q3_K}, {"Q3_K_M", 12, GGML_Q3_K}, {"Q3_K_L", 13, GGML_Q3_K},
    {"Q4_K_S", 14, GGML_Q4_K}, {"Q4_K_M", 15, GGML_Q4_K}, {"Q5_K_S", 16, GGML_Q5_K},
    {"Q5_K_M", 17, GGML_Q5_K}, {"Q6_K", 18, GGML_Q6_K},   {"IQ4_NL", 25, GGML_IQ4_NL},
    {"Q3_K", 12, GGML_Q3_K},   {"Q4_K", 15, GGML_Q4_K},   {"Q5_K", 17, GGML_Q5_K},
};

const eng_qmix_t *eng_q_mix(const char *name) {
    for (size_t i = 0; i < sizeof(mixes) / sizeof(mixes[0]); i++)
        if (strcasecmp(mixes[i].name, name) == 0) return &mixes[i];
    return NULL;
}

const char *eng_q_mix_names(void) {
    return "F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K_S Q3_K_M Q3_K_L Q4_K_S Q4_K_M Q5_K_S "
           "Q5_K_M Q6_K IQ4_NL (Q3_K, Q4_K, Q5_K: the _M mixtures)";
}

/* llama.cpp's layers that get more bits: the first and last eighth and every third between */
static bool more_bits(uint32_t i, uint32_t n) {
    return i < n / 8 || i >= 7 * n / 8 || (int)(i - n / 8) % 3 == 2;
}

static bool ends_with(const char *s, const char *tail) {
    size_t a = strlen(s), b = strlen(tail);
    return a >= b && strcmp(s + a - b, tail) == 0;
}

/* a quantized type whose blocks do not tile the rows falls back to a 32-wide type, and past
 * that to F16 */
static uint32_t fallback(uint32_t t, uint64_t ncols) {
    if (ncols % eng_q_block_elems(t) == 0) return t;
    switch (t) {
    case GGML_Q2_K:
    case GGML_Q3_K:
        t = GGML_Q4_0;
        break;
    case GGML_Q4_K:
        t = GGML_Q5_0;
        break;
    case GGML_Q5_K:
        t = GGML_Q5_1;
        break;
    case GGML_Q6_K:
        t = GGML_Q8_0;
        break;
    default:
        break;
    }
    return ncols % eng_q_block_elems(t) == 0 ? t : GGML_F16;
}

uint32_t eng_q_mix_type(const eng_qmix_t *mix, const eng_qmix_tensor_t *t) {
    uint32_t base = mix->base, ft = mix->ftype;
    /* norms, biases, 1-D tensors and float mixtures: as they are (F32 rows stay F32) */
    if (t->n_dims < 2 || !ends_with(t->name, "weight") || strstr(t->name, "_norm.weight"))
        return t->type;
    if (base == GGML_F32 || base == GGML_F16 || base == GGML_BF16) return base;
    uint32_t nt = base, i = t->layer, n = t->n_layer;
    if (!strcmp(t->name, "output.weight") || (t->tied && !strcmp(t->name, "token_embd.weight"))) {
        /* the output projection: Q6_K (Q8_0 when rows do not tile its blocks or the mixture
         * is Q8_0 already) */
        nt = t->ncols % eng_q_block_elems(base) ? GGML_Q8_0 : base == GGML_Q8_0 ? base : GGML_Q6_K;
    } else if (ends_with(t->name, "attn_v.weight")) {
        if (ft == 10)
            nt = t->n_gqa >= 4 ? GGML_Q4_K : GGML_Q3_K;
        else if (ft == 12)
            nt = i < 2 ? GGML_Q5_K : GGML_Q4_K;
        else if (ft == 13)
            nt = GGML_Q5_K;
        else if ((ft == 15 || ft == 17) && more_bits(i, n))
            nt = GGML_Q6_K;
        else if (ft == 14 && i < 4)
            nt = GGML_Q5_K;
    } else if (ends_with(t->name, "ffn_down.weight")) {
        if (ft == 10)
            nt = GGML_Q3_K;
        else if (ft == 12)
            nt = i < n / 16 ? GGML_Q5_K : GGML_Q4_K;
        else if (ft == 13)
            nt = GGML_Q5_K;
        else if ((ft == 15 || ft == 17) && more_bits(i, n))
            nt = GGML_Q6_K;
        else if (ft == 14 && i < n / 8)
            nt = GGML_Q5_K;
    } else if (ends_with(t->name, "attn_output.weight")) {
        if (ft == 10)
            nt = GGML_Q3_K;
        else if (ft == 12)
            nt = GGML_Q4_K;
        else if (ft == 13)
            nt = GGML_Q5_K;
    }
    return fallback(nt, t->ncols);
}
