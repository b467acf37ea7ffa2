"""llama.cpp block formats in PyTorch, byte-identical to ggml's reference quantizers.

    >>> import torch, qatlm.formats as F
    >>> w = torch.randn(4, 64)
    >>> raw = F.quantize(w, "q4_0")              # numpy uint8 [4, 36]: the GGUF block bytes
    >>> back = F.dequantize(raw, "q4_0", w.shape) # torch fp32 [4, 64]
    >>> bool((F.fake_quant(w, "q4_0") == back).all())
    True

This registry is the only place that knows a block format: fake quant in training, PTQ, GGUF export
and the torch evaluation engine all call it, so what the student trains against is, byte for byte,
what llama.cpp runs. Blocks run along the last dimension (a torch Linear weight [out, in]: along `in`),
as GGUF's ne[0]. `quantize` and `fake_quant` take an optional importance matrix (imatrix, one weight per
column) and then match `llama-quantize --imatrix` byte for byte (see _weighted).
"""
from __future__ import annotations

import numpy as np
import torch

from ._base import BlockFormat, Codes
from . import _kernels, q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k, iq4_nl, iq4_xs, mxfp4
from . import mlx_affine  # MLX's affine groups: a QAT target for MLX, not a GGUF type

_REGISTRY: dict[str, BlockFormat] = {m.FORMAT.name: m.FORMAT
                                     for m in (q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k,
                                               iq4_nl, iq4_xs, mxfp4)}

__all__ = ["BlockFormat", "Codes", "names", "is_format", "is_mlx", "get", "quantize", "dequantize", "fake_quant",
           "byte_shape", "SCALED_FORMATS", "fake_quant_scaled", "scale_blocks"]

# formats whose values are u * d (+ m) with one fp16 d per 32 weights: a learned factor on each d (training's
# learned block scales) gives a block that is still exactly this format (fake_quant_scaled, scale_blocks)
SCALED_FORMATS = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")


def names() -> list[str]:
    """Known format names, e.g. ['q4_0', 'q4_1', 'q5_0', 'q5_1', 'q8_0']."""
    return list(_REGISTRY)


def is_format(name: str) -> bool:
    """Whether fake quant knows `name`: a GGUF block format of names(), or an MLX one ('mlx:4g64')."""
    return name in _REGISTRY or is_mlx(name)


def is_mlx(name: str) -> bool:
    """Whether `name` is a valid MLX affine format name, 'mlx:<bits>g<group>' (see mlx_affine)."""
    p = mlx_affine.parse(name) if isinstance(name, str) else None
    return p is not None and p[0] in mlx_affine.BITS and p[1] in mlx_affine.GROUPS


def get(name: str) -> BlockFormat:
    """The BlockFormat for `name` (case-insensitive): .block_size, .type_size, .bits_per_weight, .ggml_type.
    Also MLX's affine groups, 'mlx:<bits>g<group>' (mlx_affine; not GGUF types, so not in names())."""
    if str(name).lower().startswith("mlx:"):
        return mlx_affine.get(name)
    fmt = _REGISTRY.get(str(name).lower())
    if fmt is None:
        raise ValueError(f"unknown block format {name!r}; known formats: {', '.join(names())}")
    return fmt


def byte_shape(shape: tuple[int, int], fmt: str | BlockFormat) -> tuple[int, int]:
    """Shape of the GGUF bytes for a [rows, cols] tensor: [rows, cols // block_size * type_size]."""
    f = fmt if isinstance(fmt, BlockFormat) else get(fmt)
    rows, cols = shape
    return rows, cols // f.block_size * f.type_size


def _check_weight(w: torch.Tensor, f: BlockFormat, what: str = "tensor") -> None:
    if w.dim() != 2:
        raise ValueError(f"{f.name}: expected a 2-D {what} [rows, cols], got shape {tuple(w.shape)}; "
                         "reshape it so that blocks run along the last dimension")
    if w.shape[1] % f.block_size:
        raise ValueError(f"{f.name}: row length {w.shape[1]} of {what} {tuple(w.shape)} is not a multiple of the "
                         f"block size {f.block_size}; pick a format whose block divides it (or keep it F16/F32)")
    if not w.is_floating_point():
        raise ValueError(f"{f.name}: expected a floating-point {what}, got {w.dtype}")


def _as_tensor(w) -> torch.Tensor:
    if isinstance(w, np.ndarray):
        if not w.flags.writeable:  # e.g. a memory-mapped GGUF tensor: torch wants writable memory
            w = np.array(w)
        return torch.from_numpy(np.ascontiguousarray(w))
    if isinstance(w, torch.Tensor):
        return w
    raise ValueError(f"expected a torch.Tensor or numpy.ndarray, got {type(w).__name__}")


def _check_imatrix(imatrix, f: BlockFormat, w: torch.Tensor) -> torch.Tensor | None:
    """The importance matrix as fp32 [cols] on w's device, None if there is none or ggml ignores it (Q8_0)."""
    if imatrix is None:
        return None
    cols = w.shape[1]
    if isinstance(imatrix, (list, tuple)):
        imatrix = np.asarray(imatrix, dtype=np.float32)
    t = _as_tensor(imatrix)
    if t.dim() != 1 or t.numel() != cols:
        raise ValueError(f"{f.name}: imatrix of shape {tuple(t.shape)} does not fit a tensor of shape "
                         f"{tuple(w.shape)}; pass a 1-D vector of {cols} importance weights, one per input column (in_sum2 / counts "
                         "of this tensor's entry in the imatrix file)")
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{f.name}: imatrix must hold real numbers, got {t.dtype}")
    t = t.detach().to(device=w.device, dtype=torch.float32)  # ggml takes it as float *
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        j = int(bad.nonzero()[0, 0])
        raise ValueError(f"{f.name}: imatrix holds NaN or inf (first at column {j}, or too large for fp32); "
                         "recompute it, or replace those entries (e.g. by the mean of the others)")
    if bool((t < 0).any()):
        j = int((t < 0).nonzero()[0, 0])
        raise ValueError(f"{f.name}: imatrix holds a negative weight ({float(t[j]):g} at column {j}); importance "
                         "weights are mean squared activations (in_sum2 / counts), so they must be >= 0: check "
                         "what was passed")
    return None if f.imatrix_use == "ignored" else t


@torch.no_grad()
def quantize(w, fmt: str, imatrix=None, compile: bool | None = None) -> np.ndarray:
    """GGUF block bytes of a 2-D float tensor: numpy uint8 [rows, cols // B * type_size].

    Same bytes and shape as `gguf.quants.quantize(w.float().numpy(), GGMLQuantizationType.<FMT>)`.
    Any float dtype is accepted; it is first converted to fp32 (exact for fp16/bf16), as the
    exporter does. Raises ValueError on NaN/inf, a non-2-D tensor, or a row not divisible by the block.

    imatrix: optional importance weights, a 1-D tensor/array of length cols (llama-imatrix's in_sum2 / counts
    for this tensor). Then the bytes are those of ggml_quantize_chunk(type, ..., imatrix), i.e. what
    `llama-quantize --imatrix` writes: weighted scale searches for Q4_0/Q5_0/Q4_1/Q5_1/Q4_K/Q6_K (see
    _weighted); Q8_0 ignores it, as ggml does.

        >>> raw = F.quantize(w, "q4_0", imatrix=torch.rand(w.shape[1]))

    compile: whether the CPU kernel may be torch.compile'd (None: when the tensor is large; a caller that knows
    the whole job, like `qatlm quantize`, decides whether compiling pays back; the bytes are the same).
    """
    f = get(fmt)
    w = _as_tensor(w)
    _check_weight(w, f)
    out = torch.empty(byte_shape(tuple(w.shape), f), dtype=torch.uint8)
    w_cpu = w.cpu()
    qw = _check_imatrix(imatrix, f, w_cpu)
    if qw is not None:
        ok = _kernels.run_imatrix(f, "quantize", w_cpu, out, qw)
    else:
        ok = _kernels.run(f, "quantize", w_cpu, out, compile=compile)
    if not ok:
        bad = (~torch.isfinite(w)).nonzero()[0].tolist()
        raise ValueError(f"{f.name}: tensor {tuple(w.shape)} holds NaN or inf (first at row {bad[0]}, "
                         f"col {bad[1]}); fix the weights before quantizing")
    return out.numpy()


@torch.no_grad()
def dequantize(data, fmt: str, shape) -> torch.Tensor:
    """GGUF block bytes -> torch fp32 tensor of `shape` (exact: these formats dequantize exactly in fp32)."""
    f = get(fmt)
    shape = tuple(int(s) for s in shape)
    raw = _as_tensor(data)
    if raw.dtype != torch.uint8:
        raise ValueError(f"{f.name}: expected uint8 block bytes, got {raw.dtype}")
    n = 1
    for s in shape:
        n *= s
    if not shape or shape[-1] % f.block_size:
        raise ValueError(f"{f.name}: shape {shape} has a last dimension not divisible by block size {f.block_size}")
    expected = n // f.block_size * f.type_size
    if raw.numel() != expected:
        raise ValueError(f"{f.name}: {raw.numel()} bytes do not hold a {shape} tensor ({expected} bytes expected)")
    rows = raw.reshape(-1, shape[-1] // f.block_size * f.type_size)
    out = torch.empty(rows.shape[0], shape[-1], dtype=torch.float32, device=raw.device)
    _kernels.run(f, "dequantize", rows, out)
    return out.view(shape)


def _fake_quant_values(w: torch.Tensor, f: BlockFormat, qw: torch.Tensor | None = None) -> torch.Tensor:
    out = torch.empty(w.shape, dtype=torch.float32, device=w.device)
    if qw is None:
        _kernels.run(f, "fake", w, out)
    else:
        _kernels.run_imatrix(f, "fake", w, out, qw)
    return out


class _FakeQuantSTE(torch.autograd.Function):
    """Forward: the exact dequantized values. Backward: straight-through (identity) gradient."""

    @staticmethod
    def forward(ctx, w, f, qw=None):
        return _fake_quant_values(w, f, qw)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def fake_quant(w: torch.Tensor, fmt: str, imatrix=None) -> torch.Tensor:
    """Quantize-then-dequantize `w` [rows, cols] with a straight-through gradient, on w's device.

    Returns fp32 (exact: dequantized values such as fp16(d) * q need up to 15 significant bits, which
    bf16/fp16 cannot hold). Inputs of any float dtype are upcast to fp32 first, which is exact and what
    the exporter does, so `fake_quant(w) == dequantize(quantize(w))` holds bit for bit. The gradient is
    returned to w in w's dtype. imatrix: optional per-column importance weights, as in `quantize`
    (`fake_quant(w, f, imatrix) == dequantize(quantize(w, f, imatrix))`, bit for bit).
    """
    f = get(fmt)
    _check_weight(w, f, "weight")
    return _FakeQuantSTE.apply(w, f, _check_imatrix(imatrix, f, w))


def _scaled_d(d: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp16(fp32(d) * scale): the d a block with a learned scale factor stores (the one rounding both the
    student and the exporter do)."""
    return (d.to(torch.float32) * scale.to(torch.float32)).to(torch.float16)


def _unit(f: BlockFormat, codes: Codes) -> torch.Tensor:
    """The blocks' values with d = 1 and m = 0 (the code values u: Q4_0 q - 8, Q8_0 q, Q4_1 q), [n, B] fp32."""
    one = torch.ones_like(codes.d)
    return f.decode(codes._replace(d=one, m=None if codes.m is None else torch.zeros_like(codes.m)))


class _FakeQuantScaledSTE(torch.autograd.Function):
    """Forward: decode(codes of w, with d <- fp16(d * scale)), exactly what scale_blocks writes. Backward:
    straight-through to w (identity), and to scale the exact derivative d * sum(grad * u) per block (the fp16
    rounding of d * scale passed straight through)."""

    @staticmethod
    def forward(ctx, w, scale, f, qw):
        R, C = w.shape
        B = f.block_size
        with torch.autocast(w.device.type, enabled=False):  # exact fp32/fp16 arithmetic inside a bf16 forward
            codes = _kernels.encode_rows(f, w.detach(), qw)
            c = Codes(codes.q.reshape(-1, B), _scaled_d(codes.d, scale.detach()).reshape(-1, 1),
                      None if codes.m is None else codes.m.reshape(-1, 1))
            out = f.decode(c).view(R, C)
        ctx.f = f
        ctx.save_for_backward(codes.q, codes.d, codes.m if codes.m is not None else torch.empty(0))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, d, m = ctx.saved_tensors
        f = ctx.f
        B = f.block_size
        with torch.autocast(grad.device.type, enabled=False):
            u = _unit(f, Codes(q.reshape(-1, B), d.reshape(-1, 1), m.reshape(-1, 1) if m.numel() else None))
            g_scale = (grad.to(torch.float32).reshape(-1, B) * u).sum(1).view(d.shape) * d.to(torch.float32)
        return grad, g_scale, None, None


def fake_quant_scaled(w: torch.Tensor, fmt: str, scale: torch.Tensor, imatrix=None) -> torch.Tensor:
    """fake_quant with learned block scales: each block's codes are those `quantize(w, fmt, imatrix)` picks, its
    d is multiplied by scale [rows, cols // 32] and stored as fp16. Equals
    `dequantize(scale_blocks(quantize(w, fmt, imatrix), fmt, scale), fmt, w.shape)` bit for bit; with scale = 1
    it is fake_quant(w, fmt, imatrix). Gradients: straight-through to w, the exact derivative to scale."""
    f = get(fmt)
    if f.name not in SCALED_FORMATS:
        raise ValueError(f"{f.name}: learned block scales need a format with one fp16 scale per 32 weights "
                         f"({', '.join(SCALED_FORMATS)}); train this tensor without them")
    _check_weight(w, f, "weight")
    if tuple(scale.shape) != (w.shape[0], w.shape[1] // f.block_size):
        raise ValueError(f"{f.name}: block scales of shape {tuple(scale.shape)} do not fit a weight of shape "
                         f"{tuple(w.shape)} (one per {f.block_size} weights: {(w.shape[0], w.shape[1] // f.block_size)})")
    return _FakeQuantScaledSTE.apply(w, scale, f, _check_imatrix(imatrix, f, w))


@torch.no_grad()
def scale_blocks(raw, fmt: str, scale) -> np.ndarray:
    """GGUF block bytes [rows, nb * type_size] with each block's fp16 d replaced by fp16(d * scale[row, block]):
    the export of a student trained with learned block scales (fake_quant_scaled computed with these values)."""
    f = get(fmt)
    if f.name not in SCALED_FORMATS:
        raise ValueError(f"{f.name}: learned block scales apply to {', '.join(SCALED_FORMATS)} only")
    raw_t = _as_tensor(raw)
    rows = raw_t.reshape(-1, raw_t.shape[-1])
    nb = rows.shape[1] // f.type_size
    s = _as_tensor(scale).detach().cpu().to(torch.float32)
    if s.numel() != rows.shape[0] * nb:
        raise ValueError(f"{f.name}: {s.numel()} block scales for {rows.shape[0] * nb} blocks")
    codes = f.unpack(rows.reshape(-1, f.type_size))
    out = f.pack(codes._replace(d=_scaled_d(codes.d, s.reshape(-1, 1))))
    return out.reshape(raw_t.shape).numpy()
