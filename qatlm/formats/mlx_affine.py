"""MLX affine groups (`mx.quantize`, mode "affine"): plan names `mlx:<bits>g<group>`, e.g. `mlx:4g64`, mlx-lm's
default. A QAT target for Apple's MLX, not a GGUF type: such a run is exported with `qatlm export RUN --mlx DIR`.

    >>> F.fake_quant(w, "mlx:4g64")     # == mx.dequantize(*mx.quantize(w.astype(mx.float16), 64, 4)), in fp32

What is matched: `mx.quantize` of the weights in float16 (the dtype MLX models ship in; MLX reads the fp16 values
in fp32, computes in fp32, and stores scales and biases in fp16), i.e. mlx/backend/cpu/quantized.cpp `quantize`:

    per group of `group` weights:  n = 2^bits - 1
    scale = max((max - min) / n, 1e-7), negated unless |min| > |max|;  edge = min if |min| > |max| else max
    q0 = rint(edge / scale);  if q0 != 0: scale = edge / q0, bias = edge;  else bias = 0
    q = clip(rint((w - bias) / scale), 0, n);  store fp16(scale), fp16(bias)
    value = scale * q + bias

Every step is one fp32 operation with its own rounding (true divisions, rint = round half to even), as in C.
The dequantized value is exact in fp32 only up to the final add, which rounds once; MLX's own dequantization of
fp16 scales runs in fp16 (up to 1 ulp off: a property of the runtime, as for GGUF files in MLX). Bit-exactness
with mlx itself is tested in tests/test_mlx.py.

Why our own code instead of calling mlx: mlx is not a dependency (its wheels cover macOS and Linux only) and has
no autograd bridge to torch; the fake quant must run inside the torch training loop, on CUDA too.

Block bytes (qatlm's own layout, for `quantize` / `dequantize`): fp16 scale, fp16 bias, then the codes as MLX
packs them: a little-endian bit stream, `bits` bits per weight, first weight in the lowest bits (for 4 bits:
8 codes per uint32, LSB first).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import torch

from ._base import BlockFormat, Codes, fp16_bytes, fp16_from_bytes

BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize's affine mode accepts
GROUPS = (32, 64, 128)
EPS = torch.tensor(1e-7, dtype=torch.float32)  # `float eps = 1e-7;` in C: the fp32 nearest to 1e-7
_NAME = re.compile(r"mlx:(\d+)g(\d+)")


@dataclass(frozen=True, repr=False)
class MLXAffine(BlockFormat):
    bits: int = 4

    def encode(self, blocks: torch.Tensor, fast: bool = False) -> Codes:
        n_bins = float(2 ** self.bits - 1)
        w = blocks.to(torch.float16).to(torch.float32)  # the fp16 weights MLX quantizes, read in fp32
        w_max, w_min = w.amax(dim=1, keepdim=True), w.amin(dim=1, keepdim=True)  # [n, 1]
        mask = w_min.abs() > w_max.abs()
        scale = torch.maximum((w_max - w_min) / n_bins, EPS.to(w.device))
        scale = torch.where(mask, scale, -scale)
        edge = torch.where(mask, w_min, w_max)
        q0 = torch.round(edge / scale)  # torch.round: half to even, as C's rint
        nonzero = q0 != 0
        scale = torch.where(nonzero, edge / torch.where(nonzero, q0, torch.ones_like(q0)), scale)
        bias = torch.where(nonzero, edge, torch.zeros_like(edge))
        q = torch.round((w - bias) / scale).clamp_(0, n_bins).to(torch.uint8)
        codes = Codes(q, scale.to(torch.float16), bias.to(torch.float16))
        if fast:  # no corner rules to redo: the rules above are already exact everywhere
            finite = torch.isfinite(w_max) & torch.isfinite(w_min)
            return codes._replace(fix=torch.zeros_like(finite), finite=finite)
        return codes

    def decode(self, codes: Codes) -> torch.Tensor:
        """scale * q + bias in fp32: the product is exact, the sum rounds once."""
        return codes.q.to(torch.float32) * codes.d.to(torch.float32) + codes.m.to(torch.float32)

    def pack(self, codes: Codes) -> torch.Tensor:
        return torch.cat([fp16_bytes(codes.d), fp16_bytes(codes.m), pack_bits(codes.q, self.bits)], dim=1)

    def unpack(self, raw: torch.Tensor) -> Codes:
        return Codes(unpack_bits(raw[:, 4:], self.bits, self.block_size), fp16_from_bytes(raw[:, :2]),
                     fp16_from_bytes(raw[:, 2:4]))


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """[n, k] codes (k a multiple of 8) -> [n, k * bits / 8] bytes: the LSB-first little-endian bit stream MLX
    stores (uint32 words of 32 / bits codes for 2/4/8 bits; 3 or 5 bytes per 8 codes, 3 bytes per 4 for 6 bits:
    all the same stream)."""
    n, k = q.shape
    g = q.to(torch.int64).view(n, k // 8, 8)
    word = g[:, :, 0]
    for j in range(1, 8):  # 8 codes of <= 8 bits fit an int64 word
        word = word | (g[:, :, j] << (bits * j))
    shifts = torch.arange(bits, device=q.device, dtype=torch.int64) * 8  # the word's first `bits` bytes
    return ((word.unsqueeze(2) >> shifts) & 0xFF).to(torch.uint8).view(n, k * bits // 8)


def unpack_bits(raw: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of pack_bits: [n, k * bits / 8] bytes -> [n, k] uint8 codes."""
    n = raw.shape[0]
    b = raw.to(torch.int64).view(n, k // 8, bits)
    word = b[:, :, 0]
    for j in range(1, bits):
        word = word | (b[:, :, j] << (8 * j))
    shifts = torch.arange(8, device=raw.device, dtype=torch.int64) * bits
    return ((word.unsqueeze(2) >> shifts) & (2 ** bits - 1)).to(torch.uint8).view(n, k)


def parse(name: str) -> tuple[int, int] | None:
    """(bits, group) of an MLX format name such as 'mlx:4g64'; None if `name` is not of that form."""
    m = _NAME.fullmatch(str(name).strip().lower())
    return (int(m.group(1)), int(m.group(2))) if m else None


@lru_cache(maxsize=None)
def get(name: str) -> MLXAffine:
    """The format for 'mlx:<bits>g<group>' (ValueError naming the allowed values otherwise)."""
    parsed = parse(name)
    if parsed is None or parsed[0] not in BITS or parsed[1] not in GROUPS:
        raise ValueError(f"unknown MLX format {name!r}: write mlx:<bits>g<group> with bits in "
                         f"{', '.join(map(str, BITS))} and group in {', '.join(map(str, GROUPS))} (e.g. mlx:4g64)")
    bits, group = parsed
    # ggml_type -1: no GGUF type; compile=False: a handful of elementwise ops, not worth torch.compile's start-up
    return MLXAffine(f"mlx:{bits}g{group}", -1, block_size=group, type_size=4 + group * bits // 8, compile=False,
                     bits=bits)
