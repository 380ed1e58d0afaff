/* quant.h - private: the block geometry of GGUF's tensor types and scalar reference
 * dequantizers for its quantized ones (Q4_0 ... Q8_0, the K-quants, IQ4_NL, IQ4_XS).
 *
 * The dequantizers are the readable oracle, bit-exact against the `gguf` Python package's
 * (tests/unit/test_quant.c); fast kernels belong to the backends. Type ids are
 * engine/gguf.h's enum gguf_ttype.
 */
#ifndef TIDALD_ENGINE_QUANT_H
#define TIDALD_ENGINE_QUANT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Elements in one block of the type (1 for F32, F16, BF16); 0 if the type is unknown. */
size_t eng_q_block_elems(uint32_t ggml_type);
/* Bytes of one block of the type; 0 if the type is unknown. */
size_t eng_q_block_bytes(uint32_t ggml_type);

/* Decode n elements of the type from src (n / eng_q_block_elems(type) whole blocks,
 * little-endian, any alignment) into dst. Returns 0, ENG_EUNSUPPORTED for an unknown type,
 * or ENG_EINVAL if n is not a multiple of the block size (dst untouched). O(n), no allocation.
 */
int eng_q_dequantize_row(uint32_t ggml_type, const void *src, float *dst, size_t n);

/* Encode n floats (whole blocks) as the type: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
 * IQ4_NL and Q2_K ... Q6_K (engine/quantize.c). Returns 0, ENG_EUNSUPPORTED (IQ4_XS, unknown
 * types) or ENG_EINVAL (n not a multiple of the block). */
int eng_q_quantize_row(uint32_t ggml_type, const float *x, void *dst, size_t n);

/* A quantization mixture as llama-quantize names it: the file type it records
 * (general.file_type) and its base tensor type. */
typedef struct {
    const char *name;
    uint32_t ftype, base;
} eng_qmix_t;

/* The mixture of a name (case-insensitive; Q3_K, Q4_K and Q5_K mean their _M mixtures), or
 * NULL; and every name, for messages. */
const eng_qmix_t *eng_q_mix(const char *name);
const char *eng_q_mix_names(void);

/* What a tensor of the model is, for the choice of its type. */
typedef struct {
    const char *name;
    uint32_t n_dims, type;   /* its dimensions and current type */
    uint64_t ncols;          /* row length */
    uint32_t layer, n_layer; /* blk.<layer>. (0 for other tensors), of n_layer */
    uint32_t n_gqa;          /* query heads per KV head */
    bool tied;               /* no output.weight: token_embd is also the output projection */
} eng_qmix_tensor_t;

/* The type llama.cpp's quantizer gives the tensor in the mixture: the output projection Q6_K,
 * more bits for attn_v and ffn_down in some layers of the _M/_L mixtures (and for attn_output
 * in Q2_K/Q3_K), norms and 1-D tensors kept, and a 32-wide type (then F16) where the rows do
 * not tile the blocks. */
uint32_t eng_q_mix_type(const eng_qmix_t *mix, const eng_qmix_tensor_t *t);

#endif
