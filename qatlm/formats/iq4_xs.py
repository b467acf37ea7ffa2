"""IQ4_XS: 256 weights -> fp16 d, 8 six-bit sub-block scales (scales_h u16 + scales_l[4]), 128 bytes of 4-bit
indices into IQ4_NL's codebook (4.25 bits/weight). ggml-quants.c quantize_iq4_xs ->
quantize_row_iq4_nl_impl(256, 32, ..., ntry=7), with or without an importance matrix.

Each sub-block of 32 runs IQ4_NL's scale search (iq4_nl.search_scales; with an imatrix, sigma2 is 2 * mean x^2
of the whole super-block). The 8 sub-block scales are then coded on 6 bits against d = -max_scale / 32 (max_scale
the first largest-|scale|), l = clamp(nearest_int(scale / d), -32, 31), and each sub-block's codes recomputed
as best_index(x / (d * l)) with the unrounded fp32 d; l + 32 is stored. Dequantized: fp16(d) * (l_stored - 32)
* KVALUES[q], exact in fp32.
"""
from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from ._base import BlockFormat, Codes, fp16_bytes, fp16_from_bytes, signed_absmax
from ._kbase import columns, div, fast_flags, nearest_int, rows
from .iq4_nl import best_index, codebook, search_scales, weights


class IQ4_XS(BlockFormat):
    imatrix_use = "block"

    def _encode(self, blocks: torch.Tensor, qw: torch.Tensor | None, fast: bool = False) -> Codes:
        n = blocks.shape[0]
        x = columns(blocks, 32)  # [32, 8n]
        w = weights(blocks, x, None if qw is None else columns(qw, 32))
        scales = search_scales(x, w).view(n, 8)
        # C: `if (fabsf(d) > amax_scale)` from 0: the first largest |scale| wins, a NaN scale never does
        s = torch.where(torch.isnan(scales), torch.zeros_like(scales), scales)
        max_scale = signed_absmax(s, s.amax(1, keepdim=True), s.amin(1, keepdim=True))  # [n, 1], +0.0 if all 0
        d = -max_scale / 32  # -0.0 when every sub-block is zero, as in C
        inv = torch.where(d != 0, div(1.0, d), torch.zeros_like(d))
        ls = nearest_int(inv * scales).clamp_(-32, 31)  # [n, 8]
        dl = (d * ls.float()).view(-1)  # [8n], the fp32 d (not the stored fp16 one)
        idl = torch.where(dl != 0, div(1.0, dl), torch.zeros_like(dl))
        q = rows(best_index(idl * x), n).contiguous()
        fix, finite = fast_flags(blocks, fast)
        return Codes(q, d.to(torch.float16), fix=fix, finite=finite, sc=(ls + 32).to(torch.uint8))

    def encode(self, blocks: torch.Tensor, fast: bool = False) -> Codes:
        return self._encode(blocks, None, fast)

    def encode_imatrix(self, blocks: torch.Tensor, qw: torch.Tensor, sigma2=None) -> Codes:
        return self._encode(blocks, qw)

    def decode(self, codes: Codes) -> torch.Tensor:
        n = codes.q.shape[0]
        dl = codes.d.float() * (codes.sc.float() - 32)  # [n, 8], exact
        return (dl.unsqueeze(2) * codebook(codes.q).view(n, 8, 32)).view(n, 256)  # exact: 17 x 7 bits

    def pack(self, codes: Codes) -> torch.Tensor:
        n = codes.q.shape[0]
        sc = codes.sc.to(torch.int32)  # [n, 8] in 0..63
        hi = sc >> 4
        scales_h = hi[:, 0]
        for ib in range(1, 8):
            scales_h = scales_h | (hi[:, ib] << (2 * ib))
        h = torch.stack([scales_h & 0xFF, scales_h >> 8], dim=1).to(torch.uint8)  # little-endian u16
        lo = (sc & 0xF).to(torch.uint8).view(n, 4, 2)
        scales_l = lo[:, :, 0] | (lo[:, :, 1] << 4)
        q = codes.q.view(n, 8, 2, 16)  # per 32-block: qs[j] = q[j] | q[j + 16] << 4
        qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)
        return torch.cat([fp16_bytes(codes.d), h, scales_l, qs], dim=1)

    def unpack(self, raw: torch.Tensor) -> Codes:
        n = raw.shape[0]
        scales_h = raw[:, 2].to(torch.int32) | (raw[:, 3].to(torch.int32) << 8)
        shifts = torch.arange(0, 16, 2, device=raw.device, dtype=torch.int32)
        hi = (scales_h.unsqueeze(1) >> shifts) & 3  # [n, 8]
        sl = raw[:, 4:8]
        lo = torch.stack([sl & 0xF, sl >> 4], dim=2).reshape(n, 8)
        sc = (lo.to(torch.int32) | (hi << 4)).to(torch.uint8)
        qs = raw[:, 8:].reshape(n, 8, 1, 16)
        q = torch.cat([qs & 0xF, qs >> 4], dim=2).reshape(n, 256)
        return Codes(q, fp16_from_bytes(raw[:, 0:2]), sc=sc)


FORMAT = IQ4_XS("iq4_xs", int(GGMLQuantizationType.IQ4_XS), block_size=256, type_size=136, compile=False)
