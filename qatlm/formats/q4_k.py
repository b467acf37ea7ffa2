"""Q4_K: 256 weights -> fp16 d, fp16 dmin, 8 six-bit scales and mins in 12 bytes, 128 bytes of 4-bit codes
(4.5 bits/weight). ggml-quants.c quantize_row_q4_K_ref: what llama-quantize writes without an imatrix.

Per sub-block of 32: weights w = sqrt(mean x^2) + |x|, then make_qkx2_quants(nmax=15, rmin=-1, rdelta=0.1,
nstep=20): a least-squares fit of (scale, min) for each of 21 candidate grids, keeping the one of smallest
weighted squared error. The 8 scales and 8 mins are then coded on 6 bits against the block's largest, and the
codes recomputed from the coded scales. Replayed here in the same fp32 operations, vectorised across
sub-blocks (see _kbase).

With an importance matrix: quantize_row_q4_K_impl (encode_imatrix; the searches are in _weighted).
"""
from typing import ClassVar

import torch
from gguf import GGMLQuantizationType

from ._base import BlockFormat, Codes, fp16_bytes, fp16_from_bytes
from ._kbase import affine_grid_search, columns, div, fast_flags, nearest_int, rows, seq_sum, sqrt_f32
from ._weighted import block_weights, make_qkx3_quants, make_qp_quants

NMAX, RMIN, RDELTA, NSTEP = 15, -1.0, 0.1, 20


def make_qkx2_quants(x: torch.Tensor, w: torch.Tensor, nmax: int = NMAX, rmin: float = RMIN, rdelta: float = RDELTA,
                     nstep: int = NSTEP, mad: bool = False):
    """ggml make_qkx2_quants(n, nmax, x, w, L, &the_min, Laux, rmin, rdelta, nstep, use_mad=mad) on x, w: [n, S]
    -> (scale [S], the_min [S] (>= 0, subtracted), L [n, S] int32). Q4_K's defaults; Q5_K and Q2_K pass theirs."""
    mn, mx = x.amin(0), x.amax(0)
    sum_w = seq_sum(w, from_zero=False)
    sum_x = seq_sum(w * x, from_zero=False)
    mn = torch.where(mn > 0, torch.zeros_like(mn), mn)
    flat = mx == mn
    iscale = div(float(nmax), mx - mn)
    scale = div(1.0, iscale)
    L = nearest_int(iscale * (x - mn)).clamp_(0, nmax)
    diff = scale * L.float() + mn - x
    best = seq_sum(w * (diff.abs() if mad else diff * diff))
    L, best, scale, mn = affine_grid_search(x, w, sum_w, sum_x, mn, mx, L, best, scale, nmax, rmin, rdelta, nstep,
                                            mad)
    L = torch.where(flat, torch.zeros_like(L), L)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale, -mn, L


def six_bit(inv: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`uint8_t l = nearest_int(inv*v); l = MIN(63, l)` (the uint8 cast keeps the low byte)."""
    return (nearest_int(inv * v) & 0xFF).clamp_(max=63)


def pack_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 8] scale and min codes -> the 12 `scales` bytes, written as quantize_row_q4_K_* does (codes
    above 63, which only the imatrix search can produce, spill into the neighbours' bits as they do in C)."""
    return torch.cat([ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
                      lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                      (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)], dim=1)


def unpack_scales(s: torch.Tensor):
    """12 `scales` bytes [n, 12] -> the 6-bit (scale, min) codes [n, 8] each, as get_scale_min_k4 reads them."""
    ls = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], dim=1)
    lm = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], dim=1)
    return ls, lm


def requantize(x: torch.Tensor, L: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor, ls: torch.Tensor,
               lm: torch.Tensor, nmax: int = NMAX) -> torch.Tensor:
    """The final codes from the coded scales: l = nearest_int((x + dmin*m) / (d*sc)) in 0..nmax, x, L: [sub, S];
    d, dmin: fp16 [n, 1]; ls, lm: [n, S / n]. A sub-block whose coded scale is 0 keeps the search's codes L."""
    dsc = (d.float() * ls.float()).reshape(-1)  # [S]
    dm = (dmin.float() * lm.float()).reshape(-1)
    q = nearest_int((x + dm) / dsc).clamp_(0, nmax)
    return torch.where(dsc == 0, L, q)


class Q4_K(BlockFormat):
    imatrix_use = "block"
    nmax: ClassVar[int] = NMAX  # largest code
    search: ClassVar[tuple] = (RMIN, RDELTA, NSTEP)  # the reference's make_qkx2_quants grid
    clamp_imatrix_codes: ClassVar[bool] = False  # quantize_row_q5_K_impl clamps its scale codes to 63, q4_K's does not

    def encode(self, blocks: torch.Tensor, fast: bool = False) -> Codes:
        n = blocks.shape[0]
        x = columns(blocks, 32)  # [32, 8n]
        sum_x2 = seq_sum(x * x)
        av_x = sqrt_f32(sum_x2 / 32)
        scales, mins, L = make_qkx2_quants(x, av_x + x.abs(), self.nmax, *self.search)
        scales, mins = scales.view(n, 8), mins.view(n, 8)
        zero = torch.zeros((), device=blocks.device)
        max_scale = torch.where(scales > 0, scales, zero).amax(1, keepdim=True)  # C: max from 0, NaN skipped
        max_min = torch.where(mins > 0, mins, zero).amax(1, keepdim=True)
        inv_scale = torch.where(max_scale > 0, div(63.0, max_scale), zero)
        inv_min = torch.where(max_min > 0, div(63.0, max_min), zero)
        ls, lm = six_bit(inv_scale, scales), six_bit(inv_min, mins)  # [n, 8]
        d, dmin = (max_scale / 63).to(torch.float16), (max_min / 63).to(torch.float16)
        codes = rows(requantize(x, L, d, dmin, ls, lm, self.nmax), n).to(torch.uint8)
        fix, finite = fast_flags(blocks, fast)
        return Codes(codes, d, dmin, fix=fix, finite=finite, sc=ls.to(torch.uint8), sm=lm.to(torch.uint8))

    def encode_imatrix(self, blocks: torch.Tensor, qw: torch.Tensor, sigma2=None) -> Codes:
        """ggml quantize_row_q4_K_impl: per super-block sigma2 = 2 * mean x^2, weights qw * sqrt(sigma2 + x^2),
        make_qkx3_quants(32, 15, ..., -0.9, 0.05, 36) per sub-block, then make_qp_quants(8, 63) codes the 8
        scales and the 8 mins against their weight sums (instead of the reference's plain max / 63)."""
        n = blocks.shape[0]
        xs = columns(blocks, 256)  # [256, n]
        sig = 2 * seq_sum(xs * xs) / 256  # [n]  C: 2*sum_x2/QK_K, summed over the super-block in order
        x = columns(blocks, 32)  # [32, 8n]
        w = block_weights(x, columns(qw, 32), sig.repeat_interleave(8).view(1, -1))
        sw = seq_sum(w)  # [8n]
        scales, mn, L = make_qkx3_quants(x, w, self.nmax, -0.9, 0.05, 36)  # mn = -the_min
        sw8 = sw.view(n, 8).T.contiguous()  # [8, n]
        d_block, Ls = make_qp_quants(scales.view(n, 8).T.contiguous(), 63, sw8)
        m_block, Lm = make_qp_quants((-mn).view(n, 8).T.contiguous(), 63, sw8)
        if self.clamp_imatrix_codes:
            Ls, Lm = Ls.clamp(max=63), Lm.clamp(max=63)
        ls, lm = Ls.T.to(torch.uint8).contiguous(), Lm.T.to(torch.uint8).contiguous()  # [n, 8]
        d, dmin = d_block.view(n, 1).to(torch.float16), m_block.view(n, 1).to(torch.float16)
        sc, sm = unpack_scales(pack_scales(ls, lm))  # C requantizes with what get_scale_min_k4 reads back
        codes = rows(requantize(x, L, d, dmin, sc, sm, self.nmax), n).to(torch.uint8)
        return Codes(codes, d, dmin, sc=ls, sm=lm)

    def decode(self, codes: Codes) -> torch.Tensor:
        n = codes.q.shape[0]
        # the codes as llama.cpp reads them from the packed bytes: the identity for codes <= 63 (all of them,
        # except after an imatrix search that found a negative sub-block scale)
        sc, sm = unpack_scales(pack_scales(codes.sc, codes.sm))
        d1 = codes.d.float() * sc.float()  # [n, 8], exact
        m1 = codes.m.float() * sm.float()
        q = codes.q.view(n, 8, 32).float()
        return (d1.unsqueeze(2) * q - m1.unsqueeze(2)).view(n, 256)

    def pack(self, codes: Codes) -> torch.Tensor:
        n = codes.q.shape[0]
        scales = pack_scales(codes.sc, codes.sm)
        q = codes.q.view(n, 4, 2, 32)  # 64 weights per 32 bytes: low nibbles, then high nibbles
        qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)
        return torch.cat([fp16_bytes(codes.d), fp16_bytes(codes.m), scales, qs], dim=1)

    def unpack(self, raw: torch.Tensor) -> Codes:
        n = raw.shape[0]
        ls, lm = unpack_scales(raw[:, 4:16])
        qs = raw[:, 16:].reshape(n, 4, 1, 32)
        q = torch.cat([qs & 0xF, qs >> 4], dim=2).reshape(n, 256)
        return Codes(q, fp16_from_bytes(raw[:, 0:2]), fp16_from_bytes(raw[:, 2:4]), sc=ls, sm=lm)


FORMAT = Q4_K("q4_k", int(GGMLQuantizationType.Q4_K), block_size=256, type_size=144, compile=False)
