"""Shared machinery for llama.cpp block formats.

Every format is split into four pure steps that all other code goes through:

    encode(blocks fp32 [n, B])  -> Codes(q, d, m)       the quantizer's decisions
    pack(Codes)                 -> uint8 [n, type_size]  GGUF block bytes
    unpack(uint8 [n, type_size])-> Codes
    decode(Codes)               -> fp32 [n, B]            what llama.cpp computes with

so that quantize = pack(encode(.)), dequantize = decode(unpack(.)) and fake_quant = decode(encode(.)).
The training path (fake quant) and the export path (GGUF bytes) therefore share every rounding
decision, and the tests prove it by byte equality against gguf-py / llama.cpp.

Why our own implementation instead of `gguf.quants`: gguf-py is bit-exact but numpy-only and slow
(seconds per tensor), has no autograd, and does not run on CUDA. The arithmetic here mirrors
ggml-quants.c (`quantize_row_*_ref`): fp32 throughout, each multiply and add rounded separately (no FMA,
no float64), first index wins on |x| ties, fp16 stored round-to-nearest-even.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch


class Codes(NamedTuple):
    """The quantizer's output for n blocks of B weights.

    q: integer codes as stored, [n, B] (uint8, or int8 for Q8_0)
    d: the scale as fp16, [n, 1]
    m: the fp16 minimum for the "_1" formats ([n, 1]), else None
    fix: from encode(fast=True) only: [n, 1] bool, blocks where a corner rule may apply (a +a/-a tie,
         a zero max or min, an overflowing 1/d) and whose codes must come from the exact encode instead
    finite: from encode(fast=True) only: [n, 1] bool, block holds no NaN/inf
    sc, sm: 256-weight formats only: the per-sub-block scale codes [n, sub-blocks] (and the minimum codes of
         Q2_K / Q4_K / Q5_K); there q holds the codes of all 256 weights and d/m the fp16 super-block scale /
         minimum scale (IQ4_NL, IQ4_XS: q holds indices into the non-linear codebook)
    """

    q: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None = None
    fix: torch.Tensor | None = None
    finite: torch.Tensor | None = None
    sc: torch.Tensor | None = None
    sm: torch.Tensor | None = None


@dataclass(frozen=True)
class BlockFormat(ABC):
    """One GGUF block format. Subclasses implement encode/decode/pack/unpack on [n, block_size] blocks."""

    name: str  # registry key, e.g. "q4_0"
    ggml_type: int  # gguf.GGMLQuantizationType value
    block_size: int  # weights per block
    type_size: int  # bytes per block
    compile: bool = True  # run under torch.compile on large CPU tensors (see _kernels)
    # How ggml's quantize_<type>() uses an importance matrix (one weight per column, see _weighted):
    # "row": the block weights also need the mean x^2 of the block's whole row (Q4_0/Q5_0/Q4_1/Q5_1);
    # "block": the block alone (K-quants); "ignored": ggml drops it (Q8_0); None: not implemented here.
    imatrix_use: ClassVar[str | None] = None
    # (x, w [block_size, S]: blocks and their _weighted.block_weights) -> fake-quantized values [block_size, S]
    # with the imatrix rule, in column layout: formats that define it run training's imatrix fake quant compiled
    # (see _kernels)
    fake_imatrix_columns: ClassVar = None
    # (x, w) as fake_imatrix_columns -> (d fp16 [...], codes [block_size, ...]): the imatrix rule's decisions in
    # column layout, compiled for training with learned block scales (see _kernels.encode_rows)
    imatrix_codes_columns: ClassVar = None

    @property
    def bits_per_weight(self) -> float:
        return self.type_size * 8 / self.block_size

    # --- implemented by each format -------------------------------------------------------
    @abstractmethod
    def encode(self, blocks: torch.Tensor, fast: bool = False) -> Codes:
        """fp32 [n, block_size] -> Codes: the reference quantizer's decisions.

        fast=True skips the corner rules and flags the blocks that may need them (Codes.fix) instead:
        all other blocks are already exact. Branch-free either way (torch.compile, no GPU host sync)."""

    def encode_imatrix(self, blocks: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor | None) -> Codes:
        """fp32 [n, block_size] blocks with their importance weights qw [n, block_size] (the imatrix entries of
        the block's columns) -> Codes, as ggml_quantize_chunk(type, ..., imatrix) decides them. sigma2 [n, 1]:
        the mean x^2 of each block's row, given when imatrix_use == "row" (else None). Exact rules only."""
        if self.imatrix_use == "ignored":
            return self.encode(blocks)
        raise ValueError(f"{self.name}: qatlm has no importance-matrix rule for this format; quantize it without "
                         "--imatrix, or give its tensors another type with --override")

    @abstractmethod
    def decode(self, codes: Codes) -> torch.Tensor:
        """Codes -> fp32 [n, block_size]: the values llama.cpp dequantizes to (exact in fp32)."""

    @abstractmethod
    def pack(self, codes: Codes) -> torch.Tensor:
        """Codes -> uint8 [n, type_size]: the GGUF block bytes."""

    @abstractmethod
    def unpack(self, raw: torch.Tensor) -> Codes:
        """uint8 [n, type_size] -> Codes (inverse of pack)."""

    def __repr__(self) -> str:
        return (
            f"<{self.name}: {self.block_size} weights in {self.type_size} bytes,"
            f" {self.bits_per_weight:g} bits/weight>"
        )


# --- small pure helpers shared by the formats ------------------------------------------------


def fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """[n, 1] fp16 -> [n, 2] uint8, little-endian (GGUF is little-endian; so are x86 and ARM)."""
    return x.contiguous().view(torch.uint8)


def fp16_from_bytes(b: torch.Tensor) -> torch.Tensor:
    """[n, 2] uint8 -> [n, 1] fp16."""
    return b.contiguous().view(torch.float16)


def safe_inverse(d: torch.Tensor) -> torch.Tensor:
    """`d ? 1/d : 0` in fp32, as ggml-quants.c writes it."""
    return torch.where(d == 0, torch.zeros_like(d), torch.reciprocal(d))


def signed_absmax(blocks: torch.Tensor, mx: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """Per block, the element with the largest |x|, sign kept, as quantize_row_q4_0_ref finds it.

    C scans `if (amax < fabsf(v)) { amax = fabsf(v); max = v; }` from amax = max = +0.0f, so the FIRST
    element of largest |x| wins, and an all-zero block gives +0.0 even when it holds -0.0 (gguf-py's
    argmax takes x[0] there instead; we follow ggml). Computed from the block max and min (two cheap
    reductions) plus an index search that only decides blocks where +a and -a tie. Branch-free, so that
    torch.compile fuses it and CUDA never waits on the host.
    """
    out = torch.where(mx >= -mn, mx, mn)
    tie = (mx == -mn) & (mx != 0)
    first = blocks.abs().argmax(dim=1, keepdim=True)  # torch.argmax: first maximal index, like C's strict <
    out = torch.where(tie, blocks.gather(1, first), out)
    return torch.where(out == 0, torch.zeros_like(out), out)  # +0.0 for all-zero blocks


def first_of_equals(blocks: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A block max or min as C's `if (v < min) min = v` / `if (v > max) max = v` finds it: among equal
    values the FIRST. That only matters for a zero: -0.0 vs +0.0 decides the sign stored in the fp16 d and
    m fields of Q4_1/Q5_1, and torch.amin/amax do not promise which zero they return."""
    first = (blocks == 0).to(torch.uint8).argmax(dim=1, keepdim=True)  # first zero of the block
    return torch.where(value == 0, blocks.gather(1, first), value)


def finite_or_zero(y: torch.Tensor, inv: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Code values y = x*id (+ offset) with the non-finite ones replaced by 0, as C's int cast gives them.

    Degenerate blocks, where 1/d overflowed (|d| < ~2.9e-39) or d itself is inf, make x*id inf or NaN,
    which C converts to int as INT_MIN on x86 (cvttss2si), whose low byte is 0; gguf-py gives 0 too.
    Those blocks dequantize to 0 (or NaN) whatever the codes; only their bytes depend on this rule, and
    we keep them identical.
    """
    degenerate = torch.isinf(inv) | torch.isinf(d)  # [n, 1]
    return torch.where(degenerate & ~torch.isfinite(y), torch.zeros_like(y), y)


def codes_from_float(y: torch.Tensor, hi: int, inv: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """C's `MIN(hi, (int8_t)y)` for code values y >= 0 (up to rounding): the cast truncates toward zero."""
    return finite_or_zero(y, inv, d).to(torch.int32).clamp_(max=hi).to(torch.uint8)


def encode_symmetric(blocks: torch.Tensor, half_levels: int, fast: bool = False) -> Codes:
    """Q4_0 (half_levels=8) / Q5_0 (16): ggml-quants.c quantize_row_q4_0_ref / q5_0_ref.

    d = max / -half_levels with max the signed largest-|x| element; id = d ? 1/d : 0;
    q = min(2*half_levels - 1, (int8_t)(x*id + half_levels + 0.5f)).
    """
    hi, lo = blocks.amax(dim=1, keepdim=True), blocks.amin(dim=1, keepdim=True)  # [n, 1]
    mx = torch.where(hi >= -lo, hi, lo) if fast else signed_absmax(blocks, hi, lo)
    d = mx / -half_levels
    inv = safe_inverse(d)
    y = blocks * inv + (half_levels + 0.5)  # mul then add: two fp32 roundings, no FMA
    if fast:  # corners: +a/-a ties and all-zero blocks (hi == -lo), overflowing 1/d
        fix = (hi == -lo) | torch.isinf(inv)
        q = y.to(torch.int32).clamp_(max=2 * half_levels - 1).to(torch.uint8)
        return Codes(q, d.to(torch.float16), fix=fix, finite=torch.isfinite(hi) & torch.isfinite(lo))
    return Codes(codes_from_float(y, 2 * half_levels - 1, inv, d), d.to(torch.float16))


def decode_symmetric(codes: Codes, half_levels: int) -> torch.Tensor:
    """(q - half_levels) * d, exact in fp32 (an fp16 times a small integer)."""
    return (codes.q.to(torch.float32) - half_levels) * codes.d.to(torch.float32)


def encode_min(blocks: torch.Tensor, max_code: int, fast: bool = False) -> Codes:
    """Q4_1 (max_code=15) / Q5_1 (31): ggml-quants.c quantize_row_q4_1_ref / q5_1_ref.

    d = (max - min) / max_code; id = d ? 1/d : 0; q = (int8_t)((x - min)*id + 0.5f), at most max_code.
    """
    mn, mx = blocks.amin(dim=1, keepdim=True), blocks.amax(dim=1, keepdim=True)
    if not fast:
        mn, mx = first_of_equals(blocks, mn), first_of_equals(blocks, mx)
    d = (mx - mn) / max_code
    inv = safe_inverse(d)
    y = (blocks - mn) * inv + 0.5
    if fast:  # corners: a zero max or min (sign of zero), overflowing 1/d or d
        fix = (mn == 0) | (mx == 0) | torch.isinf(inv) | torch.isinf(d)
        q = y.to(torch.int32).clamp_(max=max_code).to(torch.uint8)
        return Codes(q, d.to(torch.float16), mn.to(torch.float16), fix=fix,
                     finite=torch.isfinite(mn) & torch.isfinite(mx))
    q = codes_from_float(y, max_code, inv, d)
    return Codes(q, d.to(torch.float16), mn.to(torch.float16))


def decode_min(codes: Codes) -> torch.Tensor:
    """q * d + m: the product is exact, the sum rounds once, as in ggml's dequantize_row_q4_1."""
    return codes.q.to(torch.float32) * codes.d.to(torch.float32) + codes.m.to(torch.float32)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[n, 32] codes (low 4 bits used) -> [n, 16] bytes: qs[j] = q[j] | q[j+16] << 4."""
    half = q.shape[1] // 2
    return (q[:, :half] & 0x0F) | (q[:, half:] << 4)


def unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] bytes -> [n, 32] codes (inverse of pack_nibbles)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def pack_high_bits(q: torch.Tensor) -> torch.Tensor:
    """Bit 4 of each of 32 codes -> 4 bytes of a little-endian u32: bit j = bit 4 of q[j]."""
    bits = ((q >> 4) & 1).view(q.shape[0], 4, 8)
    # an OR chain, not a sum over the last dim: elementwise, so torch.compile fuses it (a small integer
    # reduction made Q5 packing 7x slower)
    out = bits[:, :, 0]
    for j in range(1, 8):
        out = out | (bits[:, :, j] << j)
    return out


def unpack_high_bits(qh: torch.Tensor) -> torch.Tensor:
    """4 bytes of a little-endian u32 -> [n, 32] uint8 holding bit j in position 4."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device).view(1, 1, 8)
    bits = (qh.unsqueeze(2) >> shifts) & 1  # [n, 4, 8]
    return (bits.reshape(qh.shape[0], 32) << 4).to(torch.uint8)
