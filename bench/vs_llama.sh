#!/usr/bin/env bash
# vs_llama.sh - tidald against llama.cpp on the same GGUF files and thread count, in one run:
# 512-token prefill and batch-1 decode (llama-bench -p 512 -n 64), and tidald's batch 4 and 16
# aggregate decode. llama.cpp is the one `make reference` built; without it only tidald's
# figures are printed. Prints a table on stderr and one JSON object per model on stdout.
#
# Usage: bench/vs_llama.sh MODEL.gguf [MODEL.gguf ...]    (make bench runs it on the real models)
set -uo pipefail
BUILD=${BUILD:-build}
THREADS=${THREADS:-$(nproc)}
REF_BIN=${TIDALD_REFERENCE_DIR:-$HOME/.cache/tidald-reference}/build-0.3.36/bin
LB="$REF_BIN/llama-bench"
[ -x "$LB" ] || { echo "vs_llama: $LB not built (make reference); tidald's figures only" >&2; LB=""; }

printf '%-34s %10s %10s %7s %10s %10s %7s %9s %9s\n' model "pp512 ours" "pp512 llama" ratio \
    "tg ours" "tg llama" ratio "b4 ours" "b16 ours" >&2
for m in "$@"; do
    [ -f "$m" ] || { echo "vs_llama: $m missing (make models); skipped" >&2; continue; }
    ours=$("$BUILD/bench_engine" --simd-only --threads "$THREADS" --model "$m" 2>/dev/null |
        grep '"bench":"engine"' | head -1)
    [ -n "$ours" ] || { echo "vs_llama: bench_engine failed on $m" >&2; continue; }
    pp=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["prefill_tok_s"])' "$ours")
    tg=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["decode_tok_s_b1"])' "$ours")
    b4=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["decode_tok_s_b4"])' "$ours")
    b16=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["decode_tok_s_b16"])' "$ours")
    lpp=0 ltg=0
    if [ -n "$LB" ]; then
        lj=$("$LB" -m "$m" -t "$THREADS" -p 512 -n 64 -r 3 -o json 2>/dev/null)
        read -r lpp ltg < <(python3 -c '
import json, sys
rows = json.loads(sys.argv[1])
pp = next((r["avg_ts"] for r in rows if r["n_prompt"] == 512 and r["n_gen"] == 0), 0)
tg = next((r["avg_ts"] for r in rows if r["n_gen"] == 64 and r["n_prompt"] == 0), 0)
print(pp, tg)' "$lj" 2>/dev/null || echo "0 0")
    fi
    python3 - "$m" "$pp" "$lpp" "$tg" "$ltg" "$b4" "$b16" "$THREADS" <<'EOF'
import json, os, sys
m, pp, lpp, tg, ltg, b4, b16, th = sys.argv[1:]
pp, lpp, tg, ltg, b4, b16 = map(float, (pp, lpp, tg, ltg, b4, b16))
r = lambda a, b: a / b if b else 0
name = os.path.basename(m)
sys.stderr.write("%-34s %10.1f %10.1f %6.2fx %10.1f %10.1f %6.2fx %9.1f %9.1f\n" % (
    name, pp, lpp, r(pp, lpp), tg, ltg, r(tg, ltg), b4, b16))
print(json.dumps({"bench": "vs_llama_cpp", "model": name, "threads": int(th),
                  "prefill_512_tok_s": pp, "llama_prefill_512_tok_s": lpp,
                  "prefill_ratio": round(r(pp, lpp), 3), "decode_tok_s": tg,
                  "llama_decode_tok_s": ltg, "decode_ratio": round(r(tg, ltg), 3),
                  "decode_b4_tok_s": b4, "decode_b16_tok_s": b16,
                  "batch16_gain": round(r(b16, tg), 3)}))
EOF
done
