#!/usr/bin/env python3
"""soak.py - the release daemon under a bounded barrage of hostile clients on 127.0.0.1.

Starts `tidald serve` on a free loopback port, measures RSS, open descriptors
(/proc/PID/fd) and KV usage (/metrics), then for --seconds runs worker threads
that mix vanishing clients (FIN and RST), half-closed requests, pipelining
(read and never read), streams cut mid-way, and big bodies. Afterwards it waits
(bounded) for the daemon to settle and fails if it died, if descriptors leaked,
if KV usage did not return to 0, or if SIGTERM did not end it with status 0.

Used by `make soak` (SOAK_SECONDS=N); not part of `make test`.
"""
import argparse
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

HOST = "127.0.0.1"  # the only target, ever


def connect(port, rcvbuf=None):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(30)
    s.connect((HOST, port))
    return s


def close_rst(s):
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def request(method, path, body=b"", headers=""):
    return (f"{method} {path} HTTP/1.1\r\nHost: x\r\n{headers}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def read_to_eof(s, limit=64 << 20):
    out = bytearray()
    while len(out) < limit:
        try:
            b = s.recv(65536)
        except (socket.timeout, ConnectionError):
            break
        if not b:
            break
        out += b
    return bytes(out)


def http_get(port, path):
    s = connect(port)
    s.sendall(request("GET", path, headers="Connection: close\r\n"))
    data = read_to_eof(s)
    s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def metric(port, name):
    _, body = http_get(port, "/metrics")
    m = re.search(rb"^" + re.escape(name.encode()) + rb" ([0-9.eE+-]+)$", body, re.M)
    return float(m.group(1)) if m else None


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def n_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


COMPLETION = json.dumps({"prompt": "Once upon a time", "max_tokens": 16,
                         "ignore_eos": True}).encode()
STREAM = json.dumps({"prompt": "Once upon a time", "max_tokens": 400, "stream": True,
                     "ignore_eos": True}).encode()


def vanish(port, rnd):
    s = connect(port)
    s.sendall(request("GET", "/health"))
    close_rst(s) if rnd.random() < 0.5 else s.close()


def half_close(port, rnd):
    s = connect(port)
    s.sendall(request("POST", "/v1/completions", COMPLETION))
    s.shutdown(socket.SHUT_WR)
    data = read_to_eof(s)
    s.close()
    return data.startswith(b"HTTP/1.1 200")


def pipeline(port, rnd):
    read = rnd.random() < 0.5
    s = connect(port, rcvbuf=None if read else 4096)
    s.sendall(request("GET", "/livez") * 50 + request("GET", "/readyz", headers="Connection: close\r\n"))
    if read:
        read_to_eof(s)
    s.close()


def stream(port, rnd):
    s = connect(port)
    s.sendall(request("POST", "/v1/completions", STREAM))
    got = b""
    want = rnd.randint(1, 20)
    while got.count(b"data: ") < want:
        try:
            b = s.recv(4096)
        except (socket.timeout, ConnectionError):
            break
        if not b:
            break
        got += b
    close_rst(s) if rnd.random() < 0.5 else s.close()


def big_body(port, rnd):
    s = connect(port)
    body = json.dumps({"content": "once upon a time " * rnd.randint(1000, 60000)}).encode()
    s.sendall(request("POST", "/tokenize", body, headers="Connection: close\r\n"))
    if rnd.random() < 0.3:
        close_rst(s)  # gone while its body is parsed
        return
    read_to_eof(s)
    s.close()


ACTIONS = [vanish, vanish, half_close, pipeline, stream, big_body]


def worker(port, until, seed, counts, lock):
    rnd = random.Random(seed)
    while time.monotonic() < until:
        act = rnd.choice(ACTIONS)
        try:
            act(port, rnd)
            key = act.__name__
        except OSError as e:
            key = f"{act.__name__}:{type(e).__name__}"
        with lock:
            counts[key] = counts.get(key, 0) + 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="build/tidald")
    ap.add_argument("--model", required=True)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--workers", type=int, default=8)
    a = ap.parse_args()

    log = open(os.environ.get("SOAK_LOG", "/tmp/tidald-soak.log"), "w+")
    d = subprocess.Popen([a.bin, "serve", "--model", a.model, "--host", HOST, "--port", "0",
                          "--max-connections", "256", "--write-timeout-s", "2"],
                         stdout=subprocess.DEVNULL, stderr=log)
    port = None
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60:
        log.seek(0)
        text = log.read()
        m = re.search(r"\(port (\d+)\)", text)
        if m and '"event":"ready"' in text:
            port = int(m.group(1))
            break
        if d.poll() is not None:
            break
        time.sleep(0.05)
    if not port:
        print("soak: the daemon did not become ready", file=sys.stderr)
        d.kill()
        return 1

    # warm up (model pages, KV pool, allocator arenas) so that "before" is a steady state
    warm = random.Random(0)
    for act in ACTIONS:
        try:
            act(port, warm)
        except OSError:
            pass
    time.sleep(1)
    before = {"rss_kb": rss_kb(d.pid), "fds": n_fds(d.pid),
              "kv_usage": metric(port, "tidald_kv_cache_usage_ratio")}
    counts, lock = {}, threading.Lock()
    until = time.monotonic() + a.seconds
    threads = [threading.Thread(target=worker, args=(port, until, i, counts, lock))
               for i in range(a.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    failures = []
    if d.poll() is not None:
        failures.append(f"the daemon died during the barrage (status {d.returncode})")
    else:
        # settle: bounded waits for the daemon to close what the clients left
        deadline = time.monotonic() + 60
        kv = metric(port, "tidald_kv_cache_usage_ratio")
        while kv != 0 and time.monotonic() < deadline:
            time.sleep(0.2)
            kv = metric(port, "tidald_kv_cache_usage_ratio")
        fds = n_fds(d.pid)
        while fds > before["fds"] and time.monotonic() < deadline:
            time.sleep(0.2)
            fds = n_fds(d.pid)
        after = {"rss_kb": rss_kb(d.pid), "fds": fds, "kv_usage": kv}
        print(json.dumps({"soak_seconds": a.seconds, "before": before, "after": after,
                          "actions": counts}))
        print(f"{'':10} {'before':>12} {'after':>12}")
        for k in ("rss_kb", "fds", "kv_usage"):
            print(f"{k:10} {before[k]!s:>12} {after[k]!s:>12}")
        if fds > before["fds"]:
            failures.append(f"descriptors leak: {before['fds']} before, {fds} after")
        if kv != 0:
            failures.append(f"KV usage stayed at {kv}")
        head, _ = http_get(port, "/health")
        if not head.startswith(b"HTTP/1.1 200"):
            failures.append("not healthy after the barrage")
        d.send_signal(signal.SIGTERM)
        try:
            rc = d.wait(timeout=60)
        except subprocess.TimeoutExpired:
            d.kill()
            rc = "timeout"
        if rc != 0:
            failures.append(f"SIGTERM exit status {rc}")
    for f in failures:
        print("soak: FAIL:", f, file=sys.stderr)
    if failures:
        print(f"soak: the daemon's log is in {log.name}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
