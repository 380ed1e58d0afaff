#!/usr/bin/env python3
"""synthetic_fixtures.py - record llama.cpp's answers on tidald's synthetic models, for the
parity tests (tests/unit/test_parity.c, parity::test_synthetic_models_equal_llama_cpp).

The synthetic models (tools/synth_model.c: random weights from a fixed seed) cover what the
real checkpoints do not: every architecture and weight type tidald computes. mkmodel writes
each one; llama.cpp (the libllama `make reference` built, through the sdist's Python bindings,
as reference_fixtures.py drives it) runs it. tests/fixtures/reference/synthetic.json gets, per
model, the file's FNV-1a hash (the test regenerates the model and checks it is the same file),
and

- greedy: llama.cpp's greedy ids for 64 tokens after a fixed prompt of token ids, with each
  step's top-2 gap;
- forced: 200 fixed pseudo-random token ids (BOS first) and llama.cpp's top-5 ids and logits at
  every position, teacher-forced. The gemma shape's 16-token windows bind long before that;
- self: llama.cpp's flash attention against its plain attention on those positions (top-1
  disagreements where the gap exceeds 0.05, largest logit difference): rounding's own share.

Models named SOURCE@MIXTURE are `tidald quantize` of the float model SOURCE: llama.cpp loads
tidald's quantized files and must give the same answers as tidald does on them.

Usage: scripts/synthetic_fixtures.py BIN_DIR MKMODEL TIDALD   (part of make reference-fixtures)
"""
import json
import os
import subprocess
import sys
import tempfile

import reference_fixtures  # the script's own directory is on sys.path


def fnv1a64(path):
    """the file's 64-bit FNV-1a hash, as the test computes it (no SHA-256 in the C tests)"""
    h = 0xcbf29ce484222325
    with open(path, "rb") as f:
        for b in f.read():
            h = ((h ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return "%016x" % h

# mkmodel's models: every weight type on its own (the kq shape's rows tile 256-wide blocks)
MODELS = ["tiny-f32", "tiny-f16", "tiny-bf16", "tiny-q8_0",
          "gemma-f32", "gemma-f16", "gemma-q8_0",
          "qwen2-f32", "qwen2-f16", "qwen2-q8_0", "qwen3-f32", "qwen3-f16", "qwen3-q8_0",
          "kq-q4_0", "kq-q4_1", "kq-q5_0", "kq-q5_1", "kq-q8_0", "kq-q2_k", "kq-q3_k",
          "kq-q4_k", "kq-q5_k", "kq-q6_k", "kq-iq4_nl"]
# `tidald quantize`'s mixtures of float models: SOURCE@MIXTURE
QUANTIZED = ["kq-f32@" + t for t in ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K_S",
                                      "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S",
                                      "Q5_K_M", "Q6_K", "IQ4_NL"]] + \
            ["gemma-f32@Q4_K_M", "gemma-f32@Q4_0", "tiny-f32@Q5_K_M", "qwen2-f32@Q4_K_M",
             "qwen3-f32@Q5_0"]
PROMPT = [1, 403, 407, 261, 378]
GREEDY_TOKENS = 64
FORCED_TOKENS = 200


def top(np, row, k):
    """reference_fixtures.top with the logits rounded as the fixture stores them"""
    ids, logits = reference_fixtures.top(np, row, k)
    return ids, [round(x, 5) for x in logits]


def forced_ids(n_vocab):
    """xorshift64 from a fixed seed: the same ids whatever numpy's generators do"""
    x, ids = 0x5eed, [1]
    while len(ids) < FORCED_TOKENS:
        x ^= (x << 13) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 7
        x ^= (x << 17) & 0xFFFFFFFFFFFFFFFF
        ids.append(3 + x % (n_vocab - 3))
    return ids


def open_model(llama_cpp, path, flash_attn):
    return llama_cpp.Llama(path, n_ctx=256, n_batch=256, logits_all=True, verbose=False,
                           n_threads=os.cpu_count() or 2, flash_attn=flash_attn)


def fixture(llama_cpp, np, path, name):
    m = open_model(llama_cpp, path, False)
    m.eval(PROMPT)
    gen, gaps = [], []
    for _ in range(GREEDY_TOKENS):
        row = np.array(m.scores[m.n_tokens - 1], dtype=np.float32)
        (a, _), (la, lb) = top(np, row, 2)
        gen.append(a)
        gaps.append(round(la - lb, 4))
        m.eval([a])
    m.reset()
    ids = forced_ids(m.n_vocab())
    m.eval(ids)
    plain = np.array(m.scores[: len(ids)], dtype=np.float32)
    rows = []
    for p in range(len(ids)):
        i5, l5 = top(np, plain[p], 5)
        rows.append({"top": i5, "logits": l5})
    del m
    # llama.cpp against itself: its flash-attention kernel vs its plain one on the same
    # positions (8-bit activation rounding flips a few close calls on the Q8_0 models)
    fa = open_model(llama_cpp, path, True)
    fa.eval(ids)
    other = np.array(fa.scores[: len(ids)], dtype=np.float32)
    del fa
    s = np.sort(plain, axis=1)
    sel = (s[:, -1] - s[:, -2]) > 0.05
    self_cmp = {"checked": int(sel.sum()),
                "disagree": int((plain.argmax(1)[sel] != other.argmax(1)[sel]).sum()),
                "max_diff": round(float(np.abs(plain - other).max()), 5),
                "what": "flash attention vs plain attention, forced positions"}
    return {"model": name, "fnv1a64": fnv1a64(path), "prompt": PROMPT, "gen": gen, "gaps": gaps,
            "forced": {"ids": ids, "rows": rows}, "self": self_cmp}


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    mkmodel, tidald = os.path.abspath(sys.argv[2]), os.path.abspath(sys.argv[3])
    import llama_cpp  # from PYTHONPATH: the sdist's bindings over BIN_DIR's libllama
    import numpy as np

    out = {"llama_cpp": llama_cpp.__version__, "models": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS + QUANTIZED:
            src = name.split("@")[0]
            path = os.path.join(tmp, src + ".gguf")
            if not os.path.exists(path):
                subprocess.run([mkmodel, "--shape", src, "--out", path], check=True,
                               stdout=subprocess.DEVNULL)
            if "@" in name:
                qpath = os.path.join(tmp, name.replace("@", "-") + ".gguf")
                subprocess.run([tidald, "quantize", path, qpath, name.split("@")[1]], check=True,
                               stderr=subprocess.DEVNULL)
                path = qpath
            out["models"].append(fixture(llama_cpp, np, path, name))
            print(f"synthetic_fixtures: {name}")
    dst = "tests/fixtures/reference/synthetic.json"
    with open(dst, "w") as f:
        json.dump(out, f, separators=(",", ":"))
    print(f"synthetic_fixtures: wrote {dst}")


if __name__ == "__main__":
    main()
