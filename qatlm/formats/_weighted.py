"""Importance-matrix (imatrix) weighted quantization: ggml's weighted scale searches, replayed in torch.

With an importance matrix (one float per column: `in_sum2 / counts` from llama-imatrix), `llama-quantize
--imatrix` calls `ggml_quantize_chunk(type, ..., imatrix)`, and ggml-quants.c switches from the reference
rules to weighted least-squares searches:

- Q4_0 / Q5_0 (`quantize_row_q4_0_impl` / `q5_0_impl`): weights w_j = qw_j * sqrt(sigma2 + x_j^2), sigma2 =
  mean over the whole ROW of x^2; `make_qx_quants(32, nmax, x, L, 1, w)`: the codes of the RTN scale -nmax/max
  and of 18 neighbours -(nmax + 0.1 k)/max, keeping the one with the largest (sum w x l)^2 / sum w l^2; the
  stored d is the least-squares scale sum w x l / sum w l^2 of that grid.
- Q4_1 / Q5_1 (`quantize_row_q4_1_impl` / `q5_1_impl`): same weights, `make_qkx3_quants(32, nmax, ..., rmin
  -0.9, rdelta 0.05, nstep 36)`: 37 candidate grids, each with a weighted least-squares (scale, min) refit,
  keeping the smallest weighted squared error.
- Q4_K (`quantize_row_q4_K_impl`), Q6_K (`quantize_row_q6_K_impl`): see q4_k.py / q6_k.py; they use
  `make_qkx3_quants`, `make_qp_quants` (the 6-bit sub-scales) and `make_qx_quants` defined here.
- Q8_0 ignores the imatrix (`quantize_q8_0` casts it to void).

Every operation is an fp32 operation of the C code, in the C order (see _kbase for nearest_int, seq_sum,
div and sqrt_f32). libggml-base is built without FMA (no vfmadd in its disassembly: ggml-quants.c lives in
the base library, which gets no -march flags), so each `a*b + c` is two roundings here too. The searches
are replayed on [elements of a block, blocks] tensors, so each C loop iteration is one vector op over all
blocks; branches become torch.where masks. Nothing here syncs with the host, so it runs on CUDA as is.
"""
from __future__ import annotations

import torch

from ._base import Codes, signed_absmax
from ._kbase import GROUP_MAX_EPS, affine_grid_search, columns, div, f32, nearest_int, seq_sum, sqrt_f32


_MAGIC = 12582912.0  # 1.5 * 2^23, ggml's nearest_int constant

# ---- per-row and per-block weights --------------------------------------------------------------

def row_sigma2(rows: torch.Tensor) -> torch.Tensor:
    """fp32 [R, C] -> [R, 1]: `sum_x2 += x[j]*x[j]` over the row in C order, then `sum_x2 / n_per_row`."""
    R, C = rows.shape
    if rows.device.type == "cpu":
        return (seq_sum((rows * rows).T, from_zero=False) / float(C)).unsqueeze(1)
    acc = torch.zeros(R, dtype=torch.float32, device=rows.device)
    for j in range(C):  # sequential: fp32 sums depend on their order
        col = rows[:, j]
        acc += col * col
    return (acc / float(C)).unsqueeze(1)


def block_weights(x: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """`weight[j] = qw[j] * sqrtf(sigma2 + xb[j]*xb[j])` on [k, S] tensors (sigma2 broadcast, [S])."""
    return qw * sqrt_f32(sigma2 + x * x)


# ---- the searches ------------------------------------------------------------------------------

def _signed_absmax_cols(x: torch.Tensor) -> torch.Tensor:
    """[k, S] -> [S]: per column the first element of largest |x| (C: `if (ax > amax)` from 0)."""
    t = x.T
    return signed_absmax(t, t.amax(1, keepdim=True), t.amin(1, keepdim=True)).view(-1)


def _first_of_equals_cols(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A column min/max as C's `if (x[i] < min)` from x[0] finds it: among zeros, the first (its sign)."""
    first = (x == 0).to(torch.uint8).argmax(dim=0, keepdim=True)  # [1, S]
    return torch.where(value == 0, x.gather(0, first).view(-1), value)


def _signed_absmax_seq(x: torch.Tensor) -> torch.Tensor:
    """[k, S] -> [S]: C's `if (fabsf(x[i]) > amax) { amax = fabsf(x[i]); max = x[i]; }` from amax = max = 0, row by
    row: the first element of largest |x| (NaN is skipped, an all-zero column gives +0.0). Pointwise steps only,
    so torch.compile fuses them into the search's loop."""
    amax = torch.zeros_like(x[0])
    mx = torch.zeros_like(x[0])
    for i in range(x.shape[0]):
        ax = x[i].abs()
        take = ax > amax
        amax = torch.where(take, ax, amax)
        mx = torch.where(take, x[i], mx)
    return mx


def qx_steps(nmax: int, dims: int = 1) -> torch.Tensor:
    """make_qx_quants' 19 grid numerators in C's order: -nmax (the first grid), then -(nmax + 0.1f*is) for
    is = -9..-1, 1..9, each a C float expression. fp32 [19, 1, ...] (`dims` ones)."""
    vals = [float(-nmax)] + [-f32(nmax + f32(f32(0.1) * k)) for k in range(-9, 10) if k]
    return torch.tensor(vals, dtype=torch.float32).view(-1, *([1] * dims))


# qatlm.formats._kernels sets this while it runs a large CPU job: make_qx_quants torch.compile'd (one fused pass
# over the blocks; see _kernels.compiled_qx_search); None: eager
compiled_qx_search = None


def make_qx_quants(x: torch.Tensor, nmax: int, w: torch.Tensor):
    """ggml make_qx_quants(n, nmax, x, L, rmse_type=1, qw=w) on x, w: [n, S] (or [n, ...]: any block dims).

    Returns (scale [S], L [n, S] int32 in 0..2*nmax-1). A column whose largest |x| is below 1e-15 gets
    scale 0 and L = 0 (C returns early there).

    All 19 grids are evaluated at once, as a [19, S] state updated once per element i in C's order (so every
    fp32 sum is C's), then C's sequential choice of the best grid replays over the 19 rows. Every step is
    pointwise: eager it is 19x fewer kernel launches than one grid at a time, and torch.compile (qatlm.formats.
    _kernels.run_imatrix) fuses the element loop into one pass over the blocks.
    """
    # is_compiling first: inside a compiled graph (run_imatrix's) the hook is never read, so not guarded on
    if not torch.compiler.is_compiling() and compiled_qx_search is not None and x.device.type == "cpu":
        result = compiled_qx_search(x, nmax, w)
        if result is not None:
            return result
    mx = _signed_absmax_seq(x)  # [S]
    zero = mx.abs() < GROUP_MAX_EPS
    iscales = torch.div(qx_steps(nmax, mx.dim()).to(x.device), mx)  # [19, S], each fp32 c / max rounded once

    def codes(iscale, xi):
        # nearest_int as a float: (v + 1.5*2^23) - 1.5*2^23 rounds half to even exactly like ggml's bit trick
        # for |v| < 2^22, and here |v| = |x / max| * (nmax + 0.9) at most. NaN reaches this search only as a
        # sub-block scale whose weighted sums overflowed (Q3_K's scales with an imatrix): C's max search skips
        # it and nearest_int(NaN) is 0: NaN is zeroed before the clamp (whose NaN handling compilers may change).
        # Compiled, by `v != v`: Inductor's isnan / nan_to_num test each lane in scalar code (4x slower search)
        v = (iscale * xi).add_(_MAGIC).sub_(_MAGIC)
        v = v.masked_fill_(v != v, 0.0) if torch.compiler.is_compiling() else v.nan_to_num_(nan=0.0)
        return v.clamp_(-nmax, nmax - 1)

    sumlx = torch.zeros_like(iscales)
    suml2 = torch.zeros_like(iscales)
    for i in range(x.shape[0]):  # C's element loop; C: w*x[i]*l = (w*x)*l, w*l*l = (w*l)*l
        li = codes(iscales, x[i])
        sumlx = sumlx + (w[i] * x[i]) * li
        suml2 = suml2 + (w[i] * li) * li
    # the first grid: scale = suml2 ? sumlx/suml2 : 0 (NaN is true), best = scale * sumlx; then each further grid
    # replaces it when `suml2 > 0 && sumlx*sumlx > best*suml2`
    best_is = iscales[0]
    scale = torch.where(suml2[0] != 0, sumlx[0] / suml2[0], torch.zeros_like(mx))
    best = scale * sumlx[0]
    for k in range(1, iscales.shape[0]):
        slx, sl2 = sumlx[k], suml2[k]
        better = (sl2 > 0) & (slx * slx > best * sl2)
        best_is = torch.where(better, iscales[k], best_is)
        scale = torch.where(better, slx / sl2, scale)
        best = torch.where(better, scale * slx, best)
    L = (codes(best_is, x) + nmax).to(torch.int32)  # the same expression of the same iscale: the grid's codes
    L = torch.where(zero, torch.zeros_like(L), L)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, L


def make_qkx3_quants(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float = -0.9, rdelta: float = 0.05,
                     nstep: int = 36):
    """ggml make_qkx3_quants(n, nmax, x, w, L, &the_min, Laux, rmin, rdelta, nstep, use_mad=false), x, w: [n, S].

    Returns (scale [S], min [S], L [n, S] int32 in 0..nmax), where `min` is C's local `min` (<= 0), i.e.
    -the_min: the value stored in the fp16 m field of Q4_1/Q5_1 (m = -the_min), sign of zero included.
    """
    mn = _first_of_equals_cols(x, x.amin(0))
    mx = x.amax(0)
    sum_w = seq_sum(w, from_zero=False)  # C: sum_w = w[0]; sum_x = sum_w * x[0]; then += for i >= 1
    sum_x = seq_sum(w * x, from_zero=False)
    mn = torch.where(mn > 0, torch.zeros_like(mn), mn)
    flat = mx <= mn  # C returns early here: L = 0, scale 0, min kept
    mn0 = mn
    iscale = div(float(nmax), mx - mn)
    scale = div(1.0, iscale)
    L = nearest_int(iscale * (x - mn)).clamp_(0, nmax)
    diff = scale * L.float() + mn - x
    best = seq_sum(w * (diff * diff))
    # C reuses `min` in the grid, and a better grid replaces it: later grids start from the refitted min
    L, best, scale, mn = affine_grid_search(x, w, sum_w, sum_x, mn, mx, L, best, scale, nmax, rmin, rdelta, nstep)
    L = torch.where(flat, torch.zeros_like(L), L)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    mn = torch.where(flat, mn0, mn)
    return scale, mn, L


def make_qp_quants(x: torch.Tensor, nmax: int, w: torch.Tensor):
    """ggml make_qp_quants(n, nmax, x, L, quant_weights=w) on x, w: [n, S] (Q4_K: the 8 sub-block scales or
    mins of each super-block, weighted by the sub-blocks' weight sums).

    Returns (scale [S], L [n, S] int32 in 0..255: C's uint8_t L, so a negative code wraps). Five passes of
    per-element coordinate descent follow the grid search; C stops after a pass that changed nothing, and
    such a pass leaves the state as it was, so running all five is the same.
    """
    n = x.shape[0]
    mx = torch.zeros_like(x[0])
    for i in range(n):  # C: max = MAX(max, x[i]) from 0, i.e. max > x[i] ? max : x[i]
        mx = torch.where(mx > x[i], mx, x[i])
    zero = mx < GROUP_MAX_EPS
    iscale = div(float(nmax), mx)
    L8 = (nearest_int(iscale * x) & 0xFF).float()  # the uint8 L of the initial grid
    scale = div(1.0, iscale)
    diff = x - scale * L8
    best = seq_sum((w * diff) * diff)  # C: w*diff*diff
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = div(f32(f32(f32(0.1) * step) + nmax), mx)
        scale_is = div(1.0, iscale_is)
        l = nearest_int(iscale_is * x).clamp_(max=nmax)
        diff = x - scale_is * l.float()
        mse = seq_sum((w * diff) * diff)
        better = mse < best
        best = torch.where(better, mse, best)
        iscale = torch.where(better, iscale_is, iscale)
    l = nearest_int(iscale * x).clamp_(max=nmax)
    lf = l.float()
    sumlx = seq_sum((w * x) * lf)
    suml2 = seq_sum((w * lf) * lf)
    L = l & 0xFF
    for _ in range(5):
        for i in range(n):
            wi, xi, Li = w[i], x[i], L[i].float()
            slx = sumlx - (wi * xi) * Li
            sl2 = suml2 - (wi * Li) * Li
            new_l = nearest_int((xi * sl2) / slx).clamp_(max=nmax)
            nf = new_l.float()
            changed = (slx > 0) & (sl2 > 0) & (new_l != L[i])
            slx = slx + (wi * xi) * nf
            sl2 = sl2 + (wi * nf) * nf
            take = changed & ((slx * slx) * suml2 > (sumlx * sumlx) * sl2)
            L[i] = torch.where(take, new_l & 0xFF, L[i])
            sumlx = torch.where(take, slx, sumlx)
            suml2 = torch.where(take, sl2, suml2)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    L = torch.where(zero, torch.zeros_like(L), L)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, L


# ---- the 32-weight formats -----------------------------------------------------------------------

def symmetric_imatrix_columns(x: torch.Tensor, w: torch.Tensor, half_levels: int):
    """quantize_row_q4_0_impl (half_levels=8) / q5_0_impl (16) on column-layout blocks: x and their weights w
    (block_weights) fp32 [32, S], the blocks' elements along dim 0 -> (d fp16 [S], q int32 [32, S]):
    d = fp16(make_qx_quants scale), q = that search's codes (not recomputed from the fp16 d)."""
    scale, L = make_qx_quants(x, half_levels, w)
    return scale.to(torch.float16), L


def fake_symmetric_imatrix_columns(x: torch.Tensor, w: torch.Tensor, half_levels: int) -> torch.Tensor:
    """The dequantized values of symmetric_imatrix_columns' codes, [32, ...] fp32 (= decode_symmetric): the
    kernel that _kernels.run_imatrix compiles for training's fake quant. Block element first, so every step of the
    search reads contiguous memory (given [n, 32] blocks, Inductor would gather each element with stride 32),
    and the weights come computed (inside the search's graph, Inductor would recompute their square roots for
    each of the 19 grids)."""
    d, L = symmetric_imatrix_columns(x, w, half_levels)
    return (L.to(torch.float32) - half_levels) * d.to(torch.float32)


def encode_symmetric_imatrix(blocks: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor, half_levels: int) -> Codes:
    """Q4_0 (half_levels=8) / Q5_0 (16) with an imatrix: blocks, qw fp32 [n, 32]; sigma2: [n, 1]."""
    n = blocks.shape[0]
    x = columns(blocks, 32)
    d, L = symmetric_imatrix_columns(x, block_weights(x, columns(qw, 32), sigma2.view(1, n)), half_levels)
    return Codes(L.T.to(torch.uint8).contiguous(), d.view(n, 1))


def encode_min_imatrix(blocks: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor, max_code: int) -> Codes:
    """Q4_1 (max_code=15) / Q5_1 (31) with an imatrix: quantize_row_q4_1_impl / q5_1_impl.

    d = fp16(scale), m = fp16(-the_min) of make_qkx3_quants(32, max_code, ..., -0.9, 0.05, 36), q = its codes.
    """
    n = blocks.shape[0]
    x = columns(blocks, 32)
    w = block_weights(x, columns(qw, 32), sigma2.view(1, n))
    scale, mn, L = make_qkx3_quants(x, w, max_code)
    return Codes(L.T.to(torch.uint8).contiguous(), scale.view(n, 1).to(torch.float16), mn.view(n, 1).to(torch.float16))
