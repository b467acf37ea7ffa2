"""PTQ: quantize a model file to a type plan as llama-quantize does (round to nearest, or with an imatrix).

    qatlm plan teacher.gguf --plan q4_0                  # which type each tensor gets
    qatlm quantize teacher.gguf out.gguf --plan q4_0
    qatlm quantize teacher.gguf out.gguf --plan q4_0 --imatrix imatrix.gguf   # = llama-quantize --imatrix

Every quantizable tensor is dequantized to fp32 (exactly as llama.cpp would) and re-quantized through
qatlm.formats; other tensors are copied byte for byte; the metadata entries are copied byte for byte, then
general.quantization_version, general.file_type (the plan's llama_ftype) and, with an imatrix, the
quantize.imatrix.* keys are appended as llama-quantize appends them, and tensors are written in
llama-quantize's order. The whole file is byte-identical to llama-quantize's on the same source
(tests/test_ptq.py). Reading and writing bypass gguf-py's GGUFReader/GGUFWriter (see gguf.io: they spent
~10 s per call on the 262k-token vocabulary's metadata), and tensors stream from the memory-mapped source: each is dequantized, quantized and written a few million
weights at a time (STEP_ELEMENTS), so the working buffers stay small and are reused. Allocating a whole model's
worth of fresh memory is what made a one-off quantize slow: on the reference VM first-touching 670 MB took
~1.2-1.5 s, more than quantizing it (benchmarks/quantize_file.py).
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType, quants

from .. import formats
from ..cli import command, plan_args
from ..sources import gguf_path
from .io import (OutTensor, TensorInfo, architecture, check_dequantizable, check_finite, kv_bytes, tensor_bytes,
                 validate, write_gguf_raw)
from .plans import fallback_note, is_quantizable, parse_plan, type_bytes


def type_name(t: GGMLQuantizationType) -> str:
    return t.name.lower()


STEP_ELEMENTS = 1 << 22  # weights per quantize step (16 MB as fp32): see quantize_gguf
# torch.compile'd kernels pay back only on large jobs: compiling one format costs ~4 s even with Inductor's disk
# cache warm (Dynamo's import and tracing), and saves ~2 ns per weight over eager (Q8_0 / Q4_0 on 168M weights:
# 0.15 / 0.12 s compiled, 0.49 / 0.48 s eager; measured on the 2-core Zen 5 reference machine).
# So a one-off quantize compiles a format only for more weights than this; a 270M model never does.
COMPILE_PAYBACK_ELEMENTS = 1 << 31


def dequantize_tensor(info: TensorInfo, raw: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A GGUF tensor's raw bytes (uint8 [.., bytes per row], or gguf-py's typed view; `shape`: the torch shape
    they hold when only some rows are given, info.shape by default) -> float32 numpy array in torch order.
    Exact block formats go through qatlm.formats; F16/BF16/K-quants and the rest through gguf-py's numpy
    dequantizers."""
    shape = info.shape if shape is None else shape
    name = type_name(info.ggml_type)
    if info.ggml_type == GGMLQuantizationType.F32:
        f32 = np.asarray(raw).view(np.float32).reshape(shape)
        return f32 if f32.flags.writeable else f32.copy()  # a copy-on-write map (quantize_gguf) needs no copy
    if name in formats.names():
        return formats.dequantize(np.asarray(raw).view(np.uint8).reshape(-1), name, shape).numpy()
    return quants.dequantize(np.asarray(raw).view(np.uint8).reshape(*shape[:-1], -1),
                             info.ggml_type).astype(np.float32, copy=False).reshape(shape)


def gguf_type(name: str, type_name_: str) -> GGMLQuantizationType:
    """The GGUF type of a plan's type name (an MLX format is refused: a GGUF cannot hold it)."""
    if formats.is_mlx(type_name_):
        raise ValueError(f"{name}: {type_name_} is an MLX format, which a GGUF file cannot hold; write it as an "
                         "MLX model directory (`qatlm export RUN --mlx DIR`), or pick a GGUF plan")
    return GGMLQuantizationType[type_name_.upper()]


def encode_tensor(name: str, w: np.ndarray | torch.Tensor, type_name_: str, imatrix=None,
                  path: str | os.PathLike | None = None, compile: bool | None = None) -> OutTensor:
    """float weights in torch order -> an OutTensor of the requested type (block bytes via qatlm.formats;
    `imatrix`: per-column importance [cols], as llama-quantize --imatrix passes it; `compile`: as
    formats.quantize). NaN/inf weights are an error naming the tensor (and `path`, the file they came from)."""
    t = gguf_type(name, type_name_)
    if type_name_ in ("f32", "f16"):
        check_finite(path or "the model", name, w)
        w32 = torch.as_tensor(w).to(torch.float32)
        data = np.ascontiguousarray(w32.numpy()) if type_name_ == "f32" else w32.to(torch.float16).numpy()
        return OutTensor(name, data, t)
    w2 = torch.as_tensor(w)
    shape = tuple(w2.shape)
    try:
        data = formats.quantize(w2.reshape(-1, shape[-1]), type_name_, imatrix, compile).reshape(*shape[:-1], -1)
    except ValueError:
        check_finite(path or "the model", name, w)  # the quantizer found NaN/inf: say which tensor of which file
        raise
    return OutTensor(name, data, t)


def imatrix_for(path: str | os.PathLike, tensors: dict[str, tuple[int, ...]]):
    """Read an imatrix file and check it against the weights llama-imatrix collects (GGUF name -> torch shape
    of every quantizable `blk.*` weight): a missing entry or a wrong size is an error naming the file and the
    tensor, never a silent fallback to round-to-nearest. Returns the Imatrix."""
    from ..imatrix.file import check_against, read_imatrix

    im = read_imatrix(path)
    check_against(im, {n: s for n, s in tensors.items() if n.startswith("blk.")}, path)
    return im


_BLK = re.compile(r"blk\.\s*([+-]?\d+)")


def llama_order(name: str) -> tuple[int, bytes]:
    """llama-quantize's tensor order (llama_model_loader's weight_name_comparer): the layer number of `blk.N.`
    names (-1 for the others: first), then the name's bytes."""
    m = _BLK.match(name)
    return (int(m.group(1)) if m else -1, name.encode())


def _types(model, p, tensors, imatrix: bool) -> dict[str, str]:
    """The plan's types for a GGUF's tensors; a plan that does not fit the model's shapes names the file."""
    try:
        return p.types(tensors, imatrix=imatrix)
    except ValueError as e:
        raise ValueError(f"{model}: {e}") from None


def quantize_gguf(src: str | os.PathLike, dst: str | os.PathLike, plan: str = "q4_0",
                  overrides: tuple[str, ...] = (), progress: bool = True,
                  imatrix: str | os.PathLike | None = None) -> Path:
    """Quantize GGUF `src` (or "bundled") to `dst` following `plan`, with an importance matrix file if given
    (= llama-quantize --imatrix). Returns dst. See module docstring."""
    src = gguf_path(src)
    info = validate(src)
    p = parse_plan(plan, overrides)
    types = _types(src, p, [(t.name, t.ne, type_name(t.ggml_type)) for t in info.tensors], imatrix is not None)
    im = imatrix_for(imatrix, {t.name: t.shape for t in info.tensors if is_quantizable(t.name, t.ne)}) \
        if imatrix is not None else None
    architecture(info, src)
    requant = [t for t in info.tensors if not (types[t.name] == type_name(t.ggml_type) and
                                               not is_quantizable(t.name, t.ne))]
    check_dequantizable(src, requant)  # before anything is written
    for t in requant:
        gguf_type(t.name, types[t.name])
    # copy-on-write: the F32 rows reach torch without a copy (torch wants writable arrays; nothing writes them)
    data = np.memmap(src, dtype=np.uint8, mode="c")

    order = sorted(info.tensors, key=lambda t: llama_order(t.name))  # the order llama-quantize writes

    def blobs() -> Iterator[np.ndarray]:
        it = order
        if progress:
            from tqdm import tqdm
            it = tqdm(it, desc=f"quantize {Path(src).name} -> {plan}", unit="tensor")
        for ti in it:
            want, raw = types[ti.name], tensor_bytes(info, data, ti)
            if want == type_name(ti.ggml_type) and not is_quantizable(ti.name, ti.ne):
                if ti.ggml_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                    check_finite(src, ti.name, raw.view(np.float32 if ti.ggml_type == GGMLQuantizationType.F32
                                                        else np.float16))
                yield raw  # copied as-is
            else:
                yield requantized(ti, raw, want, im.weights(ti.name) if im is not None and ti.name in im else None)

    weights_per_type: dict[str, int] = {}
    for t in requant:
        weights_per_type[types[t.name]] = weights_per_type.get(types[t.name], 0) + math.prod(t.ne)

    def requantized(ti: TensorInfo, raw: np.ndarray, want: str, qw) -> Iterator[np.ndarray]:
        """The tensor's new bytes, a few million weights at a time (rows are quantized independently)."""
        rows = raw.reshape(-1, raw.shape[-1])
        step = max(1, STEP_ELEMENTS // ti.ne[0])
        compile = weights_per_type[want] >= COMPILE_PAYBACK_ELEMENTS
        for a in range(0, rows.shape[0], step):
            w = dequantize_tensor(ti, rows[a:a + step], (min(step, rows.shape[0] - a), ti.ne[0]))
            # NaN/inf: refused naming the tensor
            yield encode_tensor(ti.name, w, want, qw, path=src, compile=compile).data

    out_types = [(t.name, t.ne, gguf_type(t.name, types[t.name])) for t in order]
    kv = [kv_bytes("general.quantization_version", GGUFValueType.UINT32, 2)]  # llama-quantize's order
    if p.file_type is not None:
        kv.append(kv_bytes("general.file_type", GGUFValueType.UINT32, p.file_type))
    if im is not None:  # what llama-quantize --imatrix records (its kv_overrides, in its order)
        kv.append(kv_bytes("quantize.imatrix.file", GGUFValueType.STRING, str(imatrix)[:127]))
        if im.datasets:
            kv.append(kv_bytes("quantize.imatrix.dataset", GGUFValueType.STRING, im.datasets[0][:127]))
        kv.append(kv_bytes("quantize.imatrix.entries_count", GGUFValueType.UINT32, len(im.entries)))
        if im.chunk_count > 0:
            kv.append(kv_bytes("quantize.imatrix.chunks_count", GGUFValueType.UINT32, im.chunk_count))
    tensors = blobs()
    try:
        return write_gguf_raw(dst, info, data, kv, out_types, tensors)
    finally:
        tensors.close()  # a failure inside a tensor ends the progress bar now, before the error is printed
        del data


def show_plan(model: str, plan: str, overrides: tuple[str, ...] = (), imatrix: bool = False) -> str:
    """The table `qatlm plan` prints: every tensor of a GGUF with its source and planned type and size, then
    what llama-quantize's row-length fallbacks changed (plans.fallback_note). imatrix: plan as with one."""
    info = validate(gguf_path(model))
    p = parse_plan(plan, overrides)
    tensors = [(t.name, t.ne, type_name(t.ggml_type)) for t in info.tensors]
    types = _types(model, p, tensors, imatrix)
    rows = [f"{'tensor':<34} {'shape (ne)':<16} {'source':>7} {'planned':>8} {'MB':>9}"]
    total = 0.0
    for t in info.tensors:
        b = type_bytes(types[t.name], math.prod(t.ne))
        total += b
        rows.append(f"{t.name:<34} {'x'.join(map(str, t.ne)):<16} {t.ggml_type.name:>7} "
                    f"{types[t.name].upper():>8} {b / 1e6:>9.3f}")
    rows.append(f"{len(info.tensors)} tensors, {total / 1e6:.1f} MB of tensor data under plan {plan}")
    note = fallback_note(p, tensors, imatrix)
    return "\n".join(rows + ([note] if note else []))


def add_parsers(sub) -> None:
    p = command(sub, "plan", "Show which GGUF type each tensor of a GGUF model gets under a plan.",
                "qatlm plan model.gguf --plan q4_0 --override 'ffn_down=q8_0'",
                lambda a: print(show_plan(a.model, a.plan, tuple(a.override), a.imatrix)))
    p.add_argument("model", help="a GGUF file or 'bundled'")
    plan_args(p)
    p.add_argument("--imatrix", action="store_true", help="plan as llama-quantize --imatrix would (iq4_nl, iq4_xs, "
                   "q4_0 and q5_0 then choose some ffn_down types differently)")

    def run(a) -> None:
        out = quantize_gguf(a.model, a.out, a.plan, tuple(a.override), imatrix=a.imatrix)
        print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")

    p = command(sub, "quantize", "PTQ of a GGUF model, = llama-quantize (round to nearest, or with --imatrix).",
                "qatlm quantize model.gguf model-q4_0.gguf --plan q4_0 --imatrix imatrix.gguf", run)
    p.add_argument("model", help="the source GGUF or 'bundled' (any types; dequantized first, as llama.cpp does)")
    p.add_argument("out", type=Path, help="the GGUF to write (written atomically)")
    plan_args(p)
    p.add_argument("--imatrix", help="an importance matrix (llama-imatrix's GGUF or legacy .dat, or `qatlm imatrix`'s)"
                   ": weighted quantization, byte-identical to llama-quantize --imatrix")
    p.set_defaults(imatrix=None)

