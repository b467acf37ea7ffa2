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


# numpy runs a reduction over axis 0 of a C-contiguous [K, N] array as N-wide row additions in row order only
# while the columns stay the inner loop; with N == 1 the iterator drops that axis and the reduction itself
# becomes the inner loop, which numpy sums pairwise (8 partial sums; measured). Narrow inputs take the torch loop.
MIN_NUMPY_COLUMNS = 16


def seq_sum(rows: torch.Tensor, from_zero: bool = True) -> torch.Tensor:
    """Sum over dim 0 of [k, S] in C loop order: ((0 + r0) + r1) + ... (or r0 + r1 + ... if not from_zero,
    for C sums initialised with the first term); torch.sum reorders fp32 sums.

    On CPU outside torch.compile this is one numpy call, numpy's add.reduce over axis 0 of the C-contiguous
    array (the rows outer, one vectorized fp32 add per row: exactly the loop), instead of k - 1 torch ops (the
    per-row sums of the imatrix rules used it already; for the K-quant searches it measured no faster or slower
    than the loop, whose time is in the searches' elementwise passes)."""
    if (rows.device.type == "cpu" and rows.dtype == torch.float32 and rows.dim() == 2
            and rows.shape[1] >= MIN_NUMPY_COLUMNS and not rows.requires_grad
            and not torch.compiler.is_compiling()):
        # initial 0.0 is C's `sum = 0` (the -0.0 of an all -0.0 column becomes +0.0); initial -0.0 adds exactly
        # nothing (-0.0 + r0 == r0 for every r0), i.e. C's `sum = x[0]`
        start = 0.0 if from_zero else -0.0
        return torch.from_numpy(np.add.reduce(rows.contiguous().numpy(), axis=0, initial=start))
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


def grid_step(x, w, sum_w, sum_x, mn, mx, L, best, scale, numer: torch.Tensor, nmax: int, mad: bool = False):
    """One candidate grid of ggml's make_qkx2/qkx3_quants (x, w: [n, S]; numer: the grid's fp32 numerator
    rmin + rdelta * step + nmax as a 0-dim tensor): iscale = numer / (max - min), a weighted least-squares fit of
    (scale, min <= 0) to the grid's codes, and the fit replaces (L, best, scale, min) where its weighted squared
    error is smaller. Returns the new (L, best, scale, min)."""
    iscale = torch.div(numer, mx - mn)
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
    return (torch.where(better, laux, L), torch.where(better, cur, best), torch.where(better, this_scale, scale),
            torch.where(better, this_min, mn))


# qatlm.formats._kernels sets this while it runs a large CPU job: the same search with each grid_step compiled
# (see _kernels.compiled_grid_search); None: eager
compiled_grid_search = None


def affine_grid_search(x, w, sum_w, sum_x, mn, mx, L, best, scale, nmax: int, rmin: float, rdelta: float,
                       nstep: int, mad: bool = False):
    """The candidate-grid loop shared by ggml's make_qkx2_quants and make_qkx3_quants (x, w: [n, S]): grid_step
    for iscale = (rmin + rdelta * step + nmax) / (max - min), step = 0..nstep (later grids start from the min of
    the best fit so far, as C's loop does). Returns (L, best, scale, min)."""
    numers = [torch.tensor(f32(f32(f32(rmin) + f32(f32(rdelta) * step)) + nmax)) for step in range(nstep + 1)]
    state = (L, best, scale, mn)
    if compiled_grid_search is not None and x.device.type == "cpu" and not torch.compiler.is_compiling():
        return compiled_grid_search(x, w, sum_w, sum_x, mx, state, numers, nmax, mad)
    for numer in numers:
        L, best, scale, mn = grid_step(x, w, sum_w, sum_x, mn, mx, L, best, scale, numer.to(x.device), nmax, mad)
    return L, best, scale, mn
