/* gguf.c - validating GGUF reader (spec: ggml docs/gguf.md, versions 2 and 3).
 *
 * The parser walks the header with a bounded cursor: every read checks the
 * bytes left first, every element count is checked against the bytes that
 * could possibly hold it before anything is allocated, and every tensor's
 * extent is checked against the data section. Cost: O(file header) time; the
 * tensor data is never touched here.
 */
#include "gguf.h"
#include "../base/err.h"
#include "quant.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define GGUF_MAX_KV 65536
#define GGUF_MAX_TENSORS 65536

typedef struct {
    const uint8_t *p;
    size_t len, pos;
    char *msg;
} cursor_t;

static int need(cursor_t *c, size_t n, const char *what) {
    if (c->len - c->pos < n)
        return eng_fail(c->msg, ENG_EFORMAT,
                        "GGUF truncated: %s needs %zu bytes at offset %zu, file has %zu", what, n,
                        c->pos, c->len);
    return 0;
}

static int rd(cursor_t *c, void *dst, size_t n, const char *what) {
    int rc = need(c, n, what);
    if (rc) return rc;
    memcpy(dst, c->p + c->pos, n);
    c->pos += n;
    return 0;
}

static int rd_u32(cursor_t *c, uint32_t *v, const char *what) {
    return rd(c, v, 4, what);
}
static int rd_u64(cursor_t *c, uint64_t *v, const char *what) {
    return rd(c, v, 8, what);
}

/* A GGUF string: u64 length then bytes. Returns a pointer into the buffer. */
static int rd_str_ref(cursor_t *c, const char **s, uint64_t *n, const char *what) {
    int rc = rd_u64(c, n, what);
    if (rc) return rc;
    if (*n > c->len - c->pos)
        return eng_fail(c->msg, ENG_EFORMAT,
                        "GGUF %s: string length %llu at offset %zu runs past end of file", what,
                        (unsigned long long)*n, c->pos - 8);
    *s = (const char *)c->p + c->pos;
    c->pos += (size_t)*n;
    return 0;
}

static int rd_str_dup(cursor_t *c, char **out, size_t *out_len, const char *what) {
    const char *s = NULL;
    uint64_t n = 0;
    int rc = rd_str_ref(c, &s, &n, what);
    if (rc) return rc;
    char *d = malloc((size_t)n + 1);
    if (!d) return eng_fail(c->msg, ENG_ENOMEM, "out of memory reading GGUF %s", what);
    memcpy(d, s, (size_t)n);
    d[n] = 0;
    *out = d;
    if (out_len) *out_len = (size_t)n;
    return 0;
}

size_t gguf_scalar_size(uint32_t t) {
    switch (t) {
    case GGUF_U8:
    case GGUF_I8:
    case GGUF_BOOL:
        return 1;
    case GGUF_U16:
    case GGUF_I16:
        return 2;
    case GGUF_U32:
    case GGUF_I32:
    case GGUF_F32:
        return 4;
    case GGUF_U64:
    case GGUF_I64:
    case GGUF_F64:
        return 8;
    default:
        return 0;
    }
}

static void widen(gguf_kv_t *kv, const uint8_t *p) {
    switch (kv->type) {
    case GGUF_U8:
        kv->v.u = p[0];
        break;
    case GGUF_I8:
        kv->v.i = (int8_t)p[0];
        break;
    case GGUF_BOOL:
        kv->v.b = p[0] != 0;
        break;
    case GGUF_U16: {
        uint16_t x;
        memcpy(&x, p, 2);
        kv->v.u = x;
        break;
    }
    case GGUF_I16: {
        int16_t x;
        memcpy(&x, p, 2);
        kv->v.i = x;
        break;
    }
    case GGUF_U32: {
        uint32_t x;
        memcpy(&x, p, 4);
        kv->v.u = x;
        break;
    }
    case GGUF_I32: {
        int32_t x;
        memcpy(&x, p, 4);
        kv->v.i = x;
        break;
    }
    case GGUF_F32: {
        float x;
        memcpy(&x, p, 4);
        kv->v.f = x;
        break;
    }
    case GGUF_U64:
        memcpy(&kv->v.u, p, 8);
        break;
    case GGUF_I64:
        memcpy(&kv->v.i, p, 8);
        break;
    case GGUF_F64:
        memcpy(&kv->v.f, p, 8);
        break;
    }
}

static int parse_kv(cursor_t *c, gguf_kv_t *kv) {
    int rc = rd_str_dup(c, &kv->key, NULL, "metadata key");
    if (rc) return rc;
    if ((rc = rd_u32(c, &kv->type, "metadata value type"))) return rc;
    if (kv->type == GGUF_STRING) return rd_str_dup(c, &kv->str, &kv->str_len, kv->key);
    if (kv->type == GGUF_ARRAY) {
        if ((rc = rd_u32(c, &kv->arr_type, "array element type"))) return rc;
        if ((rc = rd_u64(c, &kv->arr_n, "array length"))) return rc;
        if (kv->arr_type == GGUF_STRING) {
            /* each string needs at least its 8-byte length */
            if (kv->arr_n > (c->len - c->pos) / 8)
                return eng_fail(c->msg, ENG_EFORMAT,
                                "GGUF key '%s': string array of %llu elements cannot fit in the "
                                "file",
                                kv->key, (unsigned long long)kv->arr_n);
            kv->arr_s = malloc(sizeof(char *) * (size_t)(kv->arr_n ? kv->arr_n : 1));
            kv->arr_slen = malloc(sizeof(uint64_t) * (size_t)(kv->arr_n ? kv->arr_n : 1));
            if (!kv->arr_s || !kv->arr_slen)
                return eng_fail(c->msg, ENG_ENOMEM, "out of memory reading '%s'", kv->key);
            for (uint64_t i = 0; i < kv->arr_n; i++)
                if ((rc = rd_str_ref(c, &kv->arr_s[i], &kv->arr_slen[i], kv->key))) return rc;
            return 0;
        }
        size_t es = gguf_scalar_size(kv->arr_type);
        if (!es)
            return eng_fail(c->msg, ENG_EFORMAT, "GGUF key '%s': unsupported array element type %u",
                            kv->key, kv->arr_type);
        if (kv->arr_n > (c->len - c->pos) / es)
            return eng_fail(c->msg, ENG_EFORMAT,
                            "GGUF key '%s': array of %llu elements runs past end of file", kv->key,
                            (unsigned long long)kv->arr_n);
        kv->arr = c->p + c->pos;
        c->pos += (size_t)kv->arr_n * es;
        return 0;
    }
    size_t es = gguf_scalar_size(kv->type);
    if (!es)
        return eng_fail(c->msg, ENG_EFORMAT, "GGUF key '%s': unknown value type %u", kv->key,
                        kv->type);
    if ((rc = need(c, es, kv->key))) return rc;
    widen(kv, c->p + c->pos);
    c->pos += es;
    return 0;
}

const char *gguf_type_name(uint32_t t) {
    static const char *names[] = {
        [0] = "F32",     [1] = "F16",      [2] = "Q4_0",   [3] = "Q4_1",    [6] = "Q5_0",
        [7] = "Q5_1",    [8] = "Q8_0",     [9] = "Q8_1",   [10] = "Q2_K",   [11] = "Q3_K",
        [12] = "Q4_K",   [13] = "Q5_K",    [14] = "Q6_K",  [15] = "Q8_K",   [16] = "IQ2_XXS",
        [17] = "IQ2_XS", [18] = "IQ3_XXS", [19] = "IQ1_S", [20] = "IQ4_NL", [21] = "IQ3_S",
        [22] = "IQ2_S",  [23] = "IQ4_XS",  [24] = "I8",    [25] = "I16",    [26] = "I32",
        [27] = "I64",    [28] = "F64",     [29] = "IQ1_M", [30] = "BF16",   [34] = "TQ1_0",
        [35] = "TQ2_0",  [39] = "MXFP4",
    };
    if (t < sizeof(names) / sizeof(names[0]) && names[t]) return names[t];
    return "unknown";
}

size_t gguf_row_bytes(uint32_t t, uint64_t n) {
    size_t elems = eng_q_block_elems(t), bytes = eng_q_block_bytes(t);
    if (!elems || n % elems) return 0;
    uint64_t blocks = n / elems;
    if (blocks > SIZE_MAX / bytes) return 0;
    return (size_t)blocks * bytes;
}

static int parse_tensor(cursor_t *c, gguf_tensor_t *t) {
    int rc = rd_str_dup(c, &t->name, NULL, "tensor name");
    if (rc) return rc;
    if ((rc = rd_u32(c, &t->n_dims, "tensor dimension count"))) return rc;
    if (t->n_dims == 0 || t->n_dims > GGUF_MAX_DIMS)
        return eng_fail(c->msg, ENG_EFORMAT, "tensor '%s': %u dimensions (must be 1..%d)", t->name,
                        t->n_dims, GGUF_MAX_DIMS);
    uint64_t nel = 1;
    for (uint32_t d = 0; d < GGUF_MAX_DIMS; d++) t->ne[d] = 1;
    for (uint32_t d = 0; d < t->n_dims; d++) {
        if ((rc = rd_u64(c, &t->ne[d], "tensor dimension"))) return rc;
        if (t->ne[d] == 0 || t->ne[d] > (uint64_t)INT32_MAX)
            return eng_fail(c->msg, ENG_EFORMAT, "tensor '%s': dimension %u is %llu", t->name, d,
                            (unsigned long long)t->ne[d]);
        if (nel > UINT64_MAX / t->ne[d])
            return eng_fail(c->msg, ENG_EFORMAT, "tensor '%s': element count overflows", t->name);
        nel *= t->ne[d];
    }
    if ((rc = rd_u32(c, &t->type, "tensor type"))) return rc;
    if ((rc = rd_u64(c, &t->offset, "tensor offset"))) return rc;
    /* the reader knows the geometry of every type engine/quant.c decodes; which of them the
     * engine computes with is the model loader's business */
    if (!eng_q_block_elems(t->type))
        return eng_fail(c->msg, ENG_EUNSUPPORTED,
                        "tensor '%s' has type %s (%u), which tidald cannot read", t->name,
                        gguf_type_name(t->type), t->type);
    size_t row = gguf_row_bytes(t->type, t->ne[0]);
    if (!row)
        return eng_fail(c->msg, ENG_EFORMAT, "tensor '%s': row of %llu %s elements is invalid",
                        t->name, (unsigned long long)t->ne[0], gguf_type_name(t->type));
    uint64_t rows = nel / t->ne[0];
    if (rows > SIZE_MAX / row)
        return eng_fail(c->msg, ENG_EFORMAT, "tensor '%s': byte size overflows", t->name);
    t->nbytes = (size_t)rows * row;
    return 0;
}

void gguf_close(gguf_t *g) {
    if (!g) return;
    for (size_t i = 0; i < g->n_kv; i++) {
        free(g->kv[i].key);
        free(g->kv[i].str);
        free(g->kv[i].arr_s);
        free(g->kv[i].arr_slen);
    }
    free(g->kv);
    for (size_t i = 0; i < g->n_tensors; i++) free(g->tensors[i].name);
    free(g->tensors);
    if (g->mapped && g->map) munmap((void *)g->map, g->map_size);
    free(g);
}

int gguf_parse(gguf_t **out, const void *data, size_t size, char *msg) {
    *out = NULL;
    cursor_t c = {.p = data, .len = size, .pos = 0, .msg = msg};
    int rc;
    gguf_t *g = calloc(1, sizeof(*g));
    if (!g) return eng_fail(msg, ENG_ENOMEM, "out of memory");
    g->map = data;
    g->map_size = size;
    g->alignment = 32;

    char magic[4];
    if ((rc = rd(&c, magic, 4, "magic"))) goto fail;
    if (memcmp(magic, "GGUF", 4) != 0) {
        rc = eng_fail(msg, ENG_EFORMAT, "not a GGUF file (bad magic)");
        goto fail;
    }
    if ((rc = rd_u32(&c, &g->version, "version"))) goto fail;
    if (g->version != 2 && g->version != 3) {
        rc = eng_fail(msg, ENG_EUNSUPPORTED, "GGUF version %u is not supported (need 2 or 3)",
                      g->version);
        goto fail;
    }
    uint64_t nt, nkv;
    if ((rc = rd_u64(&c, &nt, "tensor count")) || (rc = rd_u64(&c, &nkv, "metadata count")))
        goto fail;
    /* a key-value pair needs >= 12 bytes, a tensor info >= 28; the caps keep the duplicate
     * checks below (quadratic) bounded on hostile headers */
    if (nkv > (c.len - c.pos) / 12 || nt > (c.len - c.pos) / 28 || nkv > GGUF_MAX_KV ||
        nt > GGUF_MAX_TENSORS) {
        rc = eng_fail(msg, ENG_EFORMAT,
                      "GGUF header claims %llu metadata entries and %llu tensors; the file is too "
                      "small for that or it exceeds the limit of 65536",
                      (unsigned long long)nkv, (unsigned long long)nt);
        goto fail;
    }
    g->kv = calloc((size_t)nkv + 1, sizeof(gguf_kv_t));
    g->tensors = calloc((size_t)nt + 1, sizeof(gguf_tensor_t));
    if (!g->kv || !g->tensors) {
        rc = eng_fail(msg, ENG_ENOMEM, "out of memory");
        goto fail;
    }
    for (uint64_t i = 0; i < nkv; i++) {
        g->n_kv = (size_t)i + 1;
        if ((rc = parse_kv(&c, &g->kv[i]))) goto fail;
        for (uint64_t j = 0; j < i; j++)
            if (strcmp(g->kv[j].key, g->kv[i].key) == 0) {
                rc = eng_fail(msg, ENG_EFORMAT, "duplicate metadata key '%s'", g->kv[i].key);
                goto fail;
            }
    }
    const gguf_kv_t *al = gguf_find(g, "general.alignment");
    if (al) {
        if (al->type != GGUF_U32 || al->v.u == 0 || (al->v.u & (al->v.u - 1)) || al->v.u > 65536) {
            rc =
                eng_fail(msg, ENG_EFORMAT, "general.alignment must be a u32 power of two <= 65536");
            goto fail;
        }
        g->alignment = (size_t)al->v.u;
    }
    for (uint64_t i = 0; i < nt; i++) {
        g->n_tensors = (size_t)i + 1;
        if ((rc = parse_tensor(&c, &g->tensors[i]))) goto fail;
    }
    size_t data_start = c.pos + (g->alignment - c.pos % g->alignment) % g->alignment;
    /* a file without tensor data may end before the aligned data section */
    size_t data_len = data_start > size ? 0 : size - data_start;
    for (size_t i = 0; i < g->n_tensors; i++) {
        gguf_tensor_t *t = &g->tensors[i];
        if (t->offset % g->alignment) {
            rc = eng_fail(msg, ENG_EFORMAT, "tensor '%s': offset %llu is not aligned to %zu",
                          t->name, (unsigned long long)t->offset, g->alignment);
            goto fail;
        }
        if (t->offset > data_len || t->nbytes > data_len - t->offset) {
            rc = eng_fail(msg, ENG_EFORMAT,
                          "tensor '%s': data (%zu bytes at offset %llu) runs past end of file "
                          "(truncated?)",
                          t->name, t->nbytes, (unsigned long long)t->offset);
            goto fail;
        }
        t->data = (const uint8_t *)data + data_start + t->offset;
        for (size_t j = 0; j < i; j++)
            if (strcmp(g->tensors[j].name, t->name) == 0) {
                rc = eng_fail(msg, ENG_EFORMAT, "duplicate tensor name '%s'", t->name);
                goto fail;
            }
    }
    *out = g;
    return 0;
fail:
    gguf_close(g);
    return rc;
}

int gguf_open(gguf_t **out, const char *path, char *msg) {
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return eng_fail(msg, ENG_EIO, "cannot open '%s': %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return eng_fail(msg, ENG_EIO, "'%s' is not a regular file", path);
    }
    if (st.st_size < 24) {
        close(fd);
        return eng_fail(msg, ENG_EFORMAT, "'%s' is too small to be a GGUF file (%lld bytes)", path,
                        (long long)st.st_size);
    }
    void *m = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (m == MAP_FAILED)
        return eng_fail(msg, ENG_EIO, "cannot map '%s': %s", path, strerror(errno));
    int rc = gguf_parse(out, m, (size_t)st.st_size, msg);
    if (rc) {
        munmap(m, (size_t)st.st_size);
        return rc;
    }
    (*out)->mapped = true;
    return 0;
}

const gguf_kv_t *gguf_find(const gguf_t *g, const char *key) {
    for (size_t i = 0; i < g->n_kv; i++)
        if (g->kv[i].key && strcmp(g->kv[i].key, key) == 0) return &g->kv[i];
    return NULL;
}

const gguf_tensor_t *gguf_tensor(const gguf_t *g, const char *name) {
    for (size_t i = 0; i < g->n_tensors; i++)
        if (strcmp(g->tensors[i].name, name) == 0) return &g->tensors[i];
    return NULL;
}

int gguf_get_u64(const gguf_t *g, const char *key, uint64_t *out, char *msg) {
    const gguf_kv_t *kv = gguf_find(g, key);
    if (!kv) return 1;
    switch (kv->type) {
    case GGUF_U8:
    case GGUF_U16:
    case GGUF_U32:
    case GGUF_U64:
        *out = kv->v.u;
        return 0;
    case GGUF_I8:
    case GGUF_I16:
    case GGUF_I32:
    case GGUF_I64:
        if (kv->v.i < 0) return eng_fail(msg, ENG_EFORMAT, "'%s' is negative", key);
        *out = (uint64_t)kv->v.i;
        return 0;
    default:
        return eng_fail(msg, ENG_EFORMAT, "'%s' must be an integer (type %u)", key, kv->type);
    }
}

int gguf_get_f64(const gguf_t *g, const char *key, double *out, char *msg) {
    const gguf_kv_t *kv = gguf_find(g, key);
    if (!kv) return 1;
    if (kv->type == GGUF_F32 || kv->type == GGUF_F64)
        *out = kv->v.f;
    else if (kv->type == GGUF_U32 || kv->type == GGUF_U64)
        *out = (double)kv->v.u;
    else if (kv->type == GGUF_I32 || kv->type == GGUF_I64)
        *out = (double)kv->v.i;
    else
        return eng_fail(msg, ENG_EFORMAT, "'%s' must be a number (type %u)", key, kv->type);
    return 0;
}

int gguf_get_bool(const gguf_t *g, const char *key, bool *out, char *msg) {
    const gguf_kv_t *kv = gguf_find(g, key);
    if (!kv) return 1;
    if (kv->type != GGUF_BOOL)
        return eng_fail(msg, ENG_EFORMAT, "'%s' must be a bool (type %u)", key, kv->type);
    *out = kv->v.b;
    return 0;
}

const char *gguf_get_str(const gguf_t *g, const char *key) {
    const gguf_kv_t *kv = gguf_find(g, key);
    return kv && kv->type == GGUF_STRING ? kv->str : NULL;
}
