"""Q6_K: 256 weights -> 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 int8 scales, fp16 d
(6.5625 bits/weight). ggml-quants.c quantize_row_q6_K_ref: what llama-quantize writes without an imatrix.

Per sub-block of 16: make_qx_quants(nmax=32, rmse_type=1): codes l in [-32, 31] from the largest-|x| element,
then 18 neighbouring grids tried, keeping the scale that maximises (sum w x l)^2 / sum w l^2 with w = x^2.
The 16 sub-block scales are coded as int8 against the largest, and the codes recomputed from the coded
scales. Replayed here in the same fp32 operations, vectorised across sub-blocks (see _kbase); large jobs run the
search torch.compile'd (_kernels.compiled_qx_search), the same fp32 program.

With an importance matrix: quantize_row_q6_K_impl (encode_imatrix), the same search weighted by the imatrix.
"""
import torch
from gguf import GGMLQuantizationType

from ._base import BlockFormat, Codes, fp16_bytes, fp16_from_bytes, signed_absmax
from . import _weighted
from ._kbase import GROUP_MAX_EPS, columns, div, fast_flags, nearest_int, rows

NMAX = 32


def make_qx_quants(x: torch.Tensor):
    """x: [16, S] -> (scale [S], L [16, S] int32 in 0..63), as ggml's make_qx_quants(16, 32, rmse_type=1)."""
    return _weighted.make_qx_quants(x, NMAX, x * x)


class Q6_K(BlockFormat):
    imatrix_use = "block"

    def encode(self, blocks: torch.Tensor, fast: bool = False) -> Codes:
        x = columns(blocks, 16)  # [16, 16n]
        scales, L = make_qx_quants(x)
        return self._code_scales(blocks, x, scales, L, fast)

    def encode_imatrix(self, blocks: torch.Tensor, qw: torch.Tensor, sigma2=None) -> Codes:
        """ggml quantize_row_q6_K_impl: make_qx_quants(16, 32, x, L, 1, qw) with the imatrix entries themselves
        as weights (no sqrt(sigma2 + x^2) factor: commented out in ggml), then the same int8 scale coding."""
        x = columns(blocks, 16)
        scales, L = _weighted.make_qx_quants(x, NMAX, columns(qw, 16))
        return self._code_scales(blocks, x, scales, L, False)

    @staticmethod
    def _code_scales(blocks, x, scales, L, fast):
        """The 16 sub-block scales [16n] -> int8 codes against the largest, and the codes recomputed from them."""
        n = blocks.shape[0]
        scales = scales.view(n, 16)
        # C: `if (fabsf(scale) > max_abs_scale)` from 0: a NaN scale (x*x overflowed) never wins
        s = torch.where(torch.isnan(scales), torch.zeros_like(scales), scales)
        max_scale = signed_absmax(s, s.amax(1, keepdim=True), s.amin(1, keepdim=True))  # [n, 1]
        empty = max_scale.abs() < GROUP_MAX_EPS  # the whole super-block is stored as zero bytes
        iscale = div(-128.0, max_scale)
        d = div(1.0, iscale).to(torch.float16)
        sc = nearest_int(iscale * scales).clamp_(max=127).to(torch.int8)  # [n, 16]
        dd = (d.float() * sc.float()).view(-1)  # [16n]
        q = nearest_int(x / dd).clamp_(-NMAX, NMAX - 1) + NMAX
        q = torch.where(dd == 0, L, q)  # a sub-block whose coded scale is 0 keeps the search's codes
        q = torch.where(empty.repeat_interleave(16).view(1, -1), torch.zeros_like(q), q)
        d = torch.where(empty, torch.zeros_like(d), d)
        sc = torch.where(empty, torch.zeros_like(sc), sc)
        fix, finite = fast_flags(blocks, fast)
        return Codes(rows(q, n).to(torch.uint8), d, fix=fix, finite=finite, sc=sc)

    def decode(self, codes: Codes) -> torch.Tensor:
        n = codes.q.shape[0]
        dsc = codes.d.float() * codes.sc.float()  # [n, 16], exact
        q = codes.q.view(n, 16, 16).float() - 32
        return (dsc.unsqueeze(2) * q).view(n, 256)

    def pack(self, codes: Codes) -> torch.Tensor:
        n = codes.q.shape[0]
        L = codes.q.view(n, 2, 4, 32)  # [half, quarter, l]
        lo = L & 0xF
        ql = torch.stack([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], dim=2)
        hi = L >> 4
        qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
        return torch.cat([ql.reshape(n, 128), qh.reshape(n, 64), codes.sc.view(torch.uint8),
                          fp16_bytes(codes.d)], dim=1)

    def unpack(self, raw: torch.Tensor) -> Codes:
        n = raw.shape[0]
        ql = raw[:, :128].reshape(n, 2, 2, 32)
        qh = raw[:, 128:192].reshape(n, 2, 32)
        q = torch.stack([(ql[:, :, 0] & 0xF) | ((qh & 3) << 4),
                         (ql[:, :, 1] & 0xF) | (((qh >> 2) & 3) << 4),
                         (ql[:, :, 0] >> 4) | (((qh >> 4) & 3) << 4),
                         (ql[:, :, 1] >> 4) | (((qh >> 6) & 3) << 4)], dim=2)
        return Codes(q.reshape(n, 256), fp16_from_bytes(raw[:, 208:210]),
                     sc=raw[:, 192:208].contiguous().view(torch.int8))


FORMAT = Q6_K("q6_k", int(GGMLQuantizationType.Q6_K), block_size=256, type_size=210, compile=False)
