/* qdot.c - activation quantizers, the scalar integer dot kernels, and the run-time choice of
 * the vector ones (qdot_x86.inc, compiled once per instruction set).
 *
 * Weight block layouts are documented in engine/quant.c. The scalar kernels are written to
 * read like those layouts: unpack each element's unsigned code, multiply by the activation,
 * sum in integers per (sub-)block, then scale in float.
 */
#include "qdot.h"
#include "../quant.h"
#include "../../base/f16.h"
#include "../gguf.h"

#include <cpuid.h>
#include <math.h>
#include <stdbool.h>
#include <string.h>

static float rd_f16(const uint8_t *p) {
    return eng_f16_to_f32((uint16_t)(p[0] | (p[1] << 8)));
}
static uint32_t rd_u32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static float f16_round(float x) {
    return eng_f16_to_f32(eng_f32_to_f16(x));
}

static const int8_t iq4_levels[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                      1,    13,   25,  38,  53,  69,  89,  113};

/* ---- activations ---- */

/* As llama.cpp quantizes a matmul's input (its Q8_0 and Q8_1 blocks), rounding for rounding:
 * codes round(x * 127 / amax) with ties to even, d = amax / 127 stored as f16, and for Q8_1
 * s = d * sum stored as f16. The model's logits move by tenths under a different rounding of
 * the activations, so matching it matters for token-for-token parity. */
/* nearbyintf for |x| < 2^22 in the default rounding mode (round half to even), inline: adding
 * 1.5 * 2^23 leaves no fraction bits, so the addition itself rounds (the base x86-64 target has
 * no round instruction, and nearbyintf is a libm call per element) */
static inline int round_even(float x) {
    const float c = 12582912.0f; /* IEEE arithmetic: (x + c) - c is not folded without fast-math */
    return (int)((x + c) - c);
}

static void quantize_a32(const float *x, qdot_a32_t *out, size_t n) {
    for (size_t b = 0; b < n / QDOT_A32; b++) {
        const float *v = x + b * QDOT_A32;
        float amax = 0;
        for (int i = 0; i < QDOT_A32; i++) amax = fmaxf(amax, fabsf(v[i]));
        float d = amax / 127.0f, id = amax != 0 ? 127.0f / amax : 0.0f;
        int32_t sum = 0;
        for (int i = 0; i < QDOT_A32; i++) {
            int q = round_even(v[i] * id);
            out[b].q[i] = (int8_t)q;
            sum += q;
        }
        out[b].d = f16_round(d);
        out[b].s = f16_round(d * (float)sum);
        out[b].sum = sum;
        out[b].pad = 0;
    }
}

/* Scaled so that the element of largest magnitude maps to -127 exactly (its sign folded
 * into d), as llama.cpp's Q8_K does. */
static void quantize_ak(const float *x, qdot_ak_t *out, size_t n) {
    for (size_t b = 0; b < n / QDOT_AK; b++) {
        const float *v = x + b * QDOT_AK;
        float amax = 0, max = 0;
        for (int i = 0; i < QDOT_AK; i++)
            if (fabsf(v[i]) > amax) amax = fabsf(v[i]), max = v[i];
        if (amax == 0) {
            memset(&out[b], 0, sizeof(out[b]));
            continue;
        }
        float iscale = -127.0f / max;
        for (int i = 0; i < QDOT_AK; i++) {
            int q = round_even(iscale * v[i]);
            out[b].q[i] = (int8_t)(q > 127 ? 127 : q);
        }
        for (int g = 0; g < QDOT_AK / 16; g++) {
            int s = 0;
            for (int i = 0; i < 16; i++) s += out[b].q[g * 16 + i];
            out[b].bsums[g] = (int16_t)s;
        }
        out[b].d = 1.0f / iscale;
    }
}

size_t qdot_act_bytes(qdot_act_t act, size_t n) {
    if (act == QDOT_ACT_32) return n / QDOT_A32 * sizeof(qdot_a32_t);
    if (act == QDOT_ACT_K) return n / QDOT_AK * sizeof(qdot_ak_t);
    return 0;
}

void qdot_quantize(qdot_act_t act, const float *x, void *out, size_t n) {
    if (act == QDOT_ACT_32) quantize_a32(x, out, n);
    if (act == QDOT_ACT_K) quantize_ak(x, out, n);
}

/* ---- scalar kernels: legacy types against qdot_a32_t ---- */

/* sum over n elements of code[i] * y[i] */
static int32_t dot_codes(const uint8_t *code, const int8_t *y, int n) {
    int32_t s = 0;
    for (int i = 0; i < n; i++) s += (int32_t)code[i] * y[i];
    return s;
}

/* the 32 4-bit codes of a legacy block: element j in qs[j]'s low nibble, j + 16 its high */
static void nibbles32(const uint8_t *qs, uint8_t *code) {
    for (int j = 0; j < 16; j++) code[j] = qs[j] & 0x0f, code[j + 16] = qs[j] >> 4;
}

/* One legacy block (engine/quant.c's layouts) as the integer values its elements scale:
 * x = d * v (+ m for the types with a minimum, 0 for the others). */
static void legacy_values(uint32_t type, const uint8_t *b, int16_t *v, float *d, float *m) {
    uint8_t code[32];
    *d = rd_f16(b);
    *m = 0;
    switch (type) {
    case GGML_Q4_0:
        nibbles32(b + 2, code);
        for (int j = 0; j < 32; j++) v[j] = (int16_t)(code[j] - 8);
        break;
    case GGML_Q4_1:
        *m = rd_f16(b + 2);
        nibbles32(b + 4, code);
        for (int j = 0; j < 32; j++) v[j] = code[j];
        break;
    case GGML_Q5_0:
    case GGML_Q5_1: {
        bool q51 = type == GGML_Q5_1;
        if (q51) *m = rd_f16(b + 2);
        uint32_t qh = rd_u32(b + (q51 ? 4 : 2));
        nibbles32(b + (q51 ? 8 : 6), code);
        for (int j = 0; j < 32; j++)
            v[j] = (int16_t)((code[j] | ((qh >> j) & 1) << 4) - (q51 ? 0 : 16));
        break;
    }
    case GGML_Q8_0:
        for (int j = 0; j < 32; j++) v[j] = (int8_t)b[2 + j];
        break;
    default: /* IQ4_NL */
        nibbles32(b + 2, code);
        for (int j = 0; j < 32; j++) v[j] = iq4_levels[code[j]];
        break;
    }
}

static float dot_legacy_scalar(uint32_t type, size_t bbytes, const void *w, const void *xq,
                               size_t n) {
    const uint8_t *b = w;
    const qdot_a32_t *y = xq;
    float acc = 0;
    for (size_t i = 0; i < n / 32; i++, b += bbytes) {
        int16_t v[32];
        float d, m;
        legacy_values(type, b, v, &d, &m);
        int32_t s = 0;
        for (int j = 0; j < 32; j++) s += (int32_t)v[j] * y[i].q[j];
        if (m != 0)
            acc += (float)s * (d * y[i].d) + m * y[i].s;
        else
            acc += (float)s * (d * y[i].d);
    }
    return acc;
}

#define LEGACY_SCALAR(name, TYPE, BYTES)                                                           \
    static float name(const void *w, const void *xq, size_t n) {                                   \
        return dot_legacy_scalar(TYPE, BYTES, w, xq, n);                                           \
    }
LEGACY_SCALAR(dot_q4_0_scalar, GGML_Q4_0, 18)
LEGACY_SCALAR(dot_q4_1_scalar, GGML_Q4_1, 20)
LEGACY_SCALAR(dot_q5_0_scalar, GGML_Q5_0, 22)
LEGACY_SCALAR(dot_q5_1_scalar, GGML_Q5_1, 24)
LEGACY_SCALAR(dot_q8_0_scalar, GGML_Q8_0, 34)
LEGACY_SCALAR(dot_iq4_nl_scalar, GGML_IQ4_NL, 18)
#undef LEGACY_SCALAR

/* ---- scalar kernels: K-quants against qdot_ak_t ---- */

/* Q4_K / Q5_K scales: eight 6-bit scales and mins in 12 bytes (engine/quant.c). */
static inline void k_scales(const uint8_t *s, uint8_t *sc, uint8_t *mn) {
    for (int j = 0; j < 8; j++) {
        if (j < 4) {
            sc[j] = s[j] & 63, mn[j] = s[j + 4] & 63;
        } else {
            sc[j] = (uint8_t)((s[j + 4] & 0x0f) | (s[j - 4] >> 6) << 4);
            mn[j] = (uint8_t)((s[j + 4] >> 4) | (s[j] >> 6) << 4);
        }
    }
}

/* The 256 codes of a Q4_K/Q5_K super-block: sub-block j's element l is nibble j % 2 of
 * qs[(j / 2) * 32 + l], plus bit j of qh[l] as the fifth bit when qh is given. */
static void k_codes(const uint8_t *qs, const uint8_t *qh, uint8_t *code) {
    for (int j = 0; j < 8; j++)
        for (int l = 0; l < 32; l++) {
            uint8_t c = (qs[(j / 2) * 32 + l] >> (4 * (j % 2))) & 0x0f;
            if (qh) c |= (uint8_t)(((qh[l] >> j) & 1) << 4);
            code[j * 32 + l] = c;
        }
}

static float dot_q45_k_scalar(const uint8_t *b, const qdot_ak_t *y, const uint8_t *qh,
                              const uint8_t *qs) {
    uint8_t sc[8], mn[8], code[256];
    k_scales(b + 4, sc, mn);
    k_codes(qs, qh, code);
    int32_t s = 0, m = 0;
    for (int j = 0; j < 8; j++) {
        s += sc[j] * dot_codes(code + j * 32, y->q + j * 32, 32);
        m += mn[j] * (y->bsums[2 * j] + y->bsums[2 * j + 1]);
    }
    return y->d * (rd_f16(b) * (float)s - rd_f16(b + 2) * (float)m);
}

static float dot_q4_k_scalar(const void *w, const void *xq, size_t n) {
    const uint8_t *b = w;
    const qdot_ak_t *y = xq;
    float acc = 0;
    for (size_t i = 0; i < n / 256; i++, b += 144) acc += dot_q45_k_scalar(b, &y[i], NULL, b + 16);
    return acc;
}

static float dot_q5_k_scalar(const void *w, const void *xq, size_t n) {
    const uint8_t *b = w;
    const qdot_ak_t *y = xq;
    float acc = 0;
    for (size_t i = 0; i < n / 256; i++, b += 176)
        acc += dot_q45_k_scalar(b, &y[i], b + 16, b + 48);
    return acc;
}

/* Q6_K codes 0..63 (the value is code - 32), element i of the super-block. */
static void q6_codes(const uint8_t *ql, const uint8_t *qh, uint8_t *code) {
    for (int i = 0; i < 256; i++) {
        int half = i / 128, r = i % 128;
        int lo = (ql[half * 64 + r % 64] >> (4 * (r / 64))) & 0x0f;
        int hi = (qh[half * 32 + r % 32] >> (2 * (r / 32))) & 3;
        code[i] = (uint8_t)(lo | hi << 4);
    }
}

/* sum over the sixteen 16-element groups of scale * (code . y - off * sum y): Q6_K's and
 * Q3_K's values are their codes less a fixed offset (32, 4) */
static int32_t dot16_scaled(const uint8_t *code, const int8_t *sc, const qdot_ak_t *y, int off) {
    int32_t s = 0;
    for (int g = 0; g < 16; g++)
        s += sc[g] * (dot_codes(code + g * 16, y->q + g * 16, 16) - off * y->bsums[g]);
    return s;
}

static float dot_q6_k_scalar(const void *w, const void *xq, size_t n) {
    const uint8_t *b = w;
    const qdot_ak_t *y = xq;
    float acc = 0;
    for (size_t i = 0; i < n / 256; i++, b += 210) {
        uint8_t code[256];
        q6_codes(b, b + 128, code);
        int32_t s = dot16_scaled(code, (const int8_t *)(b + 192), &y[i], 32);
        acc += (rd_f16(b + 208) * y[i].d) * (float)s;
    }
    return acc;
}

/* Q3_K: codes 0..7 (value code - 4), sixteen signed 6-bit scales. */
static void q3_codes(const uint8_t *hmask, const uint8_t *qs, uint8_t *code) {
    for (int i = 0; i < 256; i++) {
        int half = i / 128, shift = 2 * ((i % 128) / 32), l = i % 32;
        int low2 = (qs[half * 32 + l] >> shift) & 3;
        code[i] = (uint8_t)(low2 | ((hmask[l] >> (i / 32)) & 1) << 2);
    }
}

static void q3_scales(const uint8_t *sc, int8_t *out) {
    for (int j = 0; j < 16; j++) {
        int lo = (j < 8 ? sc[j] : sc[j - 8] >> 4) & 0x0f;
        int hi = (sc[8 + j % 4] >> (2 * (j / 4))) & 3;
        out[j] = (int8_t)((lo | hi << 4) - 32);
    }
}

static float dot_q3_k_scalar(const void *w, const void *xq, size_t n) {
    const uint8_t *b = w;
    const qdot_ak_t *y = xq;
    float acc = 0;
    for (size_t i = 0; i < n / 256; i++, b += 110) {
        uint8_t code[256];
        int8_t sc[16];
        q3_codes(b, b + 32, code);
        q3_scales(b + 96, sc);
        int32_t s = dot16_scaled(code, sc, &y[i], 4);
        acc += (rd_f16(b + 108) * y[i].d) * (float)s;
    }
    return acc;
}

/* Q2_K: codes 0..3, per-16 4-bit scale (low nibble) and min (high nibble). */
static float dot_q2_k_scalar(const void *w, const void *xq, size_t n) {
    const uint8_t *b = w;
    const qdot_ak_t *y = xq;
    float acc = 0;
    for (size_t i = 0; i < n / 256; i++, b += 84) {
        uint8_t code[256];
        for (int e = 0; e < 256; e++) {
            int half = e / 128, shift = 2 * ((e % 128) / 32), l = e % 32;
            code[e] = (b[16 + half * 32 + l] >> shift) & 3;
        }
        int32_t s = 0, m = 0;
        for (int g = 0; g < 16; g++) {
            s += (b[g] & 0x0f) * dot_codes(code + g * 16, y[i].q + g * 16, 16);
            m += (b[g] >> 4) * y[i].bsums[g];
        }
        acc += y[i].d * (rd_f16(b + 80) * (float)s - rd_f16(b + 82) * (float)m);
    }
    return acc;
}

static float dot_iq4_xs_scalar(const void *w, const void *xq, size_t n) {
    const uint8_t *b = w;
    const qdot_ak_t *y = xq;
    float acc = 0;
    for (size_t i = 0; i < n / 256; i++, b += 136) {
        unsigned sh = (unsigned)(b[2] | (b[3] << 8));
        int32_t s = 0;
        for (int j = 0; j < 8; j++) {
            int ls = (((b[4 + j / 2] >> (4 * (j % 2))) & 0x0f) | ((sh >> (2 * j)) & 3) << 4) - 32;
            uint8_t code[32];
            nibbles32(b + 8 + j * 16, code);
            int32_t sj = 0;
            for (int l = 0; l < 32; l++) sj += iq4_levels[code[l]] * y[i].q[j * 32 + l];
            s += ls * sj;
        }
        acc += (rd_f16(b) * y[i].d) * (float)s;
    }
    return acc;
}

/* One super-block of eight rows: the f16 factors as floats, each row's 6-bit scales by
 * sub-block, its minimums in pairs of sub-blocks (the lanes of a dpwssd against pairs of
 * activation sums), and the codes: byte ((k * 4 + g) * 8 + r) * 8 + e holds element
 * 64k + 8g + e of row r in its low nibble and element 64k + 32 + 8g + e in its high one. */
typedef struct {
    float d[8], dmin[8];
    uint8_t sc[8][8];       /* [sub-block][row] */
    uint8_t mn[4][8][2];    /* [sub-block pair][row][which of the pair] */
    uint8_t qs[4][4][8][8]; /* [pair k][group g][row][element] */
} qx8_q4_k_t;

/* Q6_K's eight-row group: the codes as bytes (0-63; the 6-bit codes unpacked once at load,
 * about a third more memory than the file's, and no unpacking per step), byte (z * 8 + r) * 8
 * + e holding element 8z + e of row r; the per-16 scales in pairs ([pair][row][which]). */
typedef struct {
    float d[8];
    int8_t sc[8][8][2];
    uint8_t q[32][8][8];
} qx8_q6_k_t;

/* The legacy types' eight-row group, per 32-element block: the rows' d and minimum (0 for the
 * types without one) as floats and unsigned codes, x = d * (code - off) + m, byte
 * (g * 8 + r) * 8 + e holding element 8g + e of row r. Q4_0 and Q4_1 keep nibbles (byte
 * (h * 8 + r) * 8 + e: element 8h + e low, 8h + 16 + e high); the others whole bytes, Q8_0 and
 * IQ4_NL's signed values offset by 128 so that dpbusd's unsigned side takes them. */
typedef struct {
    float d[8], m[8];
    uint8_t q[4][8][8];
} qx8_l8_t;
typedef struct {
    float d[8], m[8];
    uint8_t q[2][8][8];
} qx8_l4_t;

/* ---- vector kernels ---- */

#define QDOT_X86_AVX2
#include "qdot_x86.inc"
#undef QDOT_X86_AVX2
#define QDOT_X86_VNNI512
#include "qdot_x86.inc"
#undef QDOT_X86_VNNI512
#define QDOT_X86_AVXVNNI
#include "qdot_x86.inc"
#undef QDOT_X86_AVXVNNI

/* ---- Q4_K, eight rows interleaved ---- */

static bool x8_nibbles(uint32_t t) {
    return t == GGML_Q4_0 || t == GGML_Q4_1;
}

size_t qdot_x8_group_bytes(uint32_t t, size_t n) {
    if (!qdot_kernel_x8(t)) return 0;
    if (t == GGML_Q4_K || t == GGML_Q6_K)
        return n % 256 ? 0 : (t == GGML_Q6_K ? sizeof(qx8_q6_k_t) : sizeof(qx8_q4_k_t)) * (n / 256);
    return n % 32 ? 0 : (x8_nibbles(t) ? sizeof(qx8_l4_t) : sizeof(qx8_l8_t)) * (n / 32);
}

/* A legacy block's codes as the group stores them (see qx8_l8_t), its d and minimum. */
static void legacy_codes(uint32_t t, const uint8_t *b, uint8_t code[32], float *d, float *m) {
    *d = rd_f16(b);
    *m = t == GGML_Q4_1 || t == GGML_Q5_1 ? rd_f16(b + 2) : 0.0f;
    uint32_t qh = 0;
    const uint8_t *qs = b + 2;
    if (t == GGML_Q4_1) qs = b + 4;
    if (t == GGML_Q5_0) memcpy(&qh, b + 2, 4), qs = b + 6;
    if (t == GGML_Q5_1) memcpy(&qh, b + 4, 4), qs = b + 8;
    for (int l = 0; l < 32; l++) {
        int nib = l < 16 ? qs[l] & 0x0f : qs[l - 16] >> 4;
        if (t == GGML_Q8_0)
            code[l] = (uint8_t)(qs[l] ^ 0x80);
        else if (t == GGML_IQ4_NL)
            code[l] = (uint8_t)(iq4_levels[nib] + 128);
        else
            code[l] = (uint8_t)(nib | ((qh >> l) & 1) << 4);
    }
}

static void pack_legacy(uint32_t t, const void *rows, size_t row_bytes, size_t n, void *group) {
    size_t bb = eng_q_block_bytes(t);
    for (size_t i = 0; i < n / 32; i++)
        for (int r = 0; r < 8; r++) {
            uint8_t code[32];
            float d, m;
            legacy_codes(t, (const uint8_t *)rows + r * row_bytes + i * bb, code, &d, &m);
            if (x8_nibbles(t)) {
                qx8_l4_t *o = (qx8_l4_t *)group + i;
                o->d[r] = d, o->m[r] = m;
                for (int h = 0; h < 2; h++)
                    for (int e = 0; e < 8; e++)
                        o->q[h][r][e] = (uint8_t)(code[8 * h + e] | code[8 * h + 16 + e] << 4);
            } else {
                qx8_l8_t *o = (qx8_l8_t *)group + i;
                o->d[r] = d, o->m[r] = m;
                for (int e = 0; e < 32; e++) o->q[e / 8][r][e % 8] = code[e];
            }
        }
}

/* element e's 6-bit code in a Q6_K block */
static int q6_code(const uint8_t *b, int e) {
    int h = e / 128, l = e % 128, g = l / 32, i = l % 32;
    int lo = (b[64 * h + 32 * (g % 2) + i] >> (4 * (g / 2))) & 0x0f;
    return lo | ((b[128 + 32 * h + i] >> (2 * g)) & 3) << 4;
}

static void pack_q6_k(const void *rows, size_t row_bytes, size_t n, qx8_q6_k_t *out) {
    for (size_t i = 0; i < n / 256; i++, out++)
        for (int r = 0; r < 8; r++) {
            const uint8_t *b = (const uint8_t *)rows + r * row_bytes + i * 210;
            out->d[r] = rd_f16(b + 208);
            for (int m = 0; m < 16; m++) out->sc[m / 2][r][m % 2] = (int8_t)b[192 + m];
            for (int e = 0; e < 256; e++) out->q[e / 8][r][e % 8] = (uint8_t)q6_code(b, e);
        }
}

void qdot_x8_pack(uint32_t t, const void *rows, size_t row_bytes, size_t n, void *group) {
    if (t != GGML_Q4_K && t != GGML_Q6_K) {
        pack_legacy(t, rows, row_bytes, n, group);
        return;
    }
    if (t == GGML_Q6_K) {
        pack_q6_k(rows, row_bytes, n, group);
        return;
    }
    qx8_q4_k_t *out = group;
    for (size_t i = 0; i < n / 256; i++, out++) {
        for (int r = 0; r < 8; r++) {
            const uint8_t *b = (const uint8_t *)rows + r * row_bytes + i * 144;
            uint8_t sc[8], mn[8];
            k_scales(b + 4, sc, mn);
            out->d[r] = rd_f16(b);
            out->dmin[r] = rd_f16(b + 2);
            for (int j = 0; j < 8; j++) out->sc[j][r] = sc[j], out->mn[j / 2][r][j % 2] = mn[j];
            /* sub-block j's codes: low nibbles (j even) or high (j odd) of qs[32 * (j / 2) ..] */
            uint8_t code[256];
            for (int e = 0; e < 256; e++) {
                int j = e / 32, l = e % 32;
                code[e] = (b[16 + 32 * (j / 2) + l] >> (4 * (j % 2))) & 0x0f;
            }
            for (int k = 0; k < 4; k++)
                for (int g = 0; g < 4; g++)
                    for (int e = 0; e < 8; e++)
                        out->qs[k][g][r][e] = (uint8_t)(code[64 * k + 8 * g + e] |
                                                        code[64 * k + 32 + 8 * g + e] << 4);
        }
    }
}

/* the offset x8 codes carry: x = d * (code - off) + m */
static int x8_offset(uint32_t t) {
    return t == GGML_Q4_0 ? 8 : t == GGML_Q5_0 ? 16 : t == GGML_Q8_0 || t == GGML_IQ4_NL ? 128 : 0;
}

void qdot_x8_row(uint32_t t, const void *group, int r, size_t n, float *dst) {
    if (t != GGML_Q4_K && t != GGML_Q6_K) { /* as each dequantizer: d * value (+ m) */
        int off = x8_offset(t);
        for (size_t i = 0; i < n / 32; i++)
            for (int e = 0; e < 32; e++) {
                int code;
                float d, m;
                if (x8_nibbles(t)) {
                    const qx8_l4_t *B = (const qx8_l4_t *)group + i;
                    code = (B->q[(e / 8) % 2][r][e % 8] >> (e >= 16 ? 4 : 0)) & 0x0f;
                    d = B->d[r], m = B->m[r];
                } else {
                    const qx8_l8_t *B = (const qx8_l8_t *)group + i;
                    code = B->q[e / 8][r][e % 8];
                    d = B->d[r], m = B->m[r];
                }
                int v = code - off;
                dst[32 * i + e] = t == GGML_Q4_1 || t == GGML_Q5_1 ? (float)v * d + m
                                  : t == GGML_IQ4_NL               ? d * (float)v
                                                                   : (float)v * d;
            }
        return;
    }
    if (t == GGML_Q6_K) { /* as the dequantizer: d * scale, times code - 32 */
        const qx8_q6_k_t *B = group;
        for (size_t i = 0; i < n / 256; i++, B++)
            for (int e = 0; e < 256; e++) {
                int m = e / 16;
                dst[256 * i + e] = B->d[r] * (float)B->sc[m / 2][r][m % 2] *
                                   (float)((int)B->q[e / 8][r][e % 8] - 32);
            }
        return;
    }
    const qx8_q4_k_t *B = group;
    for (size_t i = 0; i < n / 256; i++, B++)
        for (int e = 0; e < 256; e++) {
            int j = e / 32, k = e / 64, hi = (e % 64) / 32, g = (e % 32) / 8;
            float d1 = B->d[r] * B->sc[j][r], m1 = B->dmin[r] * B->mn[j / 2][r][j % 2];
            int code = (B->qs[k][g][r][e % 8] >> (4 * hi)) & 0x0f;
            dst[256 * i + e] = d1 * (float)code - m1;
        }
}

/* ---- the table ---- */

/* kernels by level (QDOT_SCALAR .. QDOT_AVX512VNNI); the scalar level has no multi-token one */
typedef struct {
    qdot_act_t act;
    qdot_fn one[4];
    qdot_n_fn n[4];
} qdot_type_t;

#define VECN(name)                                                                                 \
    {name##_scalar, name##_avx2, name##_avxvnni, name##_vnni512}, {                                \
        NULL, name##_n_avx2, name##_n_avxvnni, name##_n_vnni512                                    \
    }
static const qdot_type_t qdot_types[] = {
    [GGML_Q4_0] = {QDOT_ACT_32, VECN(dot_q4_0)}, [GGML_Q4_1] = {QDOT_ACT_32, VECN(dot_q4_1)},
    [GGML_Q5_0] = {QDOT_ACT_32, VECN(dot_q5_0)}, [GGML_Q5_1] = {QDOT_ACT_32, VECN(dot_q5_1)},
    [GGML_Q8_0] = {QDOT_ACT_32, VECN(dot_q8_0)}, [GGML_IQ4_NL] = {QDOT_ACT_32, VECN(dot_iq4_nl)},
    [GGML_Q2_K] = {QDOT_ACT_K, VECN(dot_q2_k)},  [GGML_Q3_K] = {QDOT_ACT_K, VECN(dot_q3_k)},
    [GGML_Q4_K] = {QDOT_ACT_K, VECN(dot_q4_k)},  [GGML_Q5_K] = {QDOT_ACT_K, VECN(dot_q5_k)},
    [GGML_Q6_K] = {QDOT_ACT_K, VECN(dot_q6_k)},  [GGML_IQ4_XS] = {QDOT_ACT_K, VECN(dot_iq4_xs)},
};
#undef VECN

static int level; /* set by qdot_select() before any kernel runs */

static const qdot_type_t *type_of(uint32_t t) {
    if (t >= sizeof(qdot_types) / sizeof(qdot_types[0]) || !qdot_types[t].one[0]) return NULL;
    return &qdot_types[t];
}

qdot_act_t qdot_act(uint32_t t) {
    const qdot_type_t *q = type_of(t);
    return q ? q->act : QDOT_ACT_NONE;
}

qdot_fn qdot_kernel_scalar(uint32_t t) {
    const qdot_type_t *q = type_of(t);
    return q ? q->one[QDOT_SCALAR] : NULL;
}

qdot_n_fn qdot_kernel_n(uint32_t t) {
    const qdot_type_t *q = type_of(t);
    return q ? q->n[level] : NULL;
}

qdot_x8_fn qdot_kernel_x8(uint32_t t) {
    if (level != QDOT_AVX512VNNI) return NULL;
    switch (t) {
    case GGML_Q4_K:
        return dot_q4_k_x8_vnni512;
    case GGML_Q6_K:
        return dot_q6_k_x8_vnni512;
    case GGML_Q4_0:
        return dot_q4_0_x8_vnni512;
    case GGML_Q4_1:
        return dot_q4_1_x8_vnni512;
    case GGML_Q5_0:
        return dot_q5_0_x8_vnni512;
    case GGML_Q5_1:
        return dot_q5_1_x8_vnni512;
    case GGML_Q8_0:
        return dot_q8_0_x8_vnni512;
    case GGML_IQ4_NL:
        return dot_iq4_nl_x8_vnni512;
    default:
        return NULL;
    }
}

qdot_fn qdot_kernel(uint32_t t) {
    const qdot_type_t *q = type_of(t);
    return q ? q->one[level] : NULL;
}

/* F16C and AVX-VNNI from CPUID itself: not every compiler's __builtin_cpu_supports knows
 * them (the OS's saving of the ymm state is covered by the AVX2 check). */
static int cpuid_bit(unsigned leaf, unsigned sub, int reg, int bit) {
    unsigned r[4];
    if (!__get_cpuid_count(leaf, sub, &r[0], &r[1], &r[2], &r[3])) return 0;
    return (r[reg] >> bit) & 1;
}

static int has_level(int l) {
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               cpuid_bit(1, 0, 2, 29); /* F16C: CPUID.1:ECX[29] */
    switch (l) {
    case QDOT_SCALAR:
        return 1;
    case QDOT_AVX2:
        return avx2;
    case QDOT_AVXVNNI:
        return avx2 && cpuid_bit(7, 1, 0, 4); /* AVX-VNNI: CPUID.(7,1):EAX[4] */
    case QDOT_AVX512VNNI:
        return avx2 && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512bw");
    default:
        return 0;
    }
}

int qdot_select(int l) {
    if (!has_level(l)) return -1;
    level = l;
    return 0;
}

int qdot_init(int max_level) {
    int l = max_level;
    while (l > 0 && !has_level(l)) l--;
    level = l;
    return l;
}

const char *qdot_level_name(void) {
    static const char *names[] = {"scalar", "avx2", "avx-vnni", "avx512-vnni"};
    return names[level];
}
