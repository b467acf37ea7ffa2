"""Q2_K: 256 weights -> 16 bytes of 4-bit (scale, min) pairs, 64 bytes of 2-bit codes, fp16 d, fp16 dmin
(2.625 bits/weight). ggml-quants.c quantize_row_q2_K_ref; with an importance matrix quantize_row_q2_K_impl.

Per sub-block of 16: codes l in 0..3, scale code s and min code m in 0..15 (byte s | m << 4); a weight
dequantizes to d * s * l - dmin * m.
- Reference: make_qkx2_quants(16, nmax=3, weights |x|, rmin -0.5, rdelta 0.1, nstep 15, use_mad): the same
  affine search as Q4_K's but minimising the weighted absolute error; scales and mins coded on 4 bits against
  the block's largest (d = max_scale / 15, dmin = max_min / 15).
- imatrix: make_qkx3_quants(16, 3, w = qw * sqrt(mean x^2 + x^2), -0.9, 0.05, 36), then make_qp_quants(16, 15)
  codes the scales and the mins against the sub-blocks' weight sums (note: sigma2 is the plain mean here, not
  twice it as in Q3_K..Q5_K).
Either way the codes are then recomputed from the coded scales: l = clamp(nearest_int((x + dmin*m) / (d*s)), 0, 3).
"""
import torch
from gguf import GGMLQuantizationType

from ._base import BlockFormat, Codes, fp16_bytes, fp16_from_bytes
from ._kbase import columns, div, fast_flags, nearest_int, rows, seq_sum
from ._weighted import block_weights, make_qkx3_quants, make_qp_quants
from .q3_k import pack_2bit, unpack_2bit
from .q4_k import make_qkx2_quants, requantize


class Q2_K(BlockFormat):
    imatrix_use = "block"

    def encode(self, blocks: torch.Tensor, fast: bool = False) -> Codes:
        n = blocks.shape[0]
        x = columns(blocks, 16)  # [16, 16n]
        scales, mins, L = make_qkx2_quants(x, x.abs(), 3, -0.5, 0.1, 15, mad=True)
        scales, mins = scales.view(n, 16), mins.view(n, 16)
        zero = torch.zeros((), device=blocks.device)
        max_scale = torch.where(scales > 0, scales, zero).amax(1, keepdim=True)  # C: max from 0, NaN skipped
        max_min = torch.where(mins > 0, mins, zero).amax(1, keepdim=True)
        none = torch.zeros_like(scales, dtype=torch.int32)
        ls = torch.where(max_scale > 0, nearest_int(div(15.0, max_scale) * scales), none)  # C: uint8, may wrap
        lm = torch.where(max_min > 0, nearest_int(div(15.0, max_min) * mins), none)
        d = torch.where(max_scale > 0, max_scale / 15, zero).to(torch.float16)
        dmin = torch.where(max_min > 0, max_min / 15, zero).to(torch.float16)
        return self._finish(blocks, x, L, ls, lm, d, dmin, fast)

    def encode_imatrix(self, blocks: torch.Tensor, qw: torch.Tensor, sigma2=None) -> Codes:
        n = blocks.shape[0]
        xs = columns(blocks, 256)
        sig = seq_sum(xs * xs) / 256  # [n]  C: sigma2 = sumx2/QK_K
        x = columns(blocks, 16)  # [16, 16n]
        w = block_weights(x, columns(qw, 16), sig.repeat_interleave(16).view(1, -1))
        sw = seq_sum(w)  # [16n]
        scales, mn, L = make_qkx3_quants(x, w, 3, -0.9, 0.05, 36)  # mn = -the_min
        sw16 = sw.view(n, 16).T.contiguous()
        dm, Ls = make_qp_quants(scales.view(n, 16).T.contiguous(), 15, sw16)
        mm, Lm = make_qp_quants((-mn).view(n, 16).T.contiguous(), 15, sw16)
        return self._finish(blocks, x, L, Ls.T, Lm.T, dm.view(n, 1).to(torch.float16),
                            mm.view(n, 1).to(torch.float16), False)

    @staticmethod
    def _finish(blocks, x, L, ls, lm, d, dmin, fast) -> Codes:
        """The scale byte `ls | lm << 4` (as uint8, so codes out of 0..15 spill as in C), and the codes recomputed
        from it; a sub-block whose coded scale is 0 keeps the search's codes L [16, 16n]."""
        n = blocks.shape[0]
        byte = (ls | (lm << 4)) & 0xFF
        sc, sm = byte & 0xF, byte >> 4
        q = rows(requantize(x, L, d, dmin, sc, sm, 3), n).to(torch.uint8).contiguous()
        fix, finite = fast_flags(blocks, fast)
        return Codes(q, d, dmin, fix=fix, finite=finite, sc=sc.to(torch.uint8).contiguous(),
                     sm=sm.to(torch.uint8).contiguous())

    def decode(self, codes: Codes) -> torch.Tensor:
        n = codes.q.shape[0]
        dl = codes.d.float() * codes.sc.float()  # [n, 16], exact
        ml = codes.m.float() * codes.sm.float()
        return (dl.unsqueeze(2) * codes.q.view(n, 16, 16).float() - ml.unsqueeze(2)).view(n, 256)

    def pack(self, codes: Codes) -> torch.Tensor:
        return torch.cat([codes.sc | (codes.sm << 4), pack_2bit(codes.q), fp16_bytes(codes.d), fp16_bytes(codes.m)],
                         dim=1)

    def unpack(self, raw: torch.Tensor) -> Codes:
        s = raw[:, :16]
        return Codes(unpack_2bit(raw[:, 16:80]), fp16_from_bytes(raw[:, 80:82]), fp16_from_bytes(raw[:, 82:84]),
                     sc=s & 0xF, sm=s >> 4)


FORMAT = Q2_K("q2_k", int(GGMLQuantizationType.Q2_K), block_size=256, type_size=84, compile=False)
