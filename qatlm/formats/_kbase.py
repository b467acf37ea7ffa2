"""Shared machinery for the K-quants (256-weight super-blocks): ggml's nearest_int and fp32 sums in C order.

The K-quant reference quantizers (ggml-quants.c quantize_row_q4_K_ref / q6_K_ref) search, per sub-block,
for the scale (and minimum) that minimise a weighted error. Their results depend on every fp32 rounding of
those searches, so the torch versions here replay them operation for operation:

- `nearest_int` is ggml's bit trick (add 1.5 * 2^23, keep the mantissa), not torch.round: equal (round half
  to even) for |v| < 2^22, and beyond that the same wrapped integer C produces;
- sums run element after element in fp32 (`seq_sum`), as C's scalar loops do; torch.sum reorders them;
- a constant divided by a tensor uses torch.div on a 0-dim fp32 tensor: Python's `c / t` is implemented as
  `t.reciprocal() * c`, which rounds twice;
- sqrtf goes through float64 (`sqrt_f32`): torch.sqrt on fp32 CPU tensors is not correctly rounded (16% of
  random inputs differ from C's sqrtf by an ulp, measured with torch 2.13 AVX512), while a float64 square
  root rounded to fp32 is exactly sqrtf (double rounding is harmless for sqrt at 53 >= 2*24 + 2 bits).

All work is vectorised across sub-blocks: tensors are laid out [elements of a sub-block, sub-blocks], so that
each C loop iteration is one contiguous row.
"""
from __future__ import annotations

import numpy as np
import torch

GROUP_MAX_EPS = float(np.float32(1e-15))  # ggml-quants.c: "all zero" threshold of the K-quant searches


def f32(value) -> float:
    """A C float constant expression, evaluated in fp32 (e.g. f32(np.float32(0.1) * 3))."""
    return float(np.float32(value))


def nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int(fval): the low 23 bits of fval + 12582912.f, minus 2^22 (int32)."""
    return ((v + 12582912.0).view(torch.int32) & 0x007FFFFF) - 0x00400000


def div(c: float, t: torch.Tensor) -> torch.Tensor:
    """fp32 c / t rounded once (see the module docstring)."""
    return torch.div(torch.tensor(c, dtype=torch.float32, device=t.device), t)


def sqrt_f32(t: torch.Tensor) -> torch.Tensor:
    """C's sqrtf, correctly rounded (see the module docstring)."""
    return torch.sqrt(t.double()).float()


def seq_sum(rows: torch.Tensor, from_zero: bool = True) -> torch.Tensor:
    """Sum over dim 0 of [k, S] in C loop order: ((0 + r0) + r1) + ... (or r0 + r1 + ... if not from_zero,
    for C sums initialised with the first term)."""
    acc = rows[0] + 0.0 if from_zero else rows[0].clone()
    for i in range(1, rows.shape[0]):
        acc += rows[i]
    return acc


def fast_flags(blocks: torch.Tensor, fast: bool):
    """Codes.fix / Codes.finite for encode(fast=True): the K-quant encoders have no separate fast rules, so no
    block needs redoing; finite tells _kernels whether the input held NaN/inf. (None, None) otherwise."""
    if not fast:
        return None, None
    finite = torch.isfinite(blocks).all(1, keepdim=True)
    return torch.zeros_like(finite), finite


def columns(blocks: torch.Tensor, sub: int) -> torch.Tensor:
    """[n, 256] super-blocks -> [sub, n * 256 // sub]: sub-block elements along dim 0."""
    return blocks.reshape(-1, sub).T.contiguous()


def rows(cols: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `columns`: [sub, S] -> [n, 256]."""
    return cols.T.reshape(n, -1)


def affine_grid_search(x, w, sum_w, sum_x, mn, mx, L, best, scale, nmax: int, rmin: float, rdelta: float,
                       nstep: int, mad: bool = False):
    """The candidate-grid loop shared by ggml's make_qkx2_quants and make_qkx3_quants (x, w: [n, S]): for
    iscale = (rmin + rdelta * step + nmax) / (max - min), step = 0..nstep, a weighted least-squares fit of
    (scale, min <= 0) to the grid's codes; a fit of smaller weighted squared error replaces L, best, scale and
    min (and later grids start from that min, as C's loop does). Returns (L, best, scale, min)."""
    for step in range(nstep + 1):
        iscale = div(f32(f32(f32(rmin) + f32(f32(rdelta) * step)) + nmax), mx - mn)
        laux = nearest_int(iscale * (x - mn)).clamp_(0, nmax)
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
        cur = seq_sum(w * (diff.abs() if mad else diff * diff))
        better = (D > 0) & (cur < best)
        L = torch.where(better, laux, L)
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    return L, best, scale, mn
