/* gguf.h - private: a validating, memory-mapped GGUF (v2, v3) reader.
 *
 * Every count, offset, size, alignment and type is checked against the file
 * before it is used, so a truncated or hostile file yields ENG_EFORMAT with a
 * message naming the problem and never an out-of-bounds read. Keys and string
 * values are copied out NUL-terminated; tensor data and array payloads point
 * into the mapping and stay valid until gguf_close().
 */
#ifndef TIDALD_ENGINE_GGUF_H
#define TIDALD_ENGINE_GGUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum gguf_vtype {
    GGUF_U8 = 0,
    GGUF_I8 = 1,
    GGUF_U16 = 2,
    GGUF_I16 = 3,
    GGUF_U32 = 4,
    GGUF_I32 = 5,
    GGUF_F32 = 6,
    GGUF_BOOL = 7,
    GGUF_STRING = 8,
    GGUF_ARRAY = 9,
    GGUF_U64 = 10,
    GGUF_I64 = 11,
    GGUF_F64 = 12,
    GGUF_NTYPES
};

/* ggml tensor type ids (ggml's numbering, as in the gguf package's GGMLQuantizationType).
 * The model loader computes with F32, F16, BF16 and Q8_0 only; engine/quant.h knows the
 * block geometry of all of these and dequantizes the rest. Other ids are named in errors. */
enum gguf_ttype {
    GGML_F32 = 0,
    GGML_F16 = 1,
    GGML_Q4_0 = 2,
    GGML_Q4_1 = 3,
    GGML_Q5_0 = 6,
    GGML_Q5_1 = 7,
    GGML_Q8_0 = 8,
    GGML_Q2_K = 10,
    GGML_Q3_K = 11,
    GGML_Q4_K = 12,
    GGML_Q5_K = 13,
    GGML_Q6_K = 14,
    GGML_IQ4_NL = 20,
    GGML_IQ4_XS = 23,
    GGML_BF16 = 30,
};

#define GGUF_MAX_DIMS 4
#define QK8_0 32

typedef struct {
    char *key;
    uint32_t type;
    union {
        uint64_t u;
        int64_t i;
        double f;
        bool b;
    } v;                /* scalar value, widened */
    char *str;          /* GGUF_STRING: NUL-terminated copy */
    size_t str_len;     /* its length (may contain NUL bytes) */
    uint32_t arr_type;  /* GGUF_ARRAY: element type */
    uint64_t arr_n;     /* number of elements */
    const uint8_t *arr; /* numeric elements, little-endian, in the mapping */
    const char **arr_s; /* string elements: pointers into the mapping ... */
    uint64_t *arr_slen; /* ... and their lengths (not NUL-terminated) */
} gguf_kv_t;

typedef struct {
    char *name;
    uint32_t n_dims;
    uint64_t ne[GGUF_MAX_DIMS]; /* ne[0] is the contiguous (row) dimension; unused dims are 1 */
    uint32_t type;
    uint64_t offset;
    const void *data;
    size_t nbytes;
} gguf_tensor_t;

typedef struct {
    uint32_t version;
    size_t alignment;
    size_t n_kv;
    gguf_kv_t *kv;
    size_t n_tensors;
    gguf_tensor_t *tensors;
    const uint8_t *map; /* the whole file */
    size_t map_size;
    bool mapped; /* map came from mmap (else it is caller memory) */
} gguf_t;

/* Open and validate a file. On failure returns a negative eng_err_t and fills msg. */
int gguf_open(gguf_t **out, const char *path, char *msg);
/* Parse an in-memory image (not copied; must outlive the gguf_t). Used by fuzzing and tests. */
int gguf_parse(gguf_t **out, const void *data, size_t size, char *msg);
void gguf_close(gguf_t *g);

const gguf_kv_t *gguf_find(const gguf_t *g, const char *key);
const gguf_tensor_t *gguf_tensor(const gguf_t *g, const char *name);

/* Typed getters: return 0 and store the value, ENG_EFORMAT if the key has an
 * incompatible type (msg names it), or 1 if the key is absent (out untouched). */
int gguf_get_u64(const gguf_t *g, const char *key, uint64_t *out, char *msg);
int gguf_get_f64(const gguf_t *g, const char *key, double *out, char *msg);
int gguf_get_bool(const gguf_t *g, const char *key, bool *out, char *msg);
const char *gguf_get_str(const gguf_t *g, const char *key);

/* Bytes of one scalar metadata value of the type (GGUF_U8 ... GGUF_F64); 0 for strings, arrays
 * and unknown types. */
size_t gguf_scalar_size(uint32_t gguf_vtype);
const char *gguf_type_name(uint32_t ggml_type);
/* Bytes of one row of n elements of any type engine/quant.h knows (the loader accepts fewer);
 * 0 if the type is unknown, n is not a multiple of its block size, or the size overflows. */
size_t gguf_row_bytes(uint32_t ggml_type, uint64_t n);

#endif
