/* quant.c - GGUF tensor types: block geometry and scalar reference dequantizers.
 *
 * Written from the block layouts (one comment per type gives the byte layout; all fields are
 * little-endian, f16 is IEEE half). Each dequantizer does the arithmetic in float32 in the
 * order of the `gguf` package's numpy reference: a scale is formed first (d * sub-block
 * scale), applied to the integer quant, then any minimum is added or subtracted. The results
 * are bit-exact with it under any compiler flags: an f16 scale has 11 significant bits and a
 * sub-block scale at most 8, so d * scale is exact in float32, and so is its product with the
 * quant wherever a minimum follows (at most 22 bits). FMA contraction therefore rounds as a
 * multiply then an add would, and a product that does round (Q6_K's, up to 25 bits) rounds
 * once whichever way it is associated.
 */
#include "quant.h"
#include "gguf.h"
#include "../base/err.h"
#include "../base/f16.h"

#define QK 32    /* elements per block of the legacy types and IQ4_NL */
#define QK_K 256 /* elements per super-block of the K-quants and IQ4_XS */

typedef void (*dequant_block_fn)(const uint8_t *b, float *y);

static float rd_f16(const uint8_t *p) {
    return eng_f16_to_f32((uint16_t)(p[0] | (p[1] << 8)));
}
static uint32_t rd_u32le(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* ---- unquantized types (one element per block) ---- */

static void deq_f32(const uint8_t *b, float *y) {
    *y = eng_bits_to_f32(rd_u32le(b));
}
static void deq_f16(const uint8_t *b, float *y) {
    *y = rd_f16(b);
}
static void deq_bf16(const uint8_t *b, float *y) {
    *y = eng_bf16_to_f32((uint16_t)(b[0] | (b[1] << 8)));
}

/* ---- legacy types: blocks of 32, element j < 16 in the low nibble of qs[j], element
 * j + 16 in its high nibble ---- */

/* Q4_0, 18 bytes: d (f16), qs[16]. x = d * (q - 8), q in 0..15. */
static void deq_q4_0(const uint8_t *b, float *y) {
    float d = rd_f16(b);
    const uint8_t *qs = b + 2;
    for (int j = 0; j < QK / 2; j++) {
        y[j] = d * (float)((qs[j] & 0x0f) - 8);
        y[j + QK / 2] = d * (float)((qs[j] >> 4) - 8);
    }
}

/* Q4_1, 20 bytes: d (f16), m (f16), qs[16]. x = d * q + m. */
static void deq_q4_1(const uint8_t *b, float *y) {
    float d = rd_f16(b), m = rd_f16(b + 2);
    const uint8_t *qs = b + 4;
    for (int j = 0; j < QK / 2; j++) {
        y[j] = d * (float)(qs[j] & 0x0f) + m;
        y[j + QK / 2] = d * (float)(qs[j] >> 4) + m;
    }
}

/* Q5_0, 22 bytes: d (f16), qh (u32: bit j is element j's fifth bit), qs[16].
 * x = d * (q - 16), q in 0..31. */
static void deq_q5_0(const uint8_t *b, float *y) {
    float d = rd_f16(b);
    uint32_t qh = rd_u32le(b + 2);
    const uint8_t *qs = b + 6;
    for (int j = 0; j < QK / 2; j++) {
        int lo = (qs[j] & 0x0f) | (int)((qh >> j) & 1) << 4;
        int hi = (qs[j] >> 4) | (int)((qh >> (j + QK / 2)) & 1) << 4;
        y[j] = d * (float)(lo - 16);
        y[j + QK / 2] = d * (float)(hi - 16);
    }
}

/* Q5_1, 24 bytes: d (f16), m (f16), qh (u32), qs[16]. x = d * q + m. */
static void deq_q5_1(const uint8_t *b, float *y) {
    float d = rd_f16(b), m = rd_f16(b + 2);
    uint32_t qh = rd_u32le(b + 4);
    const uint8_t *qs = b + 8;
    for (int j = 0; j < QK / 2; j++) {
        int lo = (qs[j] & 0x0f) | (int)((qh >> j) & 1) << 4;
        int hi = (qs[j] >> 4) | (int)((qh >> (j + QK / 2)) & 1) << 4;
        y[j] = d * (float)lo + m;
        y[j + QK / 2] = d * (float)hi + m;
    }
}

/* Q8_0, 34 bytes: d (f16), qs[32] (int8). x = d * q. */
static void deq_q8_0(const uint8_t *b, float *y) {
    float d = rd_f16(b);
    const int8_t *qs = (const int8_t *)(b + 2);
    for (int j = 0; j < QK; j++) y[j] = d * (float)qs[j];
}

/* IQ4_NL, 18 bytes: d (f16), qs[16] laid out as Q4_0, but the nibble indexes a non-linear
 * table of int8 levels. x = d * kvalues[q]. */
static const int8_t iq4_kvalues[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                       1,    13,   25,  38,  53,  69,  89,  113};

static void deq_iq4_nl(const uint8_t *b, float *y) {
    float d = rd_f16(b);
    const uint8_t *qs = b + 2;
    for (int j = 0; j < QK / 2; j++) {
        y[j] = d * (float)iq4_kvalues[qs[j] & 0x0f];
        y[j + QK / 2] = d * (float)iq4_kvalues[qs[j] >> 4];
    }
}

/* ---- K-quants: super-blocks of 256 in sub-blocks of 16 or 32 with their own scales ----
 *
 * 2-bit fields (Q2_K, Q3_K's low bits, Q6_K's high bits) are packed so that byte l of a
 * 32-byte group holds elements l, l + 32, l + 64, l + 96 of a 128-element half, in bits
 * 0-1, 2-3, 4-5, 6-7. 4-bit fields pack byte l of a 32-byte group as elements l (low nibble)
 * and l + 32 (high nibble) of a 64-element chunk. One-bit masks (Q3_K, Q5_K) give element i
 * bit i / 32 of byte i % 32. */

/* Q2_K, 84 bytes: scales[16] (low nibble: scale, high nibble: min, per 16 elements),
 * qs[64] (2-bit), d (f16), dmin (f16). x = (d * scale) * q - (dmin * min). */
static void deq_q2_k(const uint8_t *b, float *y) {
    const uint8_t *scales = b, *qs = b + 16;
    float d = rd_f16(b + 80), dmin = rd_f16(b + 82);
    for (int i = 0; i < QK_K; i++) {
        int half = i / 128, shift = 2 * ((i % 128) / 32), l = i % 32;
        int q = (qs[half * 32 + l] >> shift) & 3;
        uint8_t sc = scales[i / 16];
        float dl = d * (float)(sc & 0x0f), ml = dmin * (float)(sc >> 4);
        y[i] = dl * (float)q - ml;
    }
}

/* Q3_K, 110 bytes: hmask[32] (the third bit of each element), qs[64] (low 2 bits),
 * scales[12] (sixteen 6-bit scales, offset by 32), d (f16).
 * A scale's low 4 bits are the low (j < 8) or high (j >= 8) nibble of byte j % 8; its high
 * 2 bits are bits 2 * (j / 4) of byte 8 + j % 4. The element is q = low2 - 4 when its hmask
 * bit is clear and low2 when it is set. x = (d * (scale - 32)) * q. */
static void deq_q3_k(const uint8_t *b, float *y) {
    const uint8_t *hmask = b, *qs = b + 32, *sc = b + 96;
    float d = rd_f16(b + 108);
    int scale[16];
    for (int j = 0; j < 16; j++) {
        int lo = (j < 8 ? sc[j] : sc[j - 8] >> 4) & 0x0f;
        int hi = (sc[8 + j % 4] >> (2 * (j / 4))) & 3;
        scale[j] = (lo | hi << 4) - 32;
    }
    for (int i = 0; i < QK_K; i++) {
        int half = i / 128, shift = 2 * ((i % 128) / 32), l = i % 32;
        int low2 = (qs[half * 32 + l] >> shift) & 3;
        int high = (hmask[l] >> (i / 32)) & 1;
        int q = low2 - (high ? 0 : 4);
        float dl = d * (float)scale[i / 16];
        y[i] = dl * (float)q;
    }
}

/* The 12 scale bytes of Q4_K and Q5_K hold eight 6-bit scales and eight 6-bit mins, one
 * pair per 32 elements. For j < 4: scale = s[j] & 63, min = s[j + 4] & 63. For j >= 4 the
 * low 4 bits are the nibbles of s[j + 4] (scale low, min high) and the top 2 bits are the
 * top bits of s[j - 4] (scale) and s[j] (min). */
static void k_scale_min(const uint8_t *s, int j, int *scale, int *min) {
    if (j < 4) {
        *scale = s[j] & 63;
        *min = s[j + 4] & 63;
    } else {
        *scale = (s[j + 4] & 0x0f) | (s[j - 4] >> 6) << 4;
        *min = (s[j + 4] >> 4) | (s[j] >> 6) << 4;
    }
}

/* Q4_K, 144 bytes: d (f16), dmin (f16), scales[12], qs[128] (4-bit).
 * x = (d * scale) * q - (dmin * min). */
static void deq_q4_k(const uint8_t *b, float *y) {
    float d = rd_f16(b), dmin = rd_f16(b + 2);
    const uint8_t *scales = b + 4, *qs = b + 16;
    for (int sub = 0; sub < 8; sub++) {
        int sc, mn;
        k_scale_min(scales, sub, &sc, &mn);
        float dl = d * (float)sc, ml = dmin * (float)mn;
        int chunk = sub / 2, shift = 4 * (sub % 2);
        for (int l = 0; l < 32; l++) {
            int q = (qs[chunk * 32 + l] >> shift) & 0x0f;
            y[sub * 32 + l] = dl * (float)q - ml;
        }
    }
}

/* Q5_K, 176 bytes: d (f16), dmin (f16), scales[12], qh[32] (fifth bits), qs[128] (low 4
 * bits, as Q4_K). x = (d * scale) * q - (dmin * min). */
static void deq_q5_k(const uint8_t *b, float *y) {
    float d = rd_f16(b), dmin = rd_f16(b + 2);
    const uint8_t *scales = b + 4, *qh = b + 16, *qs = b + 48;
    for (int sub = 0; sub < 8; sub++) {
        int sc, mn;
        k_scale_min(scales, sub, &sc, &mn);
        float dl = d * (float)sc, ml = dmin * (float)mn;
        int chunk = sub / 2, shift = 4 * (sub % 2);
        for (int l = 0; l < 32; l++) {
            int q = ((qs[chunk * 32 + l] >> shift) & 0x0f) | ((qh[l] >> sub) & 1) << 4;
            y[sub * 32 + l] = dl * (float)q - ml;
        }
    }
}

/* Q6_K, 210 bytes: ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] (int8, per 16
 * elements), d (f16). Each 128-element half uses 64 bytes of ql (elements l and l + 64 of
 * the half in byte l's nibbles) and 32 bytes of qh (2-bit packing). x = (d * scale) * (q -
 * 32). */
static void deq_q6_k(const uint8_t *b, float *y) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *scales = (const int8_t *)(b + 192);
    float d = rd_f16(b + 208);
    for (int i = 0; i < QK_K; i++) {
        int half = i / 128, r = i % 128;
        int lo = (ql[half * 64 + r % 64] >> (4 * (r / 64))) & 0x0f;
        int hi = (qh[half * 32 + r % 32] >> (2 * (r / 32))) & 3;
        int q = (lo | hi << 4) - 32;
        float dl = d * (float)scales[i / 16];
        y[i] = dl * (float)q;
    }
}

/* IQ4_XS, 136 bytes: d (f16), scales_h (u16: bits 2j..2j+1 are sub-block j's high scale
 * bits), scales_l[4] (nibble j % 2 of byte j / 2: the low 4 bits), qs[128]: 16 bytes per
 * 32-element sub-block, element l in byte l's low nibble and l + 16 in its high nibble,
 * indexing IQ4_NL's levels. x = (d * (scale - 32)) * kvalues[q]. */
static void deq_iq4_xs(const uint8_t *b, float *y) {
    float d = rd_f16(b);
    unsigned scales_h = (unsigned)(b[2] | (b[3] << 8));
    const uint8_t *scales_l = b + 4, *qs = b + 8;
    for (int sub = 0; sub < 8; sub++) {
        int lo = (scales_l[sub / 2] >> (4 * (sub % 2))) & 0x0f;
        int hi = (scales_h >> (2 * sub)) & 3;
        float dl = d * (float)((lo | hi << 4) - 32);
        const uint8_t *q = qs + sub * 16;
        for (int l = 0; l < 16; l++) {
            y[sub * 32 + l] = dl * (float)iq4_kvalues[q[l] & 0x0f];
            y[sub * 32 + l + 16] = dl * (float)iq4_kvalues[q[l] >> 4];
        }
    }
}

/* ---- the table ---- */

typedef struct {
    size_t elems;        /* elements per block */
    size_t bytes;        /* bytes per block */
    dequant_block_fn fn; /* decodes one block into elems floats */
} q_type_t;

static const q_type_t q_types[] = {
    [GGML_F32] = {1, 4, deq_f32},
    [GGML_F16] = {1, 2, deq_f16},
    [GGML_Q4_0] = {QK, 2 + QK / 2, deq_q4_0},
    [GGML_Q4_1] = {QK, 4 + QK / 2, deq_q4_1},
    [GGML_Q5_0] = {QK, 6 + QK / 2, deq_q5_0},
    [GGML_Q5_1] = {QK, 8 + QK / 2, deq_q5_1},
    [GGML_Q8_0] = {QK, 2 + QK, deq_q8_0},
    [GGML_Q2_K] = {QK_K, QK_K / 16 + QK_K / 4 + 4, deq_q2_k},
    [GGML_Q3_K] = {QK_K, QK_K / 8 + QK_K / 4 + 12 + 2, deq_q3_k},
    [GGML_Q4_K] = {QK_K, 4 + 12 + QK_K / 2, deq_q4_k},
    [GGML_Q5_K] = {QK_K, 4 + 12 + QK_K / 8 + QK_K / 2, deq_q5_k},
    [GGML_Q6_K] = {QK_K, QK_K / 2 + QK_K / 4 + QK_K / 16 + 2, deq_q6_k},
    [GGML_IQ4_NL] = {QK, 2 + QK / 2, deq_iq4_nl},
    [GGML_IQ4_XS] = {QK_K, 4 + QK_K / 64 + QK_K / 2, deq_iq4_xs},
    [GGML_BF16] = {1, 2, deq_bf16},
};

static const q_type_t *q_type(uint32_t t) {
    if (t >= sizeof(q_types) / sizeof(q_types[0]) || !q_types[t].fn) return NULL;
    return &q_types[t];
}

size_t eng_q_block_elems(uint32_t t) {
    const q_type_t *q = q_type(t);
    return q ? q->elems : 0;
}

size_t eng_q_block_bytes(uint32_t t) {
    const q_type_t *q = q_type(t);
    return q ? q->bytes : 0;
}

int eng_q_dequantize_row(uint32_t t, const void *src, float *dst, size_t n) {
    const q_type_t *q = q_type(t);
    if (!q) return ENG_EUNSUPPORTED;
    if (n % q->elems) return ENG_EINVAL;
    const uint8_t *b = src;
    for (size_t i = 0; i < n / q->elems; i++) q->fn(b + i * q->bytes, dst + i * q->elems);
    return 0;
}
