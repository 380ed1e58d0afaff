/* quantize_model.h - `tidald quantize`: an F32/F16/BF16 GGUF model to a quantized one.
 *
 * Every key is copied (general.file_type becomes the mixture's, general.quantization_version
 * 2); each tensor gets the type eng_q_mix_type chooses, llama-quantize's choices for the same
 * mixture, and is converted by the engine's own quantizers (engine/quantize.c), rows spread
 * over n_threads.
 */
#ifndef TIDALD_TOOLS_QUANTIZE_MODEL_H
#define TIDALD_TOOLS_QUANTIZE_MODEL_H

#include <stdio.h>

#include "../engine/gguf.h"
#include "../engine/quant.h"

/* What eng_q_mix_type needs to know of tensor t of model g: its shape and type, its layer and
 * the model's layer count, heads per KV head, and whether the embeddings are the output too. */
void quantize_describe(const gguf_t *g, const gguf_tensor_t *t, eng_qmix_tensor_t *d);

/* Quantize in to out as mixture `type` (e.g. "Q4_K_M"); progress lines go to log (may be
 * NULL). 0, or an ENG_E* code with msg (ENG_ERRMSG_LEN bytes) filled. */
int quantize_model(const char *in, const char *out, const char *type, int n_threads, FILE *log,
                   char *msg);

#endif
