"""PTQ: quantize a model file to a type plan as llama-quantize does (round to nearest, or with an imatrix).

    qatlm plan teacher.gguf --plan q4_0                  # which type each tensor gets
    qatlm quantize teacher.gguf out.gguf --plan q4_0
    qatlm quantize teacher.gguf out.gguf --plan q4_0 --imatrix imatrix.gguf   # = llama-quantize --imatrix

Every quantizable tensor is dequantized to fp32 (exactly as llama.cpp would) and re-quantized through
qatlm.formats; other tensors are copied byte for byte; metadata is copied with general.file_type set to
the plan's llama_ftype. The result is tensor-for-tensor byte-identical to llama-quantize run on an F32
GGUF of the same weights (tests/test_ptq.py).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants

from .. import formats
from ..cli import command, plan_args
from ..sources import gguf_path
from .io import OutTensor, TensorInfo, field_value, open_gguf, validate, write_gguf, write_metadata
from .plans import is_quantizable, parse_plan, type_bytes


def type_name(t: GGMLQuantizationType) -> str:
    return t.name.lower()


def dequantize_tensor(info: TensorInfo, raw: np.ndarray) -> np.ndarray:
    """Any GGUF tensor -> float32 numpy array in torch order. Exact block formats go through qatlm.formats;
    F16/BF16/K-quants and the rest through gguf-py's numpy dequantizers."""
    name = type_name(info.ggml_type)
    if info.ggml_type == GGMLQuantizationType.F32:
        return np.array(raw, dtype=np.float32).reshape(info.shape)  # a writable copy of the memory map
    if name in formats.names():
        return formats.dequantize(np.asarray(raw).reshape(-1), name, info.shape).numpy()
    return quants.dequantize(np.asarray(raw), info.ggml_type).astype(np.float32, copy=False).reshape(info.shape)


def encode_tensor(name: str, w: np.ndarray | torch.Tensor, type_name_: str, imatrix=None) -> OutTensor:
    """float weights in torch order -> an OutTensor of the requested type (block bytes via qatlm.formats;
    `imatrix`: per-column importance [cols], as llama-quantize --imatrix passes it)."""
    t = GGMLQuantizationType[type_name_.upper()]
    if type_name_ == "f32":
        data = np.ascontiguousarray(torch.as_tensor(w).to(torch.float32).numpy())
    elif type_name_ == "f16":
        data = torch.as_tensor(w).to(torch.float32).to(torch.float16).numpy()
    else:
        w2 = torch.as_tensor(w)
        shape = tuple(w2.shape)
        data = formats.quantize(w2.reshape(-1, shape[-1]), type_name_, imatrix).reshape(*shape[:-1], -1)
    return OutTensor(name, data, t)


def imatrix_for(path: str | os.PathLike, tensors: dict[str, tuple[int, ...]]):
    """Read an imatrix file and check it against the weights llama-imatrix collects (GGUF name -> torch shape
    of every quantizable `blk.*` weight): a missing entry or a wrong size is an error naming the file and the
    tensor, never a silent fallback to round-to-nearest. Returns the Imatrix."""
    from ..imatrix.file import check_against, read_imatrix

    im = read_imatrix(path)
    check_against(im, {n: s for n, s in tensors.items() if n.startswith("blk.")}, path)
    return im


def quantize_gguf(src: str | os.PathLike, dst: str | os.PathLike, plan: str = "q4_0",
                  overrides: tuple[str, ...] = (), progress: bool = True,
                  imatrix: str | os.PathLike | None = None) -> Path:
    """Quantize GGUF `src` (or "bundled") to `dst` following `plan`, with an importance matrix file if given
    (= llama-quantize --imatrix). Returns dst. See module docstring."""
    src = gguf_path(src)
    info, reader = open_gguf(src)
    p = parse_plan(plan, overrides)
    types = p.types([(t.name, t.ne, type_name(t.ggml_type)) for t in info.tensors], imatrix=imatrix is not None)
    im = imatrix_for(imatrix, {t.name: t.shape for t in info.tensors if is_quantizable(t.name, t.ne)}) \
        if imatrix is not None else None
    arch = field_value(reader, "general.architecture")
    if not arch:
        raise ValueError(f"{src}: no general.architecture key; is this a model GGUF?")

    def tensors() -> Iterator[OutTensor]:
        it = zip(info.tensors, reader.tensors)
        if progress:
            from tqdm import tqdm
            it = tqdm(list(it), desc=f"quantize {Path(src).name} -> {plan}", unit="tensor")
        for ti, rt in it:
            want = types[ti.name]
            if want == type_name(ti.ggml_type) and not is_quantizable(ti.name, ti.ne):
                yield OutTensor(ti.name, np.asarray(rt.data), ti.ggml_type)  # copied as-is
            else:
                qw = im.weights(ti.name) if im is not None and ti.name in im else None
                yield encode_tensor(ti.name, dequantize_tensor(ti, rt.data), want, qw)

    return write_gguf(dst, arch, lambda w: write_metadata(w, p.file_type, source=reader), tensors())


def show_plan(model: str, plan: str, overrides: tuple[str, ...] = ()) -> str:
    """The table `qatlm plan` prints: every tensor of a GGUF with its source and planned type and size."""
    info = validate(gguf_path(model))
    types = parse_plan(plan, overrides).types([(t.name, t.ne, type_name(t.ggml_type)) for t in info.tensors])
    rows = [f"{'tensor':<34} {'shape (ne)':<16} {'source':>7} {'planned':>8} {'MB':>9}"]
    total = 0.0
    for t in info.tensors:
        b = type_bytes(types[t.name], math.prod(t.ne))
        total += b
        rows.append(f"{t.name:<34} {'x'.join(map(str, t.ne)):<16} {t.ggml_type.name:>7} "
                    f"{types[t.name].upper():>8} {b / 1e6:>9.3f}")
    rows.append(f"{len(info.tensors)} tensors, {total / 1e6:.1f} MB of tensor data under plan {plan}")
    return "\n".join(rows)


def add_parsers(sub) -> None:
    p = command(sub, "plan", "Show which GGUF type each tensor of a GGUF model gets under a plan.",
                "qatlm plan model.gguf --plan q4_0 --override 'ffn_down=q8_0'",
                lambda a: print(show_plan(a.model, a.plan, tuple(a.override))))
    p.add_argument("model", help="a GGUF file or 'bundled'")
    plan_args(p)

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

