/* main.c - the tidald command line: subcommand dispatch and `generate`.
 *
 * `generate` loads a model, prefills the prompt in chunks, then decodes one
 * token at a time, streaming whole UTF-8 text to stdout as it is produced.
 * Everything diagnostic goes to stderr.
 */
#include "../config/config.h"
#include "../engine/engine.h"
#include "cli.h"
#include "../engine/quant.h"
#include "../tools/quantize_model.h"
#include "server.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void usage(FILE *f) {
    fprintf(
        f,
        "usage: tidald [command] [options]\n\n"
        "commands:\n"
        "  serve      serve the OpenAI-compatible HTTP API (the default; tidald serve --help)\n"
        "  generate   generate text from a prompt (tidald generate --help)\n"
        "  perplexity evaluate a text, full vs TidalDecode (tidald perplexity --help)\n"
        "  calibrate  choose TidalDecode's layers and budget on a text (tidald calibrate --help)\n"
        "  quantize   convert an F32/F16/BF16 model: tidald quantize IN.gguf OUT.gguf TYPE\n"
        "  convert-tokenizer  a Hugging Face tokenizer.json to a GGUF vocabulary\n"
        "  tokenize   print a text's token ids (tidald tokenize --help)\n"
        "  help       show this help\n");
}

static void quantize_usage(FILE *f) {
    fprintf(f,
            "usage: tidald quantize IN.gguf OUT.gguf TYPE [--threads N]\n\n"
            "Convert an F32, F16 or BF16 GGUF model to TYPE, choosing each tensor's type as\n"
            "llama.cpp's llama-quantize does for the same mixture (the output projection Q6_K,\n"
            "more bits for attn_v and ffn_down in some layers of the _M and _L mixtures, a\n"
            "32-wide type where rows do not tile 256-wide blocks).\n\n"
            "TYPE: %s\n",
            eng_q_mix_names());
}

static int cmd_quantize(int argc, char **argv) {
    const char *pos[3];
    int n_pos = 0, threads = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            quantize_usage(stdout);
            return 0;
        }
        if (!strcmp(argv[i], "--threads") && i + 1 < argc) {
            char *end;
            long t = strtol(argv[++i], &end, 10);
            if (*end || t < 0 || t > 256) {
                fprintf(stderr, "tidald quantize: --threads must be 0..256\n");
                return 2;
            }
            threads = (int)t;
        } else if (argv[i][0] == '-' || n_pos == 3) {
            fprintf(stderr, "tidald quantize: unexpected argument '%s'\n", argv[i]);
            quantize_usage(stderr);
            return 2;
        } else {
            pos[n_pos++] = argv[i];
        }
    }
    if (n_pos != 3) {
        quantize_usage(stderr);
        return 2;
    }
    char msg[ENG_ERRMSG_LEN];
    if (quantize_model(pos[0], pos[1], pos[2], threads, stderr, msg)) {
        fprintf(stderr, "tidald quantize: %s\n", msg);
        return 1;
    }
    return 0;
}

extern char **environ;

static int cmd_serve(int argc, char **argv) {
    cfg_t cfg;
    char msg[CFG_ERRMSG_LEN] = {0};
    if (cfg_load(&cfg, argc, argv, environ, msg) != 0) {
        fprintf(stderr, "tidald serve: %s\n", msg);
        return 2;
    }
    if (cfg.help) {
        cfg_help(stdout);
        cfg_free(&cfg);
        return 0;
    }
    int code = srv_run(&cfg);
    cfg_free(&cfg);
    return code;
}

int eval_open(const cfg_generate_t *cfg, eng_model_t **model, eng_ctx_t **ctx) {
    char msg[ENG_ERRMSG_LEN];
    if (eng_model_load(model, cfg->model, msg) != 0) {
        fprintf(stderr, "tidald: cannot load model: %s\n", msg);
        return -1;
    }
    eng_ctx_params_t cp;
    eng_ctx_params_default(&cp);
    cp.n_threads = cfg->threads;
    cp.device = (eng_device_t)eng_device_parse(cfg->device);
    cp.n_ctx = (uint32_t)cfg->ctx_size;
    uint32_t n_train = eng_model_hparams(*model)->n_ctx_train;
    if (cp.n_ctx > n_train) { /* as serve does: positions past training are untrained */
        fprintf(stderr,
                "tidald: warning: --ctx-size %u is larger than the model's training context of %u "
                "tokens; using %u\n",
                cp.n_ctx, n_train, n_train);
        cp.n_ctx = n_train;
    }
    cp.block_size = (uint32_t)cfg->block_size;
    cp.kv_f16 = strcmp(cfg->kv_type, "f16") == 0;
    cp.swa_full = cfg->swa_full;
    cp.sinks = (uint32_t)cfg->sinks;
    cp.max_seqs = 1;
    cp.max_batch_tokens = (uint32_t)cfg->batch_size;
    if (eng_ctx_create(ctx, *model, &cp, msg) != 0) {
        fprintf(stderr, "tidald: cannot create context: %s\n", msg);
        return -1;
    }
    return 0;
}

int eval_attn_params(const cfg_generate_t *cfg, const eng_hparams_t *hp, eng_attn_params_t *a) {
    char msg[ENG_ERRMSG_LEN];
    if (srv_attn_params(cfg->attention, cfg->token_budget, cfg->selection_layers, cfg->force_sinks,
                        cfg->per_group, hp, a, msg)) {
        fprintf(stderr, "tidald: %s\n", msg);
        return -1;
    }
    return 0;
}

static int cmd_generate(int argc, char **argv) {
    cfg_generate_t cfg;
    char msg[ENG_ERRMSG_LEN] = {0};
    if (cfg_generate_parse(&cfg, argc, argv, msg) != 0) {
        fprintf(stderr, "tidald generate: %s\n", msg);
        return 2;
    }
    if (cfg.help) {
        cfg_generate_help(stdout);
        return 0;
    }
    if (!cfg.seed_set) cfg.seed = (uint64_t)time(NULL);

    int status = 1;
    eng_model_t *model = NULL;
    eng_ctx_t *ctx = NULL;
    eng_sampler_t *smp = NULL;
    int32_t *prompt = NULL;
    float *logits = NULL;
    kv_seq_t seq = {0};
    double t0 = now_s();
    if (eval_open(&cfg, &model, &ctx)) goto done;
    const eng_hparams_t *hp = eng_model_hparams(model);
    const eng_tokenizer_t *tok = eng_model_tokenizer(model);
    uint32_t max_batch = (uint32_t)cfg.batch_size;
    double t_load = now_s() - t0;
    if (cfg.verbose) {
        eng_device_info_t dev;
        eng_ctx_device_info(ctx, &dev);
        fprintf(stderr,
                "tidald: %s (%s) layers=%u embd=%u heads=%u/%u vocab=%u ctx=%u backend=%s "
                "device=\"%s\" load=%.3fs seed=%llu\n",
                hp->name, hp->arch, hp->n_layer, hp->n_embd, hp->n_head, hp->n_head_kv, hp->n_vocab,
                eng_ctx_n_ctx(ctx), eng_ctx_backend_name(ctx), dev.name, t_load,
                (unsigned long long)cfg.seed);
    }

    size_t n_prompt;
    if (eng_tokenize(tok, cfg.prompt, strlen(cfg.prompt), eng_tok_add_bos(tok), &prompt, &n_prompt,
                     msg) != 0) {
        fprintf(stderr, "tidald: prompt: %s\n", msg);
        goto done;
    }
    if (n_prompt == 0) {
        fprintf(stderr, "tidald: the prompt is empty and the model adds no BOS token\n");
        goto done;
    }
    if (n_prompt >= eng_ctx_n_ctx(ctx)) {
        fprintf(stderr, "tidald: the prompt is %zu tokens; the context holds %u\n", n_prompt,
                eng_ctx_n_ctx(ctx));
        goto done;
    }
    eng_sampler_params_t sp;
    eng_sampler_params_default(&sp);
    sp.temperature = cfg.temperature;
    sp.top_k = cfg.top_k;
    sp.top_p = cfg.top_p;
    sp.min_p = cfg.min_p;
    sp.repetition_penalty = cfg.repeat_penalty;
    sp.presence_penalty = cfg.presence_penalty;
    sp.frequency_penalty = cfg.frequency_penalty;
    sp.penalty_last_n = (uint32_t)cfg.repeat_last_n;
    sp.seed = cfg.seed;
    if (eng_sampler_params_check(&sp, msg) != 0 ||
        eng_sampler_create(&smp, &sp, hp->n_vocab) != 0) {
        fprintf(stderr, "tidald: sampler: %s\n", msg[0] ? msg : "out of memory");
        goto done;
    }
    for (size_t i = 0; i < n_prompt; i++) eng_sampler_accept(smp, prompt[i]);
    logits = malloc(sizeof(float) * hp->n_vocab);
    if (!logits) {
        fprintf(stderr, "tidald: out of memory\n");
        goto done;
    }
    kv_seq_init(&seq, eng_ctx_kv_pool(ctx));
    seq.n_sinks = (uint32_t)cfg.sinks;
    eng_attn_params_t attn;
    if (eval_attn_params(&cfg, hp, &attn)) goto done;

    double t1 = now_s();
    for (size_t done_n = 0; done_n < n_prompt;) {
        uint32_t n =
            (uint32_t)(n_prompt - done_n < (size_t)max_batch ? n_prompt - done_n : max_batch);
        eng_batch_item_t it = {&seq, prompt + done_n, n, logits, false};
        if (eng_forward(ctx, &it, 1, msg) != 0) {
            fprintf(stderr, "tidald: prefill: %s\n", msg);
            goto done;
        }
        done_n += n;
    }
    double t2 = now_s();
    eng_detok_t dt;
    eng_detok_init(&dt, tok);
    char out[1024];
    int32_t n_gen = 0;
    const char *stop_reason = "length";
    while (n_gen < cfg.max_tokens) {
        int32_t id = eng_sampler_sample(smp, logits);
        eng_sampler_accept(smp, id);
        n_gen++;
        if (eng_tok_is_eog(tok, id)) {
            stop_reason = "eos";
            break;
        }
        size_t w = eng_detok_push(&dt, id, out, sizeof(out));
        fwrite(out, 1, w, stdout);
        fflush(stdout);
        if (n_gen == cfg.max_tokens) break;
        if (!cfg.no_eviction)
            eng_seq_make_room(ctx, &seq, eng_ctx_n_ctx(ctx), 1, (uint32_t)cfg.evict_chunk);
        if (seq.n_tokens + 1 > eng_ctx_n_ctx(ctx)) {
            stop_reason = "context full";
            break;
        }
        eng_batch_item_t it = {&seq, &id, 1, logits, false, &attn};
        if (eng_forward(ctx, &it, 1, msg) != 0) {
            fprintf(stderr, "\ntidald: decode: %s\n", msg);
            goto done;
        }
    }
    size_t w = eng_detok_flush(&dt, out, sizeof(out));
    fwrite(out, 1, w, stdout);
    fputc('\n', stdout);
    fflush(stdout);
    double t3 = now_s();
    if (cfg.verbose)
        fprintf(stderr,
                "tidald: prompt %zu tokens in %.3fs (%.1f tok/s); generated %d tokens in %.3fs "
                "(%.1f tok/s); evicted %llu; stop: %s\n",
                n_prompt, t2 - t1, n_prompt / (t2 - t1 + 1e-12), n_gen, t3 - t2,
                n_gen / (t3 - t2 + 1e-12), (unsigned long long)seq.n_evicted, stop_reason);
    status = 0;
done:
    if (seq.pool) kv_seq_close(&seq);
    free(logits);
    free(prompt);
    eng_sampler_free(smp);
    eng_ctx_free(ctx);
    eng_model_free(model);
    return status;
}

int main(int argc, char **argv) {
    if (argc >= 2 && (strcmp(argv[1], "help") == 0 || strcmp(argv[1], "--help") == 0 ||
                      strcmp(argv[1], "-h") == 0)) {
        usage(stdout);
        printf("\n");
        cfg_help(stdout);
        return 0;
    }
    if (argc < 2 || argv[1][0] == '-') return cmd_serve(argc, argv); /* no command: serve */
    if (strcmp(argv[1], "serve") == 0) return cmd_serve(argc - 1, argv + 1);
    if (strcmp(argv[1], "generate") == 0) return cmd_generate(argc - 1, argv + 1);
    if (strcmp(argv[1], "perplexity") == 0) return cmd_perplexity(argc - 1, argv + 1);
    if (strcmp(argv[1], "calibrate") == 0) return cmd_calibrate(argc - 1, argv + 1);
    if (strcmp(argv[1], "quantize") == 0) return cmd_quantize(argc - 1, argv + 1);
    if (strcmp(argv[1], "convert-tokenizer") == 0) return cmd_convert_tokenizer(argc - 1, argv + 1);
    if (strcmp(argv[1], "tokenize") == 0) return cmd_tokenize(argc - 1, argv + 1);
    fprintf(stderr, "tidald: unknown command '%s'\n", argv[1]);
    usage(stderr);
    return 2;
}
