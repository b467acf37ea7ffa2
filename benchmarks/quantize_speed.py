"""Quantization throughput: qatlm vs gguf-py's numpy quantizer (and ggml's C reference when
llama-cpp-python is installed), measured side by side in one run, printed as ratios.

    python benchmarks/quantize_speed.py [--repeats 3]

Each timing is the best of --repeats runs after one warm-up call (which also pays torch.compile's
one-time cost; that cost is printed separately). The goal for Q4_0 is >= 20x gguf-py on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants

import qatlm.formats as F

try:  # llama.cpp's own C quantizer, through the libggml that llama-cpp-python ships
    import ctypes
    import os

    import llama_cpp

    _lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    _lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    _lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                         ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]

    def ggml_c(w: np.ndarray, name: str) -> np.ndarray:
        f = F.get(name)
        out = np.empty(F.byte_shape(w.shape, f), np.uint8)
        _lib.ggml_quantize_chunk(f.ggml_type, w.ctypes.data, out.ctypes.data, 0, w.shape[0], w.shape[1], None)
        return out
except ImportError:  # reported in the output, not hidden
    ggml_c = None


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--formats", default=",".join(F.names()))
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ggml C reference: "
          f"{'yes' if ggml_c else 'no (pip install llama-cpp-python)'}")
    print(f"{'shape':>12} {'format':>6} {'qatlm s':>9} {'gguf s':>9} {'C s':>8} {'x gguf':>7} {'x C':>6} {'compile s':>9}")
    for base in [(262144, 640), (2048, 640)]:
        for name in args.formats.split(","):
            # the K-quants' 256-blocks do not divide 640: same number of weights in rows of 2560
            shape = base if base[1] % F.get(name).block_size == 0 else (base[0] // 4, base[1] * 4)
            w = (torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.02)
            wn = w.numpy()
            t = time.perf_counter()
            F.quantize(w, name)  # warm-up: compiles the kernel once per process
            first = time.perf_counter() - t
            ours = best_of(lambda: F.quantize(w, name), args.repeats)
            qtype = GGMLQuantizationType[name.upper()]
            # gguf-py cannot quantize the K-quants (Q4_K, Q6_K): their gguf column reads nan
            ref = best_of(lambda: quants.quantize(wn, qtype), args.repeats) if not name.endswith("_k") else float("nan")
            c = best_of(lambda: ggml_c(wn, name), args.repeats) if ggml_c else float("nan")
            print(f"{'x'.join(map(str, shape)):>12} {name:>6} {ours:9.4f} {ref:9.4f} {c:8.4f} {ref / ours:7.1f} "
                  f"{c / ours:6.2f} {max(0.0, first - ours):9.1f}")


if __name__ == "__main__":
    main()
