/* emu_device.h - CUDA's device-side language on the CPU, for testing tidald's kernels without a
 * GPU. Force-included when engine/cuda/kernels.cu is compiled as C++ (after its launches are
 * rewritten to emu_launch; see the Makefile's cuda-emu-test).
 *
 * Each block runs alone, its threads as cooperative fibers: a thread runs until it reaches
 * __syncthreads() or a warp operation, then the next one runs. A barrier opens when every
 * live thread of the block (or every lane of the warp) has reached it; reaching different
 * barriers is reported as a deadlock. Because a thread runs as far as it can before the
 * others start, a missing __syncthreads() shows up as a read of data not yet written. */
#ifndef TIDALD_EMU_DEVICE_H
#define TIDALD_EMU_DEVICE_H

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <functional>
#include <math.h>
#include <stdint.h>
#include <string.h>

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};

extern dim3 emu_threadIdx, emu_blockIdx, emu_blockDim, emu_gridDim;
extern void *emu_dyn_smem;
#define threadIdx emu_threadIdx
#define blockIdx emu_blockIdx
#define blockDim emu_blockDim
#define gridDim emu_gridDim

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static /* blocks run one at a time */
#define __constant__

void emu_run_grid(dim3 g, dim3 b, size_t shm, const std::function<void()> &body);
bool emu_capturing(cudaStream_t st);
void emu_record(cudaStream_t st, std::function<void()> fn);

template <typename K, typename... A>
void emu_launch(K kernel, dim3 g, dim3 b, size_t shm, cudaStream_t st, A... args) {
    std::function<void()> run = [=]() { emu_run_grid(g, b, shm, [=]() { kernel(args...); }); };
    if (emu_capturing(st))
        emu_record(st, run);
    else
        run();
}

/* ---- synchronisation and warp operations ---- */
void __syncthreads();
/* every lane of the warp contributes v; returns the 32 contributions */
const uint64_t *emu_warp_exchange(uint64_t v);

static inline unsigned emu_lane() {
    return threadIdx.x % 32;
}
template <typename T> static inline uint64_t emu_bits(T v) {
    uint64_t u = 0;
    memcpy(&u, &v, sizeof(T));
    return u;
}
template <typename T> static inline T emu_from(uint64_t u) {
    T v;
    memcpy(&v, &u, sizeof(T));
    return v;
}
template <typename T> static inline T __shfl_sync(unsigned, T v, int src) {
    return emu_from<T>(emu_warp_exchange(emu_bits(v))[src & 31]);
}
template <typename T> static inline T __shfl_xor_sync(unsigned, T v, int m) {
    return emu_from<T>(emu_warp_exchange(emu_bits(v))[(emu_lane() ^ m) & 31]);
}
template <typename T> static inline T __shfl_up_sync(unsigned, T v, unsigned d) {
    const uint64_t *x = emu_warp_exchange(emu_bits(v));
    return emu_lane() >= d ? emu_from<T>(x[emu_lane() - d]) : v;
}
static inline unsigned __ballot_sync(unsigned, int pred) {
    const uint64_t *x = emu_warp_exchange(pred != 0);
    unsigned m = 0;
    for (int i = 0; i < 32; i++) m |= (x[i] ? 1u : 0u) << i;
    return m;
}
static inline unsigned __match_any_sync(unsigned, unsigned v) {
    const uint64_t *x = emu_warp_exchange(v);
    unsigned m = 0;
    for (int i = 0; i < 32; i++) m |= (x[i] == v ? 1u : 0u) << i;
    return m;
}

/* ---- arithmetic ---- */
static inline int __ffs(unsigned x) {
    return __builtin_ffs((int)x);
}
static inline int __popc(unsigned x) {
    return __builtin_popcount(x);
}
static inline float emu_expf(float x) {
    return expf(x);
}
#define __expf emu_expf /* glibc declares its own __expf */
static inline float __fmul_rn(float a, float b) {
    return a * b;
}
static inline float __fadd_rn(float a, float b) {
    return a + b;
}
/* four signed byte products of a and b, summed into c */
static inline int __dp4a(int a, int b, int c) {
    for (int i = 0; i < 4; i++) c += (int)(int8_t)(a >> 8 * i) * (int)(int8_t)(b >> 8 * i);
    return c;
}
/* round to nearest, ties to even, as the device does */
static inline int __float2int_rn(float x) {
    return (int)nearbyintf(x);
}
static inline unsigned __float_as_uint(float f) {
    return emu_bits(f) & 0xffffffffu;
}
template <typename T> static inline T __ldcs(const T *p) {
    return *p;
}
static inline float atomicAdd(float *p, float v) {
    float o = *p;
    *p = o + v;
    return o;
}
static inline unsigned atomicAdd(unsigned *p, unsigned v) {
    unsigned o = *p;
    *p = o + v;
    return o;
}
static inline unsigned min(unsigned a, unsigned b) {
    return a < b ? a : b;
}
static inline unsigned max(unsigned a, unsigned b) {
    return a > b ? a : b;
}

#endif
