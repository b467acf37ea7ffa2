"""IQ4_NL: 32 weights -> fp16 d + 16 bytes of 4-bit indices into a fixed non-linear codebook (4.5 bits/weight).
ggml-quants.c quantize_iq4_nl -> quantize_row_iq4_nl_impl(32, 32, ..., ntry=7): what llama-quantize writes, with
or without an importance matrix (the same search; the imatrix only changes its weights).

A weight dequantizes to d * KVALUES[q]. The search, per block:
  weights w = x^2 (imatrix: qw * sqrt(sigma2 + x^2), sigma2 = 2 * mean x^2 of the block);
  d0 = max / 127 (max: the first largest-|x| element, sign kept), codes q = best_index(x / d0), then the
  least-squares scale d = sum w q x / sum w q^2 of those codes; then 15 more grids id = (t - 127) / max,
  t = -7..7, each refit the same way, keeping the one with the largest (sum w q x)^2 / sum w q^2;
  the stored codes are recomputed from the unrounded fp32 d: best_index(x / d).
Every step is an fp32 operation of the C code in its order (see _kbase); best_index is replayed exactly
through a table of fp32 decision thresholds (`THRESHOLDS`). IQ4_XS (iq4_xs.py) runs the same search on
each 32-weight sub-block of a 256 super-block.
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from ._base import BlockFormat, Codes, fp16_bytes, fp16_from_bytes, pack_nibbles, unpack_nibbles
from ._kbase import GROUP_MAX_EPS, columns, div, f32, fast_flags, rows, seq_sum
from ._weighted import _signed_absmax_cols, block_weights

# ggml-common.h kvalues_iq4nl
KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
NTRY = 7


def _ordered(v: np.float32) -> int:
    """fp32 -> an integer that orders like the float (bit pattern, negatives mirrored)."""
    b = int(np.array(v, np.float32).view(np.int32))
    return b if b >= 0 else -(b & 0x7FFFFFFF)


def _from_ordered(i: int) -> np.float32:
    b = i if i >= 0 else (-i) | -0x80000000
    return np.array(b, np.int32).view(np.float32)[()]


def _thresholds() -> np.ndarray:
    """t[k] (k = 0..14): the smallest fp32 x whose ggml best_index_int8 is > k.

    For x between codebook values lo = KVALUES[k] and hi = KVALUES[k+1], best_index_int8 returns k unless
    `x - lo < hi - x` is false in fp32 (each difference rounded: ties and near-ties go up). That predicate
    is monotone in x, so a bisection over the fp32 values finds where it flips; then
    best_index(x) = #{k : t[k] <= x} for every non-NaN x (x <= KVALUES[0] -> 0, x >= KVALUES[15] -> 15)."""
    out = []
    for k in range(15):
        lo, hi = np.float32(KVALUES[k]), np.float32(KVALUES[k + 1])
        a, b = _ordered(lo), _ordered(hi)  # predicate false at a, true at b
        while b - a > 1:
            m = (a + b) // 2
            x = _from_ordered(m)
            if np.float32(x - lo) < np.float32(hi - x):
                a = m
            else:
                b = m
        out.append(_from_ordered(b))
    return np.array(out, np.float32)


THRESHOLDS = _thresholds()
# The thresholds of this codebook all lie on the half-integer grid (midpoints of integer neighbours), so
# best_index(x) is a table lookup at floor(2x): every x in [u/2, (u+1)/2) has the same count of t[k] <= x.
assert np.all(np.floor(2 * THRESHOLDS) == 2 * THRESHOLDS), THRESHOLDS
_HALF_STEPS = 256  # the table covers 2x in [-256, 256]: beyond it the index is 0 or 15 anyway
_INDEX_TABLE = np.searchsorted(THRESHOLDS, np.arange(-_HALF_STEPS, _HALF_STEPS + 1) / 2, side="right")
_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _tables(device: torch.device):
    if device not in _TABLES:
        idx = torch.from_numpy(_INDEX_TABLE).to(device=device, dtype=torch.uint8)
        values = torch.tensor(KVALUES, dtype=torch.float32, device=device)
        _TABLES[device] = idx, values, values[idx.long()]
    return _TABLES[device]


def _half_steps(v: torch.Tensor) -> torch.Tensor:
    """floor(2v) + 256 as flat int32, NaN -> the top (C's binary search ends at index 15 for NaN)."""
    lim = float(_HALF_STEPS // 2)
    v = torch.nan_to_num(v, nan=lim, posinf=lim, neginf=-lim).clamp_(-lim, lim)
    return torch.floor(v.mul_(2)).to(torch.int32).add_(_HALF_STEPS).view(-1)


def _lookup(table: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # index_select with int32 indices: ~4x faster on CPU than table[int64 index] (and the int64 cast)
    return torch.index_select(table, 0, _half_steps(v)).view(v.shape)


def best_index(v: torch.Tensor) -> torch.Tensor:
    """ggml best_index_int8(16, kvalues_iq4nl, v) elementwise (uint8 codes 0..15)."""
    return _lookup(_tables(v.device)[0], v)


def nearest_value(v: torch.Tensor) -> torch.Tensor:
    """KVALUES[best_index(v)] as fp32, in one lookup."""
    return _lookup(_tables(v.device)[2], v)


def codebook(idx: torch.Tensor) -> torch.Tensor:
    """Codes -> the codebook values as fp32."""
    return torch.index_select(_tables(idx.device)[1], 0, idx.reshape(-1).to(torch.int32)).view(idx.shape)


def _grid(x: torch.Tensor, w: torch.Tensor, iscale: torch.Tensor):
    """One candidate grid: q = KVALUES[best_index(iscale * x)], and `sumqx += w*q*x; sumq2 += w*q*q` in C order."""
    q = nearest_value(iscale * x)
    wq = w * q
    return seq_sum(wq * x), seq_sum(wq * q)


def search_scales(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """quantize_row_iq4_nl_impl's per-block scale search (ntry = 7) on x, w: [32, S] -> d [S] (fp32).

    A block whose largest |x| is below 1e-15 gets d = 0."""
    mx = _signed_absmax_cols(x)  # [S]
    zero = mx.abs() < GROUP_MAX_EPS
    d = (-mx) / float(KVALUES[0])  # C: -max/values[0] (ntry > 0)
    sumqx, sumq2 = _grid(x, w, div(1.0, d))
    zero_f = torch.zeros_like(sumqx)
    d = torch.where(sumq2 > 0, sumqx / sumq2, zero_f)
    best = d * sumqx
    for itry in range(-NTRY, NTRY + 1):
        sumqx, sumq2 = _grid(x, w, div(float(itry + KVALUES[0]), mx))  # C: (itry + values[0])/max
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = torch.where(better, sumqx / sumq2, d)
        best = torch.where(better, d * sumqx, best)
    return torch.where(zero, zero_f, d)


def weights(blocks: torch.Tensor, x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """`weight[j] = qw ? qw[j] * sqrtf(sigma2 + x[j]*x[j]) : x[j]*x[j]` on x, qw: [32, S] (columns of the
    [n, B] super-blocks `blocks`), sigma2 = `sigma2 += x[j]*x[j]` over the super-block in order, `*= 2.f/B`."""
    if qw is None:
        return x * x
    xs = blocks.T
    sigma2 = seq_sum(xs * xs) * f32(2.0 / blocks.shape[1])  # [n]
    return block_weights(x, qw, sigma2.repeat_interleave(x.shape[1] // blocks.shape[0]).view(1, -1))


class IQ4_NL(BlockFormat):
    imatrix_use = "block"

    def _encode(self, blocks: torch.Tensor, qw: torch.Tensor | None, fast: bool = False) -> Codes:
        n = blocks.shape[0]
        x = columns(blocks, 32)  # [32, n]
        w = weights(blocks, x, None if qw is None else columns(qw, 32))
        d = search_scales(x, w)
        inv = torch.where(d != 0, div(1.0, d), torch.zeros_like(d))  # C: scales[0] ? 1/scales[0] : 0 (NaN is true)
        q = rows(best_index(inv * x), n).contiguous()
        fix, finite = fast_flags(blocks, fast)
        return Codes(q, d.view(n, 1).to(torch.float16), fix=fix, finite=finite)

    def encode(self, blocks: torch.Tensor, fast: bool = False) -> Codes:
        return self._encode(blocks, None, fast)

    def encode_imatrix(self, blocks: torch.Tensor, qw: torch.Tensor, sigma2=None) -> Codes:
        return self._encode(blocks, qw)

    def decode(self, codes: Codes) -> torch.Tensor:
        return codes.d.float() * codebook(codes.q)  # exact: 11-bit d times a 7-bit integer

    def pack(self, codes: Codes) -> torch.Tensor:
        return torch.cat([fp16_bytes(codes.d), pack_nibbles(codes.q)], dim=1)  # d, qs[16]

    def unpack(self, raw: torch.Tensor) -> Codes:
        return Codes(unpack_nibbles(raw[:, 2:]), fp16_from_bytes(raw[:, :2]))


FORMAT = IQ4_NL("iq4_nl", int(GGMLQuantizationType.IQ4_NL), block_size=32, type_size=18, compile=False)
