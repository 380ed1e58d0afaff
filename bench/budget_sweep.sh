#!/usr/bin/env bash
# budget_sweep.sh - choose a TidalDecode budget and check StreamingLLM's sink result on
# ../shared/models/stories260K.gguf over bench/data/stories.txt (our own text, ~4.4K tokens):
#   - full attention, 128-token window, 4 sinks vs 1 vs 0 sinks; the whole 2048-token context;
#   - tidal with budgets 8, 16, 32, 64 and full attention at the model's trained 512 window.
set -euo pipefail
BUILD=${BUILD:-build}
MODEL=../shared/models/stories260K.gguf
TEXT=bench/data/stories.txt
if [ ! -f "$MODEL" ]; then
    echo "budget_sweep: $MODEL not present; skipping" >&2
    exit 0
fi
run() { "$BUILD/tidald" perplexity --model "$MODEL" --file "$TEXT" "$@" 2>/dev/null | tail -1; }
field() { sed -n "s/.*\"$1\":\([0-9.]*\).*/\1/p"; }

printf '%-34s %10s %10s %10s\n' "configuration" "ppl" "top1 agr" "mean KL" >&2
for args in "--ctx-size 128 --sinks 4" "--ctx-size 128 --sinks 1" "--ctx-size 128 --sinks 0" \
    "--ctx-size 2048 --sinks 4"; do
    OUT=$(run $args)
    echo "{\"bench\":\"perplexity\",\"args\":\"$args\",\"result\":$OUT}"
    printf '%-34s %10s %10s %10s\n' "full $args" "$(echo "$OUT" | field perplexity)" "-" "-" >&2
done
# the same comparison over a prefix that fits the model's whole 2048-token context
for args in "--ctx-size 2048 --no-eviction" "--ctx-size 128 --sinks 4" "--ctx-size 128 --sinks 1" \
    "--ctx-size 128 --sinks 0"; do
    OUT=$(run --eval-tokens 2048 $args)
    echo "{\"bench\":\"perplexity\",\"args\":\"--eval-tokens 2048 $args\",\"result\":$OUT}"
    printf '%-34s %10s %10s %10s\n' "first 2048: $args" "$(echo "$OUT" | field perplexity)" "-" "-" >&2
done
for K in 8 16 32 64; do
    OUT=$(run --ctx-size 512 --attention tidal --token-budget "$K")
    echo "{\"bench\":\"perplexity\",\"args\":\"--ctx-size 512 --attention tidal --token-budget $K\",\"result\":$OUT}"
    printf '%-34s %10s %10s %10s\n' "tidal K=$K --ctx-size 512" "$(echo "$OUT" | field perplexity)" \
        "$(echo "$OUT" | field top1_agreement_vs_full)" "$(echo "$OUT" | field mean_kl_vs_full)" >&2
done
OUT=$(run --ctx-size 512)
echo "{\"bench\":\"perplexity\",\"args\":\"--ctx-size 512\",\"result\":$OUT}"
printf '%-34s %10s %10s %10s\n' "full --ctx-size 512" "$(echo "$OUT" | field perplexity)" "1" "0" >&2
