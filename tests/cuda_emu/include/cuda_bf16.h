/* cuda_bf16.h (emulation) - bfloat16 for the CPU emulation of tidald's kernels. */
#ifndef TIDALD_EMU_CUDA_BF16_H
#define TIDALD_EMU_CUDA_BF16_H
#include "cuda_fp16.h"

struct __nv_bfloat16 {
    uint16_t x;
};
inline float __bfloat162float(__nv_bfloat16 b) {
    return eng_bf16_to_f32(b.x);
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u = eng_f32_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{(uint16_t)((u >> 16) | 0x40)};
    u += 0x7fffu + ((u >> 16) & 1); /* round to nearest even */
    return __nv_bfloat16{(uint16_t)(u >> 16)};
}
#endif
