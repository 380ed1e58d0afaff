/* helpers.h - shared fixtures for the unit tests: model paths, temp files, RNG. */
#ifndef TIDALD_TESTS_HELPERS_H
#define TIDALD_TESTS_HELPERS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* The shared stories260K model: $TIDALD_SHARED_MODELS/stories260K.gguf, by default
 * ../shared/models/ (a GPU machine whose copy of the tree has no ../shared can point the
 * variable at the models wherever they are). */
const char *stories_path(void);
#define STORIES_PATH stories_path()

/* True if the shared stories260K model is present; otherwise the caller skips. */
bool have_stories(void);
/* A real checkpoint fetched by `make models` ($TIDALD_MODELS_DIR/name, by default
 * build/models/name), or NULL when it is not there (offline): the caller skips, naming
 * `make models`. The path lives until the next call. */
const char *real_model_path(const char *name);
#define SMOLLM2_GGUF "SmolLM2-135M-Instruct.Q4_1.gguf"
#define GEMMA3_GGUF "gemma-3-270m-q4_k_m.gguf"

/* Path of a synthetic model (e.g. "tiny-f32") generated once per test process into /tmp. */
const char *synth_path(const char *name);
float frand(uint64_t *s); /* uniform in [-1, 1) */
/* The whole file, malloc'd with a NUL after its *len bytes (so a text file is a C string);
 * fails the test if it cannot be read or is empty. Paths are relative to the repository root,
 * where the unit tests run. */
uint8_t *test_slurp(const char *path, size_t *len);
/* The test's own greedy oracle: index of the largest of x[0..n), the lowest on ties. */
int32_t test_argmax(const float *x, uint32_t n);
/* Skip the calling test, with the reason, unless a CUDA GPU can be opened. */
void need_cuda_gpu(void);

#endif
