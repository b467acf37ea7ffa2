"""Q4_K: 256 weights -> fp16 d, fp16 dmin, 8 six-bit scales and mins in 12 bytes, 128 bytes of 4-bit codes
(4.5 bits/weight). ggml-quants.c quantize_row_q4_K_ref: what llama-quantize writes without an imatrix.

Per sub-block of 32: weights w = sqrt(mean x^2) + |x|, then make_qkx2_quants(nmax=15, rmin=-1, rdelta=0.1,
nstep=20): a least-squares fit of (scale, min) for each of 21 candidate grids, keeping the one of smallest
weighted squared error. The 8 scales and 8 mins are then coded on 6 bits against the block's largest, and the
codes recomputed from the coded scales. Replayed here in the same fp32 operations, vectorised across
sub-blocks (see _kbase).
"""
import torch
from gguf import GGMLQuantizationType

from ._base import BlockFormat, Codes, fp16_bytes, fp16_from_bytes
from ._kbase import columns, div, fast_flags, f32, nearest_int, rows, seq_sum, sqrt_f32

NMAX, RMIN, RDELTA, NSTEP = 15, -1.0, 0.1, 20


def make_qkx2_quants(x: torch.Tensor, w: torch.Tensor):
    """x, w: [32, S] -> (scale [S], the_min [S] (>= 0, subtracted), L [32, S] int32), as ggml computes."""
    mn, mx = x.amin(0), x.amax(0)
    sum_w = seq_sum(w, from_zero=False)
    sum_x = seq_sum(w * x, from_zero=False)
    mn = torch.where(mn > 0, torch.zeros_like(mn), mn)
    flat = mx == mn
    iscale = div(float(NMAX), mx - mn)
    scale = div(1.0, iscale)
    L = nearest_int(iscale * (x - mn)).clamp_(0, NMAX)
    diff = scale * L.float() + mn - x
    best = seq_sum(w * (diff * diff))
    for step in range(NSTEP + 1):
        iscale = div(f32(f32(RMIN + f32(f32(RDELTA) * step)) + NMAX), mx - mn)
        laux = nearest_int(iscale * (x - mn)).clamp_(0, NMAX)
        lf = laux.float()
        wl = w * lf
        sum_l, sum_l2, sum_xl = seq_sum(wl), seq_sum(wl * lf), seq_sum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        diff = this_scale * lf + this_min - x
        cur = seq_sum(w * (diff * diff))
        better = (D > 0) & (cur < best)
        L = torch.where(better, laux, L)
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    L = torch.where(flat, torch.zeros_like(L), L)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale, -mn, L


def six_bit(inv: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`uint8_t l = nearest_int(inv*v); l = MIN(63, l)` (the uint8 cast keeps the low byte)."""
    return (nearest_int(inv * v) & 0xFF).clamp_(max=63)


class Q4_K(BlockFormat):
    def encode(self, blocks: torch.Tensor, fast: bool = False) -> Codes:
        n = blocks.shape[0]
        x = columns(blocks, 32)  # [32, 8n]
        sum_x2 = seq_sum(x * x)
        av_x = sqrt_f32(sum_x2 / 32)
        scales, mins, L = make_qkx2_quants(x, av_x + x.abs())
        scales, mins = scales.view(n, 8), mins.view(n, 8)
        zero = torch.zeros((), device=blocks.device)
        max_scale = torch.where(scales > 0, scales, zero).amax(1, keepdim=True)  # C: max from 0, NaN skipped
        max_min = torch.where(mins > 0, mins, zero).amax(1, keepdim=True)
        inv_scale = torch.where(max_scale > 0, div(63.0, max_scale), zero)
        inv_min = torch.where(max_min > 0, div(63.0, max_min), zero)
        ls, lm = six_bit(inv_scale, scales), six_bit(inv_min, mins)  # [n, 8]
        d, dmin = (max_scale / 63).to(torch.float16), (max_min / 63).to(torch.float16)
        # codes from the coded scales; a sub-block whose coded scale is 0 keeps the search's codes
        dsc = (d.float() * ls.float()).view(-1)  # [8n]
        dm = (dmin.float() * lm.float()).view(-1)
        q = nearest_int((x + dm) / dsc).clamp_(0, NMAX)
        q = torch.where(dsc == 0, L, q)
        codes = rows(q, n).to(torch.uint8)
        fix, finite = fast_flags(blocks, fast)
        return Codes(codes, d, dmin, fix=fix, finite=finite, sc=ls.to(torch.uint8), sm=lm.to(torch.uint8))

    def decode(self, codes: Codes) -> torch.Tensor:
        n = codes.q.shape[0]
        d1 = codes.d.float() * codes.sc.float()  # [n, 8], exact
        m1 = codes.m.float() * codes.sm.float()
        q = codes.q.view(n, 8, 32).float()
        return (d1.unsqueeze(2) * q - m1.unsqueeze(2)).view(n, 256)

    def pack(self, codes: Codes) -> torch.Tensor:
        ls, lm, n = codes.sc, codes.sm, codes.q.shape[0]
        scales = torch.cat([ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
                            lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                            (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)], dim=1)
        q = codes.q.view(n, 4, 2, 32)  # 64 weights per 32 bytes: low nibbles, then high nibbles
        qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)
        return torch.cat([fp16_bytes(codes.d), fp16_bytes(codes.m), scales, qs], dim=1)

    def unpack(self, raw: torch.Tensor) -> Codes:
        n = raw.shape[0]
        s = raw[:, 4:16]
        ls = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], dim=1)
        lm = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], dim=1)
        qs = raw[:, 16:].reshape(n, 4, 1, 32)
        q = torch.cat([qs & 0xF, qs >> 4], dim=2).reshape(n, 256)
        return Codes(q, fp16_from_bytes(raw[:, 0:2]), fp16_from_bytes(raw[:, 2:4]), sc=ls, sm=lm)


FORMAT = Q4_K("q4_k", int(GGMLQuantizationType.Q4_K), block_size=256, type_size=144, compile=False)
