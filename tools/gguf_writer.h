/* gguf_writer.h - a small GGUF v3 writer for synthetic models and test fixtures.
 *
 * Metadata is serialized as it is added; tensors are described up front and
 * their data (owned by the caller until gw_write returns) is written after
 * the aligned header. Conversion helpers produce rows of every type the engine quantizes.
 */
#ifndef TIDALD_TOOLS_GGUF_WRITER_H
#define TIDALD_TOOLS_GGUF_WRITER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../engine/gguf.h"

typedef struct gw gw_t;

gw_t *gw_create(void);
void gw_free(gw_t *w);
void gw_kv_str(gw_t *w, const char *key, const char *val);
void gw_kv_u32(gw_t *w, const char *key, uint32_t val);
void gw_kv_f32(gw_t *w, const char *key, float val);
void gw_kv_bool(gw_t *w, const char *key, bool val);
void gw_kv_arr_str(gw_t *w, const char *key, const char *const *vals, size_t n);
void gw_kv_arr_f32(gw_t *w, const char *key, const float *vals, size_t n);
void gw_kv_arr_i32(gw_t *w, const char *key, const int32_t *vals, size_t n);
/* Copy a key and its value as a parsed file holds it (any scalar, string, or array of scalars
 * or strings). 0, or -1 for an array of arrays or out of memory. */
int gw_kv_copy(gw_t *w, const gguf_kv_t *kv);
/* ne[0] is the row length. data is nbytes of the given ggml type; not copied. */
void gw_tensor(gw_t *w, const char *name, uint32_t n_dims, const uint64_t *ne, uint32_t type,
               const void *data, size_t nbytes);
/* 0 on success; -1 on I/O or allocation failure (msg filled, 256 bytes). */
int gw_write(gw_t *w, const char *path, char *msg);
/* Serialize to a malloc'd buffer. */
int gw_write_mem(gw_t *w, uint8_t **out, size_t *len);

/* Convert n floats (whole blocks) to a ggml type with the engine's quantizers
 * (eng_q_quantize_row); returns bytes written to dst, which must hold gw_type_bytes(type, n),
 * or 0 for a type it cannot write. */
size_t gw_convert(uint32_t type, const float *src, size_t n, void *dst);
size_t gw_type_bytes(uint32_t type, size_t n);

#endif
