"""MXFP4 (OCP microscaling FP4): 32 weights -> one E8M0 exponent byte + 16 bytes of 4-bit E2M1 codes
(4.25 bits/weight). ggml-quants.c quantize_row_mxfp4_ref, what quantize_mxfp4 runs with or without an importance
matrix (it ignores the imatrix: `quant_weights` is unused there).

Per block:
  amax = the largest |x| (C: `if (amax < fabsf(v)) amax = fabsf(v)` from 0, so NaN never wins);
  e = amax > 0 ? (uint8_t)(floorf(log2f(amax)) - 2 + 127) : 0;
  d = GGML_E8M0_TO_FP32_HALF(e) = 2^(e - 128) (the E2M1 values are stored doubled: kvalues_mxfp4 below);
  q[j] = best_index_mxfp4(x[j], d): the first i of the smallest fp32 |kvalues[i]*d - x[j]|.
A weight dequantizes to kvalues[q] * d (exact in fp32). Bytes: e, then qs[j] = q[j] | q[j+16] << 4.

Exactness notes: log2f is taken as the fp32 rounding of a float64 log2 (glibc's log2f rounds its double-precision
result once, so the two agree except within ~1e-16 of a float midpoint: only floor(.) matters here, and it moves
only for an amax within half an fp32 ulp of log2 below a power of two); the uint8_t cast of a float goes through
a 32-bit integer on x86 (cvttss2si), so a negative exponent (amax < 2^-125) wraps modulo 256 and an infinite one
gives 0, as C's bytes do. The 16 candidates are compared in C's order with C's strict `<`.
"""
from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from ._base import BlockFormat, Codes, pack_nibbles, unpack_nibbles

# ggml-common.h kvalues_mxfp4 (= kvalues_fp4): the E2M1 values times 2
KVALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


def exponent(amax: torch.Tensor) -> torch.Tensor:
    """e (uint8) of blocks whose largest |x| is amax (fp32): C's expression, wrap-around included."""
    lg = torch.log2(amax.double()).float()  # log2f: see the module docstring
    e = torch.floor(lg) - 2.0 + 127.0  # fp32 sums of integers: exact
    as_int = torch.where(torch.isfinite(e), e, torch.zeros_like(e)).to(torch.int32)
    as_int = torch.where(torch.isfinite(e), as_int, torch.full_like(as_int, -2 ** 31))  # cvttss2si: INT_MIN
    return torch.where(amax > 0, as_int & 0xFF, torch.zeros_like(as_int)).to(torch.uint8)


def scale(e: torch.Tensor) -> torch.Tensor:
    """GGML_E8M0_TO_FP32_HALF(e) as fp32: 2^(e - 128), from its bit pattern (e < 2: the subnormals)."""
    ei = e.to(torch.int32)
    bits = torch.where(ei < 2, torch.full_like(ei, 0x00200000) << ei, (ei - 1) << 23)
    return bits.view(torch.float32)


def best_index(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """best_index_mxfp4(x, d) elementwise: the first index of the smallest fp32 |KVALUES[i]*d - x| (uint8)."""
    best_err = (KVALUES[0] * d - x).abs()
    best = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for i in range(1, 16):
        err = (KVALUES[i] * d - x).abs()
        better = err < best_err  # C's strict <: ties keep the first; a NaN never replaces anything
        best = torch.where(better, torch.full_like(best, i), best)
        best_err = torch.where(better, err, best_err)
    return best


class MXFP4(BlockFormat):
    imatrix_use = "ignored"  # ggml quantize_mxfp4: `GGML_UNUSED(quant_weights)`

    def encode(self, blocks: torch.Tensor, fast: bool = False) -> Codes:
        a = blocks.abs()
        amax = torch.where(torch.isnan(a), torch.zeros_like(a), a).amax(dim=1, keepdim=True)
        e = exponent(amax)
        q = best_index(blocks, scale(e))
        if not fast:
            return Codes(q, e)
        finite = torch.isfinite(blocks).all(1, keepdim=True)
        return Codes(q, e, fix=torch.zeros_like(finite), finite=finite)  # no separate corner rules

    def decode(self, codes: Codes) -> torch.Tensor:
        """KVALUES[q] * d: exact (a power of two times an integer up to 12)."""
        values = torch.tensor(KVALUES, dtype=torch.float32, device=codes.q.device)
        v = torch.index_select(values, 0, codes.q.reshape(-1).to(torch.int32)).view(codes.q.shape)
        return v * scale(codes.d)

    def pack(self, codes: Codes) -> torch.Tensor:
        return torch.cat([codes.d.view(-1, 1), pack_nibbles(codes.q)], dim=1)  # e, qs[16]

    def unpack(self, raw: torch.Tensor) -> Codes:
        return Codes(unpack_nibbles(raw[:, 1:]), raw[:, :1].contiguous())


# Codes.d holds the E8M0 byte e here (uint8 [n, 1]), not an fp16 scale
FORMAT = MXFP4("mxfp4", int(GGMLQuantizationType.MXFP4), block_size=32, type_size=17)
