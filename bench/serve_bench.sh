#!/usr/bin/env bash
# serve_bench.sh MODEL - start the daemon on a free loopback port, run tools/loadgen at
# concurrency 1, 4 and 16, print the aggregate output tokens/s of each and the 16-vs-1 ratio.
set -euo pipefail
MODEL=$1
BUILD=${BUILD:-build}
LOG=$(mktemp)
"$BUILD/tidald" serve --model "$MODEL" --port 0 --max-running 16 \
    --log-level info 2>"$LOG" &
PID=$!
trap 'kill $PID 2>/dev/null || true; rm -f "$LOG"' EXIT
for _ in $(seq 1 300); do
    grep -q '"event":"ready"' "$LOG" && break
    sleep 0.1
done
PORT=$(sed -n 's/.*(port \([0-9]*\)).*/\1/p' "$LOG" | head -1)
[ -n "$PORT" ] || { cat "$LOG"; exit 1; }
declare -A TPS
for C in 1 4 16; do
    REQ=$((C * 2)); [ "$C" -eq 1 ] && REQ=4
    OUT=$("$BUILD/loadgen" --port "$PORT" --concurrency "$C" --requests "$REQ" --max-tokens 128 --prompt-words 16)
    echo "$OUT"
    TPS[$C]=$(echo "$OUT" | sed -n 's/.*"output_tok_per_s":\([0-9.]*\).*/\1/p')
done
RATIO=$(awk -v a="${TPS[16]}" -v b="${TPS[1]}" 'BEGIN { printf "%.2f", a / b }')
echo "{\"bench\":\"serve_batching\",\"model\":\"$(basename "$MODEL")\",\"tok_s_c1\":${TPS[1]},\"tok_s_c4\":${TPS[4]},\"tok_s_c16\":${TPS[16]},\"c16_over_c1\":$RATIO}"
echo "serve: aggregate output tok/s  c1 ${TPS[1]}  c4 ${TPS[4]}  c16 ${TPS[16]}  (c16/c1 = ${RATIO}x, goal >= 4x)" >&2
kill -TERM $PID
wait $PID
