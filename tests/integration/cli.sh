#!/usr/bin/env bash
# cli.sh - drives the real tidald binary (the sanitizer build under `make test`): help, greedy
# parity on stories260K, seeded sampling, and clear failures on bad input.
set -u
BIN=${TIDALD_BIN:-build/tidald}
MK=${MKMODEL:-build/mkmodel}
STORIES=../shared/models/stories260K.gguf
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
pass=0 fail=0 skip=0

ok() { pass=$((pass + 1)); echo "[PASS] $1"; }
bad() { fail=$((fail + 1)); echo "[FAIL] $1"; [ -f "$TMP/err" ] && sed 's/^/    /' "$TMP/err" | head -20; }
# no sanitizer report in the last stderr
clean() { ! grep -qE 'Sanitizer|runtime error' "$TMP/err"; }

"$BIN" --help >"$TMP/out" 2>"$TMP/err" && grep -q generate "$TMP/out" && ok "tidald --help" || bad "tidald --help"
"$BIN" generate --help >"$TMP/out" 2>"$TMP/err"
missing=""
for f in --model --prompt --max-tokens --temperature --top-p --top-k --seed --min-p --threads; do
    grep -q -- "$f" "$TMP/out" || missing="$missing $f"
done
[ -z "$missing" ] && ok "generate --help documents every flag" || bad "generate --help lacks:$missing"

"$BIN" frobnicate >"$TMP/out" 2>"$TMP/err"
[ $? -eq 2 ] && grep -q "unknown command" "$TMP/err" && ok "unknown command exits 2" || bad "unknown command"

"$BIN" generate --model x --prompt y --temperature nan >"$TMP/out" 2>"$TMP/err"
[ $? -eq 2 ] && grep -q -- "--temperature" "$TMP/err" && ok "bad flag value is named" || bad "bad flag value"

# --device: cpu always works; cuda works on a GPU machine and otherwise fails with the reason;
# auto runs either way
[ -x "$MK" ] && "$MK" --shape tiny-f32 --out "$TMP/tiny.gguf" >/dev/null 2>&1
"$BIN" generate --model "$TMP/tiny.gguf" --prompt hi --max-tokens 4 --device cpu >"$TMP/out" 2>"$TMP/err" &&
    clean && ok "--device cpu" || bad "--device cpu"
"$BIN" generate --model "$TMP/tiny.gguf" --prompt hi --max-tokens 4 --device auto >"$TMP/out" 2>"$TMP/err" &&
    clean && ok "--device auto" || bad "--device auto"
"$BIN" generate --model "$TMP/tiny.gguf" --prompt hi --max-tokens 4 --device cuda >"$TMP/out" 2>"$TMP/err"
rc=$?
if [ $rc -eq 0 ]; then clean && ok "--device cuda (GPU present)" || bad "--device cuda"; else
    [ $rc -eq 1 ] && grep -q -- "--device cuda: " "$TMP/err" && clean &&
        ok "--device cuda without a GPU fails with the reason" || bad "--device cuda without a GPU"
fi
# a --ctx-size past the model's training context (tiny: 256) is clamped with a warning, not silently
"$BIN" generate --model "$TMP/tiny.gguf" --prompt hi --max-tokens 4 --ctx-size 100000 >"$TMP/out" 2>"$TMP/err" &&
    grep -q -- "warning: --ctx-size 100000 is larger than the model's training context of 256 tokens; using 256" "$TMP/err" &&
    clean && ok "--ctx-size past the training context warns and clamps" || bad "--ctx-size past the training context"
"$BIN" generate --model "$TMP/tiny.gguf" --prompt hi --max-tokens 4 --ctx-size 128 >"$TMP/out" 2>"$TMP/err" &&
    ! grep -q "warning" "$TMP/err" && clean && ok "--ctx-size within the training context: no warning" || bad "--ctx-size 128 warned"
"$BIN" serve --help >"$TMP/out" 2>"$TMP/err" && grep -q -- "--max-nonstream-tokens" "$TMP/out" &&
    grep -q "TIDALD_MAX_NONSTREAM_TOKENS" "$TMP/out" && ok "serve --help lists --max-nonstream-tokens" || bad "serve --help lacks --max-nonstream-tokens"
"$BIN" generate --model "$TMP/tiny.gguf" --prompt hi --device tpu >"$TMP/out" 2>"$TMP/err"
[ $? -eq 2 ] && grep -q -- "--device" "$TMP/err" && ok "unknown device is refused" || bad "unknown device"

# tidald quantize: a float model to a mixture that loads and generates; bad input refused
"$MK" --shape kq-f32 --out "$TMP/kq.gguf" >/dev/null 2>&1
"$BIN" quantize "$TMP/kq.gguf" "$TMP/kq-q4km.gguf" Q4_K_M >"$TMP/out" 2>"$TMP/err" &&
    grep -q "output.weight *F32 *-> Q6_K" "$TMP/err" && grep -q "blk.1.attn_v.weight *F32 *-> Q6_K" "$TMP/err" &&
    "$BIN" generate --model "$TMP/kq-q4km.gguf" --prompt hi --max-tokens 8 --temperature 0 >"$TMP/out" 2>"$TMP/err" &&
    clean && ok "quantize Q4_K_M: llama-quantize's tensor types, and the file generates" || bad "quantize Q4_K_M"
"$BIN" quantize "$TMP/kq.gguf" "$TMP/x.gguf" Q7_K >"$TMP/out" 2>"$TMP/err"
[ $? -eq 1 ] && grep -q "unknown type 'Q7_K'" "$TMP/err" && grep -q "Q4_K_M" "$TMP/err" && [ ! -e "$TMP/x.gguf" ] &&
    clean && ok "quantize: an unknown type is named, with the types there are" || bad "quantize unknown type"
"$BIN" quantize "$TMP/kq-q4km.gguf" "$TMP/x.gguf" Q8_0 >"$TMP/out" 2>"$TMP/err"
[ $? -eq 1 ] && grep -q "is Q[0-9]_[0-9K]* already" "$TMP/err" && [ ! -e "$TMP/x.gguf" ] &&
    clean && ok "quantize: a quantized model is refused (no double rounding)" || bad "quantize of a quantized model"
"$BIN" quantize "$TMP/kq.gguf" >"$TMP/out" 2>"$TMP/err"
[ $? -eq 2 ] && grep -q "usage: tidald quantize" "$TMP/err" && ok "quantize without its arguments: usage" || bad "quantize usage"

# tidald convert-tokenizer / tokenize: usage, a missing input named, and on SmolLM2's
# tokenizer.json (make hf-tokenizers) a vocabulary that tokenizes as the model's own, and a
# model with its vocabulary replaced that generates what the original does
"$BIN" convert-tokenizer >"$TMP/out" 2>"$TMP/err"
[ $? -eq 2 ] && grep -q "usage: tidald convert-tokenizer" "$TMP/err" && ok "convert-tokenizer without its arguments: usage" || bad "convert-tokenizer usage"
"$BIN" convert-tokenizer "$TMP/none/tokenizer.json" "$TMP/v.gguf" >"$TMP/out" 2>"$TMP/err"
[ $? -eq 1 ] && grep -q "cannot open .*none/tokenizer.json" "$TMP/err" && [ ! -e "$TMP/v.gguf" ] && clean &&
    ok "convert-tokenizer: a missing tokenizer.json is named" || bad "convert-tokenizer missing input"
"$BIN" tokenize "some text" >"$TMP/out" 2>"$TMP/err"
[ $? -eq 2 ] && grep -q "usage: tidald tokenize" "$TMP/err" && ok "tokenize without --model: usage" || bad "tokenize usage"
MODELS=${TIDALD_MODELS_DIR:-build/models}
SMOL=$MODELS/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -f "$MODELS/hf/SmolLM2-135M-Instruct.Q4_1/tokenizer.json" ] && [ -f "$SMOL" ]; then
    text="Hello, world! In 1969, 12345 people said: don't panic."
    "$BIN" convert-tokenizer "$MODELS/hf/SmolLM2-135M-Instruct.Q4_1" "$TMP/v.gguf" >"$TMP/out" 2>"$TMP/err" &&
        grep -q "pre-tokenizer smollm, 48900 merges" "$TMP/err" &&
        "$BIN" tokenize --model "$TMP/v.gguf" "$text" >"$TMP/ids" 2>"$TMP/err" &&
        "$BIN" tokenize --model "$SMOL" "$text" >"$TMP/want" 2>>"$TMP/err" && cmp -s "$TMP/ids" "$TMP/want" &&
        grep -q '^\[[0-9]' "$TMP/ids" && clean &&
        ok "convert-tokenizer: SmolLM2's tokenizer.json tokenizes as the model does" || bad "convert-tokenizer SmolLM2"
    "$BIN" convert-tokenizer "$MODELS/hf/SmolLM2-135M-Instruct.Q4_1/tokenizer.json" "$TMP/m.gguf" --model "$SMOL" >"$TMP/out" 2>"$TMP/err" &&
        "$BIN" generate --model "$TMP/m.gguf" --prompt "The capital of France is" --max-tokens 12 --temperature 0 >"$TMP/got" 2>"$TMP/err" &&
        "$BIN" generate --model "$SMOL" --prompt "The capital of France is" --max-tokens 12 --temperature 0 >"$TMP/want" 2>>"$TMP/err" &&
        cmp -s "$TMP/got" "$TMP/want" && [ -s "$TMP/got" ] && clean &&
        ok "convert-tokenizer --model: SmolLM2 with its vocabulary replaced generates as before" || bad "convert-tokenizer --model"
    rm -f "$TMP/m.gguf"
else
    skip=$((skip + 1))
    echo "[SKIP] $MODELS/hf/SmolLM2-135M-Instruct.Q4_1/tokenizer.json not there (make models hf-tokenizers): skipping the SmolLM2 convert-tokenizer cases"
fi

"$BIN" generate --model /nonexistent.gguf --prompt hi >"$TMP/out" 2>"$TMP/err"
[ $? -eq 1 ] && grep -q "cannot open" "$TMP/err" && [ ! -s "$TMP/out" ] && clean && ok "missing model file" || bad "missing model file"

if [ -f "$STORIES" ]; then
    want=", there was a little girl named Lily. She loved to play outside in the park. One day, she saw a big, red ball. She wanted to play with it, but it was too high."
    "$BIN" generate --model "$STORIES" --prompt "Once upon a time" --max-tokens 60 --temperature 0 >"$TMP/out" 2>"$TMP/err"
    got=$(head -c ${#want} "$TMP/out")
    [ "$got" = "$want" ] && clean && ok "greedy text equals llama.cpp's on stories260K" || { bad "greedy text on stories260K"; echo "    got: $(cat "$TMP/out")"; }

    "$BIN" generate --model "$STORIES" --prompt "Once upon a time" --max-tokens 40 --temperature 0.9 --top-p 0.9 --top-k 20 --seed 7 >"$TMP/a" 2>"$TMP/err"
    "$BIN" generate --model "$STORIES" --prompt "Once upon a time" --max-tokens 40 --temperature 0.9 --top-p 0.9 --top-k 20 --seed 7 >"$TMP/b" 2>>"$TMP/err"
    "$BIN" generate --model "$STORIES" --prompt "Once upon a time" --max-tokens 40 --temperature 0.9 --top-p 0.9 --top-k 20 --seed 8 >"$TMP/c" 2>>"$TMP/err"
    cmp -s "$TMP/a" "$TMP/b" && ! cmp -s "$TMP/a" "$TMP/c" && clean && ok "a seed makes sampling reproducible" || bad "seeded sampling"

    printf 'Once \xff upon' >"$TMP/p"
    "$BIN" generate --model "$STORIES" --prompt "$(cat "$TMP/p")" >"$TMP/out" 2>"$TMP/err"
    [ $? -eq 1 ] && grep -q "UTF-8" "$TMP/err" && clean && ok "invalid UTF-8 prompt is refused" || bad "invalid UTF-8 prompt"

    head -c 700000 "$STORIES" >"$TMP/trunc.gguf"
    "$BIN" generate --model "$TMP/trunc.gguf" --prompt hi >"$TMP/out" 2>"$TMP/err"
    [ $? -eq 1 ] && grep -q "past end of file" "$TMP/err" && clean && ok "truncated model names the problem" || bad "truncated model"

    "$BIN" generate --model "$STORIES" --prompt "Once upon a time" --max-tokens 3000 --temperature 0 --ctx-size 64 --no-eviction >"$TMP/out" 2>"$TMP/err"
    [ $? -eq 0 ] && clean && ok "generation stops cleanly when the context is full" || bad "context full"

    "$BIN" generate --model "$STORIES" --prompt "Once upon a time" --max-tokens 2000 --temperature 0 --ctx-size 128 --verbose >"$TMP/out" 2>"$TMP/err"
    words=$(wc -w <"$TMP/out")
    [ $? -eq 0 ] && clean && [ "$words" -gt 600 ] && grep -q "generated 2000 tokens" "$TMP/err" && ! grep -q $'\xef\xbf\xbd' "$TMP/out" &&
        ok "2000 tokens through a 128-token window, readable ($words words)" || bad "streaming past the window"

    "$BIN" generate --model "$STORIES" --prompt "Once upon a time" --max-tokens 300 --temperature 0 --ctx-size 128 --attention tidal --token-budget 32 --force-sinks >"$TMP/out" 2>"$TMP/err"
    [ $? -eq 0 ] && clean && [ "$(wc -w <"$TMP/out")" -gt 150 ] && ok "tidal decoding past the window" || bad "tidal generate"

    "$BIN" perplexity --model "$STORIES" --file bench/data/stories.txt --ctx-size 128 --attention tidal --token-budget 32 >"$TMP/out" 2>"$TMP/err"
    tail -1 "$TMP/out" | grep -q '"top1_agreement_vs_full"' && clean && ok "perplexity reports tidal vs full" || bad "perplexity"

    "$BIN" perplexity --model "$STORIES" --file bench/data/stories.txt --ctx-size 128 --chunked >"$TMP/out" 2>"$TMP/err"
    tail -1 "$TMP/out" | python3 -c 'import json,math,sys; j=json.loads(sys.stdin.read()); sys.exit(not (j["method"] == "chunked" and j["chunks"] > 0 and j["tokens"] == j["chunks"] * 63 and 1 < j["perplexity"] < 100))' &&
        clean && ok "perplexity --chunked scores the second half of each 128-token chunk" || bad "perplexity --chunked"

    # the sliding window with re-computation: with a window the text fits in, the same number as
    # the streaming cache (one pass, nothing evicted); a narrower window re-computed every token
    "$BIN" perplexity --model "$STORIES" --file bench/data/stories.txt --ctx-size 400 --eval-tokens 300 --kv-type f32 >"$TMP/stream" 2>"$TMP/err" &&
        "$BIN" perplexity --model "$STORIES" --file bench/data/stories.txt --ctx-size 400 --eval-tokens 300 --kv-type f32 --recompute-stride 400 >"$TMP/out" 2>>"$TMP/err" &&
        "$BIN" perplexity --model "$STORIES" --file bench/data/stories.txt --ctx-size 64 --eval-tokens 300 --recompute-stride 1 >"$TMP/one" 2>>"$TMP/err" &&
        python3 - "$TMP/stream" "$TMP/out" "$TMP/one" <<'PY' && clean && ok "perplexity --recompute-stride: the window re-computed from scratch" || bad "perplexity --recompute-stride"
import json, sys
s, r, o = (json.loads(open(f).read().splitlines()[-1]) for f in sys.argv[1:])
assert r["method"] == "recompute" and r["tokens"] == s["tokens"] == o["tokens"] == 299, (s, r, o)
assert abs(r["perplexity"] - s["perplexity"]) < 1e-4 * s["perplexity"], (s, r)
assert o["recompute_stride"] == 1 and o["ctx_size"] == 64 and 1 < o["perplexity"] < 100, o
PY
    # calibrate: every setting measured, the smallest budget reaching the agreement recommended,
    # and the file it writes sets a server's attention defaults
    "$BIN" calibrate --model "$STORIES" --file bench/data/stories.txt --ctx-size 512 --eval-tokens 400 \
        --budgets 16,64 --layers 3,4 --min-agreement 0.8 --out "$TMP/cal.json" >"$TMP/out" 2>"$TMP/err" &&
        "$BIN" calibrate --model "$STORIES" --file bench/data/stories.txt --ctx-size 512 --eval-tokens 400 \
            --budgets 4 --layers 4 --min-agreement 0.999 >"$TMP/none" 2>>"$TMP/err" &&
        python3 - "$TMP/out" "$TMP/cal.json" "$TMP/none" <<'PY' && clean && ok "calibrate sweeps layers and budgets and recommends" || bad "calibrate"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
sweep, rec = rows[:-1], rows[-1]["recommended"]
assert len(sweep) == 6, rows  # budgets 16 and 64, each with layer 2 alone, 2+3 and 2+4
assert {tuple(r["selection_layers"]) for r in sweep} == {(2,), (2, 3), (2, 4)}, sweep
ok = [r for r in sweep if r["top1_agreement_vs_full"] >= 0.8]
small = min(r["token_budget"] for r in ok)
best = max(r["top1_agreement_vs_full"] for r in ok if r["token_budget"] == small)
assert rec["reached"] and rec["token_budget"] == small and rec["top1_agreement_vs_full"] == best, rec
cal = json.load(open(sys.argv[2]))
assert cal == {"attention": "tidal", "selection_layers": ",".join(map(str, rec["selection_layers"])),
               "token_budget": small}, cal
none = [json.loads(l) for l in open(sys.argv[3])]
assert none[-1]["recommended"]["reached"] is False and none[-1]["recommended"]["token_budget"] == 4, none
PY
    "$BIN" calibrate --model "$STORIES" --file bench/data/stories.txt --budgets x >"$TMP/out" 2>"$TMP/err"
    [ $? -ne 0 ] && grep -q -- "--budgets" "$TMP/err" && ok "calibrate refuses a bad budget list" || bad "calibrate --budgets x"
    "$BIN" serve --config "$TMP/cal.json" --model "$STORIES" --port 0 >"$TMP/srv" 2>&1 &
    srv=$!
    for _ in $(seq 1 100); do grep -q '"ready"' "$TMP/srv" && break; sleep 0.1; done
    port=$(sed -n 's/.*(port \([0-9]*\)).*/\1/p' "$TMP/srv" | head -1)
    python3 - "$port" "$TMP/cal.json" <<'PY' >"$TMP/err" 2>&1 && ok "serve --config takes calibrate's settings as its attention defaults" || bad "serve --config from calibrate"
import json, sys, urllib.request
port, cal = sys.argv[1], json.load(open(sys.argv[2]))
body = json.dumps({"prompt": "Once upon a time", "max_tokens": 120, "temperature": 0,
                   "telemetry": {"entropy": True}}).encode()
req = urllib.request.Request("http://127.0.0.1:%s/v1/completions" % port, body,
                             {"Content-Type": "application/json"})
tele = json.load(urllib.request.urlopen(req, timeout=60))["telemetry"]
layers = [int(x) for x in cal["selection_layers"].split(",")]
# past the budget, the layers between the selection layers (and after the last) are sparse
want = [l for l in range(layers[0] + 1, 5) if l not in layers]
assert tele[-1]["sparse_layers"] == want, (tele[-1]["sparse_layers"], want)
PY
    kill $srv 2>/dev/null
    wait $srv 2>/dev/null

    "$BIN" perplexity --model "$STORIES" --file bench/data/stories.txt --chunked --recompute-stride 4 >"$TMP/out" 2>"$TMP/err"
    [ $? -eq 2 ] && grep -q -- "--recompute-stride" "$TMP/err" && ok "--recompute-stride with --chunked is refused" || bad "--recompute-stride with --chunked"
else
    skip=$((skip + 1))
    echo "[SKIP] $STORIES not present: skipping the stories260K CLI cases"
fi

"$MK" --shape tiny-q8_0 --out "$TMP/tiny.gguf" 2>"$TMP/err" &&
    "$BIN" generate --model "$TMP/tiny.gguf" --prompt "hello world" --max-tokens 16 --seed 1 >"$TMP/out" 2>"$TMP/err" &&
    clean && ok "synthetic Q8_0 model generates" || bad "synthetic Q8_0 model"

echo "cli: $pass passed, $fail failed, $skip skipped"
[ "$fail" -eq 0 ]
