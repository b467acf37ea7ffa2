"""Small GGUF files built in the tests, and ways to damage them."""
import struct
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter


def write_tiny(path: Path, names=("a.weight", "b.weight"), arch="llama") -> Path:
    w = GGUFWriter(str(path), arch)
    w.add_uint32("general.alignment", 32)
    w.add_string("general.name", "tiny")
    rng = np.random.default_rng(0)
    for n in names:
        w.add_tensor(n, rng.standard_normal((4, 64)).astype(np.float32), raw_dtype=GGMLQuantizationType.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tensor_info_pos(data: bytes, name: str) -> int:
    """Byte position just after the tensor-info name string `name` (the n_dims field)."""
    key = struct.pack("<Q", len(name)) + name.encode()
    i = data.index(key)
    return i + len(key)


def patch(path: Path, pos: int, raw: bytes) -> None:
    data = bytearray(path.read_bytes())
    data[pos:pos + len(raw)] = raw
    path.write_bytes(bytes(data))
