/* helpers.c - shared fixtures for the unit tests. */
#include "helpers.h"
#include "../../engine/backend.h"
#include "../../tools/synth_model.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

const char *stories_path(void) {
    static char path[512];
    const char *dir = getenv("TIDALD_SHARED_MODELS");
    snprintf(path, sizeof(path), "%s/stories260K.gguf", dir && *dir ? dir : "../shared/models");
    return path;
}

bool have_stories(void) {
    return access(STORIES_PATH, R_OK) == 0;
}

uint8_t *test_slurp(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    cr_assert(f, "cannot open %s (run the unit tests from the repository root)", path);
    cr_assert_eq(fseek(f, 0, SEEK_END), 0);
    long size = ftell(f);
    cr_assert_gt(size, 0, "%s is empty", path);
    cr_assert_eq(fseek(f, 0, SEEK_SET), 0);
    uint8_t *buf = malloc((size_t)size + 1);
    cr_assert(buf);
    cr_assert_eq(fread(buf, 1, (size_t)size, f), (size_t)size, "short read of %s", path);
    fclose(f);
    buf[size] = 0;
    *len = (size_t)size;
    return buf;
}

const char *real_model_path(const char *name) {
    static char path[512];
    const char *dir = getenv("TIDALD_MODELS_DIR");
    snprintf(path, sizeof(path), "%s/%s", dir && *dir ? dir : "build/models", name);
    return access(path, R_OK) == 0 ? path : NULL;
}

/* Models are written once per test run into $TIDALD_TEST_TMP (make test empties it first);
 * tests run in parallel processes, so each writes a private file and renames it into place. */
const char *synth_path(const char *name) {
    static char path[512];
    const char *dir = getenv("TIDALD_TEST_TMP");
    snprintf(path, sizeof(path), "%s/%s.gguf", dir && *dir ? dir : "/tmp", name);
    if (access(path, R_OK) != 0) {
        char tmp[600], msg[256] = {0};
        snprintf(tmp, sizeof(tmp), "%s.%d.tmp", path, (int)getpid());
        cr_assert_eq(synth_write(name, tmp, 0, msg), 0, "synth_write: %s", msg);
        cr_assert_eq(rename(tmp, path), 0, "rename %s", tmp);
    }
    return path;
}

float frand(uint64_t *s) {
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *s = x;
    return (float)(x >> 40) / 8388608.0f - 1.0f;
}

int32_t test_argmax(const float *x, uint32_t n) {
    int32_t b = 0;
    for (uint32_t i = 1; i < n; i++)
        if (x[i] > x[b]) b = (int32_t)i;
    return b;
}

void need_cuda_gpu(void) {
    eng_backend_t *probe;
    char msg[ENG_ERRMSG_LEN];
    if (eng_backend_open(&probe, ENG_DEVICE_CUDA, 1, msg) != 0)
        cr_skip_test("no CUDA GPU here (%s); the CUDA parity tests need one", msg);
    probe->ops->destroy(probe);
}
