/* kernels.cu - the CUDA backend's kernels: embedding gather, RMSNorm, RoPE and the K-shift,
 * SwiGLU, residual add, activation conversion for cuBLAS, KV stores through block tables, and
 * attention: flash-decoding paged decode (dense, selection, sparse) with the entropy telemetry
 * folded into the online softmax, the TidalDecode top-k selection, and tiled causal prefill;
 * and for quantized weights kept in their GGUF blocks: 8-bit activations, the dp4a GEMV of
 * decode batches, dequantized F16 tiles for cuBLAS, and exact embedding rows.
 *
 * The arithmetic follows the CPU backend (engine/cpu/cpu_backend.c) step by step so that the
 * parity tests can hold both to the same references.
 */
#include "kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>

#define WARP 32
#define MAX_HD 256               /* largest head size the attention kernels take */
#define LANE_D (MAX_HD / WARP)   /* head dims per lane */
#define SPLIT 256                /* keys per flash-decoding split */
#define DEC_WARPS 4              /* warps per decode block */
#define PF_WARPS 4               /* warps per prefill block */
#define PF_QW 4                  /* queries per prefill warp */
#define PF_QT (PF_WARPS * PF_QW) /* queries per prefill block */
#define PF_KT 32                 /* keys per prefill tile */

enum { K_DENSE = 0, K_SELECT = 1, K_SPARSE = 2 }; /* eng_att_kind_t */

static unsigned blocks_for(size_t n, unsigned threads) {
    size_t b = (n + threads - 1) / threads;
    return (unsigned)(b > 0x7fffffff ? 0x7fffffff : (b ? b : 1));
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = WARP / 2; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = WARP / 2; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* ---- quantized weights ----------------------------------------------------------------
 *
 * Quantized weights stay in their GGUF blocks on the device (engine/quant.c documents each
 * layout). Every type is read in groups of 16 consecutive elements of a row: four words of
 * 8-bit integers q and the group's d, m and off, element e being d * (q[e] + off) + m with the
 * roundings engine/quant.c's dequantizers make (__fmul_rn and __fadd_rn keep nvcc from fusing
 * them), so a dequantized row is bit-exact with the CPU's. The GEMV multiplies the integers
 * with 8-bit activations (dp4a) and applies d, off and m once per group. Fields are read as
 * 16-bit words: every block size and field offset is even, no block is 4-byte aligned. */

enum {
    QT_Q4_0 = 2,
    QT_Q4_1 = 3,
    QT_Q5_0 = 6,
    QT_Q5_1 = 7,
    QT_Q8_0 = 8,
    QT_Q2_K = 10,
    QT_Q3_K = 11,
    QT_Q4_K = 12,
    QT_Q5_K = 13,
    QT_Q6_K = 14,
    QT_IQ4_NL = 20,
    QT_IQ4_XS = 23
};

typedef struct {
    int q[4];   /* the 16 integers, four to a word (int8) */
    float d, m; /* element = d * (q + off) + m */
    int off;
} g16_t;

/* IQ4_NL's and IQ4_XS's levels */
__constant__ int8_t c_iq4_levels[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                        1,    13,   25,  38,  53,  69,  89,  113};

__device__ __forceinline__ uint32_t ld16(const uint8_t *p) {
    return *(const uint16_t *)p;
}
__device__ __forceinline__ uint32_t ld32(const uint8_t *p) {
    return ld16(p) | ld16(p + 2) << 16;
}
__device__ __forceinline__ float ldh(const uint8_t *p) {
    return __half2float(*(const __half *)p);
}
/* 16 bytes from p, shifted right by `shift` and masked per byte */
__device__ __forceinline__ void bits16(const uint8_t *p, int shift, uint32_t mask, int *q) {
    for (int i = 0; i < 4; i++) q[i] = (int)((ld32(p + 4 * i) >> shift) & mask);
}
/* bit k (k < 4) of b to bit 8k + to */
__device__ __forceinline__ int spread4(uint32_t b, int to) {
    return (int)(((b & 1) | (b & 2) << 7 | (b & 4) << 14 | (b & 8) << 21) << to);
}
/* each byte of q (a nibble) to its IQ4 level */
__device__ __forceinline__ void iq4_levels(int *q) {
    for (int i = 0; i < 4; i++) {
        uint32_t v = 0;
        for (int k = 0; k < 4; k++)
            v |= (uint32_t)(uint8_t)c_iq4_levels[((uint32_t)q[i] >> 8 * k) & 15] << 8 * k;
        q[i] = (int)v;
    }
}

/* One type's block: its size and the unpacking of its group h (0..elems/16-1). */
template <uint32_t TY> struct qt;
template <> struct qt<QT_Q4_0> {
    static constexpr uint32_t id = QT_Q4_0, elems = 32, bytes = 18;
    static constexpr bool has_m = false;
    __device__ static void unpack(const uint8_t *b, uint32_t h, g16_t &u) {
        bits16(b + 2, 4 * h, 0x0f0f0f0fu, u.q);
        u.d = ldh(b), u.m = 0, u.off = -8;
    }
};
template <> struct qt<QT_Q4_1> {
    static constexpr uint32_t id = QT_Q4_1, elems = 32, bytes = 20;
    static constexpr bool has_m = true;
    __device__ static void unpack(const uint8_t *b, uint32_t h, g16_t &u) {
        bits16(b + 4, 4 * h, 0x0f0f0f0fu, u.q);
        u.d = ldh(b), u.m = ldh(b + 2), u.off = 0;
    }
};
template <> struct qt<QT_Q5_0> {
    static constexpr uint32_t id = QT_Q5_0, elems = 32, bytes = 22;
    static constexpr bool has_m = false;
    __device__ static void unpack(const uint8_t *b, uint32_t h, g16_t &u) {
        uint32_t qh = ld32(b + 2) >> 16 * h;
        bits16(b + 6, 4 * h, 0x0f0f0f0fu, u.q);
        for (int i = 0; i < 4; i++) u.q[i] |= spread4((qh >> 4 * i) & 15, 4);
        u.d = ldh(b), u.m = 0, u.off = -16;
    }
};
template <> struct qt<QT_Q5_1> {
    static constexpr uint32_t id = QT_Q5_1, elems = 32, bytes = 24;
    static constexpr bool has_m = true;
    __device__ static void unpack(const uint8_t *b, uint32_t h, g16_t &u) {
        uint32_t qh = ld32(b + 4) >> 16 * h;
        bits16(b + 8, 4 * h, 0x0f0f0f0fu, u.q);
        for (int i = 0; i < 4; i++) u.q[i] |= spread4((qh >> 4 * i) & 15, 4);
        u.d = ldh(b), u.m = ldh(b + 2), u.off = 0;
    }
};
template <> struct qt<QT_Q8_0> {
    static constexpr uint32_t id = QT_Q8_0, elems = 32, bytes = 34;
    static constexpr bool has_m = false;
    __device__ static void unpack(const uint8_t *b, uint32_t h, g16_t &u) {
        bits16(b + 2 + 16 * h, 0, 0xffffffffu, u.q);
        u.d = ldh(b), u.m = 0, u.off = 0;
    }
};
template <> struct qt<QT_IQ4_NL> {
    static constexpr uint32_t id = QT_IQ4_NL, elems = 32, bytes = 18;
    static constexpr bool has_m = false;
    __device__ static void unpack(const uint8_t *b, uint32_t h, g16_t &u) {
        bits16(b + 2, 4 * h, 0x0f0f0f0fu, u.q);
        iq4_levels(u.q);
        u.d = ldh(b), u.m = 0, u.off = 0;
    }
};
/* K-quants: group j of a super-block is its elements 16j .. 16j + 15 */
template <> struct qt<QT_Q2_K> {
    static constexpr uint32_t id = QT_Q2_K, elems = 256, bytes = 84;
    static constexpr bool has_m = true;
    __device__ static void unpack(const uint8_t *b, uint32_t j, g16_t &u) {
        bits16(b + 16 + (j / 8) * 32 + 16 * (j % 2), 2 * ((j % 8) / 2), 0x03030303u, u.q);
        uint32_t sc = b[j];
        u.d = __fmul_rn(ldh(b + 80), (float)(sc & 15));
        u.m = -__fmul_rn(ldh(b + 82), (float)(sc >> 4));
        u.off = 0;
    }
};
template <> struct qt<QT_Q3_K> {
    static constexpr uint32_t id = QT_Q3_K, elems = 256, bytes = 110;
    static constexpr bool has_m = false;
    __device__ static void unpack(const uint8_t *b, uint32_t j, g16_t &u) {
        int hi[4];
        bits16(b + 32 + (j / 8) * 32 + 16 * (j % 2), 2 * ((j % 8) / 2), 0x03030303u, u.q);
        bits16(b + 16 * (j % 2), (int)(j / 2), 0x01010101u, hi);
        for (int i = 0; i < 4; i++) u.q[i] |= hi[i] << 2;
        const uint8_t *sc = b + 96;
        int lo = (j < 8 ? sc[j] : sc[j - 8] >> 4) & 15, top = (sc[8 + j % 4] >> (2 * (j / 4))) & 3;
        u.d = __fmul_rn(ldh(b + 108), (float)((lo | top << 4) - 32));
        u.m = 0, u.off = -4;
    }
};
/* Q4_K's and Q5_K's 6-bit scale and min of sub-block j (0..7) */
__device__ __forceinline__ void k_scale_min(const uint8_t *s, uint32_t j, int *sc, int *mn) {
    if (j < 4) {
        *sc = s[j] & 63, *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 15) | (s[j - 4] >> 6) << 4;
        *mn = (s[j + 4] >> 4) | (s[j] >> 6) << 4;
    }
}
template <> struct qt<QT_Q4_K> {
    static constexpr uint32_t id = QT_Q4_K, elems = 256, bytes = 144;
    static constexpr bool has_m = true;
    __device__ static void unpack(const uint8_t *b, uint32_t j, g16_t &u) {
        uint32_t sub = j / 2;
        int sc, mn;
        bits16(b + 16 + (sub / 2) * 32 + 16 * (j % 2), 4 * (sub % 2), 0x0f0f0f0fu, u.q);
        k_scale_min(b + 4, sub, &sc, &mn);
        u.d = __fmul_rn(ldh(b), (float)sc), u.m = -__fmul_rn(ldh(b + 2), (float)mn), u.off = 0;
    }
};
template <> struct qt<QT_Q5_K> {
    static constexpr uint32_t id = QT_Q5_K, elems = 256, bytes = 176;
    static constexpr bool has_m = true;
    __device__ static void unpack(const uint8_t *b, uint32_t j, g16_t &u) {
        uint32_t sub = j / 2;
        int sc, mn, hi[4];
        bits16(b + 48 + (sub / 2) * 32 + 16 * (j % 2), 4 * (sub % 2), 0x0f0f0f0fu, u.q);
        bits16(b + 16 + 16 * (j % 2), (int)sub, 0x01010101u, hi);
        for (int i = 0; i < 4; i++) u.q[i] |= hi[i] << 4;
        k_scale_min(b + 4, sub, &sc, &mn);
        u.d = __fmul_rn(ldh(b), (float)sc), u.m = -__fmul_rn(ldh(b + 2), (float)mn), u.off = 0;
    }
};
template <> struct qt<QT_Q6_K> {
    static constexpr uint32_t id = QT_Q6_K, elems = 256, bytes = 210;
    static constexpr bool has_m = false;
    __device__ static void unpack(const uint8_t *b, uint32_t j, g16_t &u) {
        int hi[4];
        bits16(b + (j / 8) * 64 + 16 * (j % 4), 4 * ((j % 8) / 4), 0x0f0f0f0fu, u.q);
        bits16(b + 128 + (j / 8) * 32 + 16 * (j % 2), 2 * ((j % 8) / 2), 0x03030303u, hi);
        for (int i = 0; i < 4; i++) u.q[i] |= hi[i] << 4;
        u.d = __fmul_rn(ldh(b + 208), (float)(int8_t)b[192 + j]);
        u.m = 0, u.off = -32;
    }
};
template <> struct qt<QT_IQ4_XS> {
    static constexpr uint32_t id = QT_IQ4_XS, elems = 256, bytes = 136;
    static constexpr bool has_m = false;
    __device__ static void unpack(const uint8_t *b, uint32_t j, g16_t &u) {
        uint32_t sub = j / 2;
        int lo = (b[4 + sub / 2] >> (4 * (sub % 2))) & 15, top = (ld16(b + 2) >> (2 * sub)) & 3;
        bits16(b + 8 + sub * 16, 4 * (j % 2), 0x0f0f0f0fu, u.q);
        iq4_levels(u.q);
        u.d = __fmul_rn(ldh(b), (float)((lo | top << 4) - 32));
        u.m = 0, u.off = 0;
    }
};

/* Group g (of cols / 16) of a row. */
template <uint32_t TY>
__device__ __forceinline__ void q_group(const uint8_t *row, uint32_t g, g16_t &u) {
    constexpr uint32_t per = qt<TY>::elems / 16;
    qt<TY>::unpack(row + (size_t)(g / per) * qt<TY>::bytes, g % per, u);
}

/* Element e of a group, as engine/quant.c computes it. */
template <bool HAS_M> __device__ __forceinline__ float q_elem(const g16_t &u, int e) {
    int q = (int8_t)((uint32_t)u.q[e >> 2] >> 8 * (e & 3));
    float v = __fmul_rn(u.d, (float)(q + u.off));
    return HAS_M ? __fadd_rn(v, u.m) : v;
}

/* Call f with the tag of the type; false if there are no kernels for it. */
template <typename F> static bool q_dispatch(uint32_t type, F f) {
    switch (type) {
    case QT_Q4_0:
        f(qt<QT_Q4_0>());
        return true;
    case QT_Q4_1:
        f(qt<QT_Q4_1>());
        return true;
    case QT_Q5_0:
        f(qt<QT_Q5_0>());
        return true;
    case QT_Q5_1:
        f(qt<QT_Q5_1>());
        return true;
    case QT_Q8_0:
        f(qt<QT_Q8_0>());
        return true;
    case QT_Q2_K:
        f(qt<QT_Q2_K>());
        return true;
    case QT_Q3_K:
        f(qt<QT_Q3_K>());
        return true;
    case QT_Q4_K:
        f(qt<QT_Q4_K>());
        return true;
    case QT_Q5_K:
        f(qt<QT_Q5_K>());
        return true;
    case QT_Q6_K:
        f(qt<QT_Q6_K>());
        return true;
    case QT_IQ4_NL:
        f(qt<QT_IQ4_NL>());
        return true;
    case QT_IQ4_XS:
        f(qt<QT_IQ4_XS>());
        return true;
    }
    return false;
}

extern "C" bool cu_q_supported(uint32_t type) {
    return q_dispatch(type, [](auto) {});
}

template <uint32_t TY>
__global__ void k_get_rows_q(const uint8_t *w, size_t row_bytes, uint32_t cols, const int32_t *ids,
                             float *out) {
    const uint8_t *row = w + (size_t)ids[blockIdx.x] * row_bytes;
    float *o = out + (size_t)blockIdx.x * cols;
    for (uint32_t g = threadIdx.x; g < cols / 16; g += blockDim.x) {
        g16_t u;
        q_group<TY>(row, g, u);
        for (int e = 0; e < 16; e++) o[16 * g + e] = q_elem<qt<TY>::has_m>(u, e);
    }
}

template <uint32_t TY>
__global__ void k_dequant_f16(const uint8_t *w, size_t row_bytes, uint32_t cols, size_t n_groups,
                              __half *out) {
    uint32_t ng = cols / 16;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n_groups;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t r = i / ng;
        uint32_t g = (uint32_t)(i % ng);
        g16_t u;
        q_group<TY>(w + r * row_bytes, g, u);
        __half *o = out + r * cols + 16 * (size_t)g;
        for (int e = 0; e < 16; e++) o[e] = __float2half_rn(q_elem<qt<TY>::has_m>(u, e));
    }
}

extern "C" void cu_dequant_f16(cudaStream_t st, uint32_t type, const void *w, size_t row_bytes,
                               uint32_t cols, uint32_t rows, void *out) {
    size_t n = (size_t)rows * (cols / 16);
    if (!n) return;
    unsigned grid = blocks_for(n, 256) < 65536 ? blocks_for(n, 256) : 65536;
    q_dispatch(type, [&](auto tag) {
        k_dequant_f16<decltype(tag)::id>
            <<<grid, 256, 0, st>>>((const uint8_t *)w, row_bytes, cols, n, (__half *)out);
    });
}

/* The activations in 8 bits, per 32 values: one warp per block. */
__global__ void k_quantize_q8(const float *x, size_t nb, cu_q8_t *out) {
    size_t b = (size_t)blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    uint32_t lane = threadIdx.x % WARP;
    if (b >= nb) return;
    float v = x[b * 32 + lane];
    float d = warp_max(fabsf(v)) / 127.0f, id = d > 0 ? 1.0f / d : 0.0f;
    int q = __float2int_rn(v * id), s = q;
    out[b].q[lane] = (int8_t)q;
    for (int o = 8; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o); /* within each half */
    if (lane == 0) out[b].d = d;
    if ((lane & 15) == 0) out[b].s[lane >> 4] = (int16_t)s;
}

extern "C" void cu_quantize_q8(cudaStream_t st, const float *x, size_t n, cu_q8_t *out) {
    size_t nb = n / 32;
    if (nb) k_quantize_q8<<<blocks_for(nb, 8), 8 * WARP, 0, st>>>(x, nb, out);
}

/* y[t][r] = row r . x[t] for QMV_T tokens per block (blockIdx.y), one warp per row; the lanes
 * take the row's groups in turn, so a warp reads 32 consecutive groups at a time. */
#define QMV_WARPS 4
#define QMV_T 8
template <uint32_t TY>
__global__ void __launch_bounds__(QMV_WARPS *WARP)
    k_qmatvec(const uint8_t *w, size_t row_bytes, uint32_t rows, uint32_t cols, const cu_q8_t *xq,
              uint32_t T, float *y) {
    uint32_t r = blockIdx.x * QMV_WARPS + threadIdx.x / WARP, lane = threadIdx.x % WARP;
    if (r >= rows) return; /* whole warps */
    uint32_t t0 = blockIdx.y * QMV_T, nt = min(T - t0, (uint32_t)QMV_T), nb = cols / 32;
    const uint8_t *row = w + (size_t)r * row_bytes;
    float acc[QMV_T];
    for (int t = 0; t < QMV_T; t++) acc[t] = 0;
    for (uint32_t g = lane; g < cols / 16; g += WARP) {
        g16_t u;
        q_group<TY>(row, g, u);
#pragma unroll
        for (uint32_t t = 0; t < QMV_T; t++) {
            if (t >= nt) break;
            const cu_q8_t *a = xq + (size_t)(t0 + t) * nb + g / 2;
            const int *aq = (const int *)a->q + 4 * (g & 1);
            int s = a->s[g & 1], isum = 0;
            for (int i = 0; i < 4; i++) isum = __dp4a(u.q[i], aq[i], isum);
            float v = u.d * (float)(isum + u.off * s);
            if constexpr (qt<TY>::has_m) v += u.m * (float)s;
            acc[t] += a->d * v;
        }
    }
#pragma unroll
    for (uint32_t t = 0; t < QMV_T; t++) {
        if (t >= nt) break;
        float v = warp_sum(acc[t]);
        if (lane == 0) y[(size_t)(t0 + t) * rows + r] = v;
    }
}

extern "C" void cu_qmatvec(cudaStream_t st, uint32_t type, const void *w, size_t row_bytes,
                           uint32_t rows, uint32_t cols, const cu_q8_t *xq, uint32_t T, float *y) {
    if (!rows || !T) return;
    dim3 grid((rows + QMV_WARPS - 1) / QMV_WARPS, (T + QMV_T - 1) / QMV_T);
    q_dispatch(type, [&](auto tag) {
        k_qmatvec<decltype(tag)::id><<<grid, QMV_WARPS * WARP, 0, st>>>(
            (const uint8_t *)w, row_bytes, rows, cols, xq, T, y);
    });
}

/* ---- element-wise and row kernels ---------------------------------------------------- */

__device__ __forceinline__ float w_elem(uint32_t type, const void *row, uint32_t i) {
    if (type == CU_W_F16) return __half2float(((const __half *)row)[i]);
    if (type == CU_W_BF16) return __bfloat162float(((const __nv_bfloat16 *)row)[i]);
    return ((const float *)row)[i];
}

__global__ void k_get_rows(uint32_t type, const char *w, size_t row_bytes, uint32_t cols,
                           const int32_t *ids, float *out) {
    uint32_t t = blockIdx.x;
    const char *row = w + (size_t)ids[t] * row_bytes;
    for (uint32_t c = threadIdx.x; c < cols; c += blockDim.x)
        out[(size_t)t * cols + c] = w_elem(type, row, c);
}

extern "C" void cu_get_rows(cudaStream_t st, uint32_t type, const void *w, size_t row_bytes,
                            uint32_t cols, const int32_t *ids, uint32_t T, float *out) {
    if (!T) return;
    bool quantized = q_dispatch(type, [&](auto tag) {
        k_get_rows_q<decltype(tag)::id>
            <<<T, 128, 0, st>>>((const uint8_t *)w, row_bytes, cols, ids, out);
    });
    if (!quantized) k_get_rows<<<T, 256, 0, st>>>(type, (const char *)w, row_bytes, cols, ids, out);
}

__global__ void k_rmsnorm(const float *x, const float *w, float *out, uint32_t n, float eps) {
    __shared__ float part[32];
    const float *xr = x + (size_t)blockIdx.x * n;
    float *o = out + (size_t)blockIdx.x * n;
    float ss = 0;
    for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) ss += xr[i] * xr[i];
    ss = warp_sum(ss);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = ss;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < (blockDim.x >> 5) ? part[threadIdx.x] : 0;
        v = warp_sum(v);
        if (threadIdx.x == 0) part[0] = v;
    }
    __syncthreads();
    float scale = 1.0f / sqrtf(part[0] / (float)n + eps);
    for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) o[i] = xr[i] * scale * w[i];
}

extern "C" void cu_rmsnorm(cudaStream_t st, const float *x, const float *w, float *out, uint32_t T,
                           uint32_t n, float eps) {
    if (!T) return;
    k_rmsnorm<<<T, 256, 0, st>>>(x, w, out, n, eps);
}

/* The angle of pair i at position pos, computed as the CPU computes it: theta multiplied by
 * theta_scale once per pair, divided by the pair's frequency factor, then scaled. */
__device__ __forceinline__ float rope_angle(float pos, uint32_t i, float theta_scale,
                                            const float *ff, float freq_scale) {
    float theta = pos;
    for (uint32_t j = 0; j < i; j++) theta = __fmul_rn(theta, theta_scale);
    return __fmul_rn(ff ? theta / ff[i] : theta, freq_scale);
}

/* The offsets of pair i's two dims in a head: (2i, 2i+1), or (i, i + n_rot/2) for NEOX. */
__device__ __forceinline__ void rope_dims(uint32_t i, uint32_t n_rot, bool neox, uint32_t *a,
                                          uint32_t *b) {
    *a = neox ? i : 2 * i;
    *b = neox ? i + n_rot / 2 : 2 * i + 1;
}

__global__ void k_rope(float *x, const uint32_t *pos, uint32_t T, uint32_t n_heads, uint32_t hd,
                       uint32_t n_rot, float theta_scale, float freq_scale, bool neox,
                       const float *ff) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    uint32_t pairs = n_rot / 2;
    if (idx >= (size_t)T * n_heads * pairs) return;
    uint32_t i = (uint32_t)(idx % pairs);
    size_t th = idx / pairs; /* t * n_heads + h */
    uint32_t t = (uint32_t)(th / n_heads);
    float a = rope_angle((float)pos[t], i, theta_scale, ff, freq_scale), cs, sn;
    sincosf(a, &sn, &cs);
    uint32_t da, db;
    rope_dims(i, n_rot, neox, &da, &db);
    float *v = x + th * hd;
    float p = v[da], q = v[db];
    v[da] = p * cs - q * sn;
    v[db] = p * sn + q * cs;
}

extern "C" void cu_rope(cudaStream_t st, float *x, const uint32_t *pos, uint32_t T,
                        uint32_t n_heads, uint32_t head_dim, uint32_t n_rot, float base,
                        float freq_scale, bool neox, const float *freq_factors) {
    size_t n = (size_t)T * n_heads * (n_rot / 2);
    if (!n) return;
    float theta_scale = powf(base, -2.0f / (float)n_rot);
    k_rope<<<blocks_for(n, 256), 256, 0, st>>>(x, pos, T, n_heads, head_dim, n_rot, theta_scale,
                                               freq_scale, neox, freq_factors);
}

__global__ void k_swiglu(float *g, const float *u, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

extern "C" void cu_swiglu(cudaStream_t st, float *g, const float *u, size_t n) {
    if (n) k_swiglu<<<blocks_for(n, 256), 256, 0, st>>>(g, u, n);
}

/* GELU's tanh form at x rounded to F16, the result rounded to F16 (the CPU's table). */
__global__ void k_geglu(float *g, const float *u, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float x = g[i], y;
        if (x <= -10.0f) {
            y = 0.0f;
        } else if (x >= 10.0f) {
            y = x * u[i];
        } else {
            float h = __half2float(__float2half_rn(x));
            float e =
                0.5f * h * (1.0f + tanhf(0.79788456080286535588f * h * (1.0f + 0.044715f * h * h)));
            y = __half2float(__float2half_rn(e)) * u[i];
        }
        g[i] = y;
    }
}

extern "C" void cu_geglu(cudaStream_t st, float *g, const float *u, size_t n) {
    if (n) k_geglu<<<blocks_for(n, 256), 256, 0, st>>>(g, u, n);
}

__global__ void k_add_bias(float *x, const float *b, uint32_t n, size_t total) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x)
        x[i] += b[i % n];
}

extern "C" void cu_add_bias(cudaStream_t st, float *x, const float *b, uint32_t T, uint32_t n) {
    size_t total = (size_t)T * n;
    if (total) k_add_bias<<<blocks_for(total, 256), 256, 0, st>>>(x, b, n, total);
}

__global__ void k_scale(float *x, float s, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        x[i] *= s;
}

extern "C" void cu_scale(cudaStream_t st, float *x, float s, size_t n) {
    if (n) k_scale<<<blocks_for(n, 256), 256, 0, st>>>(x, s, n);
}

__global__ void k_add(float *x, const float *y, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        x[i] += y[i];
}

extern "C" void cu_add(cudaStream_t st, float *x, const float *y, size_t n) {
    if (n) k_add<<<blocks_for(n, 256), 256, 0, st>>>(x, y, n);
}

__global__ void k_to_f16(const float *x, __half *o, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        o[i] = __float2half_rn(x[i]);
}
__global__ void k_to_bf16(const float *x, __nv_bfloat16 *o, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        o[i] = __float2bfloat16_rn(x[i]);
}

extern "C" void cu_convert(cudaStream_t st, uint32_t type, const float *x, void *out, size_t n) {
    if (!n) return;
    if (type == CU_W_BF16)
        k_to_bf16<<<blocks_for(n, 256), 256, 0, st>>>(x, (__nv_bfloat16 *)out, n);
    else
        k_to_f16<<<blocks_for(n, 256), 256, 0, st>>>(x, (__half *)out, n);
}

/* ---- the KV pool --------------------------------------------------------------------- */

/* Element index of the key vector of position pos (in physical block b) of a layer; the value
 * vector follows block_size * kv_dim elements later. */
__device__ __forceinline__ size_t kv_index(const cu_pool_t &p, uint32_t b, uint32_t layer,
                                           uint32_t pos) {
    size_t slab = (size_t)p.block_size * p.kv_dim;
    return ((size_t)b * p.n_layer + layer) * 2 * slab + (size_t)(pos % p.block_size) * p.kv_dim;
}
__device__ __forceinline__ float kv_ld(const cu_pool_t &p, size_t i) {
    return p.elem == 2 ? __half2float(((const __half *)p.data)[i]) : ((const float *)p.data)[i];
}
__device__ __forceinline__ void kv_st(const cu_pool_t &p, size_t i, float v) {
    if (p.elem == 2)
        ((__half *)p.data)[i] = __float2half_rn(v);
    else
        ((float *)p.data)[i] = v;
}

/* The slice's table for this pool: the local layers' own in a split cache. */
__device__ __forceinline__ uint32_t table_of(const cu_pool_t &p, const cu_seq_t &s) {
    return p.local ? s.local_off : s.table_off;
}
/* Element index of the key vector of the slice's position pos (kv_seq_kp's slot mapping). */
__device__ __forceinline__ size_t kv_at(const cu_pool_t &p, const uint32_t *tables,
                                        const cu_seq_t &s, uint32_t layer, uint32_t pos) {
    uint32_t slot = pos < s.kv_sinks ? pos : pos + s.skip;
    return kv_index(p, tables[table_of(p, s) + slot / p.block_size], layer, slot);
}

__global__ void k_kv_store(cu_pool_t pool, uint32_t layer, const float *k, const float *v,
                           const uint32_t *pos, const uint32_t *row_seq, const cu_seq_t *seqs,
                           const uint32_t *tables, uint32_t T) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)T * pool.kv_dim) return;
    uint32_t t = (uint32_t)(idx / pool.kv_dim), e = (uint32_t)(idx % pool.kv_dim);
    const cu_seq_t &s = seqs[row_seq[t]];
    size_t at = kv_at(pool, tables, s, layer, pos[t]) + e;
    kv_st(pool, at, k[idx]);
    kv_st(pool, at + (size_t)pool.block_size * pool.kv_dim, v[idx]);
}

extern "C" void cu_kv_store(cudaStream_t st, cu_pool_t pool, uint32_t layer, const float *k,
                            const float *v, const uint32_t *pos, const uint32_t *row_seq,
                            const cu_seq_t *seqs, const uint32_t *tables, uint32_t T) {
    size_t n = (size_t)T * pool.kv_dim;
    if (n)
        k_kv_store<<<blocks_for(n, 256), 256, 0, st>>>(pool, layer, k, v, pos, row_seq, seqs,
                                                       tables, T);
}

__global__ void k_shift(cu_pool_t pool, const uint32_t *table, uint32_t sinks, uint32_t skip,
                        uint32_t layer, uint32_t from, uint32_t n_pos, float delta,
                        uint32_t n_head_kv, uint32_t hd, uint32_t n_rot, float theta_scale,
                        float freq_scale, bool neox, const float *ff) {
    uint32_t pairs = n_rot / 2;
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    size_t per_pos = (size_t)n_head_kv * pairs;
    if (idx >= (size_t)n_pos * per_pos) return;
    uint32_t i = (uint32_t)(idx % pairs);
    uint32_t h = (uint32_t)(idx / pairs % n_head_kv);
    uint32_t p = from + (uint32_t)(idx / per_pos);
    float a = rope_angle(delta, i, theta_scale, ff, freq_scale), cs = cosf(a), sn = -sinf(a);
    uint32_t da, db;
    rope_dims(i, n_rot, neox, &da, &db);
    uint32_t slot = p < sinks ? p : p + skip, b = table[slot / pool.block_size];
    if (b == 0xFFFFFFFFu) return; /* a local layer's block out of the window */
    size_t at = kv_index(pool, b, layer, slot) + (size_t)h * hd;
    float x = kv_ld(pool, at + da), y = kv_ld(pool, at + db);
    kv_st(pool, at + da, x * cs - y * sn);
    kv_st(pool, at + db, x * sn + y * cs);
}

extern "C" void cu_k_shift(cudaStream_t st, cu_pool_t pool, const uint32_t *table, uint32_t sinks,
                           uint32_t skip, uint32_t layer, uint32_t from, uint32_t to,
                           uint32_t delta, uint32_t n_head_kv, uint32_t head_dim, uint32_t n_rot,
                           float base, float freq_scale, bool neox, const float *freq_factors) {
    if (to <= from || n_rot < 2) return;
    size_t n = (size_t)(to - from) * n_head_kv * (n_rot / 2);
    float theta_scale = powf(base, -2.0f / (float)n_rot);
    k_shift<<<blocks_for(n, 256), 256, 0, st>>>(pool, table, sinks, skip, layer, from, to - from,
                                                (float)delta, n_head_kv, head_dim, n_rot,
                                                theta_scale, freq_scale, neox, freq_factors);
}

/* ---- attention ----------------------------------------------------------------------- */

/* Online-softmax state of one warp: running max m, sum l, the weighted logit sum t =
 * sum w_i (s_i - m) and the sink weight, rescaled together when m grows; each lane also holds
 * LANE_D of the output's dimensions (d = lane + 32 k). Entropy follows as ln l - t / l. */
struct acc_t {
    float m, l, t, sink;
    float o[LANE_D];
};

__device__ __forceinline__ void acc_init(acc_t &a) {
    a.m = -INFINITY;
    a.l = a.t = a.sink = 0;
#pragma unroll
    for (int k = 0; k < LANE_D; k++) a.o[k] = 0;
}

/* Fold one tile of up to 32 keys (lane j holds key j's score s, -inf when absent, its value
 * vector's element index vidx and whether it is a sink) into the warp's state. */
__device__ __forceinline__ void fold_tile(acc_t &a, float s, bool sink, size_t vidx,
                                          const cu_pool_t &pool, uint32_t hd, int lane) {
    float tm = warp_max(s);
    if (tm == -INFINITY) return;
    if (tm > a.m) {
        float r = __expf(a.m - tm); /* 0 on the first tile */
#pragma unroll
        for (int k = 0; k < LANE_D; k++) a.o[k] *= r;
        a.t = a.l > 0 ? r * (a.t - a.l * (tm - a.m)) : 0;
        a.l *= r;
        a.sink *= r;
        a.m = tm;
    }
    bool valid = s != -INFINITY;
    float d = valid ? s - a.m : 0, w = valid ? expf(d) : 0;
    a.l += warp_sum(w);
    a.t += warp_sum(w * d);
    a.sink += warp_sum(sink ? w : 0);
    unsigned mask = __ballot_sync(0xffffffffu, valid);
    while (mask) {
        int j = __ffs(mask) - 1;
        mask &= mask - 1;
        float wj = __shfl_sync(0xffffffffu, w, j);
        size_t vj = (size_t)__shfl_sync(0xffffffffu, (unsigned long long)vidx, j);
#pragma unroll
        for (int k = 0; k < LANE_D; k++) {
            uint32_t dd = lane + WARP * k;
            if (dd < hd) a.o[k] += wj * kv_ld(pool, vj + dd);
        }
    }
}

/* Merge state b (scalars; o read from ob) into a (o in oa), both over disjoint keys. */
__device__ __forceinline__ void merge(float &m, float &l, float &t, float &sink, float bm, float bl,
                                      float bt, float bsink) {
    if (bl <= 0) return;
    if (l <= 0) {
        m = bm, l = bl, t = bt, sink = bsink;
        return;
    }
    float M = fmaxf(m, bm), ra = __expf(m - M), rb = __expf(bm - M);
    t = ra * (t - l * (M - m)) + rb * (bt - bl * (M - bm));
    l = l * ra + bl * rb;
    sink = sink * ra + bsink * rb;
    m = M;
}

__device__ __forceinline__ float dot_q(const float *qs, const cu_pool_t &pool, size_t kidx,
                                       uint32_t hd) {
    float s = 0;
    if (pool.elem == 2 && hd % 8 == 0 && kidx % 8 == 0) { /* 16-byte loads */
        const uint4 *k4 = (const uint4 *)((const __half *)pool.data + kidx);
        for (uint32_t d8 = 0; d8 < hd / 8; d8++) {
            uint4 u = k4[d8];
            const __half2 *h2 = (const __half2 *)&u;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                float2 kf = __half22float2(h2[j]);
                s += qs[8 * d8 + 2 * j] * kf.x + qs[8 * d8 + 2 * j + 1] * kf.y;
            }
        }
    } else if (pool.elem == 2 && hd % 2 == 0) {
        const __half2 *k2 = (const __half2 *)((const __half *)pool.data + kidx);
        for (uint32_t d = 0; d < hd / 2; d++) {
            float2 kf = __half22float2(k2[d]);
            s += qs[2 * d] * kf.x + qs[2 * d + 1] * kf.y;
        }
    } else {
        for (uint32_t d = 0; d < hd; d++) s += qs[d] * kv_ld(pool, kidx + d);
    }
    return s;
}

/* The first key a dense decode query sees: the window's start on a sliding-window layer. */
__device__ __forceinline__ uint32_t key_lo(const cu_seq_t &s, uint32_t kind, const cu_shape_t &sh) {
    return kind != K_SPARSE && sh.window && s.pos0 + 1 > sh.window ? s.pos0 + 1 - sh.window : 0;
}

/* Keys a decode query attends: its selection, or every key from key_lo to itself. */
__device__ __forceinline__ uint32_t n_keys_of(const cu_seq_t &s, uint32_t kind, uint32_t h,
                                              const cu_shape_t &sh) {
    return kind == K_SPARSE ? s.n_sel[h] : s.pos0 + 1 - key_lo(s, kind, sh);
}

/* grid (split, head, slice), DEC_WARPS warps: one split of one head's keys. */
__global__ void __launch_bounds__(DEC_WARPS *WARP)
    k_attn_decode(cu_shape_t sh, cu_pool_t pool, uint32_t layer, const float *q,
                  const cu_seq_t *seqs, const uint8_t *kinds, const uint32_t *tables,
                  uint32_t max_split, float *part, float *scores, uint32_t score_stride) {
    __shared__ float qs[MAX_HD];
    __shared__ float wm[DEC_WARPS], wl[DEC_WARPS], wt[DEC_WARPS], ws[DEC_WARPS];
    __shared__ float wo[DEC_WARPS][MAX_HD];
    uint32_t split = blockIdx.x, h = blockIdx.y, i = blockIdx.z;
    const cu_seq_t &s = seqs[i];
    if (s.n_q != 1) return;
    uint32_t kind = kinds[i], hd = sh.head_dim, n = n_keys_of(s, kind, h, sh),
             lo = key_lo(s, kind, sh);
    uint32_t k0 = split * SPLIT, k1 = min(n, k0 + SPLIT);
    if (k0 >= n) return;
    const float *qrow = q + ((size_t)s.q_start * sh.n_head + h) * hd;
    for (uint32_t d = threadIdx.x; d < hd; d += blockDim.x) qs[d] = qrow[d] * sh.scale;
    __syncthreads();
    int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    uint32_t koff = (h / (sh.n_head / sh.n_head_kv)) * hd;
    size_t slab = (size_t)pool.block_size * pool.kv_dim;
    const uint32_t *sel = s.sel + (size_t)h * s.budget;
    float *sc = scores ? scores + ((size_t)i * sh.n_head + h) * score_stride : NULL;
    acc_t a;
    acc_init(a);
    for (uint32_t base = k0 + warp * WARP; base < k1; base += DEC_WARPS * WARP) {
        uint32_t j = base + lane;
        float sv = -INFINITY;
        size_t vidx = 0;
        uint32_t p = 0;
        if (j < k1) {
            p = kind == K_SPARSE ? sel[j] : lo + j;
            size_t at = kv_at(pool, tables, s, layer, p) + koff;
            sv = dot_q(qs, pool, at, hd);
            vidx = at + slab;
            if (kind == K_SELECT && sc) sc[p] = sv;
        }
        fold_tile(a, sv, j < k1 && p < s.n_sinks, vidx, pool, hd, lane);
    }
    if (lane == 0) wm[warp] = a.m, wl[warp] = a.l, wt[warp] = a.t, ws[warp] = a.sink;
#pragma unroll
    for (int k = 0; k < LANE_D; k++)
        if (lane + WARP * k < hd) wo[warp][lane + WARP * k] = a.o[k];
    __syncthreads();
    /* merge the warps: the weights of warp w relative to the merged max */
    float M = -INFINITY;
    for (int w = 0; w < DEC_WARPS; w++)
        if (wl[w] > 0) M = fmaxf(M, wm[w]);
    float *out = part + (((size_t)i * sh.n_head + h) * max_split + split) * (hd + 4);
    for (uint32_t d = threadIdx.x; d < hd; d += blockDim.x) {
        float o = 0;
        for (int w = 0; w < DEC_WARPS; w++)
            if (wl[w] > 0) o += wo[w][d] * __expf(wm[w] - M);
        out[4 + d] = o;
    }
    if (threadIdx.x == 0) {
        float m = -INFINITY, l = 0, t = 0, sk = 0;
        for (int w = 0; w < DEC_WARPS; w++) merge(m, l, t, sk, wm[w], wl[w], wt[w], ws[w]);
        out[0] = m, out[1] = l, out[2] = t, out[3] = sk;
    }
}

/* grid (head, slice): merge a head's splits into its output row and telemetry. */
__global__ void k_attn_combine(cu_shape_t sh, const cu_seq_t *seqs, const uint8_t *kinds,
                               uint32_t max_split, const float *part, float *out, cu_tele_t tele) {
    uint32_t h = blockIdx.x, i = blockIdx.y, hd = sh.head_dim;
    const cu_seq_t &s = seqs[i];
    if (s.n_q != 1) return;
    uint32_t n = n_keys_of(s, kinds[i], h, sh), ns = (n + SPLIT - 1) / SPLIT;
    const float *pp = part + ((size_t)i * sh.n_head + h) * max_split * (hd + 4);
    float m = -INFINITY, l = 0, t = 0, sk = 0;
    for (uint32_t k = 0; k < ns; k++) {
        const float *x = pp + (size_t)k * (hd + 4);
        merge(m, l, t, sk, x[0], x[1], x[2], x[3]);
    }
    float inv = l > 0 ? 1.0f / l : 0;
    float *o = out + ((size_t)s.q_start * sh.n_head + h) * hd;
    for (uint32_t d = threadIdx.x; d < hd; d += blockDim.x) {
        float acc = 0;
        for (uint32_t k = 0; k < ns; k++) {
            const float *x = pp + (size_t)k * (hd + 4);
            if (x[1] > 0) acc += x[4 + d] * __expf(x[0] - m);
        }
        o[d] = acc * inv;
    }
    if (threadIdx.x == 0) {
        size_t slot = (size_t)i * sh.n_head + h;
        tele.entropy[slot] = (logf(l) - t * inv) / 0.69314718055994530942f;
        tele.sink_mass[slot] = sk * inv;
        tele.n_att[slot] = (float)n;
        tele.m[slot] = m;
        tele.l[slot] = l;
    }
}

static uint32_t n_split(uint32_t max_keys) {
    return (max_keys + SPLIT - 1) / SPLIT;
}

extern "C" size_t cu_attn_part_floats(uint32_t n_seqs, uint32_t n_head, uint32_t head_dim,
                                      uint32_t max_keys) {
    return (size_t)n_seqs * n_head * (n_split(max_keys) ? n_split(max_keys) : 1) * (head_dim + 4);
}

extern "C" void cu_attn_decode(cudaStream_t st, cu_shape_t sh, cu_pool_t pool, uint32_t layer,
                               const float *q, const cu_seq_t *seqs, const uint8_t *kinds,
                               const uint32_t *tables, uint32_t n_seqs, uint32_t max_keys,
                               float *part, float *scores, uint32_t score_stride, float *out,
                               cu_tele_t tele) {
    uint32_t ms = n_split(max_keys);
    if (!n_seqs || !ms) return;
    dim3 g(ms, sh.n_head, n_seqs);
    k_attn_decode<<<g, DEC_WARPS * WARP, 0, st>>>(sh, pool, layer, q, seqs, kinds, tables, ms, part,
                                                  scores, score_stride);
    dim3 gc(sh.n_head, n_seqs);
    k_attn_combine<<<gc, 64, 0, st>>>(sh, seqs, kinds, ms, part, out, tele);
}

/* ---- TidalDecode selection ----------------------------------------------------------- */

/* A float's bits mapped so that unsigned order is float order. */
__device__ __forceinline__ uint32_t order_key(float f) {
    uint32_t u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

#define SEL_THREADS 1024

/* Exclusive prefix sums of a and b over the block (thread order); totals in *ta, *tb. */
__device__ void block_scan2(uint32_t a, uint32_t b, uint32_t *pa, uint32_t *pb, uint32_t *ta,
                            uint32_t *tb) {
    __shared__ uint32_t sa[SEL_THREADS / WARP], sb[SEL_THREADS / WARP];
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    uint32_t xa = a, xb = b;
    for (int o = 1; o < WARP; o <<= 1) {
        uint32_t ya = __shfl_up_sync(0xffffffffu, xa, o), yb = __shfl_up_sync(0xffffffffu, xb, o);
        if (lane >= o) xa += ya, xb += yb;
    }
    if (lane == WARP - 1) sa[warp] = xa, sb[warp] = xb;
    __syncthreads();
    uint32_t oa = 0, ob = 0, na = 0, nb = 0;
    for (int w = 0; w < (int)(blockDim.x / WARP); w++) {
        if (w < warp) oa += sa[w], ob += sb[w];
        na += sa[w], nb += sb[w];
    }
    *pa = oa + xa - a;
    *pb = ob + xb - b;
    *ta = na;
    *tb = nb;
    __syncthreads();
}

/* grid (head or KV-head group, slice), SEL_THREADS threads. The candidates are positions
 * [first, n - 1); the want-th largest score's order key is found by four 8-bit radix passes
 * (warp-aggregated shared-memory histograms), then each thread writes the taken positions of
 * its own contiguous range at offsets from one block-wide scan, so the output is ascending. */
__global__ void __launch_bounds__(SEL_THREADS)
    k_attn_select(cu_shape_t sh, const cu_seq_t *seqs, const uint8_t *kinds, const float *scores,
                  uint32_t score_stride, cu_tele_t tele, float *gsum) {
    __shared__ uint32_t hist[256];
    __shared__ uint32_t s_prefix, s_remaining;
    uint32_t x = blockIdx.x, i = blockIdx.y;
    const cu_seq_t &s = seqs[i];
    if (s.n_q != 1 || kinds[i] != K_SELECT) return;
    uint32_t group = sh.n_head / sh.n_head_kv;
    if (s.per_group ? x >= sh.n_head_kv : x >= sh.n_head) return;
    uint32_t n = s.pos0 + 1, K = s.budget;
    uint32_t h0 = s.per_group ? x * group : x, nh = s.per_group ? group : 1;
    const float *src = scores + ((size_t)i * sh.n_head + h0) * score_stride;
    if (n <= K) { /* everything fits the budget */
        for (uint32_t p = threadIdx.x; p < n; p += blockDim.x)
            for (uint32_t h = h0; h < h0 + nh; h++) s.sel[(size_t)h * K + p] = p;
        if (threadIdx.x == 0)
            for (uint32_t h = h0; h < h0 + nh; h++) s.n_sel[h] = n;
        return;
    }
    if (s.per_group) { /* each head's probabilities, summed over the group */
        float *g = gsum + ((size_t)i * sh.n_head_kv + x) * score_stride;
        for (uint32_t p = threadIdx.x; p < n; p += blockDim.x) {
            float acc = 0;
            for (uint32_t h = h0; h < h0 + nh; h++) {
                size_t slot = (size_t)i * sh.n_head + h;
                acc += expf(scores[slot * score_stride + p] - tele.m[slot]) / tele.l[slot];
            }
            g[p] = acc;
        }
        __syncthreads();
        src = g;
    }
    uint32_t first = s.force_sinks ? min(s.n_sinks, K - 1) : 0, want = K - 1 - first;
    int lane = threadIdx.x % WARP;
    if (threadIdx.x == 0) s_prefix = 0, s_remaining = want;
    uint32_t mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (uint32_t b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0;
        __syncthreads();
        uint32_t prefix = s_prefix;
        for (uint32_t base = first; base + 1 < n; base += blockDim.x) { /* block-uniform */
            uint32_t p = base + threadIdx.x;
            bool counted = false;
            uint32_t bin = 0;
            if (p + 1 < n) {
                uint32_t key = order_key(src[p]);
                counted = (key & mask) == prefix;
                bin = (key >> shift) & 255;
            }
            unsigned peers = __match_any_sync(0xffffffffu, counted ? bin : 0xffffffffu);
            if (counted && lane == __ffs(peers) - 1) atomicAdd(&hist[bin], (uint32_t)__popc(peers));
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            uint32_t rem = s_remaining, above = 0;
            int dg = 255;
            for (; dg > 0; dg--) {
                if (above + hist[dg] >= rem) break;
                above += hist[dg];
            }
            s_remaining = rem - above;
            s_prefix = prefix | ((uint32_t)dg << shift);
        }
        mask |= 255u << shift;
        __syncthreads();
    }
    uint32_t thr = s_prefix, ties = s_remaining; /* every key above thr, the first ties */
    for (uint32_t p = threadIdx.x; p < first; p += blockDim.x)
        for (uint32_t h = h0; h < h0 + nh; h++) s.sel[(size_t)h * K + p] = p;
    uint32_t nc = n - 1 - first, per = (nc + blockDim.x - 1) / blockDim.x;
    uint32_t b0 = first + min(threadIdx.x * per, nc), b1 = first + min(threadIdx.x * per + per, nc);
    uint32_t gt = 0, tie = 0;
    for (uint32_t p = b0; p < b1; p++) {
        uint32_t key = order_key(src[p]);
        gt += key > thr;
        tie += key == thr;
    }
    uint32_t gt_pre, tie_pre, gt_tot, tie_tot;
    block_scan2(gt, tie, &gt_pre, &tie_pre, &gt_tot, &tie_tot);
    uint32_t at = first + gt_pre + min(tie_pre, ties), rank = tie_pre;
    for (uint32_t p = b0; p < b1; p++) {
        uint32_t key = order_key(src[p]);
        bool take = key > thr || (key == thr && rank < ties);
        rank += key == thr;
        if (!take) continue;
        for (uint32_t h = h0; h < h0 + nh; h++) s.sel[(size_t)h * K + at] = p;
        at++;
    }
    if (threadIdx.x == 0)
        for (uint32_t h = h0; h < h0 + nh; h++) {
            s.sel[(size_t)h * K + first + want] = n - 1;
            s.n_sel[h] = K;
        }
}

extern "C" void cu_attn_select(cudaStream_t st, cu_shape_t sh, const cu_seq_t *seqs,
                               const uint8_t *kinds, uint32_t n_seqs, const float *scores,
                               uint32_t score_stride, cu_tele_t tele, float *gsum) {
    if (!n_seqs) return;
    dim3 g(sh.n_head, n_seqs);
    k_attn_select<<<g, SEL_THREADS, 0, st>>>(sh, seqs, kinds, scores, score_stride, tele, gsum);
}

/* ---- prefill ------------------------------------------------------------------------- */

/* grid (query tile, head, slice): PF_QT queries of one head against key tiles of PF_KT staged
 * in shared memory; each warp owns PF_QW queries, each lane one key of the tile. */
__global__ void __launch_bounds__(PF_WARPS *WARP)
    k_attn_prefill(cu_shape_t sh, cu_pool_t pool, uint32_t layer, const float *q,
                   const cu_seq_t *seqs, const uint32_t *tables, float *out) {
    extern __shared__ float smem[];
    uint32_t hd = sh.head_dim, qt = blockIdx.x, h = blockIdx.y, i = blockIdx.z;
    const cu_seq_t &s = seqs[i];
    if (s.n_q <= 1 || qt * PF_QT >= s.n_q) return;
    float *qs = smem;                  /* [PF_QT][hd] */
    float *ks = qs + PF_QT * hd;       /* [PF_KT][hd + 1] */
    float *vs = ks + PF_KT * (hd + 1); /* [PF_KT][hd] */
    uint32_t q0 = qt * PF_QT, nq = min((uint32_t)PF_QT, s.n_q - q0);
    for (uint32_t x = threadIdx.x; x < PF_QT * hd; x += blockDim.x) {
        uint32_t j = x / hd, d = x % hd;
        qs[x] = j < nq ? q[((size_t)(s.q_start + q0 + j) * sh.n_head + h) * hd + d] * sh.scale : 0;
    }
    int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    uint32_t koff = (h / (sh.n_head / sh.n_head_kv)) * hd;
    size_t slab = (size_t)pool.block_size * pool.kv_dim;
    float m[PF_QW], l[PF_QW], o[PF_QW][LANE_D];
#pragma unroll
    for (int a = 0; a < PF_QW; a++) {
        m[a] = -INFINITY, l[a] = 0;
#pragma unroll
        for (int k = 0; k < LANE_D; k++) o[a][k] = 0;
    }
    uint32_t last = s.pos0 + q0 + nq; /* keys [first, last) are needed by this tile */
    uint32_t first = sh.window && s.pos0 + q0 + 1 > sh.window ? s.pos0 + q0 + 1 - sh.window : 0;
    for (uint32_t t0 = first / PF_KT * PF_KT; t0 < last; t0 += PF_KT) {
        __syncthreads();
        for (uint32_t x = threadIdx.x; x < PF_KT * hd; x += blockDim.x) {
            uint32_t j = x / hd, d = x % hd, p = t0 + j;
            float kv = 0, vv = 0;
            if (p >= first && p < last) { /* keys before `first` are masked for every query */
                size_t at = kv_at(pool, tables, s, layer, p) + koff + d;
                kv = kv_ld(pool, at);
                vv = kv_ld(pool, at + slab);
            }
            ks[j * (hd + 1) + d] = kv;
            vs[j * hd + d] = vv;
        }
        __syncthreads();
#pragma unroll
        for (int a = 0; a < PF_QW; a++) {
            uint32_t qi = warp * PF_QW + a;
            if (qi >= nq) break;
            uint32_t qpos = s.pos0 + q0 + qi, p = t0 + lane;
            float sv = -INFINITY;
            if (p <= qpos && (!sh.window || qpos - p < sh.window)) {
                const float *qq = qs + qi * hd, *kk = ks + lane * (hd + 1);
                float acc = 0;
                for (uint32_t d = 0; d < hd; d++) acc += qq[d] * kk[d];
                sv = acc;
            }
            float tm = warp_max(sv);
            if (tm == -INFINITY) continue;
            if (tm > m[a]) {
                float r = __expf(m[a] - tm);
#pragma unroll
                for (int k = 0; k < LANE_D; k++) o[a][k] *= r;
                l[a] *= r;
                m[a] = tm;
            }
            float w = sv == -INFINITY ? 0 : expf(sv - m[a]);
            l[a] += warp_sum(w);
            for (int j = 0; j < PF_KT; j++) {
                float wj = __shfl_sync(0xffffffffu, w, j);
                if (wj == 0) continue;
#pragma unroll
                for (int k = 0; k < LANE_D; k++) {
                    uint32_t dd = lane + WARP * k;
                    if (dd < hd) o[a][k] += wj * vs[j * hd + dd];
                }
            }
        }
    }
#pragma unroll
    for (int a = 0; a < PF_QW; a++) {
        uint32_t qi = warp * PF_QW + a;
        if (qi >= nq) break;
        float inv = l[a] > 0 ? 1.0f / l[a] : 0;
        float *orow = out + ((size_t)(s.q_start + q0 + qi) * sh.n_head + h) * hd;
#pragma unroll
        for (int k = 0; k < LANE_D; k++) {
            uint32_t dd = lane + WARP * k;
            if (dd < hd) orow[dd] = o[a][k] * inv;
        }
    }
}

extern "C" void cu_attn_prefill(cudaStream_t st, cu_shape_t sh, cu_pool_t pool, uint32_t layer,
                                const float *q, const cu_seq_t *seqs, const uint32_t *tables,
                                uint32_t n_seqs, uint32_t max_q, float *out) {
    if (!n_seqs || max_q <= 1) return;
    size_t shm = sizeof(float) * ((size_t)PF_QT * sh.head_dim + (size_t)PF_KT * (sh.head_dim + 1) +
                                  (size_t)PF_KT * sh.head_dim);
    static size_t shm_set = 48 * 1024;
    if (shm > shm_set) {
        cudaFuncSetAttribute(k_attn_prefill, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shm);
        shm_set = shm;
    }
    dim3 g((max_q + PF_QT - 1) / PF_QT, sh.n_head, n_seqs);
    k_attn_prefill<<<g, PF_WARPS * WARP, shm, st>>>(sh, pool, layer, q, seqs, tables, out);
}

/* ---- logits post-processing for the sampler ------------------------------------------ */

/* (value, index) with the larger value, the lower index on ties */
__device__ __forceinline__ void better(float &v, uint32_t &i, float v2, uint32_t i2) {
    if (v2 > v || (v2 == v && i2 < i)) v = v2, i = i2;
}

/* grid R, ARGMAX_THREADS: one row each */
#define ARGMAX_THREADS 1024
__global__ void __launch_bounds__(ARGMAX_THREADS)
    k_argmax(const float *rows, uint32_t n, int32_t *out) {
    __shared__ float sv[ARGMAX_THREADS / WARP];
    __shared__ uint32_t si[ARGMAX_THREADS / WARP];
    __shared__ int sbad;
    const float *x = rows + (size_t)blockIdx.x * n;
    float v = -INFINITY;
    uint32_t idx = 0xffffffffu;
    bool bad = false;
    if (threadIdx.x == 0) sbad = 0;
    __syncthreads();
    for (uint32_t k = threadIdx.x; k < n; k += blockDim.x) {
        float xk = x[k];
        bad |= xk != xk || xk == INFINITY;
        better(v, idx, xk, k);
    }
    for (int o = WARP / 2; o; o >>= 1) {
        float v2 = __shfl_xor_sync(0xffffffffu, v, o);
        uint32_t i2 = __shfl_xor_sync(0xffffffffu, idx, o);
        better(v, idx, v2, i2);
    }
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    if (lane == 0) sv[warp] = v, si[warp] = idx;
    if (bad) sbad = 1;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x / WARP); w++) better(v, idx, sv[w], si[w]);
        /* a NaN or +inf anywhere, or nothing above -inf: -1, as eng_argmax on the host */
        out[blockIdx.x] = sbad || idx == 0xffffffffu ? -1 : (int32_t)idx;
    }
}

extern "C" void cu_argmax(cudaStream_t st, const float *rows, uint32_t R, uint32_t n,
                          int32_t *out) {
    if (R) k_argmax<<<R, ARGMAX_THREADS, 0, st>>>(rows, n, out);
}

/* ---- bandwidth probe ----------------------------------------------------------------- */

__global__ void k_read_probe(const float4 *p, size_t n4, float *out) {
    float acc = 0;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n4;
         i += (size_t)gridDim.x * blockDim.x) {
        float4 v = __ldcs(p + i);
        acc += v.x + v.y + v.z + v.w;
    }
    acc = warp_sum(acc);
    if ((threadIdx.x & 31) == 0) atomicAdd(out + blockIdx.x, acc);
}

extern "C" void cu_read_probe(cudaStream_t st, const void *p, size_t n4, float *out,
                              unsigned blocks) {
    k_read_probe<<<blocks, 512, 0, st>>>((const float4 *)p, n4, out);
}
