#!/usr/bin/env bash
# deploy_test.sh - the deploy/ material against the real programs, all on loopback:
# promtool on the shipped Prometheus files; a real Prometheus scraping a real tidald with the
# shipped scrape config; a real nginx with the shipped config fronting two replicas (spread,
# then one replica killed mid-run); the manifests parsed and checked against the binary.
set -u
BIN=${TIDALD_BIN:-build/tidald}
MK=${MKMODEL:-build/mkmodel}
LOADGEN=${LOADGEN:-build/loadgen}
PY=/usr/bin/python3
T=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    wait 2>/dev/null
    rm -rf "$T"
}
trap cleanup EXIT
pass=0 fail=0
ok() { pass=$((pass + 1)); echo "[PASS] $1"; }
bad() { fail=$((fail + 1)); echo "[FAIL] $1"; }
free_port() { $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
metric() { curl -s "http://127.0.0.1:$1/metrics" | awk -v m="$2" '$1 == m { print $2 }'; }

# start_replica NAME MODEL: runs tidald on a free port; sets PORT_<NAME>
start_replica() {
    "$BIN" serve --model "$2" --port 0 --max-running 8 2>"$T/$1.log" &
    PIDS+=($!)
    eval "PID_$1=$!"
    for _ in $(seq 1 200); do
        grep -q '"event":"ready"' "$T/$1.log" 2>/dev/null && break
        sleep 0.05
    done
    eval "PORT_$1=$(sed -n 's/.*(port \([0-9]*\)).*/\1/p' "$T/$1.log" | head -1)"
}

"$MK" --shape tiny-f32 --out "$T/tiny.gguf" 2>/dev/null
"$MK" --shape small-f32 --out "$T/small.gguf" 2>/dev/null

# ---- manifests and files parse; names match the binary -------------------
$PY - "$BIN" <<'PYEOF' && ok "manifests parse and match the binary's flags, env, probes and port" || bad "manifests"
import json, subprocess, sys, yaml
help_text = subprocess.run([sys.argv[1], "serve", "--help"], capture_output=True, text=True).stdout
docs = []
for f in ["deployment", "deployment-gpu", "service", "servicemonitor", "hpa"]:
    docs += [d for d in yaml.safe_load_all(open(f"deploy/kubernetes/{f}.yaml")) if d]
for f in ["deploy/prometheus/prometheus.yml", "deploy/prometheus/alerts.yml"]:
    yaml.safe_load(open(f))
json.load(open("deploy/grafana/tidald-dashboard.json"))
deps = [d for d in docs if d["kind"] == "Deployment"]
assert len(deps) == 2
for dep in deps:
    c = dep["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    for name in env:
        assert name in help_text, f"{name} is not a tidald setting"
    port = c["ports"][0]["containerPort"]
    assert str(port) == env["TIDALD_PORT"], "containerPort and TIDALD_PORT differ"
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 300
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > int(env["TIDALD_DRAIN_TIMEOUT_S"])
    assert "preStop" in c["lifecycle"]
    assert c["args"] == ["serve"]
gpu = next(d for d in deps if d["metadata"]["name"] == "tidald-gpu")
assert gpu["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "tidald_requests_waiting"
sm = next(d for d in docs if d["kind"] == "ServiceMonitor")
assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
dash = json.load(open("deploy/grafana/tidald-dashboard.json"))
exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
for fam in ["tidald_requests_running", "tidald_kv_cache_usage_ratio", "tidald_attention_entropy_bits",
            "tidald_time_to_first_token_seconds", "tidald_token_entropy_bits", "tidald_sink_mass"]:
    assert fam in exprs, f"dashboard lacks {fam}"
PYEOF

start_replica A "$T/tiny.gguf"
for path in /livez /readyz /health /metrics; do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT_A$path")" = 200 ] && ok "probe path $path answers 200" || bad "probe path $path"
done

# ---- Prometheus ------------------------------------------------------------
promtool check config deploy/prometheus/prometheus.yml >"$T/pc.out" 2>&1 && ok "promtool check config" || { bad "promtool check config"; cat "$T/pc.out"; }
promtool check rules deploy/prometheus/alerts.yml >"$T/pr.out" 2>&1 && ok "promtool check rules" || { bad "promtool check rules"; cat "$T/pr.out"; }
PP=$(free_port)
mkdir -p "$T/prom"
cp deploy/prometheus/alerts.yml "$T/prom/"
sed -e "s/127.0.0.1:8080/127.0.0.1:$PORT_A/" -e 's/scrape_interval: 15s/scrape_interval: 1s/' \
    deploy/prometheus/prometheus.yml >"$T/prom/prometheus.yml"
prometheus --config.file="$T/prom/prometheus.yml" --storage.tsdb.path="$T/prom/data" \
    --web.listen-address="127.0.0.1:$PP" >"$T/prom.log" 2>&1 &
PIDS+=($!)
curl -s "http://127.0.0.1:$PORT_A/v1/completions" -d '{"prompt":"hello","max_tokens":5,"ignore_eos":true}' >/dev/null
got=""
for _ in $(seq 1 60); do
    got=$(curl -s "http://127.0.0.1:$PP/api/v1/query?query=tidald_generation_tokens_total" |
        $PY -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "")' 2>/dev/null)
    [ -n "$got" ] && [ "${got%.*}" -ge 5 ] 2>/dev/null && break
    sleep 0.5
done
[ -n "$got" ] && [ "${got%.*}" -ge 5 ] 2>/dev/null && ok "Prometheus scraped tidald_generation_tokens_total = $got" || { bad "Prometheus query (got '$got')"; tail -5 "$T/prom.log"; }

# ---- nginx in front of two replicas ---------------------------------------
start_replica B "$T/small.gguf"
start_replica C "$T/small.gguf"
NP=$(free_port)
mkdir -p "$T/nginx/logs"
sed -e "s/server 127.0.0.1:8081 /server 127.0.0.1:$PORT_B /" -e "s/server 127.0.0.1:8082 /server 127.0.0.1:$PORT_C /" \
    -e "s/listen 8080;/listen 127.0.0.1:$NP;/" deploy/nginx/tidald.conf >"$T/nginx/tidald.conf"
cat >"$T/nginx/nginx.conf" <<NGX
worker_processes 1;
pid $T/nginx/nginx.pid;
error_log $T/nginx/logs/error.log;
events { worker_connections 256; }
http {
    access_log $T/nginx/logs/access.log;
    client_body_temp_path $T/nginx/body;
    proxy_temp_path $T/nginx/proxy;
    include $T/nginx/tidald.conf;
}
NGX
nginx -t -p "$T/nginx" -c "$T/nginx/nginx.conf" >"$T/nginx.t" 2>&1 && ok "nginx accepts the shipped config" || { bad "nginx -t"; cat "$T/nginx.t"; }
nginx -p "$T/nginx" -c "$T/nginx/nginx.conf" -g 'daemon off;' 2>>"$T/nginx/logs/error.log" &
PIDS+=($!)
for _ in $(seq 1 100); do curl -s "http://127.0.0.1:$NP/health" >/dev/null && break; sleep 0.05; done

"$LOADGEN" --port "$NP" --concurrency 8 --requests 16 --max-tokens 24 >"$T/lg1.json" 2>"$T/lg1.err"
okn=$(sed -n 's/.*"ok":\([0-9]*\).*/\1/p' "$T/lg1.json")
b=$(metric "$PORT_B" 'tidald_requests_total{finish_reason="length"}')
c=$(metric "$PORT_C" 'tidald_requests_total{finish_reason="length"}')
[ "$okn" = 16 ] && ok "16 concurrent streams through nginx all completed" || { bad "streams through nginx ($okn/16)"; cat "$T/lg1.err"; }
[ "${b:-0}" -gt 0 ] && [ "${c:-0}" -gt 0 ] && [ $((b + c)) -eq 16 ] && ok "spread over both replicas ($b + $c)" || bad "spread ($b, $c)"

# kill one replica mid-run: only its requests are lost
"$LOADGEN" --port "$NP" --concurrency 8 --requests 8 --max-tokens 1500 >"$T/lg2.json" 2>"$T/lg2.err" &
LG=$!
sleep 1.5
held=$(( $(metric "$PORT_B" tidald_requests_running) + $(metric "$PORT_B" tidald_requests_waiting) ))
kill -9 "$PID_B"
wait "$LG"
okn=$(sed -n 's/.*"ok":\([0-9]*\).*/\1/p' "$T/lg2.json")
[ "$held" -gt 0 ] && [ "$okn" -eq $((8 - held)) ] && ok "killing a replica lost only its $held requests ($okn/8 completed)" ||
    { bad "replica kill: held $held, completed $okn/8"; cat "$T/lg2.err"; }
"$LOADGEN" --port "$NP" --concurrency 4 --requests 4 --max-tokens 8 >"$T/lg3.json" 2>"$T/lg3.err"
okn=$(sed -n 's/.*"ok":\([0-9]*\).*/\1/p' "$T/lg3.json")
[ "$okn" = 4 ] && ok "the next requests succeed on the other replica" || { bad "after the kill ($okn/4)"; cat "$T/lg3.err"; }

echo "deploy: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
