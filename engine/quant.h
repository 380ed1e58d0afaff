/* quant.h - private: the block geometry of GGUF's tensor types and scalar reference
 * dequantizers for its quantized ones (Q4_0 ... Q8_0, the K-quants, IQ4_NL, IQ4_XS).
 *
 * The dequantizers are the readable oracle, bit-exact against the `gguf` Python package's
 * (tests/unit/test_quant.c); fast kernels belong to the backends. Type ids are
 * engine/gguf.h's enum gguf_ttype.
 */
#ifndef TIDALD_ENGINE_QUANT_H
#define TIDALD_ENGINE_QUANT_H

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

#endif
