/* mkmodel.c - command-line front end of the synthetic GGUF writer. */
#include "synth_model.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void usage(FILE *f) {
    fprintf(
        f, "usage: mkmodel --shape SHAPE-TYPE --out PATH [--seed N]\n\n"
           "Writes a synthetic GGUF model (llama, or gemma3 for the gemma shape) with random "
           "weights (fixed seed).\n"
           "TYPE is f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, q4_k, q5_k, q6_k or\n"
           "iq4_nl (every 2-D weight; `tidald quantize` makes llama.cpp's mixtures). Shapes:\n");
    for (const synth_shape_t *s = synth_shapes; s->name; s++)
        fprintf(f, "  %-6s %s\n", s->name, s->about);
}

int main(int argc, char **argv) {
    const char *shape = NULL, *out = NULL;
    unsigned long long seed = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0) {
            usage(stdout);
            return 0;
        } else if (strcmp(argv[i], "--shape") == 0 && i + 1 < argc) {
            shape = argv[++i];
        } else if (strcmp(argv[i], "--out") == 0 && i + 1 < argc) {
            out = argv[++i];
        } else if (strcmp(argv[i], "--seed") == 0 && i + 1 < argc) {
            seed = strtoull(argv[++i], NULL, 10);
        } else {
            usage(stderr);
            return 2;
        }
    }
    if (!shape || !out) {
        usage(stderr);
        return 2;
    }
    char msg[256] = {0};
    if (synth_write(shape, out, seed, msg) != 0) {
        fprintf(stderr, "mkmodel: %s\n", msg);
        return 1;
    }
    fprintf(stderr, "mkmodel: wrote %s to %s\n", shape, out);
    return 0;
}
