/* helpers.c - shared fixtures for the unit tests. */
#include "helpers.h"
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
