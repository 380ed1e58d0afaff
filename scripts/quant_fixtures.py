#!/usr/bin/env python3
"""quant_fixtures.py - writes tests/fixtures/quant/<TYPE>.{bin,f32} for tests/unit/test_quant.c.

For every GGUF quantized type tidald dequantizes, builds a few random but valid blocks
(random bytes, with each block's f16 scale fields replaced by finite values) and stores
them raw in <TYPE>.bin, and the `gguf` package's reference dequantization of those blocks
as little-endian float32 in <TYPE>.f32. The test checks engine/quant.c against them bit
for bit.

Made with gguf==0.19.0 (numpy 2.4). CI does not run this: the fixtures are committed.
Rerun only when adding a type:

    python3 -m venv /tmp/gguf-venv && /tmp/gguf-venv/bin/pip install gguf==0.19.0
    /tmp/gguf-venv/bin/python scripts/quant_fixtures.py [OUT_DIR]
"""

import os
import sys

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import dequantize

SEED = 20260601

# type -> (blocks to write, byte offsets of the f16 fields in one block)
TYPES = {
    "Q4_0": (16, [0]),  # d, qs[16]
    "Q4_1": (16, [0, 2]),  # d, m, qs[16]
    "Q5_0": (16, [0]),  # d, qh[4], qs[16]
    "Q5_1": (16, [0, 2]),  # d, m, qh[4], qs[16]
    "Q8_0": (16, [0]),  # d, qs[32]
    "Q2_K": (8, [80, 82]),  # scales[16], qs[64], d, dmin
    "Q3_K": (8, [108]),  # hmask[32], qs[64], scales[12], d
    "Q4_K": (8, [0, 2]),  # d, dmin, scales[12], qs[128]
    "Q5_K": (8, [0, 2]),  # d, dmin, scales[12], qh[32], qs[128]
    "Q6_K": (8, [208]),  # ql[128], qh[64], scales[16], d
    "IQ4_NL": (16, [0]),  # d, qs[16]
    "IQ4_XS": (8, [0]),  # d, scales_h, scales_l[4], qs[128]
}

# Scales that exercise the f16 conversion's edge cases, used for the first blocks.
SPECIAL = [0x0001, 0x83FF, 0x8000, 0x0000, 0x7BFF]  # subnormals, -0, +0, the largest half


def make_blocks(rng, n_blocks, type_size, f16_offsets):
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for b in range(n_blocks):
        for k, off in enumerate(f16_offsets):
            if b < len(SPECIAL) and k == 0:
                h = np.uint16(SPECIAL[b])
            else:
                h = np.float16(rng.normal(0.0, 0.05)).view(np.uint16)
            raw[b, off : off + 2] = np.frombuffer(np.uint16(h).astype("<u2").tobytes(), np.uint8)
    return raw


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/quant"
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(SEED)
    for name, (n_blocks, f16_offsets) in TYPES.items():
        qtype = T[name]
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        raw = make_blocks(rng, n_blocks, type_size, f16_offsets)
        out = dequantize(raw.reshape(-1), qtype).astype("<f4").reshape(-1)
        assert out.size == n_blocks * block_size, name
        with open(os.path.join(out_dir, name + ".bin"), "wb") as f:
            f.write(raw.tobytes())
        with open(os.path.join(out_dir, name + ".f32"), "wb") as f:
            f.write(out.tobytes())
        print(f"{name}: type {int(qtype)}, {n_blocks} blocks of {block_size} in {type_size} bytes")


if __name__ == "__main__":
    main()
