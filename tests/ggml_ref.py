"""ggml's own C quantizers, called through ctypes from the libggml that llama-cpp-python builds.

This is llama.cpp's ground truth: `ggml_quantize_chunk` with no importance matrix is exactly what
llama-quantize runs per tensor (it dispatches to quantize_row_*_ref for these types).
"""
import ctypes
import os

import numpy as np
import llama_cpp
from gguf import GGMLQuantizationType, GGML_QUANT_SIZES

_LIB = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
_LIB.ggml_quantize_chunk.restype = ctypes.c_size_t
_LIB.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                     ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
_LIB.ggml_quantize_init.argtypes = [ctypes.c_int]


def ggml_quantize(w: np.ndarray, name: str) -> np.ndarray:
    """uint8 [rows, cols // B * type_size]: what libggml writes for this fp32 tensor."""
    qtype = GGMLQuantizationType[name.upper()]
    bs, ts = GGML_QUANT_SIZES[qtype]
    w = np.ascontiguousarray(w, dtype=np.float32)
    rows, cols = w.shape
    out = np.zeros((rows, cols // bs * ts), np.uint8)
    _LIB.ggml_quantize_init(int(qtype))
    n = _LIB.ggml_quantize_chunk(int(qtype), w.ctypes.data, out.ctypes.data, 0, rows, cols, None)
    assert n == out.nbytes, (n, out.nbytes)
    return out
