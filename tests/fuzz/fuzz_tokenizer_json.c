/* fuzz_tokenizer_json.c - libFuzzer target for `tidald convert-tokenizer`: arbitrary bytes as a
 * tokenizer.json through the converter and, when it writes a vocabulary, through the loader and
 * a tokenize/detokenize round over the input itself. Hostile ids, sizes, structures and
 * strings must give errors naming the problem, never crashes, hangs or leaks. */
#include "../../engine/engine.h"
#include "../../tools/hf_vocab.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char in[64], out[64], msg[ENG_ERRMSG_LEN] = {0};
    snprintf(in, sizeof(in), "/tmp/fuzz-tokjson-%d.json", (int)getpid());
    snprintf(out, sizeof(out), "/tmp/fuzz-tokjson-%d.gguf", (int)getpid());
    FILE *f = fopen(in, "wb");
    if (!f) return 0;
    fwrite(data, 1, size, f);
    fclose(f);
    hf_vocab_opts_t o = {.input = in};
    if (hf_vocab_convert(&o, out, NULL, msg) != 0) {
        if (!msg[0]) abort(); /* every refusal names its problem */
        return 0;
    }
    eng_tokenizer_t *t = NULL;
    if (eng_vocab_load(&t, out, msg) == 0) {
        int32_t *ids;
        size_t n, len = size < 256 ? size : 256;
        if (eng_utf8_valid((const char *)data, len) &&
            eng_tokenize_ex(t, (const char *)data, len, true, true, &ids, &n, msg) == 0) {
            eng_detok_t d;
            eng_detok_init(&d, t);
            char text[256];
            for (size_t i = 0; i < n; i++) eng_detok_push(&d, ids[i], text, sizeof(text));
            eng_detok_flush(&d, text, sizeof(text));
            free(ids);
        }
        eng_vocab_free(t);
    } else if (!msg[0]) {
        abort();
    }
    unlink(out);
    return 0;
}
