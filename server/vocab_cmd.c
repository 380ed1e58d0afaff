/* vocab_cmd.c - `tidald convert-tokenizer` (a Hugging Face tokenizer.json to a GGUF vocabulary,
 * tools/hf_vocab.c) and `tidald tokenize` (a text's token ids, as llama-tokenize --ids). */
#include "../engine/engine.h"
#include "../tools/hf_vocab.h"
#include "cli.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void convert_usage(FILE *f) {
    fprintf(f,
            "usage: tidald convert-tokenizer TOKENIZER OUT.gguf [--config FILE] [--pre NAME]\n"
            "                                [--model MODEL.gguf] [--vocab-size N]\n\n"
            "Convert a Hugging Face tokenizer.json (TOKENIZER: the file, or the directory holding\n"
            "it and tokenizer_config.json) to a GGUF vocabulary, as llama.cpp's converter writes\n"
            "it: byte-level BPE vocabularies (GPT-2, SmolLM, Llama 3, Qwen2) as 'gpt2' with their\n"
            "merges and pre-tokenizer, SentencePiece ones with byte fallback (Llama 2, Gemma) as\n"
            "'llama' with piece scores.\n\n"
            "  --config FILE      tokenizer_config.json (default: the one beside tokenizer.json):\n"
            "                     special tokens, add_bos/add_eos, chat template\n"
            "  --pre NAME         record this pre-tokenizer instead of the recognised one\n"
            "  --model FILE       write this model with its vocabulary replaced, not a\n"
            "                     vocabulary-only file\n"
            "  --vocab-size N     pad the vocabulary to N tokens with unused [PADn] tokens\n");
}

int cmd_convert_tokenizer(int argc, char **argv) {
    hf_vocab_opts_t o = {0};
    const char *pos[2];
    int n_pos = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        bool has_val = i + 1 < argc;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            convert_usage(stdout);
            return 0;
        } else if (!strcmp(a, "--config") && has_val) {
            o.config = argv[++i];
        } else if (!strcmp(a, "--pre") && has_val) {
            o.pre = argv[++i];
        } else if (!strcmp(a, "--model") && has_val) {
            o.model = argv[++i];
        } else if (!strcmp(a, "--vocab-size") && has_val) {
            char *end;
            long n = strtol(argv[++i], &end, 10);
            if (*end || n < 1 || n > (1l << 22)) {
                fprintf(stderr, "tidald convert-tokenizer: --vocab-size must be 1..4194304\n");
                return 2;
            }
            o.vocab_size = (uint32_t)n;
        } else if (a[0] == '-' || n_pos == 2) {
            fprintf(stderr, "tidald convert-tokenizer: unexpected argument '%s'\n", a);
            convert_usage(stderr);
            return 2;
        } else {
            pos[n_pos++] = a;
        }
    }
    if (n_pos != 2) {
        convert_usage(stderr);
        return 2;
    }
    o.input = pos[0];
    char msg[ENG_ERRMSG_LEN];
    if (hf_vocab_convert(&o, pos[1], stderr, msg)) {
        fprintf(stderr, "tidald convert-tokenizer: %s\n", msg);
        return 1;
    }
    return 0;
}

static void tokenize_usage(FILE *f) {
    fprintf(f, "usage: tidald tokenize --model FILE [--no-bos] [--special] (TEXT | --file PATH)\n\n"
               "Print the token ids of a text as a JSON array. FILE is a model or a vocabulary\n"
               "(tidald convert-tokenizer). BOS is prepended when the vocabulary asks for it\n"
               "(--no-bos: never); --special reads control-token texts such as <|im_end|> as\n"
               "those tokens.\n");
}

int cmd_tokenize(int argc, char **argv) {
    const char *model = NULL, *file = NULL, *text = NULL;
    bool no_bos = false, special = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            tokenize_usage(stdout);
            return 0;
        } else if (!strcmp(a, "--model") && i + 1 < argc) {
            model = argv[++i];
        } else if (!strcmp(a, "--file") && i + 1 < argc) {
            file = argv[++i];
        } else if (!strcmp(a, "--no-bos")) {
            no_bos = true;
        } else if (!strcmp(a, "--special")) {
            special = true;
        } else if (a[0] == '-' || text) {
            fprintf(stderr, "tidald tokenize: unexpected argument '%s'\n", a);
            tokenize_usage(stderr);
            return 2;
        } else {
            text = a;
        }
    }
    if (!model || !!file == !!text) {
        tokenize_usage(stderr);
        return 2;
    }
    char msg[ENG_ERRMSG_LEN];
    eng_tokenizer_t *tok = NULL;
    if (eng_vocab_load(&tok, model, msg)) {
        fprintf(stderr, "tidald tokenize: %s\n", msg);
        return 1;
    }
    size_t len = text ? strlen(text) : 0, n = 0;
    char *buf = file ? cli_read_file(file, &len) : NULL;
    int32_t *ids = NULL;
    int status = 1;
    if (file && !buf) {
        fprintf(stderr, "tidald tokenize: cannot read %s\n", file);
    } else if (eng_tokenize_ex(tok, buf ? buf : text, len, !no_bos && eng_tok_add_bos(tok), special,
                               &ids, &n, msg)) {
        fprintf(stderr, "tidald tokenize: %s\n", msg);
    } else {
        putchar('[');
        for (size_t i = 0; i < n; i++) printf(i ? ", %d" : "%d", ids[i]);
        printf("]\n");
        status = 0;
    }
    free(ids);
    free(buf);
    eng_vocab_free(tok);
    return status;
}
