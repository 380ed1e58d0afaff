#!/usr/bin/env python3
"""reference_fixtures.py - record llama.cpp's answers on the real checkpoints, for the parity
tests (tests/unit/test_parity.c).

llama.cpp is the one scripts/reference.sh builds from PyPI's llama-cpp-python sdist; this script
drives its libllama through the sdist's own Python bindings (PYTHONPATH = the unpacked sdist,
LLAMA_CPP_LIB_PATH = the build's bin directory, so nothing is compiled twice) and runs
llama-perplexity. For each model in build/models it writes tests/fixtures/reference/<name>.json:

- greedy: 8 prompts (4 plain, 4 chat through the GGUF's own template), the prompt's token ids
  and llama.cpp's greedy continuation of up to 128 tokens (stopping after an end-of-generation
  token), with each step's top-2 logit gap;
- forced: teacher-forced over the first 2,048 tokens of Debian's GPL-3 text
  (/usr/share/common-licenses/GPL-3, sha256 recorded): at every position the top-1 id, the
  top-2 gap and the five largest logits;
- self: llama.cpp against itself on the forced positions, its flash-attention kernel (the
  CLI tools' default on a CPU) against its plain attention (the bindings' default, used for
  everything above): how far two correct implementations of the same model drift apart from
  rounding alone, the yardstick for tidald's own differences;
- perplexity: llama-perplexity's estimate on the same file at context 512.

Usage: scripts/reference_fixtures.py BIN_DIR [MODEL_DIR]   (make reference-fixtures)
"""
import json
import os
import re
import subprocess
import sys

from fetch_models import sha256_of  # the script's own directory is on sys.path

TEXT = "/usr/share/common-licenses/GPL-3"
FORCED_TOKENS = 2048
GREEDY_TOKENS = 128
PPL_CTX = 512
MODELS = ["SmolLM2-135M-Instruct.Q4_1.gguf", "gemma-3-270m-q4_k_m.gguf"]
PLAIN = [
    "Once upon a time",
    "The capital of France is",
    "def fibonacci(n):\n",
    "In 1969, the first humans",
]
# tokenizer texts: digits, punctuation before letters, upper-case contractions, code, spaces,
# newlines, accents, CJK, emoji
TOKENIZE = [
    "In 1969, 12345 people paid $3.50 each (about 4,000,000 in total).",
    "I'M sure you'RE right; we'LL see. Don't, won't, can't!",
    "def f(x):\n    return x**2  # square\n\n\n",
    "   leading spaces and trailing   ",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber stra\u00dfe",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 and \u4e2d\u6587",
    "emoji \U0001f600\U0001f680 mixed\twith\ttabs\r\nand CRLF",
    "<html><body class=\"x\">a&amp;b</body></html>",
    "x2's (a) [b] {c} --flag=value ... !!! ???",
    "3.14159 2.71828 1e-10 0x1F 1_000_000",
]
CHAT = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in two sentences.",
    "List three prime numbers greater than 100.",
]


def render_chat(template, bos, eos, user):
    import jinja2.sandbox

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(m):
        raise RuntimeError(m)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=[{"role": "user", "content": user}],
        add_generation_prompt=True,
        bos_token=bos,
        eos_token=eos,
    )


def top(np, row, k):
    idx = np.argpartition(-row, k)[:k]
    idx = idx[np.argsort(-row[idx], kind="stable")]
    return [int(i) for i in idx], [float(row[i]) for i in idx]


def open_model(llama_cpp, path, flash_attn):
    return llama_cpp.Llama(path, n_ctx=FORCED_TOKENS + 16, n_batch=512, logits_all=True,
                           verbose=False, n_threads=os.cpu_count() or 2, flash_attn=flash_attn)


def compare(np, a, b, gap_min=0.05):
    """top-1 disagreements of b with a where a's top-2 gap > gap_min; mean and max |a - b| of
    a's top-1 logit"""
    s = np.sort(a, axis=1)
    sel = (s[:, -1] - s[:, -2]) > gap_min
    ta, tb = a.argmax(1), b.argmax(1)
    d = np.abs(a[np.arange(len(ta)), ta] - b[np.arange(len(ta)), ta])
    return {"checked": int(sel.sum()), "disagree": int((ta[sel] != tb[sel]).sum()),
            "mean_diff": round(float(d.mean()), 5), "max_diff": round(float(d.max()), 5)}


def model_fixture(llama_cpp, np, bin_dir, path):
    m = open_model(llama_cpp, path, False)
    vocab = m._model.vocab
    meta = m.metadata
    add_bos = meta.get("tokenizer.ggml.add_bos_token", "false") == "true"
    out = {"model": os.path.basename(path), "sha256": sha256_of(path), "add_bos": add_bos}

    def run(ids, n, m=m):
        m.reset()
        m.eval(ids)
        gen, gaps = [], []
        for _ in range(n):
            row = np.array(m.scores[m.n_tokens - 1], dtype=np.float32)
            (a, b), (la, lb) = top(np, row, 2)
            gen.append(a)
            gaps.append(round(la - lb, 4))
            if llama_cpp.llama_vocab_is_eog(vocab, a):
                break
            m.eval([a])
        return gen, gaps

    out["flash_attn"] = False
    greedy = []
    for p in PLAIN:
        ids = m.tokenize(p.encode(), add_bos=add_bos, special=False)
        gen, gaps = run(ids, GREEDY_TOKENS)
        greedy.append({"chat": False, "prompt": p, "ids": ids, "gen": gen, "gaps": gaps})
    template = meta.get("tokenizer.chat_template")
    if not template and meta.get("general.architecture", "").startswith("gemma"):
        # this Gemma 3 file carries no template: Gemma's published turn format, which is
        # what tidald applies to gemma-architecture files without one
        template = ("{{ bos_token }}{% for m in messages %}<start_of_turn>"
                    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
                    "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
                    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    if not template:
        sys.exit(f"reference_fixtures: {path} has no chat template")
    bos = m.detokenize([m.token_bos()], special=True).decode("utf-8", "replace")
    eos = m.detokenize([m.token_eos()], special=True).decode("utf-8", "replace")
    for p in CHAT:
        text = render_chat(template, bos, eos, p)
        ids = m.tokenize(text.encode(), add_bos=False, special=True)
        gen, gaps = run(ids, GREEDY_TOKENS)
        greedy.append({"chat": True, "user": p, "prompt": text, "ids": ids, "gen": gen,
                       "gaps": gaps})
    out["greedy"] = greedy
    out["tokenize"] = [{"text": t, "ids": m.tokenize(t.encode(), add_bos=False, special=False)}
                       for t in TOKENIZE]

    with open(TEXT, "rb") as f:
        text = f.read()
    ids = m.tokenize(text, add_bos=add_bos, special=False)[:FORCED_TOKENS]
    m.reset()
    m.eval(ids)
    plain = np.array(m.scores[: len(ids)], dtype=np.float32)
    forced = []
    for p in range(len(ids)):
        i5, l5 = top(np, plain[p], 5)
        forced.append({"top": i5, "logits": [round(x, 5) for x in l5]})
    out["forced"] = {"text": TEXT, "text_sha256": sha256_of(TEXT), "ids": ids, "rows": forced}
    del m
    fa = open_model(llama_cpp, path, True)
    fa.eval(ids)
    out["self"] = compare(np, plain, np.array(fa.scores[: len(ids)], dtype=np.float32))
    out["self"]["what"] = "flash attention vs plain attention, forced positions"
    # and on the greedy prompts: where llama.cpp's flash-attention greedy first differs from
    # the plain one (-1: never)
    for g in greedy:
        gen, _ = run(g["ids"], len(g["gen"]), m=fa)
        g["fa_diverges_at"] = next((i for i, (a, b) in enumerate(zip(gen, g["gen"])) if a != b),
                                   -1 if len(gen) == len(g["gen"]) else min(len(gen), len(g["gen"])))
    del fa

    ppl = subprocess.run(
        [os.path.join(bin_dir, "llama-perplexity"), "-m", path, "-f", TEXT, "-c", str(PPL_CTX),
         "-t", str(os.cpu_count() or 2)], capture_output=True, text=True)
    found = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", ppl.stdout + ppl.stderr)
    if not found:
        sys.exit("reference_fixtures: llama-perplexity gave no estimate:\n" + ppl.stderr[-2000:])
    chunks = re.search(r"calculating perplexity over (\d+) chunks", ppl.stderr)
    out["perplexity"] = {"text": TEXT, "ctx": PPL_CTX, "ppl": float(found.group(1)),
                         "err": float(found.group(2)),
                         "chunks": int(chunks.group(1)) if chunks else None}
    return out


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    bin_dir = os.path.abspath(sys.argv[1])
    model_dir = sys.argv[2] if len(sys.argv) > 2 else "build/models"
    import llama_cpp  # from PYTHONPATH: the sdist's bindings over bin_dir's libllama
    import numpy as np

    version = open(os.path.join(os.path.dirname(bin_dir), "..", "VERSION")).read().strip() \
        if os.path.exists(os.path.join(os.path.dirname(bin_dir), "..", "VERSION")) else ""
    os.makedirs("tests/fixtures/reference", exist_ok=True)
    for name in MODELS:
        path = os.path.join(model_dir, name)
        if not os.path.exists(path):
            print(f"reference_fixtures: {path} missing (run make models); skipped")
            continue
        fx = model_fixture(llama_cpp, np, bin_dir, path)
        fx["llama_cpp"] = version or llama_cpp.__version__
        dst = os.path.join("tests/fixtures/reference", name.rsplit(".gguf", 1)[0] + ".json")
        with open(dst, "w") as f:
            json.dump(fx, f, separators=(",", ":"))
        print(f"reference_fixtures: wrote {dst}")


if __name__ == "__main__":
    main()
