"""Importance-matrix files as llama-imatrix writes them and llama-quantize --imatrix reads them.

    im = read_imatrix("imatrix.gguf")        # GGUF (current) or legacy .dat, detected from the content
    im.weights("blk.0.attn_q.weight")        # float32 [cols]: what llama-quantize hands the quantizer
    check_against(im, {"blk.0.attn_q.weight": (1024, 640), ...})
    write_imatrix(im, "out.gguf")            # byte for byte what llama-imatrix writes for the same data
    write_imatrix(im, "out.dat", fmt="dat")  # the legacy format

The GGUF format (tools/imatrix/imatrix.cpp `save_imatrix`, common/imatrix-loader.cpp `common_imatrix_load`):
keys `general.type = "imatrix"`, `imatrix.datasets` (array of str), `imatrix.chunk_count` and
`imatrix.chunk_size` (u32); then, per weight in sorted name order, `<name>.in_sum2`, F32 ne [n_cols, n_mat]: the
sum over tokens of each input column's squared activation, and `<name>.counts`, F32 ne [1, n_mat]: the token
count (n_mat = 1 except for MoE expert tensors, one slice per expert; gguf.cpp drops trailing 1-dims, so a dense
weight's tensors are 1-D on disk: ne [n_cols] and [1]). llama-quantize reads counts with lround()
and passes per column `in_sum2 / count` (1.0 where a count is 0), and refuses a GGUF without the three keys.

The legacy `.dat` format (`save_imatrix_legacy`), all little-endian int32 / f32: n_entries; per entry name
length, name bytes, ncall, nval, then nval floats holding `in_sum2 / count * ncall` with
`ncall = ceil(max(count) / chunk_size)`; then, optionally, the chunk count and a length-prefixed dataset name.
llama-quantize divides the floats by ncall. In memory a legacy entry is kept as (floats, ncall), so
`weights()` gives the same per-column values either way; chunk_size is 0 for a legacy file, as in llama.cpp.

GGUF I/O is gguf-py's (GGUFWriter / GGUFReader) after qatlm.gguf.io's structural validation; what is added here
is the imatrix-level checking, with errors naming the file and the tensor.
"""
from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

from ..atomic import atomic_file
from ..gguf.io import GGUFError, validate

KEY_TYPE = "general.type"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUFFIX_SUMS = ".in_sum2"
SUFFIX_COUNTS = ".counts"


@dataclass
class Entry:
    """One weight's statistics: in_sum2 float32 [n_mat, cols], counts float32 [n_mat] (n_mat = 1: dense)."""

    in_sum2: np.ndarray
    counts: np.ndarray

    def __post_init__(self):
        self.in_sum2 = np.ascontiguousarray(self.in_sum2, dtype=np.float32)
        if self.in_sum2.ndim == 1:
            self.in_sum2 = self.in_sum2[None]
        self.counts = np.atleast_1d(np.asarray(self.counts, dtype=np.float32)).reshape(-1)
        if self.in_sum2.ndim != 2 or self.counts.shape[0] != self.in_sum2.shape[0]:
            raise ValueError(f"in_sum2 {self.in_sum2.shape} needs one count per matrix, got counts "
                             f"{self.counts.shape}")

    @property
    def cols(self) -> int:
        return self.in_sum2.shape[1]

    @property
    def n_mat(self) -> int:
        return self.in_sum2.shape[0]


@dataclass
class Imatrix:
    """llama-imatrix's data: GGUF weight name -> Entry, plus the file's metadata."""

    entries: dict[str, Entry] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0  # tokens per chunk (n_ctx); 0 when read from a legacy .dat file
    legacy: bool = False  # read from a .dat file: counts are ncall, in_sum2 the stored (sum/count)*ncall

    def add(self, name: str, in_sum2, count) -> None:
        """Set one weight's statistics: in_sum2 [cols] (or [n_mat, cols]) and its token count(s)."""
        self.entries[name] = Entry(in_sum2, count)

    def weights(self, name: str) -> np.ndarray:
        """float32 [n_mat * cols]: the per-column importance llama-quantize passes to the quantizer for `name`
        (tools/quantize/quantize.cpp load_imatrix: in_sum2 / lround(count), or 1.0 where the count is 0)."""
        e = self.entries.get(name)
        if e is None:
            raise KeyError(f"no imatrix entry for {name!r}")
        counts = np.array([float(_lround(c)) for c in e.counts], np.float32)
        if self.legacy:  # quantize.cpp: legacy sums are divided by ncall, and kept as they are if ncall is 0
            w = np.where(counts[:, None] > 0, e.in_sum2 / np.maximum(counts, 1)[:, None], e.in_sum2)
        else:
            w = np.where(counts[:, None] > 0, e.in_sum2 / np.maximum(counts, 1)[:, None], np.float32(1))
        return w.astype(np.float32).reshape(-1)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __len__(self) -> int:
        return len(self.entries)


def _lround(x: float) -> int:
    """C's lround: halves away from zero (Python's round() is half-to-even)."""
    return int(math.floor(abs(x) + 0.5)) * (1 if x >= 0 else -1)


# ---- validation ----


def _check_entry(path, name: str, e: Entry, allow_zero_counts: bool) -> None:
    where = f"{path}: tensor {name}"
    if not np.isfinite(e.in_sum2).all():
        bad = int((~np.isfinite(e.in_sum2)).sum())
        raise ValueError(f"{where}{SUFFIX_SUMS} has {bad} non-finite value(s) (NaN/inf); llama-quantize refuses "
                         "such an imatrix. Recompute it (a model that overflows in fp16? try fp32).")
    if (e.in_sum2 < 0).any():
        raise ValueError(f"{where}{SUFFIX_SUMS} has {int((e.in_sum2 < 0).sum())} negative value(s); a sum of "
                         "squares cannot be negative, so the file is corrupt. Recompute it.")
    if not np.isfinite(e.counts).all() or (e.counts < 0).any():
        raise ValueError(f"{where}{SUFFIX_COUNTS} has negative or non-finite counts {e.counts.tolist()}; "
                         "the file is corrupt. Recompute it.")
    if not allow_zero_counts and (e.counts == 0).any():
        raise ValueError(f"{where}{SUFFIX_COUNTS} has a count of zero ({int((e.counts == 0).sum())} of "
                         f"{e.n_mat}): no token reached this weight, so its importance is unknown (llama-quantize "
                         "would use 1.0). Use more or different text, or pass allow_zero_counts=True.")


def check(im: Imatrix, path: str | os.PathLike = "imatrix", allow_zero_counts: bool = False) -> None:
    """Raise ValueError (naming `path` and the tensor) for NaN/inf/negative values or counts of zero."""
    if not im.entries:
        raise ValueError(f"{path}: the imatrix has no entries")
    for name, e in im.entries.items():
        _check_entry(path, name, e, allow_zero_counts)


def check_against(im: Imatrix, tensors: dict[str, tuple[int, ...]], path: str | os.PathLike = "imatrix") -> None:
    """Check that every weight in `tensors` (GGUF name -> torch shape (rows, cols), or (n_mat, rows, cols) for
    expert tensors) has an entry of the right size, as llama-quantize does before quantizing with it
    (src/llama-quant.cpp: the imatrix must have ne[0] * ne[2] values). Raises ValueError listing the problems."""
    missing, wrong = [], []
    for name, shape in tensors.items():
        e = im.entries.get(name)
        if e is None:
            missing.append(name)
            continue
        cols, n_mat = shape[-1], (shape[0] if len(shape) == 3 else 1)
        if e.cols * e.n_mat != cols * n_mat:
            wrong.append(f"{name}: imatrix has {e.n_mat} x {e.cols} values, the weight {tuple(shape)} needs "
                         f"{n_mat} x {cols}")
    problems = []
    if missing:
        problems.append(f"no entry for {len(missing)} weight(s): {', '.join(missing[:8])}"
                        + (" ..." if len(missing) > 8 else ""))
    if wrong:
        problems.append("wrong size: " + "; ".join(wrong[:8]) + (" ..." if len(wrong) > 8 else ""))
    if problems:
        raise ValueError(f"{path}: the imatrix does not fit the model ({'; '.join(problems)}). Was it computed "
                         "on another model? Recompute it on this one.")


# ---- reading ----


def read_imatrix(path: str | os.PathLike, allow_zero_counts: bool = False) -> Imatrix:
    """Read an imatrix file, GGUF or legacy .dat (told apart by the GGUF magic, as llama.cpp's loader does),
    and validate it. Raises ValueError naming the file (and the tensor) when it is not a usable imatrix."""
    from ..sources import regular_file

    path = Path(path)
    if regular_file(path, "an imatrix file (llama-imatrix's GGUF or legacy .dat)").st_size == 0:
        raise ValueError(f"{path}: the imatrix file is empty (an interrupted run?). Recompute it.")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    im = _read_gguf(path) if magic == b"GGUF" else _read_dat(path)
    check(im, path, allow_zero_counts)
    return im


def _corrupt(path, what: str) -> ValueError:
    return ValueError(f"{path}: not a valid imatrix file: {what}. Recompute it with llama-imatrix or qatlm.")


def _read_gguf(path: Path) -> Imatrix:
    try:
        validate(path)  # structure, offsets and bounds, before gguf-py trusts any of it
        reader = GGUFReader(path)
    except GGUFError:
        raise  # a ValueError that names the file and the fault
    except (ValueError, IndexError, struct.error, OverflowError) as e:
        raise _corrupt(path, f"gguf-py cannot parse it ({e})") from None

    def value(key):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    gtype = value(KEY_TYPE)
    sums = {t.name[:-len(SUFFIX_SUMS)]: t for t in reader.tensors if t.name.endswith(SUFFIX_SUMS)}
    counts = {t.name[:-len(SUFFIX_COUNTS)]: t for t in reader.tensors if t.name.endswith(SUFFIX_COUNTS)}
    if gtype != "imatrix" or not sums:
        arch = value("general.architecture")
        raise ValueError(f"{path}: a GGUF file but not an imatrix (general.type = {gtype!r}"
                         + (f", general.architecture = {arch!r}" if arch else "")
                         + f", {len(sums)} '*{SUFFIX_SUMS}' tensors). Pass the file llama-imatrix or "
                           "qatlm wrote, not a model.")
    missing = [k for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE) if k not in reader.fields]
    if missing:  # quantize.cpp: "missing imatrix metadata"
        raise ValueError(f"{path}: imatrix metadata missing: {', '.join(missing)} (llama-quantize refuses such "
                         "a file). Rewrite it with write_imatrix().")
    im = Imatrix(datasets=[str(d) for d in (value(KEY_DATASETS) or [])],
                 chunk_count=int(value(KEY_CHUNK_COUNT)), chunk_size=int(value(KEY_CHUNK_SIZE)))
    for name in sorted(set(sums) | set(counts)):
        s, c = sums.get(name), counts.get(name)
        if s is None or c is None:
            raise _corrupt(path, f"tensor {name} has {'no ' + SUFFIX_SUMS if s is None else 'no ' + SUFFIX_COUNTS}"
                                 f" to go with its {SUFFIX_COUNTS if s is None else SUFFIX_SUMS}")
        for t in (s, c):
            if t.tensor_type != GGMLQuantizationType.F32:
                raise _corrupt(path, f"tensor {t.name} is {t.tensor_type.name}, must be F32")
        n_sums, n_counts = int(np.prod(s.shape)), int(np.prod(c.shape))
        if n_counts < 1 or n_sums % n_counts:
            raise _corrupt(path, f"tensor {name}: {n_sums} sums do not split into {n_counts} matrices")
        sum_data = np.array(s.data, dtype=np.float32).reshape(n_counts, n_sums // n_counts)
        im.entries[name] = Entry(sum_data, np.array(c.data, dtype=np.float32).reshape(-1))
    return im


def _read_dat(path: Path) -> Imatrix:
    raw = path.read_bytes()
    pos = 0

    def take(fmt: str, what: str):
        nonlocal pos
        n = struct.calcsize(fmt)
        if pos + n > len(raw):
            raise _corrupt(path, f"truncated while reading {what} at byte {pos} (file has {len(raw)} bytes)")
        out = struct.unpack_from(fmt, raw, pos)
        pos += n
        return out

    (n_entries,) = take("<i", "the entry count")
    if n_entries < 1 or n_entries > len(raw) // 12:
        raise ValueError(f"{path}: neither a GGUF nor a legacy .dat imatrix (the first int32, {n_entries}, is not "
                         "a plausible entry count). Pass the file llama-imatrix or qatlm wrote.")
    im = Imatrix(legacy=True)
    for i in range(n_entries):
        (n,) = take("<i", f"the name length of entry {i + 1}")
        if n < 1 or pos + n > len(raw):
            raise _corrupt(path, f"entry {i + 1}: name length {n} runs past the end of the file")
        try:
            name = raw[pos:pos + n].decode("utf-8")
        except UnicodeDecodeError:
            raise _corrupt(path, f"entry {i + 1}: the name is not UTF-8") from None
        pos += n
        ncall, nval = take("<ii", f"tensor {name}: ncall and nval")
        if nval < 1:
            raise _corrupt(path, f"tensor {name}: {nval} values")
        vals = np.array(take(f"<{nval}f", f"tensor {name}: {nval} values"), np.float32)
        if name in im.entries:
            raise _corrupt(path, f"tensor {name} appears twice")
        im.entries[name] = Entry(vals, float(ncall))
    if pos + 4 <= len(raw):  # optional trailer: chunk count, then the dataset name
        (im.chunk_count,) = take("<i", "the chunk count")
        if pos + 4 <= len(raw):
            (n,) = take("<i", "the dataset name length")
            if 0 < n <= len(raw) - pos:
                im.datasets.append(raw[pos:pos + n].decode("utf-8", errors="replace"))
    return im


# ---- writing ----


def write_imatrix(im: Imatrix, path: str | os.PathLike, fmt: str | None = None) -> Path:
    """Write `im` atomically (temporary file beside `path`, renamed when complete). fmt "gguf" (the default
    unless `path` ends in .dat) writes llama-imatrix's current format; "dat" the legacy one."""
    path = Path(path)
    fmt = fmt or ("dat" if path.suffix == ".dat" else "gguf")
    if fmt not in ("gguf", "dat"):
        raise ValueError(f"imatrix format {fmt!r}: use 'gguf' or 'dat'")
    check(im, path, allow_zero_counts=True)
    with atomic_file(path) as tmp:
        (_write_gguf if fmt == "gguf" else _write_dat)(im, tmp)
    return path


def _write_gguf(im: Imatrix, path: Path) -> None:
    # a legacy entry (floats, ncall) is written as in_sum2 = floats, counts = ncall: the same in_sum2 / count
    writer = GGUFWriter(path, arch="imatrix")
    # llama-imatrix's file has no general.architecture (gguf-py adds one in its constructor)
    writer.kv_data[0].pop("general.architecture", None)
    writer.add_key_value(KEY_TYPE, "imatrix", GGUFValueType.STRING)
    writer.add_key_value(KEY_DATASETS, list(im.datasets), GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
    writer.add_key_value(KEY_CHUNK_COUNT, int(im.chunk_count), GGUFValueType.UINT32)
    writer.add_key_value(KEY_CHUNK_SIZE, int(im.chunk_size), GGUFValueType.UINT32)
    for name in sorted(im.entries):  # imatrix.cpp: "deterministic tensor name order"
        e = im.entries[name]
        # ggml_new_tensor_2d(F32, cols, n_mat) and (1, n_mat), but gguf.cpp stores n_dims = ggml_n_dims(), which
        # drops trailing 1s: a dense weight's entry is 1-D on disk, ne [cols] and [1]
        sums, counts = (e.in_sum2, e.counts.reshape(-1, 1)) if e.n_mat > 1 else (e.in_sum2[0], e.counts)
        writer.add_tensor(name + SUFFIX_SUMS, sums)  # numpy [n_mat, cols] -> ne [cols, n_mat]
        writer.add_tensor(name + SUFFIX_COUNTS, counts)  # ne [1, n_mat]
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_dat(im: Imatrix, path: Path) -> None:
    """imatrix.cpp save_imatrix_legacy: values (sum/count)*ncall, ncall = ceil(max count / chunk_size)."""
    out = [struct.pack("<i", len(im.entries))]
    for name in sorted(im.entries):
        e = im.entries[name]
        if im.legacy or im.chunk_size <= 0:
            ncall = int(_lround(float(e.counts.max())))  # already ncall (a legacy file), or no chunk size known
        else:
            ncall = (int(e.counts.max()) + im.chunk_size - 1) // im.chunk_size
        if im.legacy:
            vals = e.in_sum2.reshape(-1)
        else:
            count = np.repeat(e.counts, e.cols).astype(np.float32)
            s = e.in_sum2.reshape(-1)
            vals = np.where(count == 0, np.float32(1), s) / np.where(count == 0, np.float32(1), count)
            vals = (vals * np.float32(ncall)).astype(np.float32)
        b = name.encode("utf-8")
        out += [struct.pack("<i", len(b)), b, struct.pack("<ii", ncall, vals.size), vals.astype("<f4").tobytes()]
    out.append(struct.pack("<i", int(im.chunk_count)))
    ds = (im.datasets[-1] if im.datasets else "").encode("utf-8")
    out += [struct.pack("<i", len(ds)), ds]
    path.write_bytes(b"".join(out))
