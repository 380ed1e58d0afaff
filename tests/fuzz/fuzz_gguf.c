/* fuzz_gguf.c - libFuzzer target for model files: arbitrary bytes through the GGUF parser and,
 * when they parse, the tokenizer loader over their metadata (vocabulary, scores, types,
 * merges), then a tokenize/detokenize round over the input itself. Hostile sizes, counts,
 * offsets and strings must give errors, never crashes, hangs or leaks. */
#include "../../engine/gguf.h"
#include "../../engine/model.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    gguf_t *g = NULL;
    char msg[ENG_ERRMSG_LEN];
    if (gguf_parse(&g, data, size, msg) != 0) {
        if (!msg[0]) abort(); /* every refusal names its problem */
        return 0;
    }
    const gguf_kv_t *toks = gguf_find(g, "tokenizer.ggml.tokens");
    eng_tokenizer_t *t = NULL;
    if (toks && toks->type == GGUF_ARRAY && toks->arr_n > 0 && toks->arr_n < (1u << 20) &&
        eng__tokenizer_load(&t, g, (uint32_t)toks->arr_n, msg) == 0) {
        int32_t *ids;
        size_t n;
        size_t len = size < 256 ? size : 256;
        if (eng_tokenize_ex(t, (const char *)data, len, true, true, &ids, &n, msg) == 0) {
            eng_detok_t d;
            eng_detok_init(&d, t);
            char out[256];
            for (size_t i = 0; i < n; i++) eng_detok_push(&d, ids[i], out, sizeof(out));
            eng_detok_flush(&d, out, sizeof(out));
            free(ids);
        }
        eng__tokenizer_free(t);
    }
    gguf_close(g);
    return 0;
}
