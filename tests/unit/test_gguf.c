/* test_gguf.c - the GGUF reader accepts real files and refuses every kind of bad one clearly. */
#include "../../engine/engine.h"
#include "../../engine/gguf.h"
#include "../../tools/gguf_writer.h"
#include "helpers.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* A small valid file: a few keys of every kind and two tensors. */
static uint8_t *small_file(size_t *len) {
    gw_t *w = gw_create();
    static float a[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    static uint16_t b[32];
    static const char *strs[] = {"x", "yy", "zzz"};
    static const int32_t ints[] = {1, -2, 3};
    gw_kv_str(w, "general.architecture", "llama");
    gw_kv_u32(w, "general.alignment", 32);
    gw_kv_f32(w, "some.float", 0.5f);
    gw_kv_bool(w, "some.bool", true);
    gw_kv_arr_str(w, "some.strs", strs, 3);
    gw_kv_arr_i32(w, "some.ints", ints, 3);
    uint64_t ne_a[2] = {4, 2}, ne_b[1] = {32};
    gw_tensor(w, "a", 2, ne_a, GGML_F32, a, sizeof(a));
    gw_tensor(w, "b", 1, ne_b, GGML_F16, b, sizeof(b));
    uint8_t *buf;
    cr_assert_eq(gw_write_mem(w, &buf, len), 0);
    gw_free(w);
    return buf;
}

static int parse(const uint8_t *buf, size_t len, char *msg) {
    gguf_t *g = NULL;
    int rc = gguf_parse(&g, buf, len, msg);
    if (rc == 0) gguf_close(g);
    return rc;
}

Test(gguf, test_gguf_parses_a_written_file) {
    size_t len;
    uint8_t *buf = small_file(&len);
    gguf_t *g;
    char msg[ENG_ERRMSG_LEN];
    cr_assert_eq(gguf_parse(&g, buf, len, msg), 0, "%s", msg);
    cr_expect_eq(g->version, 3);
    cr_expect_str_eq(gguf_get_str(g, "general.architecture"), "llama");
    const gguf_kv_t *s = gguf_find(g, "some.strs");
    cr_assert(s);
    cr_expect_eq(s->arr_n, 3);
    cr_expect_eq(s->arr_slen[2], 3);
    cr_expect(memcmp(s->arr_s[2], "zzz", 3) == 0);
    const gguf_tensor_t *a = gguf_tensor(g, "a");
    cr_assert(a);
    cr_expect_eq(a->ne[0], 4);
    cr_expect_eq(a->ne[1], 2);
    cr_expect_eq(((const float *)a->data)[7], 8.0f);
    cr_expect_eq(gguf_tensor(g, "b")->nbytes, 64);
    gguf_close(g);
    free(buf);
}

Test(gguf, test_gguf_rejects_truncation_at_every_length) {
    size_t len;
    uint8_t *buf = small_file(&len);
    char msg[ENG_ERRMSG_LEN];
    for (size_t n = 0; n < len; n++) {
        uint8_t *copy = malloc(n ? n : 1); /* exact-size copy so ASan sees any over-read */
        memcpy(copy, buf, n);
        msg[0] = 0;
        int rc = parse(copy, n, msg);
        cr_assert_neq(rc, 0, "a %zu-byte prefix of %zu parsed", n, len);
        cr_assert(msg[0] != 0, "no message for a %zu-byte prefix", n);
        free(copy);
    }
    free(buf);
}

Test(gguf, test_gguf_survives_random_corruption) {
    size_t len;
    uint8_t *buf = small_file(&len);
    uint8_t *copy = malloc(len);
    uint64_t rng = 42;
    char msg[ENG_ERRMSG_LEN];
    for (int it = 0; it < 3000; it++) {
        memcpy(copy, buf, len);
        int flips = 1 + (int)((frand(&rng) + 1) * 4);
        for (int f = 0; f < flips; f++) {
            size_t pos = (size_t)((frand(&rng) + 1) * 0.5 * len) % len;
            copy[pos] = (uint8_t)((frand(&rng) + 1) * 128);
        }
        parse(copy, len, msg); /* any result is fine; ASan/UBSan judge the reads */
    }
    free(copy);
    free(buf);
}

/* Overwrite bytes at an offset of a valid file and expect a specific refusal. */
static void expect_refusal(size_t at, const void *bytes, size_t n, int want, const char *needle) {
    size_t len;
    uint8_t *buf = small_file(&len);
    memcpy(buf + at, bytes, n);
    char msg[ENG_ERRMSG_LEN] = {0};
    int rc = parse(buf, len, msg);
    cr_expect_eq(rc, want, "rc %d, message: %s", rc, msg);
    cr_expect(strstr(msg, needle) != NULL, "message '%s' lacks '%s'", msg, needle);
    free(buf);
}

Test(gguf, test_gguf_rejects_bad_magic_version_and_counts) {
    expect_refusal(0, "GGUX", 4, ENG_EFORMAT, "magic");
    uint32_t v = 1;
    expect_refusal(4, &v, 4, ENG_EUNSUPPORTED, "version 1");
    uint64_t huge = UINT64_MAX / 2;
    expect_refusal(8, &huge, 8, ENG_EFORMAT, "tensors");
    expect_refusal(16, &huge, 8, ENG_EFORMAT, "metadata");
}

Test(gguf, test_gguf_rejects_hostile_string_length) {
    /* first key's length field sits at offset 24 */
    uint64_t huge = 1ull << 62;
    expect_refusal(24, &huge, 8, ENG_EFORMAT, "runs past end");
}

/* Offsets of fields in the tensor-info section: find tensor "b"'s info by scanning. */
static size_t find_tensor_info(const uint8_t *buf, size_t len, const char *name) {
    size_t nl = strlen(name);
    for (size_t i = 0; i + 8 + nl < len; i++) {
        uint64_t l;
        memcpy(&l, buf + i, 8);
        if (l == nl && memcmp(buf + i + 8, name, nl) == 0 && buf[i + 8 + nl] <= 4 &&
            buf[i + 8 + nl] >= 1)
            return i + 8 + nl; /* offset of n_dims */
    }
    cr_assert_fail("tensor info '%s' not found", name);
    return 0;
}

Test(gguf, test_gguf_rejects_unsupported_tensor_type_naming_it) {
    size_t len;
    uint8_t *buf = small_file(&len);
    size_t at = find_tensor_info(buf, len, "b") + 4 + 8; /* n_dims, 1 dim, then type */
    free(buf);
    uint32_t iq2 = 16; /* IQ2_XXS: a type whose blocks tidald cannot decode */
    expect_refusal(at, &iq2, 4, ENG_EUNSUPPORTED, "tensor 'b' has type IQ2_XXS");
}

Test(gguf, test_gguf_rejects_bad_dims_offsets_and_sizes) {
    size_t len;
    uint8_t *buf = small_file(&len);
    size_t nd = find_tensor_info(buf, len, "b");
    free(buf);
    uint32_t five = 5, zero = 0;
    expect_refusal(nd, &five, 4, ENG_EFORMAT, "dimensions");
    expect_refusal(nd, &zero, 4, ENG_EFORMAT, "dimensions");
    uint64_t dim0 = 0, bigdim = 1ull << 40;
    expect_refusal(nd + 4, &dim0, 8, ENG_EFORMAT, "dimension 0");
    expect_refusal(nd + 4, &bigdim, 8, ENG_EFORMAT, "dimension 0");
    expect_refusal(nd + 4, &bigdim, 8, ENG_EFORMAT, "tensor 'b'");
    uint64_t misaligned = 33, past = 1 << 20;
    expect_refusal(nd + 4 + 8 + 4, &misaligned, 8, ENG_EFORMAT, "not aligned");
    expect_refusal(nd + 4 + 8 + 4, &past, 8, ENG_EFORMAT, "past end of file");
}

Test(gguf, test_gguf_rejects_duplicate_keys_and_tensors) {
    gw_t *w = gw_create();
    gw_kv_u32(w, "k", 1);
    gw_kv_u32(w, "k", 2);
    uint8_t *buf;
    size_t len;
    cr_assert_eq(gw_write_mem(w, &buf, &len), 0);
    char msg[ENG_ERRMSG_LEN] = {0};
    cr_expect_eq(parse(buf, len, msg), ENG_EFORMAT);
    cr_expect(strstr(msg, "duplicate metadata key 'k'"), "%s", msg);
    free(buf);
    gw_free(w);

    w = gw_create();
    static float d[4];
    uint64_t ne[1] = {4};
    gw_tensor(w, "t", 1, ne, GGML_F32, d, sizeof(d));
    gw_tensor(w, "t", 1, ne, GGML_F32, d, sizeof(d));
    cr_assert_eq(gw_write_mem(w, &buf, &len), 0);
    cr_expect_eq(parse(buf, len, msg), ENG_EFORMAT);
    cr_expect(strstr(msg, "duplicate tensor name 't'"), "%s", msg);
    free(buf);
    gw_free(w);
}

Test(gguf, test_gguf_rejects_bad_alignment_value) {
    gw_t *w = gw_create();
    gw_kv_u32(w, "general.alignment", 24);
    uint8_t *buf;
    size_t len;
    cr_assert_eq(gw_write_mem(w, &buf, &len), 0);
    char msg[ENG_ERRMSG_LEN] = {0};
    cr_expect_eq(parse(buf, len, msg), ENG_EFORMAT);
    cr_expect(strstr(msg, "alignment"), "%s", msg);
    free(buf);
    gw_free(w);
}

Test(gguf, test_gguf_open_reports_missing_and_non_regular_files) {
    gguf_t *g;
    char msg[ENG_ERRMSG_LEN] = {0};
    cr_expect_eq(gguf_open(&g, "/nonexistent/model.gguf", msg), ENG_EIO);
    cr_expect(strstr(msg, "cannot open"), "%s", msg);
    cr_expect_eq(gguf_open(&g, "/tmp", msg), ENG_EIO);
    cr_expect(strstr(msg, "not a regular file"), "%s", msg);
}

Test(gguf, test_gguf_reads_stories260K) {
    if (!have_stories()) cr_skip_test("%s not present; skipping", STORIES_PATH);
    gguf_t *g;
    char msg[ENG_ERRMSG_LEN];
    cr_assert_eq(gguf_open(&g, STORIES_PATH, msg), 0, "%s", msg);
    cr_expect_eq(g->version, 3);
    cr_expect_eq(g->n_tensors, 48);
    const gguf_tensor_t *t = gguf_tensor(g, "blk.0.ffn_down.weight");
    cr_assert(t);
    cr_expect_eq(t->ne[0], 172);
    cr_expect_eq(t->ne[1], 64);
    gguf_close(g);
}

/* Truncating a real model file anywhere gives a clear load error, never a crash. */
Test(gguf, test_model_load_rejects_truncated_model_files) {
    size_t len;
    uint8_t *all = test_slurp(synth_path("tiny-f32"), &len);
    long size = (long)len;
    char path[64];
    snprintf(path, sizeof(path), "/tmp/tidald-trunc-%d.gguf", (int)getpid());
    for (long n = 0; n < size; n += size / 97 + 1) {
        FILE *o = fopen(path, "wb");
        fwrite(all, 1, (size_t)n, o);
        fclose(o);
        eng_model_t *m = NULL;
        char msg[ENG_ERRMSG_LEN] = {0};
        int rc = eng_model_load(&m, path, msg);
        cr_assert_neq(rc, 0, "truncated to %ld bytes but loaded", n);
        cr_assert(msg[0], "no message at %ld bytes", n);
    }
    remove(path);
    free(all);
}

Test(gguf, test_gguf_accepts_version_2) {
    size_t len;
    uint8_t *buf = small_file(&len);
    uint32_t v2 = 2;
    memcpy(buf + 4, &v2, 4); /* v2 and v3 share the layout; v3 only added big-endian files */
    gguf_t *g;
    char msg[ENG_ERRMSG_LEN];
    cr_assert_eq(gguf_parse(&g, buf, len, msg), 0, "%s", msg);
    cr_expect_eq(g->version, 2);
    gguf_close(g);
    free(buf);
}

/* gw_kv_copy reproduces every key of a file (scalars of each width, strings, string and
 * numeric arrays): what `tidald quantize` relies on to carry a model's metadata over. */
Test(gguf, test_kv_copy_reproduces_every_key) {
    char msg[ENG_ERRMSG_LEN];
    gguf_t *g;
    cr_assert_eq(gguf_open(&g, synth_path("tiny-f32"), msg), 0, "%s", msg);
    gw_t *w = gw_create();
    gw_kv_copy(w, &(gguf_kv_t){.key = "x.i8", .type = GGUF_I8, .v.i = -5});
    gw_kv_copy(w, &(gguf_kv_t){.key = "x.i64", .type = GGUF_I64, .v.i = -1234567890123});
    gw_kv_copy(w, &(gguf_kv_t){.key = "x.f64", .type = GGUF_F64, .v.f = 0.1});
    for (size_t i = 0; i < g->n_kv; i++)
        cr_assert_eq(gw_kv_copy(w, &g->kv[i]), 0, "%s", g->kv[i].key);
    uint8_t *buf;
    size_t len;
    cr_assert_eq(gw_write_mem(w, &buf, &len), 0);
    gguf_t *h;
    cr_assert_eq(gguf_parse(&h, buf, len, msg), 0, "%s", msg);
    cr_assert_eq(h->n_kv, g->n_kv + 3);
    cr_expect_eq(gguf_find(h, "x.i8")->v.i, -5);
    cr_expect_eq(gguf_find(h, "x.i64")->v.i, -1234567890123);
    cr_expect_eq(gguf_find(h, "x.f64")->v.f, 0.1);
    for (size_t i = 0; i < g->n_kv; i++) {
        const gguf_kv_t *a = &g->kv[i], *b = gguf_find(h, a->key);
        cr_assert(b, "%s", a->key);
        cr_expect_eq(a->type, b->type, "%s", a->key);
        if (a->type == GGUF_STRING) {
            cr_expect(a->str_len == b->str_len && !memcmp(a->str, b->str, a->str_len), "%s",
                      a->key);
        } else if (a->type == GGUF_ARRAY) {
            cr_expect_eq(a->arr_type, b->arr_type, "%s", a->key);
            cr_assert_eq(a->arr_n, b->arr_n, "%s", a->key);
            if (a->arr_type == GGUF_STRING)
                for (uint64_t k = 0; k < a->arr_n; k++)
                    cr_expect(a->arr_slen[k] == b->arr_slen[k] &&
                                  !memcmp(a->arr_s[k], b->arr_s[k], a->arr_slen[k]),
                              "%s[%llu]", a->key, (unsigned long long)k);
            else
                cr_expect_eq(memcmp(a->arr, b->arr, a->arr_n * gguf_scalar_size(a->arr_type)), 0,
                             "%s", a->key);
        } else {
            cr_expect_eq(a->v.u, b->v.u, "%s", a->key);
        }
    }
    gguf_close(h);
    free(buf);
    gw_free(w);
    gguf_close(g);
}
