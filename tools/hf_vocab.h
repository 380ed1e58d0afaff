/* hf_vocab.h - `tidald convert-tokenizer`: a Hugging Face tokenizer.json to a GGUF vocabulary.
 *
 * Reads the two families of vocabulary GGUF files carry, as llama.cpp's converter writes them:
 *   - byte-level BPE (GPT-2, SmolLM, Llama 3, Qwen2): tokenizer.ggml.model "gpt2", the merges,
 *     and the pre-tokenizer recognised from the file's pre_tokenizer structure ("smollm",
 *     "llama-bpe", "qwen2", "gpt2"); a structure it does not know is refused, naming it, unless
 *     a name is given;
 *   - SentencePiece BPE with byte fallback (Llama 2, Gemma): model "llama", piece scores from
 *     the vocabulary order (SentencePiece lists pieces by score, and Hugging Face's conversion
 *     keeps that order; a merge list that disagrees is reported), byte tokens <0xXX>.
 * Added tokens become control tokens when marked special (or when they look like one, as
 * llama.cpp judges: <|...|>, <unused...>, <pad>, <mask>), user-defined otherwise; ids the file
 * leaves out become unused [PADn] tokens. tokenizer_config.json (beside tokenizer.json, or
 * named) gives the BOS/EOS/UNK/PAD tokens, add_bos/add_eos/add_sep and the chat template
 * (chat_template.jinja beside it when the config has none); a post_processor template that
 * opens with the BOS token sets add_bos when the config does not say.
 *
 * Output: a vocabulary-only GGUF, or with a model given, that model's tensors and metadata with
 * its tokenizer.* keys replaced (the vocabulary must match its embedding rows).
 */
#ifndef TIDALD_TOOLS_HF_VOCAB_H
#define TIDALD_TOOLS_HF_VOCAB_H

#include <stdint.h>
#include <stdio.h>

typedef struct {
    const char *input;   /* tokenizer.json, or a directory holding it */
    const char *config;  /* tokenizer_config.json; NULL: the one beside the input, if any */
    const char *pre;     /* pre-tokenizer name to record instead of the detected one; NULL */
    const char *model;   /* GGUF model to carry into the output; NULL: vocabulary only */
    uint32_t vocab_size; /* pad the vocabulary to this many tokens; 0: as the file has */
} hf_vocab_opts_t;

/* Convert; a summary (and any warning) goes to log (may be NULL). 0, or an ENG_E* code with msg
 * (ENG_ERRMSG_LEN bytes) filled. */
int hf_vocab_convert(const hf_vocab_opts_t *o, const char *out, FILE *log, char *msg);

#endif
