/* cuda_fp16.h (emulation) - half precision for the CPU emulation of tidald's kernels. */
#ifndef TIDALD_EMU_CUDA_FP16_H
#define TIDALD_EMU_CUDA_FP16_H
#include "../../../base/f16.h"

struct __half {
    uint16_t x;
};
struct __half2 {
    __half x, y;
};
struct float2 {
    float x, y;
};
struct float4 {
    float x, y, z, w;
};
struct uint4 {
    unsigned x, y, z, w;
};
inline float __half2float(__half h) {
    return eng_f16_to_f32(h.x);
}
inline __half __float2half_rn(float f) {
    return __half{eng_f32_to_f16(f)};
}
inline float2 __half22float2(__half2 h) {
    return float2{__half2float(h.x), __half2float(h.y)};
}
#endif
