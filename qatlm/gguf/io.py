"""GGUF files in and out: a validating reader and an atomic writer, on top of the `gguf` package.

Reading and writing use gguf-py (GGUFReader / GGUFWriter). What we add, and why it is our own code:
gguf-py's reader does not check sizes, offsets or bounds, and malformed files have been the source of
llama.cpp CVEs (CVE-2024-21802/21825/21836/23496/23605, CVE-2026-33298). `validate()` walks the header
with explicit bounds checks, doing what llama.cpp's gguf.cpp checks, before gguf-py touches the file:
a regular file (a FIFO or device is refused before it is opened); magic and version; counts bounded by the
file size; every string and array within the file; no empty or duplicate keys; tensor names non-empty, unique
and shorter than GGML_MAX_NAME (64 bytes); n_dims <= 4; positive dims whose product does not overflow (an empty
tensor is refused too: no model has one); known tensor types; rows divisible by the block size; each tensor
offset equal to the running sum of padded sizes (general.alignment: u32, a power of two, default 32); tensor
data within the file. One more bound is ours: gguf-py's reader builds a numpy view per array item (~1 KB of
memory and ~20 us each), so a small file of millions of empty strings would cost gigabytes; the total number
of metadata array items is capped by the file size (one per 64 bytes beyond 65,536; a real model has one per
few hundred bytes or fewer) and at MAX_ARRAY_ITEMS (5x what Gemma 3's 262k-token vocabulary needs).

`architecture()`, `check_model_keys()` and `check_dequantizable()` check what the commands read next: a string
architecture, the hyperparameters a teacher or a memory estimate is built from (consistent with the tensors),
and tensor types that gguf-py can dequantize to floats.

`write_gguf()` writes through qatlm.atomic (temporary file beside the target, renamed when complete), so a
crash or a full disk never leaves a half-written file under the requested name. `write_metadata()` is the one
metadata path of every GGUF qatlm writes (PTQ and export): the source file's keys copied, or keys built by
the caller, then llama.cpp's file type and quantization version.
"""
from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

from ..atomic import atomic_file
from ..sources import regular_file

_U64 = struct.Struct("<Q")
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_MAX_DIMS = 4
_DEFAULT_ALIGNMENT = 32
GGML_MAX_NAME = 64  # ggml.h: a tensor name (with its NUL) fits in 64 bytes; gguf.cpp refuses longer ones
MAX_ARRAY_ITEMS = 1 << 22  # all metadata arrays together (Gemma 3: 3 x 262,144 items) ...
BYTES_PER_ITEM = 64  # ... and, beyond 65,536 of them, one per 64 bytes of file (Gemma 3 270M: one per 320)


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
    spans: dict[str, tuple[int, int]] = None  # key -> (start, end) bytes of its whole entry in the file
    values: dict[str, object] = None  # key -> value, for scalar and string keys (arrays: not kept)


class _Cursor:
    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.path = buf, 0, path
        self.items = 0  # metadata array items so far
        self.max_items = min(MAX_ARRAY_ITEMS, max(1 << 16, len(buf) // BYTES_PER_ITEM))

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

    def skip_strings(self, count: int, key: str) -> None:
        """Skip `count` strings of array `key`: the checks of string(), in one tight loop (a 262k-token
        vocabulary has 262k of them; formatting a message per item cost 0.3 s)."""
        buf, pos, end = self.buf, self.pos, len(self.buf)
        length = _U64.unpack_from
        start = pos
        try:
            for _ in range(count):
                start = pos
                if pos + 8 > end:
                    raise EOFError
                n = length(buf, pos)[0]
                pos += 8
                if n > end - pos:
                    raise EOFError
                str(buf[pos:pos + n], "utf-8")
                pos += n
        except (EOFError, UnicodeDecodeError):
            self.pos = start
            self.string(f"string in array {key!r}")  # the same fault again, now raised with its message
            raise AssertionError("unreachable")  # pragma: no cover
        self.pos = pos

    def skip_value(self, vtype: int, key: str):
        """Skip one value; returns it for scalars and strings (None for arrays)."""
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype], f"value of {key!r}")
        if vtype == GGUFValueType.STRING:
            return self.string(f"value of {key!r}")
        if vtype == GGUFValueType.ARRAY:
            etype = self.unpack("I", f"array type of {key!r}")
            count = self.unpack("Q", f"array length of {key!r}")
            self.items += count
            if self.items > self.max_items:
                raise self.fail(f"more than {self.max_items} metadata array items in a {len(self.buf)}-byte file "
                                f"(array {key!r} has {count}); no model has that many per byte of weights, and "
                                "gguf-py would need ~1 KB of memory per item")
            if etype in _SCALAR:
                self.need(count * struct.calcsize(_SCALAR[etype]), f"array {key!r} of {count} items")
                self.pos += count * struct.calcsize(_SCALAR[etype])
            elif etype == GGUFValueType.STRING:
                self.need(count * 8, f"array {key!r} of {count} strings")
                self.skip_strings(count, key)
            else:
                raise self.fail(f"array {key!r} has unsupported element type {etype}")
            return None
        raise self.fail(f"key {key!r} has unknown value type {vtype}")


def validate(path: str | os.PathLike) -> GGUFInfo:
    """Check a GGUF file's structure (see module docstring); raise GGUFError naming the file and the fault."""
    path = Path(path)
    try:
        size = regular_file(path, "a GGUF file").st_size
    except ValueError as e:
        raise GGUFError(str(e)) from None
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
    spans: dict[str, tuple[int, int]] = {}
    values: dict[str, object] = {}
    alignment = _DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        start = c.pos
        key = c.string("key")
        if not key:
            raise c.fail("empty key name")
        if key in keys:
            raise c.fail(f"duplicate key {key!r}")
        vtype = c.unpack("I", f"type of {key!r}")
        keys[key] = vtype
        value = c.skip_value(vtype, key)
        spans[key] = (start, c.pos)
        if value is not None:
            values[key] = value
        if key == "general.alignment":
            if vtype != GGUFValueType.UINT32 or not value or value & (value - 1):
                raise c.fail(f"general.alignment must be a u32 power of two, got {value!r}")
            alignment = value

    tensors: list[TensorInfo] = []
    names: set[str] = set()
    expected_offset = 0
    for _ in range(n_tensors):
        name = c.string("tensor name")
        if not name or len(name.encode()) >= GGML_MAX_NAME:
            raise c.fail(f"tensor name {name[:80]!r} is {len(name.encode())} bytes (1..{GGML_MAX_NAME - 1} allowed, "
                         "as llama.cpp's gguf.cpp)")
        if name in names:
            raise c.fail(f"duplicate tensor name {name!r}")
        names.add(name)
        n_dims = c.unpack("I", f"n_dims of {name!r}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise c.fail(f"tensor {name!r} has {n_dims} dims (1..{_MAX_DIMS} allowed)")
        ne = tuple(c.unpack("q", f"dims of {name!r}") for _ in range(n_dims))
        n = 1
        for dim in ne:
            if dim <= 0:
                raise c.fail(f"tensor {name!r} has a {'negative' if dim < 0 else 'zero'} dimension {ne}")
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
    return GGUFInfo(path, version, keys, tensors, alignment, data_start, spans, values)


def open_gguf(path: str | os.PathLike) -> tuple[GGUFInfo, GGUFReader]:
    """Validate, then open with gguf-py (memory-mapped tensor data)."""
    info = validate(path)
    return info, GGUFReader(info.path)


def field_value(reader: GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def architecture(reader: GGUFReader | GGUFInfo, path: str | os.PathLike) -> str:
    """general.architecture, which must be a non-empty string (GGUFError naming the file otherwise)."""
    key = "general.architecture"
    if isinstance(reader, GGUFInfo):
        vtype, value = reader.keys.get(key), reader.values.get(key)
    else:
        f = reader.fields.get(key)
        vtype, value = (None, None) if f is None else (f.types[0], f.contents())
    if vtype is None:
        raise GGUFError(f"{path}: no general.architecture key; is this a model GGUF? (convert the model with "
                        "llama.cpp's convert_hf_to_gguf.py)")
    if GGUFValueType(vtype) != GGUFValueType.STRING or not value:
        raise GGUFError(f"{path}: general.architecture is {value!r} ({GGUFValueType(vtype).name}), not an "
                        "architecture name string; the metadata is damaged: re-download or re-convert the file")
    return value


# tensor types gguf-py dequantizes (gguf.quants.dequantize): integer, F64 and Q8_1/Q8_K tensors are not weights
def dequantizable(t: GGMLQuantizationType) -> bool:
    from gguf import quants

    return t in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) or t in quants._type_traits


def check_dequantizable(path: str | os.PathLike, tensors: Iterable[TensorInfo]) -> None:
    """GGUFError naming the first tensor whose type cannot be read as float weights."""
    for t in tensors:
        if not dequantizable(t.ggml_type):
            raise GGUFError(f"{path}: tensor {t.name!r} is stored as {t.ggml_type.name}, which is not a float or "
                            "block-quantized weight type (gguf-py cannot dequantize it, nor can llama-quantize); "
                            "re-convert the model with float weights")


def check_finite(path: str | os.PathLike, name: str, w) -> None:
    """ValueError naming the tensor when a weight holds NaN or inf (numpy array or torch tensor)."""
    if isinstance(w, np.ndarray):
        if w.dtype.kind != "f" or np.isfinite(w).all():
            return
        count = int((~np.isfinite(w)).sum())
    else:
        import torch

        if not w.is_floating_point() or bool(torch.isfinite(w).all()):
            return
        count = int((~torch.isfinite(w)).sum())
    if count:
        raise ValueError(f"{path}: tensor {name!r} has {count} NaN/inf value(s); the weights are damaged "
                         "(re-download or re-export the model)")


_LAYER = re.compile(r"^blk\.(\d+)\.")


def _int_key(reader: GGUFReader, path, key: str, lo: int, hi: int, default=None) -> int | None:
    f = reader.fields.get(key)
    if f is None:
        if default is None:
            raise GGUFError(f"{path}: no {key} key; the file lacks a model hyperparameter llama.cpp needs "
                            "(re-convert it with convert_hf_to_gguf.py)")
        return default
    v = f.contents()
    if GGUFValueType(f.types[0]) in (GGUFValueType.ARRAY, GGUFValueType.STRING, GGUFValueType.BOOL,
                                     GGUFValueType.FLOAT32, GGUFValueType.FLOAT64) or not lo <= v <= hi:
        raise GGUFError(f"{path}: {key} is {v!r} ({GGUFValueType(f.types[0]).name}); expected an integer in "
                        f"{lo}..{hi}. The metadata is damaged: re-download or re-convert the file")
    return int(v)


def _float_key(reader: GGUFReader, path, key: str) -> None:
    f = reader.fields.get(key)
    if f is None:
        return
    v = f.contents()
    if GGUFValueType(f.types[0]) not in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64) or not 0 < v < float("inf"):
        raise GGUFError(f"{path}: {key} is {v!r}; expected a positive finite float. The metadata is damaged: "
                        "re-download or re-convert the file")


def check_model_keys(info: GGUFInfo, reader: GGUFReader, arch: str) -> dict[str, int]:
    """The hyperparameters a model is built from, checked against the tensors before transformers (or the
    memory estimate) trusts them: block_count >= 2 and equal to the number of blk.N layers in the file (a
    count that drops layers or asks for 2^31 of them is refused), positive sizes, heads that divide evenly, an
    embedding width matching token_embd, a vocabulary matching token_embd's rows, special token ids inside it.
    Returns {"block_count", "embedding_length", "head_count", "head_count_kv", "key_length"}."""
    path = info.path
    layers = {int(m.group(1)) for t in info.tensors if (m := _LAYER.match(t.name))}
    n_layer = max(layers) + 1 if layers else 0
    bc = _int_key(reader, path, f"{arch}.block_count", 0, 1024)
    if bc < 2 or bc != n_layer or len(layers) != n_layer:
        raise GGUFError(f"{path}: {arch}.block_count is {bc} but the file holds tensors of {len(layers)} layers "
                        f"(blk.0 .. blk.{n_layer - 1}); qatlm needs block_count >= 2 matching the blk.N tensors "
                        "(else layers would be dropped or invented). Re-convert the file")
    hi = 1 << 24
    emb, heads = (_int_key(reader, path, f"{arch}.{k}", 1, hi) for k in ("embedding_length", "attention.head_count"))
    for k in ("context_length", "feed_forward_length"):
        _int_key(reader, path, f"{arch}.{k}", 1, hi)
    kv = _int_key(reader, path, f"{arch}.attention.head_count_kv", 1, hi, default=heads)
    if heads % kv:
        raise GGUFError(f"{path}: {arch}.attention.head_count {heads} is not a multiple of head_count_kv {kv}; "
                        "the metadata is damaged: re-download or re-convert the file")
    key_len = _int_key(reader, path, f"{arch}.attention.key_length", 1, hi, default=-1)
    if key_len == -1:
        if emb % heads:
            raise GGUFError(f"{path}: {arch}.embedding_length {emb} is not a multiple of attention.head_count "
                            f"{heads} and there is no attention.key_length; re-convert the file")
        key_len = emb // heads
    _int_key(reader, path, f"{arch}.attention.value_length", 1, hi, default=key_len)
    _int_key(reader, path, f"{arch}.attention.sliding_window", 1, hi, default=1)
    for k in ("attention.layer_norm_rms_epsilon", "rope.freq_base"):
        _float_key(reader, path, f"{arch}.{k}")
    embd = next((t for t in info.tensors if t.name == "token_embd.weight"), None)
    if embd is None or len(embd.ne) != 2 or embd.ne[0] != emb:
        raise GGUFError(f"{path}: token_embd.weight is {'missing' if embd is None else f'ne {embd.ne}'}; expected "
                        f"[{emb}, n_vocab] ({arch}.embedding_length {emb}). Re-convert the file")
    n_vocab = embd.ne[1]
    f = reader.fields.get("tokenizer.ggml.tokens")
    if f is None or GGUFValueType(f.types[0]) != GGUFValueType.ARRAY or len(f.data) != n_vocab \
            or (f.data and GGUFValueType(f.types[1]) != GGUFValueType.STRING):
        got = "missing" if f is None else f"{len(f.data)} items of {[GGUFValueType(x).name for x in f.types]}"
        raise GGUFError(f"{path}: tokenizer.ggml.tokens is {got}; expected {n_vocab} strings (token_embd.weight has "
                        f"{n_vocab} rows). Re-convert the file")
    for k in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        g = reader.fields.get(k)
        if g is not None and (GGUFValueType(g.types[0]) != GGUFValueType.ARRAY or len(g.data) != n_vocab):
            raise GGUFError(f"{path}: {k} has {len(g.data)} items but the vocabulary has {n_vocab} tokens; "
                            "re-convert the file")
    for k in ("bos", "eos", "unknown", "padding", "seperator", "cls", "mask", "eot", "eom"):
        _int_key(reader, path, f"tokenizer.ggml.{k}_token_id", 0, n_vocab - 1, default=-1)
    return {"block_count": bc, "embedding_length": emb, "head_count": heads, "head_count_kv": kv,
            "key_length": key_len}


def copy_fields(reader: GGUFReader, writer: GGUFWriter, skip: Iterable[str] = ()) -> None:
    """Copy every metadata key of a source file, with its type, except GGUF.* and those in `skip`."""
    skip = set(skip) | {"general.architecture", "general.alignment"}  # the writer sets these
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key in skip:
            continue
        vtype = GGUFValueType(f.types[0])
        if vtype == GGUFValueType.ARRAY and len(f.types) < 2:  # gguf-py's writer cannot write an empty array
            raise GGUFError(f"{getattr(reader.data, 'filename', 'the source GGUF')}: metadata key {key!r} is an "
                            "empty array, which qatlm (gguf-py) cannot copy; remove the key (gguf-py's "
                            "gguf_new_metadata.py --remove-metadata) or re-convert the file")
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


# ---- the PTQ fast path: raw metadata copy and streamed tensors ---------------------------------------------
# gguf-py's GGUFReader builds numpy views per metadata item: for a 262k-token vocabulary that is ~800k views and
# ~10 s (most of a whole-model `qatlm quantize`), and GGUFWriter re-serializes every item. PTQ needs neither: it
# copies the source's metadata entries byte for byte (validate() has checked and located them) and appends the
# keys llama-quantize sets, in llama-quantize's order, so the file is byte-identical to llama-quantize's
# (tests/test_ptq.py), and the tensor data is streamed from the memory-mapped source.

# keys llama-quantize drops from the source (it re-sets the first two at the end, in this order)
SET_BY_QUANTIZE = ("general.quantization_version", "general.file_type", "split.no", "split.count",
                   "split.tensors.count")


def tensor_bytes(info: GGUFInfo, data: np.memmap, t: TensorInfo) -> np.ndarray:
    """Tensor t's raw bytes, a read-only view of the mapped file: uint8 [*torch shape[:-1], bytes per row]."""
    block, type_size = GGML_QUANT_SIZES[t.ggml_type]
    start = info.data_start + t.offset
    return data[start:start + t.nbytes].reshape(*t.shape[:-1], t.ne[0] // block * type_size)


def kv_bytes(key: str, vtype: GGUFValueType, value) -> bytes:
    """One metadata entry, serialized as gguf.cpp writes it (scalars and strings)."""
    k = key.encode()
    out = struct.pack("<Q", len(k)) + k + struct.pack("<I", int(vtype))
    if vtype == GGUFValueType.STRING:
        v = str(value).encode()
        return out + struct.pack("<Q", len(v)) + v
    return out + struct.pack("<" + _SCALAR[int(vtype)], value)


def write_gguf_raw(path: str | os.PathLike, source: GGUFInfo, data: np.memmap, extra_kv: list[bytes],
                   tensors: list[tuple[str, tuple[int, ...], GGMLQuantizationType]], blobs: Iterable[np.ndarray],
                   drop: Iterable[str] = SET_BY_QUANTIZE) -> Path:
    """Write a GGUF (version 3) atomically: the source's metadata entries byte for byte except `drop`, then
    `extra_kv`; the tensor infos of `tensors` (name, ne, type), then their data taken in order from `blobs`
    (each exactly its tensor's bytes: an array, or an iterator of arrays written one after another), each
    padded to the source's alignment as gguf.cpp pads."""
    drop = set(drop)
    kept = [span for key, span in source.spans.items() if key not in drop]
    align = source.alignment
    infos, offset = [], 0
    sizes = []
    for name, ne, gtype in tensors:
        block, type_size = GGML_QUANT_SIZES[gtype]
        n = 1
        for d in ne:
            n *= d
        nbytes = n // block * type_size
        k = name.encode()
        infos.append(struct.pack("<Q", len(k)) + k + struct.pack("<I", len(ne)) +
                     struct.pack(f"<{len(ne)}q", *ne) + struct.pack("<IQ", int(gtype), offset))
        sizes.append(nbytes)
        offset += (nbytes + align - 1) // align * align
    with atomic_file(path) as tmp, open(tmp, "wb") as fh:
        fh.write(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kept) + len(extra_kv)))
        for a, b in kept:
            fh.write(data[a:b])
        for e in extra_kv:
            fh.write(e)
        for e in infos:
            fh.write(e)
        fh.write(b"\0" * (-fh.tell() % align))
        count = 0
        for (name, _, _), nbytes, blob in zip(tensors, sizes, blobs):
            written = 0
            for part in ([blob] if isinstance(blob, np.ndarray) else blob):
                raw = np.ascontiguousarray(part).view(np.uint8).reshape(-1)
                fh.write(raw.data)
                written += raw.size
            if written != nbytes:
                raise AssertionError(f"{name}: {written} bytes for a {nbytes}-byte tensor")
            fh.write(b"\0" * (-nbytes % align))
            count += 1
        if count != len(tensors):
            raise AssertionError(f"{count} of {len(tensors)} tensors written")
    return Path(path)
