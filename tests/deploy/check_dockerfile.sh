#!/usr/bin/env bash
# check_dockerfile.sh - no Docker engine runs here, so check the Dockerfile against the tree:
# every file it copies exists, every make target it runs exists (make -n), and the runtime
# image keeps its promises (non-root user, HEALTHCHECK on /health, EXPOSE, TIDALD_* env,
# /models, SIGTERM).
set -u
F=${1:-Dockerfile}
pass=0 fail=0
ok() { pass=$((pass + 1)); echo "[PASS] $1"; }
bad() { fail=$((fail + 1)); echo "[FAIL] $1"; }

while read -r src; do
    [ -e "$src" ] && ok "COPY source exists: $src" || bad "COPY source missing: $src"
done < <(grep -E '^COPY ' "$F" | grep -v -- '--from=' | awk '{for (i = 2; i < NF; i++) print $i}')

targets=$(grep -E '^RUN make ' "$F" | sed -E 's/^RUN make ([a-z-]+).*/\1/' | sort -u)
for t in $targets; do
    make -n "$t" >/dev/null 2>&1 && ok "make target exists: $t" || bad "make target missing: $t"
done
[ -n "$targets" ] && ok "the image builds with make targets ($(echo $targets))" || bad "no make targets in RUN steps"

grep -qE '^USER [0-9a-z]+' "$F" && ! grep -qE '^USER (root|0)$' "$F" && ok "runs as a non-root user" || bad "non-root USER"
grep -qE '^HEALTHCHECK .*' "$F" && grep -A1 '^HEALTHCHECK' "$F" | grep -q '/health' && ok "HEALTHCHECK on /health" || bad "HEALTHCHECK"
grep -qE '^EXPOSE 8080' "$F" && ok "EXPOSE 8080" || bad "EXPOSE"
grep -qE '^VOLUME /models' "$F" && grep -q 'TIDALD_MODEL=/models/' "$F" && ok "model at /models" || bad "/models"
grep -qE '^STOPSIGNAL SIGTERM' "$F" && ok "STOPSIGNAL SIGTERM" || bad "STOPSIGNAL"
for v in $(grep -oE 'TIDALD_[A-Z_]+=' "$F" | tr -d '=' | sort -u); do
    ${TIDALD_BIN:-build/tidald} serve --help | grep -q "$v" && ok "env $v is a real setting" || bad "env $v unknown to tidald"
done
grep -qE '^FROM debian:12-slim' "$F" && grep -qE '^FROM nvidia/cuda:\$\{CUDA_VERSION\}-runtime' "$F" &&
    grep -qE '^ARG CUDA_VERSION=13\.' "$F" && ok "CPU (Debian 12 slim) and CUDA 13 runtime stages" || bad "image bases"
echo "dockerfile: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
