"""Q5_K: 256 weights -> fp16 d, fp16 dmin, 8 six-bit scales and mins in 12 bytes, 32 bytes of high bits, 128 bytes
of low nibbles (5.5 bits/weight). ggml-quants.c quantize_row_q5_K_ref; with an importance matrix
quantize_row_q5_K_impl.

Q4_K's quantizer with 5-bit codes: the reference searches make_qkx2_quants(nmax=31, rmin=-0.5, rdelta=0.1,
nstep=15) per sub-block of 32; with an imatrix make_qkx3_quants(31, -0.9, 0.05, 36) and make_qp_quants for the
scales, whose codes Q5_K (unlike Q4_K) clamps to 63. Only the bit layout differs from q4_k.py: code e of pair p
(e = 64p + 32h + j, h = 0/1) keeps its low nibble in qs[32p + j] (h = 0: low, h = 1: high nibble) and bit 4 in
bit 2p + h of qh[j].
"""
from typing import ClassVar

import torch
from gguf import GGMLQuantizationType

from ._base import Codes, fp16_bytes, fp16_from_bytes
from .q4_k import Q4_K, pack_scales, unpack_scales


class Q5_K(Q4_K):
    nmax: ClassVar[int] = 31
    search: ClassVar[tuple] = (-0.5, 0.1, 15)
    clamp_imatrix_codes: ClassVar[bool] = True

    def pack(self, codes: Codes) -> torch.Tensor:
        n = codes.q.shape[0]
        L = codes.q.view(n, 4, 2, 32)  # [pair, half, j]
        lo = L & 0xF
        qs = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(n, 128)
        hi = (L >> 4).reshape(n, 8, 32)  # bit k of qh[j]: bit 4 of code 32k + j
        qh = hi[:, 0]
        for k in range(1, 8):
            qh = qh | (hi[:, k] << k)
        return torch.cat([fp16_bytes(codes.d), fp16_bytes(codes.m), pack_scales(codes.sc, codes.sm), qh, qs], dim=1)

    def unpack(self, raw: torch.Tensor) -> Codes:
        n = raw.shape[0]
        ls, lm = unpack_scales(raw[:, 4:16])
        qh = raw[:, 16:48]
        shifts = torch.arange(8, dtype=torch.uint8, device=raw.device).view(1, 8, 1)
        hi = ((qh.unsqueeze(1) >> shifts) & 1).view(n, 4, 2, 32)
        qs = raw[:, 48:].reshape(n, 4, 1, 32)
        q = torch.cat([qs & 0xF, qs >> 4], dim=2) | (hi << 4)
        return Codes(q.reshape(n, 256), fp16_from_bytes(raw[:, 0:2]), fp16_from_bytes(raw[:, 2:4]), sc=ls, sm=lm)


FORMAT = Q5_K("q5_k", int(GGMLQuantizationType.Q5_K), block_size=256, type_size=176, compile=False)
