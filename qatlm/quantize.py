"""PTQ: quantize a model file to a type plan with round-to-nearest, what llama-quantize does with no imatrix.

    qatlm quantize teacher.gguf out.gguf --plan q4_0

Every quantizable tensor is dequantized to fp32 (exactly as llama.cpp would) and re-quantized through
qatlm.formats; other tensors are copied byte for byte; metadata is copied with general.file_type set to
the plan's llama_ftype. The result is tensor-for-tensor byte-identical to llama-quantize run on an F32
GGUF of the same weights (tests/test_quantize_llamacpp.py).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType, quants

from . import formats
from .gguf_io import OutTensor, TensorInfo, field_value, open_gguf, copy_fields, write_gguf
from .plans import is_quantizable, parse_plan


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


def encode_tensor(name: str, w: np.ndarray | torch.Tensor, type_name_: str) -> OutTensor:
    """float weights in torch order -> an OutTensor of the requested type (block bytes via qatlm.formats)."""
    t = GGMLQuantizationType[type_name_.upper()]
    if type_name_ == "f32":
        data = np.ascontiguousarray(torch.as_tensor(w).to(torch.float32).numpy())
    elif type_name_ == "f16":
        data = torch.as_tensor(w).to(torch.float32).to(torch.float16).numpy()
    else:
        w2 = torch.as_tensor(w)
        shape = tuple(w2.shape)
        data = formats.quantize(w2.reshape(-1, shape[-1]), type_name_).reshape(*shape[:-1], -1)
    return OutTensor(name, data, t)


def quantize_gguf(src: str | os.PathLike, dst: str | os.PathLike, plan: str = "q4_0",
                  overrides: tuple[str, ...] = (), progress: bool = True) -> Path:
    """Quantize GGUF `src` (or "bundled") to `dst` following `plan`. Returns dst. See module docstring."""
    if str(src) == "bundled":
        from .models import bundled_gguf

        src = bundled_gguf()
    info, reader = open_gguf(src)
    p = parse_plan(plan, overrides)
    types = p.types([(t.name, t.ne, type_name(t.ggml_type)) for t in info.tensors])
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
                yield encode_tensor(ti.name, dequantize_tensor(ti, rt.data), want)

    def metadata(writer) -> None:
        copy_fields(reader, writer, skip={"general.file_type", "general.quantization_version"})
        if p.file_type is not None:
            writer.add_key_value("general.file_type", p.file_type, GGUFValueType.UINT32)
        writer.add_key_value("general.quantization_version", 2, GGUFValueType.UINT32)

    return write_gguf(dst, arch, metadata, tensors())

