"""GGUF files in and out: a validating reader and an atomic writer, on top of the `gguf` package.

Reading and writing use gguf-py (GGUFReader / GGUFWriter). What we add, and why it is our own code:
gguf-py's reader does not check sizes, offsets or bounds, and malformed files have been the source of
llama.cpp CVEs (CVE-2024-21802/21825/21836/23496/23605, CVE-2026-33298). `validate()` walks the header
with explicit bounds checks, doing what llama.cpp's gguf.cpp checks, before gguf-py touches the file:
magic and version; counts bounded by the file size; every string and array within the file; no
duplicate keys or tensor names; n_dims <= 4; non-negative dims whose product does not overflow; known
tensor types; rows divisible by the block size; each tensor offset equal to the running sum of padded
sizes (general.alignment: u32, a power of two, default 32); tensor data within the file.

`write_gguf()` writes through qatlm.atomic (temporary file beside the target, renamed when complete), so a
crash or a full disk never leaves a half-written file under the requested name. `write_metadata()` is the one
metadata path of every GGUF qatlm writes (PTQ and export): the source file's keys copied, or keys built by
the caller, then llama.cpp's file type and quantization version.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

from ..atomic import atomic_file

_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_MAX_DIMS = 4
_DEFAULT_ALIGNMENT = 32


class GGUFError(ValueError):
    """A GGUF file that qatlm refuses to read, with the reason and the file named."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ne: tuple[int, ...]  # GGUF order: ne[0] is the row length (torch shape reversed)
    ggml_type: GGMLQuantizationType
    offset: int  # relative to the start of the data section
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """torch/numpy order."""
        return tuple(reversed(self.ne))


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    version: int
    keys: dict[str, int]  # key -> GGUFValueType
    tensors: list[TensorInfo]
    alignment: int
    data_start: int


class _Cursor:
    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, why: str) -> GGUFError:
        return GGUFError(f"{self.path}: not a valid GGUF file: {why} (at byte {self.pos}). "
                         "Re-download or re-export the file; qatlm does not read damaged GGUF files.")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.fail(f"{what} needs {n} bytes but only {len(self.buf) - self.pos} remain (truncated?)")

    def unpack(self, fmt: str, what: str):
        size = struct.calcsize("<" + fmt)
        self.need(size, what)
        v = struct.unpack_from("<" + fmt, self.buf, self.pos)[0]
        self.pos += size
        return v

    def string(self, what: str) -> str:
        n = self.unpack("Q", f"{what} length")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not UTF-8 ({e})") from None

    def skip_value(self, vtype: int, key: str) -> int | None:
        """Skip one value; returns it for u32 scalars (general.alignment needs it)."""
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype], f"value of {key!r}")
        if vtype == GGUFValueType.STRING:
            self.string(f"value of {key!r}")
            return None
        if vtype == GGUFValueType.ARRAY:
            etype = self.unpack("I", f"array type of {key!r}")
            count = self.unpack("Q", f"array length of {key!r}")
            if etype in _SCALAR:
                self.need(count * struct.calcsize(_SCALAR[etype]), f"array {key!r} of {count} items")
                self.pos += count * struct.calcsize(_SCALAR[etype])
            elif etype == GGUFValueType.STRING:
                self.need(count * 8, f"array {key!r} of {count} strings")
                for _ in range(count):
                    self.string(f"string in array {key!r}")
            else:
                raise self.fail(f"array {key!r} has unsupported element type {etype}")
            return None
        raise self.fail(f"key {key!r} has unknown value type {vtype}")


def validate(path: str | os.PathLike) -> GGUFInfo:
    """Check a GGUF file's structure (see module docstring); raise GGUFError naming the file and the fault."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise GGUFError(f"{path}: not a valid GGUF file: the file is empty. Re-download or re-export the file.")
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        # memory-mapped: only the header pages are read, however large the tensor data is
        view = memoryview(data)
        try:
            return _walk(_Cursor(view, path), view, size, path)
        finally:
            view.release()


def _walk(c: "_Cursor", data: memoryview, size: int, path: Path) -> GGUFInfo:
    if size < 4 or bytes(data[:4]) != b"GGUF":
        raise c.fail(f"magic is {bytes(data[:4])!r}, expected b'GGUF'")
    c.pos = 4
    version = c.unpack("I", "version")
    if version not in (2, 3):
        raise c.fail(f"version {version} is not supported (2 or 3)")
    n_tensors = c.unpack("Q", "tensor count")
    n_kv = c.unpack("Q", "key-value count")
    if n_kv * 13 > size - c.pos or n_tensors * 24 > size - c.pos:  # smallest possible entries
        raise c.fail(f"{n_kv} keys / {n_tensors} tensors cannot fit in a {size}-byte file")

    keys: dict[str, int] = {}
    alignment = _DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key = c.string("key")
        if key in keys:
            raise c.fail(f"duplicate key {key!r}")
        vtype = c.unpack("I", f"type of {key!r}")
        keys[key] = vtype
        value = c.skip_value(vtype, key)
        if key == "general.alignment":
            if vtype != GGUFValueType.UINT32 or not value or value & (value - 1):
                raise c.fail(f"general.alignment must be a u32 power of two, got {value!r}")
            alignment = value

    tensors: list[TensorInfo] = []
    names: set[str] = set()
    expected_offset = 0
    for _ in range(n_tensors):
        name = c.string("tensor name")
        if name in names:
            raise c.fail(f"duplicate tensor name {name!r}")
        names.add(name)
        n_dims = c.unpack("I", f"n_dims of {name!r}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise c.fail(f"tensor {name!r} has {n_dims} dims (1..{_MAX_DIMS} allowed)")
        ne = tuple(c.unpack("q", f"dims of {name!r}") for _ in range(n_dims))
        n = 1
        for dim in ne:
            if dim < 0:
                raise c.fail(f"tensor {name!r} has a negative dimension {ne}")
            n *= dim
            if n >= 1 << 62:
                raise c.fail(f"tensor {name!r} dimensions {ne} overflow")
        raw_type = c.unpack("I", f"type of {name!r}")
        try:
            gtype = GGMLQuantizationType(raw_type)
            block, type_size = GGML_QUANT_SIZES[gtype]
        except (ValueError, KeyError):
            raise c.fail(f"tensor {name!r} has unknown type {raw_type}") from None
        if ne[0] % block:
            raise c.fail(f"tensor {name!r} row length {ne[0]} is not a multiple of {gtype.name}'s block {block}")
        offset = c.unpack("Q", f"offset of {name!r}")
        if offset != expected_offset:
            raise c.fail(f"tensor {name!r} offset {offset} != {expected_offset} (the padded end of the previous tensor)")
        nbytes = n // block * type_size
        tensors.append(TensorInfo(name, ne, gtype, offset, nbytes))
        expected_offset = offset + (nbytes + alignment - 1) // alignment * alignment

    data_start = (c.pos + alignment - 1) // alignment * alignment
    end = data_start + (tensors[-1].offset + tensors[-1].nbytes if tensors else 0)
    if end > size:
        raise GGUFError(f"{path}: not a valid GGUF file: tensor data ends at byte {end} but the file has {size} "
                        "bytes (truncated download or copy?). Re-download or re-export the file.")
    return GGUFInfo(path, version, keys, tensors, alignment, data_start)


def open_gguf(path: str | os.PathLike) -> tuple[GGUFInfo, GGUFReader]:
    """Validate, then open with gguf-py (memory-mapped tensor data)."""
    info = validate(path)
    return info, GGUFReader(info.path)


def field_value(reader: GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def copy_fields(reader: GGUFReader, writer: GGUFWriter, skip: Iterable[str] = ()) -> None:
    """Copy every metadata key of a source file, with its type, except GGUF.* and those in `skip`."""
    skip = set(skip) | {"general.architecture", "general.alignment"}  # the writer sets these
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key in skip:
            continue
        vtype = GGUFValueType(f.types[0])
        sub = GGUFValueType(f.types[-1]) if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, f.contents(), vtype, sub_type=sub)


@dataclass
class OutTensor:
    name: str
    data: np.ndarray  # float32/float16 [.., cols] or uint8 block bytes [.., cols // B * type_size]
    ggml_type: GGMLQuantizationType


def write_metadata(writer: GGUFWriter, file_type: int | None, source: GGUFReader | None = None, build=None) -> None:
    """Metadata of a quantized file: every key of `source` (its tokenizer included), or `build(writer)` for a
    model that has no source GGUF; then general.file_type (llama_ftype) and general.quantization_version."""
    if source is not None:
        copy_fields(source, writer, skip={"general.file_type", "general.quantization_version"})
    if build is not None:
        build(writer)
    if file_type is not None:
        writer.add_key_value("general.file_type", file_type, GGUFValueType.UINT32)
    writer.add_key_value("general.quantization_version", 2, GGUFValueType.UINT32)


def write_gguf(path: str | os.PathLike, arch: str, fill_metadata, tensors: Iterable[OutTensor]) -> Path:
    """Write a GGUF atomically: `fill_metadata(writer)` adds keys, then tensors are written in order."""
    with atomic_file(path) as tmp:
        writer = GGUFWriter(tmp, arch)
        fill_metadata(writer)
        for t in tensors:  # gguf-py derives the logical shape from the byte shape for block types
            writer.add_tensor(t.name, t.data, raw_dtype=t.ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(path)
