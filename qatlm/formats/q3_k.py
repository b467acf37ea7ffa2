"""Q3_K: 256 weights -> 32 bytes of high bits (hmask), 64 bytes of 2-bit low parts, 16 six-bit signed scales in
12 bytes, fp16 d (3.4375 bits/weight). ggml-quants.c quantize_row_q3_K_ref; with an importance matrix
quantize_row_q3_K_impl.

Codes are l in [-4, 3] (stored l + 4: bit 2 in hmask, bits 0-1 in qs), per sub-block of 16 a signed 6-bit scale
s in [-32, 31] (stored s + 32); a weight dequantizes to d * s * l.
- Reference: make_q3_quants(16, nmax=4, do_rmse) per sub-block: the codes of the RTN scale -4/max, then up to
  five passes of per-element coordinate descent on (sum w x l)^2 / sum w l^2 with w = x^2; the 16 scales coded
  against d = max_scale / -32 (max_scale the first largest-|scale|).
- imatrix: make_qx_quants(16, 4, x, L, 1, w) per sub-block with w = qw * sqrt(2 * mean x^2 + x^2), then
  make_qx_quants(16, 32, scales, Ls, 1, sw) codes the 16 scales against their weight sums sw.
Either way the codes are then recomputed from the coded scales: l = clamp(nearest_int(x / (d16 * s)), -4, 3).
"""
import torch
from gguf import GGMLQuantizationType

from ._base import BlockFormat, Codes, fp16_bytes, fp16_from_bytes, signed_absmax
from . import _weighted
from ._kbase import GROUP_MAX_EPS, columns, div, fast_flags, nearest_int, rows, seq_sum
from ._weighted import _signed_absmax_seq, block_weights


# qatlm.formats._kernels sets this while it runs a large CPU job: descent_pass torch.compile'd (one fused loop over
# the sub-blocks; _kernels.compiled_q3_pass); None: eager
compiled_descent_pass = None


def make_q3_quants(x: torch.Tensor):
    """ggml make_q3_quants(16, 4, x, L, do_rmse=true) on x: [16, S] -> (scale [S], L [16, S] int32 in 0..7).

    A column whose largest |x| is below 1e-15 gets scale 0 and L = 0. C stops the descent after a pass that
    changed nothing; such a pass leaves the state as it was, so running all five is the same."""
    nmax = 4
    mx = _signed_absmax_seq(x)  # C's loop, 16 pointwise steps (the reductions over [S, 16] views cost 5x more)
    zero = mx.abs() < GROUP_MAX_EPS
    L = nearest_int(div(float(-nmax), mx) * x).clamp_(-nmax, nmax - 1)  # C: iscale = -nmax / max
    w = x * x
    wx = w * x
    lf = L.float()
    sumlx = seq_sum(wx * lf)  # C: w*x[i]*l
    suml2 = seq_sum((w * lf) * lf)
    step = descent_pass
    if not torch.compiler.is_compiling() and compiled_descent_pass is not None and x.device.type == "cpu":
        step = compiled_descent_pass
    for _ in range(5):
        state = step(x, w, wx, L, sumlx, suml2)
        if state is None:  # compiling unavailable: eager from here (same fp32 program)
            step = descent_pass
            state = step(x, w, wx, L, sumlx, suml2)
        L, sumlx, suml2 = state
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    L = torch.where(zero, torch.zeros_like(L), L + nmax)
    return torch.where(zero, torch.zeros_like(scale), scale), L


def descent_pass(x, w, wx, L, sumlx, suml2, nmax: int = 4):
    """One pass of make_q3_quants' coordinate descent over the 16 elements in C's order: element i's code moves
    to nearest_int(x_i * sum_l2' / sum_lx') (the sums without it) where that raises (sum w x l)^2 / sum w l^2.
    Functional (the codes as a list of rows, stacked at the end), so torch.compile fuses a pass into one loop."""
    rows = [L[i] for i in range(x.shape[0])]
    for i in range(x.shape[0]):
        Li = rows[i].float()
        slx = sumlx - wx[i] * Li
        sl2 = suml2 - (w[i] * Li) * Li
        new_l = nearest_int((x[i] * sl2) / slx).clamp_(-nmax, nmax - 1)  # C computes it only where slx > 0
        nf = new_l.float()
        new_slx = slx + wx[i] * nf
        new_sl2 = sl2 + (w[i] * nf) * nf
        take = (slx > 0) & (new_l != rows[i]) & (new_sl2 > 0) & \
            ((new_slx * new_slx) * suml2 > (sumlx * sumlx) * new_sl2)
        rows[i] = torch.where(take, new_l, rows[i])
        sumlx = torch.where(take, new_slx, sumlx)
        suml2 = torch.where(take, new_sl2, suml2)
    return torch.stack(rows), sumlx, suml2


def pack_scales(sc: torch.Tensor) -> torch.Tensor:
    """[n, 16] six-bit codes (s + 32) -> the 12 `scales` bytes: low nibbles of 0-7 / 8-15 in bytes 0-7 (low /
    high nibble), the 2 high bits of scale j in byte 8 + j % 4 at bit 2 * (j // 4)."""
    lo = sc & 0xF
    low = lo[:, :8] | (lo[:, 8:] << 4)
    hi = (sc >> 4).view(-1, 4, 4)  # [n, j // 4, j % 4]
    high = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    return torch.cat([low, high], dim=1)


def unpack_scales(s: torch.Tensor) -> torch.Tensor:
    """12 `scales` bytes -> [n, 16] six-bit codes, as dequantize_row_q3_K reads them."""
    low = torch.cat([s[:, :8] & 0xF, s[:, :8] >> 4], dim=1)
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8, device=s.device).view(1, 4, 1)
    high = ((s[:, 8:12].unsqueeze(1) >> shifts) & 3).reshape(-1, 16)  # [n, j // 4 * 4 + j % 4]
    return low | (high << 4)


def pack_2bit(L: torch.Tensor) -> torch.Tensor:
    """[n, 256] codes (low 2 bits used) -> 64 bytes: code 128h + 32k + j in bits 2k of byte 32h + j (Q2_K, Q3_K)."""
    q = (L & 3).view(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def unpack_2bit(qs: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8, device=qs.device).view(1, 1, 4, 1)
    return ((qs.view(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, 256)


class Q3_K(BlockFormat):
    imatrix_use = "block"

    def encode(self, blocks: torch.Tensor, fast: bool = False) -> Codes:
        n = blocks.shape[0]
        x = columns(blocks, 16)  # [16, 16n]
        scales, L = make_q3_quants(x)
        scales = scales.view(n, 16)
        # C: `if (fabsf(scales[j]) > amax)` from 0: the first largest |scale| wins, a NaN never does
        s = torch.where(torch.isnan(scales), torch.zeros_like(scales), scales)
        max_scale = signed_absmax(s, s.amax(1, keepdim=True), s.amin(1, keepdim=True))  # [n, 1]
        iscale = div(-32.0, max_scale)
        l8 = ((nearest_int(iscale * scales) + 128) & 0xFF) - 128  # C stores it in an int8_t first
        sc = torch.where(max_scale != 0, l8.clamp_(-32, 31) + 32, torch.zeros_like(l8))
        d = torch.where(max_scale != 0, div(1.0, iscale), torch.zeros_like(iscale)).to(torch.float16)
        return self._finish(blocks, x, L, sc, d, fast)

    def encode_imatrix(self, blocks: torch.Tensor, qw: torch.Tensor, sigma2=None) -> Codes:
        n = blocks.shape[0]
        xs = columns(blocks, 256)
        sig = 2 * seq_sum(xs * xs) / 256  # [n]  C: 2*sumx2/QK_K
        x = columns(blocks, 16)  # [16, 16n]
        w = block_weights(x, columns(qw, 16), sig.repeat_interleave(16).view(1, -1))
        sw = seq_sum(w)  # [16n]
        scales, L = _weighted.make_qx_quants(x, 4, w)
        d_block, Ls = _weighted.make_qx_quants(scales.view(n, 16).T.contiguous(), 32,
                                               sw.view(n, 16).T.contiguous())
        return self._finish(blocks, x, L, Ls.T.contiguous(), d_block.view(n, 1).to(torch.float16), False)

    @staticmethod
    def _finish(blocks, x, L, sc, d, fast) -> Codes:
        """Codes recomputed from the coded scales (sc [n, 16] in 0..63, d fp16 [n, 1]); a sub-block whose coded
        scale is 0 keeps the search's codes L [16, 16n]."""
        n = blocks.shape[0]
        dd = (d.float() * (sc - 32).float()).view(-1)  # [16n]
        q = nearest_int(x / dd).clamp_(-4, 3) + 4
        q = torch.where(dd == 0, L, q)
        fix, finite = fast_flags(blocks, fast)
        return Codes(rows(q, n).to(torch.uint8).contiguous(), d, fix=fix, finite=finite,
                     sc=sc.to(torch.uint8).contiguous())

    def decode(self, codes: Codes) -> torch.Tensor:
        n = codes.q.shape[0]
        dl = codes.d.float() * (codes.sc.float() - 32)  # [n, 16], exact
        return (dl.unsqueeze(2) * (codes.q.float() - 4).view(n, 16, 16)).view(n, 256)

    def pack(self, codes: Codes) -> torch.Tensor:
        n = codes.q.shape[0]
        hi = (codes.q >> 2).view(n, 8, 32)  # bit k of hmask[j]: bit 2 of code 32k + j
        hmask = hi[:, 0]
        for k in range(1, 8):
            hmask = hmask | (hi[:, k] << k)
        return torch.cat([hmask, pack_2bit(codes.q), pack_scales(codes.sc), fp16_bytes(codes.d)], dim=1)

    def unpack(self, raw: torch.Tensor) -> Codes:
        n = raw.shape[0]
        shifts = torch.arange(8, dtype=torch.uint8, device=raw.device).view(1, 8, 1)
        hi = ((raw[:, :32].unsqueeze(1) >> shifts) & 1).reshape(n, 256)
        q = unpack_2bit(raw[:, 32:96]) | (hi << 2)
        return Codes(q, fp16_from_bytes(raw[:, 108:110]), sc=unpack_scales(raw[:, 96:108]))


FORMAT = Q3_K("q3_k", int(GGMLQuantizationType.Q3_K), block_size=256, type_size=110, compile=False)
