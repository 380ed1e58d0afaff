#!/usr/bin/env bash
# streaming_llm.sh - StreamingLLM's result on a real model: SmolLM2-135M-Instruct (8K context)
# over 16,384 tokens of natural text that Debian ships (six licenses from
# /usr/share/common-licenses, one after the other), teacher-forced one token at a time:
#   - windows of 256, 512 and 1024 tokens, evicting past them with 4 sinks and with 0 sinks;
#   - the sliding window with re-computation at the same windows (every W/4 tokens the last W
#     tokens computed from scratch; StreamingLLM's oracle baseline, re-computing every token
#     would cost W times the pass);
#   - dense attention over the model's whole 8,192-token context (evicting past it).
# Prints one JSON line per run on stdout and a table on stderr. Usage:
#   bench/streaming_llm.sh [MODEL] [EVAL_TOKENS]      (THREADS=N: worker threads, 0 = all)
set -euo pipefail
BUILD=${BUILD:-build}
MODEL=${1:-${REAL_MODEL_DIR:-build/models}/SmolLM2-135M-Instruct.Q4_1.gguf}
EVAL=${2:-16384}
if [ ! -f "$MODEL" ]; then
    echo "streaming_llm: $MODEL not present (make models); skipping" >&2
    exit 0
fi
TEXT=$BUILD/bench-data/licenses.txt
mkdir -p "$(dirname "$TEXT")"
L=/usr/share/common-licenses
cat $L/GPL-3 $L/GPL-2 $L/LGPL-2.1 $L/Apache-2.0 $L/MPL-2.0 $L/Artistic >"$TEXT"
THREADS=${THREADS:-0}
run() {
    "$BUILD/tidald" perplexity --model "$MODEL" --file "$TEXT" --eval-tokens "$EVAL" \
        --threads "$THREADS" "$@" 2>/dev/null | tail -1
}
field() { sed -n "s/.*\"$1\":\([0-9.]*\).*/\1/p"; }
row() {
    local name=$1
    shift
    local out
    out=$(run "$@")
    echo "{\"bench\":\"streaming_llm\",\"run\":\"$name\",\"args\":\"$*\",\"result\":$out}"
    printf '%-40s %10s\n' "$name" "$(echo "$out" | field perplexity)" >&2
}
printf '%-40s %10s\n' "SmolLM2, $EVAL tokens" "perplexity" >&2
for W in 256 512 1024; do
    row "window $W, 4 sinks" --ctx-size "$W" --sinks 4
    row "window $W, 0 sinks" --ctx-size "$W" --sinks 0
    row "window $W, re-computed every $((W / 4))" --ctx-size "$W" --recompute-stride $((W / 4))
done
row "dense, 8192-token context" --ctx-size 8192 --sinks 4
