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


def ggml_quantize(w: np.ndarray, name: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """uint8 [rows, cols // B * type_size]: what libggml writes for this fp32 tensor.

    imatrix: optional fp32 [cols] importance weights, passed as ggml_quantize_chunk's `imatrix` argument
    (what llama-quantize --imatrix does per tensor)."""
    qtype = GGMLQuantizationType[name.upper()]
    bs, ts = GGML_QUANT_SIZES[qtype]
    w = np.ascontiguousarray(w, dtype=np.float32)
    rows, cols = w.shape
    out = np.zeros((rows, cols // bs * ts), np.uint8)
    qw = None
    if imatrix is not None:
        qw = np.ascontiguousarray(imatrix, dtype=np.float32)
        assert qw.shape == (cols,), (qw.shape, cols)
    _LIB.ggml_quantize_init(int(qtype))
    n = _LIB.ggml_quantize_chunk(int(qtype), w.ctypes.data, out.ctypes.data, 0, rows, cols,
                                 None if qw is None else qw.ctypes.data)
    assert n == out.nbytes, (n, out.nbytes)
    return out


def llama_quantize(src, dst, ftype: int) -> None:
    """llama.cpp's llama-quantize (llama_model_quantize) with no imatrix; requantizing allowed."""
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ftype
    p.nthread = 2
    p.allow_requantize = True
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    assert rc == 0, f"llama_model_quantize({src} -> {dst}, ftype={ftype}) returned {rc}"


def tensors_by_name(path):
    """{name: (type name, raw bytes as uint8 numpy)} of a GGUF file, read with gguf-py."""
    from gguf import GGUFReader

    r = GGUFReader(path)
    return {t.name: (t.tensor_type.name, np.asarray(t.data).view(np.uint8).reshape(-1)) for t in r.tensors}


def assert_export_is_fake_quant(path, latent: dict, types=None) -> int:
    """Every block-format tensor of the GGUF at `path` dequantizes exactly to fake_quant of the latent weight
    (GGUF name -> torch-order tensor). Returns how many tensors were checked."""
    import torch
    from gguf import GGUFReader

    import qatlm.formats as F

    n = 0
    for rt in GGUFReader(path).tensors:
        typ = rt.tensor_type.name.lower()
        if typ in F.names() and (types is None or typ in types):
            w = latent[rt.name]
            deq = F.dequantize(np.asarray(rt.data).reshape(-1), typ, w.shape)
            assert torch.equal(deq, F.fake_quant(w.reshape(-1, w.shape[-1]), typ).reshape(w.shape)), rt.name
            n += 1
    return n


def runs_in_llama_cpp(gguf, student, tokenizer) -> None:
    """llama.cpp loads the file and its next-token log-probabilities track the torch student's (fake quant).
    Tolerance: llama.cpp quantizes the activations too (Q8_K for the K-quant dot products) and sums in
    another order, so its log-probabilities are close to, not equal to, the fake-quant forward's."""
    import torch

    from qatlm.eval.perplexity import LlamaCppEngine
    from tiny_models import TEXT

    eng = LlamaCppEngine(str(gguf), n_ctx=64, threads=1)
    ids = tokenizer(TEXT[:400])["input_ids"][:64]
    lp_cpp = eng.logprobs(ids)
    with torch.no_grad():
        logits = student(torch.tensor([ids])).logits[0, len(ids) // 2:-1].float()
    lp_torch = torch.log_softmax(logits, -1)
    assert torch.isfinite(lp_cpp).all()
    target = torch.tensor(ids[len(ids) // 2 + 1:])
    nll_cpp = -lp_cpp.gather(1, target[:, None]).mean()
    nll_torch = -lp_torch.gather(1, target[:, None]).mean()
    assert abs(float(nll_cpp - nll_torch)) < 0.05 * float(nll_torch), (float(nll_cpp), float(nll_torch))
    del eng
