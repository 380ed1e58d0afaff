/* gguf_writer.c - GGUF v3 serialization (spec: ggml docs/gguf.md). */
#include "gguf_writer.h"
#include "../base/f16.h"
#include "../engine/quant.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    char *name;
    uint32_t n_dims;
    uint64_t ne[4];
    uint32_t type;
    const void *data;
    size_t nbytes;
} gw_tensor_t;

struct gw {
    uint8_t *kv;
    size_t kv_len, kv_cap;
    uint64_t n_kv;
    gw_tensor_t *t;
    size_t n_t, cap_t;
    bool oom;
};

static void put(gw_t *w, const void *p, size_t n) {
    if (w->oom || !n) return;
    if (w->kv_len + n > w->kv_cap) {
        size_t cap = w->kv_cap ? w->kv_cap : 4096;
        while (cap < w->kv_len + n) cap *= 2;
        uint8_t *b = realloc(w->kv, cap);
        if (!b) {
            w->oom = true;
            return;
        }
        w->kv = b;
        w->kv_cap = cap;
    }
    memcpy(w->kv + w->kv_len, p, n);
    w->kv_len += n;
}
static void put_u32(gw_t *w, uint32_t v) {
    put(w, &v, 4);
}
static void put_u64(gw_t *w, uint64_t v) {
    put(w, &v, 8);
}
static void put_str(gw_t *w, const char *s) {
    put_u64(w, strlen(s));
    put(w, s, strlen(s));
}
static void key(gw_t *w, const char *k, uint32_t type) {
    put_str(w, k);
    put_u32(w, type);
    w->n_kv++;
}

gw_t *gw_create(void) {
    return calloc(1, sizeof(gw_t));
}

void gw_free(gw_t *w) {
    if (!w) return;
    for (size_t i = 0; i < w->n_t; i++) free(w->t[i].name);
    free(w->t);
    free(w->kv);
    free(w);
}

void gw_kv_str(gw_t *w, const char *k, const char *v) {
    key(w, k, 8);
    put_str(w, v);
}
void gw_kv_u32(gw_t *w, const char *k, uint32_t v) {
    key(w, k, 4);
    put_u32(w, v);
}
void gw_kv_f32(gw_t *w, const char *k, float v) {
    key(w, k, 6);
    put(w, &v, 4);
}
void gw_kv_bool(gw_t *w, const char *k, bool v) {
    key(w, k, 7);
    uint8_t b = v;
    put(w, &b, 1);
}
void gw_kv_arr_str(gw_t *w, const char *k, const char *const *v, size_t n) {
    key(w, k, 9);
    put_u32(w, 8);
    put_u64(w, n);
    for (size_t i = 0; i < n; i++) put_str(w, v[i]);
}
void gw_kv_arr_f32(gw_t *w, const char *k, const float *v, size_t n) {
    key(w, k, 9);
    put_u32(w, 6);
    put_u64(w, n);
    put(w, v, 4 * n);
}
void gw_kv_arr_i32(gw_t *w, const char *k, const int32_t *v, size_t n) {
    key(w, k, 9);
    put_u32(w, 5);
    put_u64(w, n);
    put(w, v, 4 * n);
}

void gw_tensor(gw_t *w, const char *name, uint32_t n_dims, const uint64_t *ne, uint32_t type,
               const void *data, size_t nbytes) {
    if (w->oom) return;
    if (w->n_t == w->cap_t) {
        size_t cap = w->cap_t ? w->cap_t * 2 : 64;
        gw_tensor_t *t = realloc(w->t, cap * sizeof(*t));
        if (!t) {
            w->oom = true;
            return;
        }
        w->t = t;
        w->cap_t = cap;
    }
    gw_tensor_t *t = &w->t[w->n_t++];
    memset(t, 0, sizeof(*t));
    t->name = strdup(name);
    if (!t->name) w->oom = true;
    t->n_dims = n_dims;
    for (uint32_t d = 0; d < n_dims && d < 4; d++) t->ne[d] = ne[d];
    t->type = type;
    t->data = data;
    t->nbytes = nbytes;
}

#define ALIGN 32
static size_t pad(size_t n) {
    return (ALIGN - n % ALIGN) % ALIGN;
}

/* header bytes (magic .. tensor infos), and each tensor's offset */
static int build_header(gw_t *w, uint8_t **out, size_t *len) {
    gw_t h = {0};
    put(&h, "GGUF", 4);
    put_u32(&h, 3);
    put_u64(&h, w->n_t);
    put_u64(&h, w->n_kv);
    put(&h, w->kv, w->kv_len);
    size_t off = 0;
    for (size_t i = 0; i < w->n_t; i++) {
        gw_tensor_t *t = &w->t[i];
        put_str(&h, t->name);
        put_u32(&h, t->n_dims);
        for (uint32_t d = 0; d < t->n_dims; d++) put_u64(&h, t->ne[d]);
        put_u32(&h, t->type);
        put_u64(&h, off);
        off += t->nbytes + pad(t->nbytes);
    }
    static const uint8_t zeros[ALIGN];
    put(&h, zeros, pad(h.kv_len));
    if (h.oom || w->oom) {
        free(h.kv);
        return -1;
    }
    *out = h.kv;
    *len = h.kv_len;
    return 0;
}

int gw_write(gw_t *w, const char *path, char *msg) {
    uint8_t *hdr;
    size_t hlen;
    if (build_header(w, &hdr, &hlen)) {
        snprintf(msg, 256, "out of memory");
        return -1;
    }
    FILE *f = fopen(path, "wb");
    if (!f) {
        snprintf(msg, 256, "cannot create '%s'", path);
        free(hdr);
        return -1;
    }
    static const uint8_t zeros[ALIGN];
    bool ok = fwrite(hdr, 1, hlen, f) == hlen;
    for (size_t i = 0; ok && i < w->n_t; i++) {
        ok = fwrite(w->t[i].data, 1, w->t[i].nbytes, f) == w->t[i].nbytes;
        size_t p = pad(w->t[i].nbytes);
        if (ok && p) ok = fwrite(zeros, 1, p, f) == p;
    }
    ok = (fclose(f) == 0) && ok;
    free(hdr);
    if (!ok) {
        snprintf(msg, 256, "write to '%s' failed", path);
        return -1;
    }
    return 0;
}

int gw_write_mem(gw_t *w, uint8_t **out, size_t *len) {
    uint8_t *hdr;
    size_t hlen;
    if (build_header(w, &hdr, &hlen)) return -1;
    size_t total = hlen;
    for (size_t i = 0; i < w->n_t; i++) total += w->t[i].nbytes + pad(w->t[i].nbytes);
    uint8_t *b = realloc(hdr, total ? total : 1);
    if (!b) {
        free(hdr);
        return -1;
    }
    size_t p = hlen;
    for (size_t i = 0; i < w->n_t; i++) {
        memcpy(b + p, w->t[i].data, w->t[i].nbytes);
        p += w->t[i].nbytes;
        memset(b + p, 0, pad(w->t[i].nbytes));
        p += pad(w->t[i].nbytes);
    }
    *out = b;
    *len = total;
    return 0;
}

int gw_kv_copy(gw_t *w, const gguf_kv_t *kv) {
    if (kv->type == GGUF_STRING) {
        key(w, kv->key, GGUF_STRING);
        put_u64(w, kv->str_len);
        put(w, kv->str, kv->str_len);
    } else if (kv->type == GGUF_ARRAY) {
        size_t es = gguf_scalar_size(kv->arr_type);
        if (kv->arr_type != GGUF_STRING && !es) return -1; /* arrays of arrays */
        key(w, kv->key, GGUF_ARRAY);
        put_u32(w, kv->arr_type);
        put_u64(w, kv->arr_n);
        if (kv->arr_type == GGUF_STRING)
            for (uint64_t i = 0; i < kv->arr_n; i++) {
                put_u64(w, kv->arr_slen[i]);
                put(w, kv->arr_s[i], kv->arr_slen[i]);
            }
        else
            put(w, kv->arr, (size_t)kv->arr_n * es);
    } else {
        size_t es = gguf_scalar_size(kv->type);
        if (!es) return -1;
        uint8_t b[8];
        if (kv->type == GGUF_F32) {
            float f = (float)kv->v.f;
            memcpy(b, &f, 4);
        } else if (kv->type == GGUF_F64) {
            memcpy(b, &kv->v.f, 8);
        } else if (kv->type == GGUF_BOOL) {
            b[0] = kv->v.b;
        } else { /* integers, little-endian, two's complement for the signed ones */
            uint64_t u = kv->v.u;
            for (size_t i = 0; i < 8; i++) b[i] = (uint8_t)(u >> (8 * i));
        }
        key(w, kv->key, kv->type);
        put(w, b, es);
    }
    return w->oom ? -1 : 0;
}

size_t gw_type_bytes(uint32_t type, size_t n) {
    size_t be = eng_q_block_elems(type);
    return be ? n / be * eng_q_block_bytes(type) : 0;
}

size_t gw_convert(uint32_t type, const float *src, size_t n, void *dst) {
    return eng_q_quantize_row(type, src, dst, n) == 0 ? gw_type_bytes(type, n) : 0;
}
