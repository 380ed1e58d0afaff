/* f16.h - scalar IEEE half and bfloat16 conversions (portable, exact). */
#ifndef TIDALD_BASE_F16_H
#define TIDALD_BASE_F16_H

#include <stdint.h>
#include <string.h>

static inline float eng_bits_to_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline uint32_t eng_f32_to_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float eng_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    if (exp == 0) {
        if (man == 0) return eng_bits_to_f32(sign);
        /* subnormal: value = man * 2^-24 */
        float f = (float)man * (1.0f / 16777216.0f);
        return sign ? -f : f;
    }
    if (exp == 31) return eng_bits_to_f32(sign | 0x7f800000u | (man << 13));
    return eng_bits_to_f32(sign | ((exp + 112) << 23) | (man << 13));
}

/* Round to nearest even. */
static inline uint16_t eng_f32_to_f16(float f) {
    uint32_t x = eng_f32_to_bits(f);
    uint32_t sign = (x >> 16) & 0x8000;
    uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00 | (ax > 0x7f800000u ? 0x200 : 0));
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00); /* overflow to inf */
    if (ax < 0x38800000u) {                                  /* subnormal or zero */
        float a = eng_bits_to_f32(ax) * 16777216.0f;         /* in units of 2^-24 */
        uint32_t m = (uint32_t)a;
        float r = a - (float)m;
        if (r > 0.5f || (r == 0.5f && (m & 1))) m++;
        return (uint16_t)(sign | m);
    }
    uint32_t e = (ax >> 23) - 112, m = ax & 0x7fffff;
    uint32_t h = (e << 10) | (m >> 13);
    uint32_t rem = m & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;
    return (uint16_t)(sign | h);
}

static inline float eng_bf16_to_f32(uint16_t b) {
    return eng_bits_to_f32((uint32_t)b << 16);
}
static inline uint16_t eng_f32_to_bf16(float f) {
    uint32_t x = eng_f32_to_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40);
    return (uint16_t)((x + 0x7fff + ((x >> 16) & 1)) >> 16);
}

#endif
