"""The torch.compile'd imatrix fake quant (Q4_0/Q5_0: training's fake quant with llama-quantize --imatrix's rule,
on CPU tensors of >= 64k weights) lands bit for bit on the dequantized bytes of libggml's
`ggml_quantize_chunk(type, ..., imatrix)`. One large tensor per format holds several case families side by
side (Gaussian weights at four scales, heavy tails with row offsets, degenerate blocks, zero-importance
columns, extreme magnitudes whose weighted sums overflow), so one compile covers them all (Inductor caches it on
disk). The other compiled kernels (RTN fake quant, the KD head) run first in the same process: an earlier
compiled imatrix kernel passed alone and failed after them."""
import numpy as np
import pytest
import torch

import qatlm.formats as F
from qatlm.formats import _kernels
from ggml_ref import ggml_quantize


def mixed_tensor(rng, rows=1024, cols=1536):
    w = np.empty((rows, cols), np.float32)
    q = rows // 8
    for k, scale in enumerate((1e-6, 0.02, 1.0, 300.0)):
        w[k * q:(k + 1) * q] = rng.standard_normal((q, cols)) * scale
    w[4 * q:6 * q] = (rng.standard_t(2, size=(2 * q, cols)) + rng.uniform(-3, 3, size=(2 * q, 1))) * 0.05
    d = w[6 * q:7 * q].reshape(-1, 32)  # degenerate blocks in ordinary rows
    d[0::7] = 0.0
    d[1::7] = -0.0
    d[2::7] = 0.5
    d[3::7, 1:] = 0.0
    d[4::7] = np.float32(1e-16)  # below ggml's all-zero threshold
    w[7 * q:] = rng.standard_normal((q, cols)) * np.float32(2.0) ** rng.integers(-60, 60, size=(q, 1))
    qw = (10.0 ** rng.uniform(-4, 4, size=cols)).astype(np.float32)
    qw[rng.random(cols) < 0.2] = 0
    qw[64:96] = 0  # a whole block without importance
    return w, qw


@pytest.fixture(scope="module")
def other_kernels_ran():
    """The process state that broke the earlier kernel: the RTN kernels and the KD head compiled and run."""
    if not _kernels.compile_enabled():
        pytest.skip("torch.compile disabled (QATLM_COMPILE=0)")
    from qatlm.train.kd_loss import _chunk_fn
    w = torch.randn(1024, 2048)
    F.fake_quant(w, "q4_0")
    F.quantize(w, "q5_0")
    z = torch.randn(64, 1 << 15)
    _chunk_fn(z)(z, torch.randn_like(z), torch.ones(64), 1.0, 0.1)
    assert ("q4_0", "fake") in _kernels._compiled


@pytest.mark.parametrize("name", ["q4_0", "q5_0"])
def test_compiled_imatrix_fake_quant_matches_libggml(name, other_kernels_ran):
    w, qw = mixed_tensor(np.random.default_rng(7))
    assert w.size >= _kernels.IMATRIX_COMPILE_MIN_ELEMENTS
    ref = F.dequantize(ggml_quantize(w, name, qw), name, w.shape)
    fq = F.fake_quant(torch.from_numpy(w), name, imatrix=torch.from_numpy(qw))
    assert (name, "fake+imatrix") in _kernels._compiled  # the compiled kernel is the one under test
    bad = (fq.view(torch.int32) != ref.view(torch.int32)).nonzero()
    assert len(bad) == 0, f"{name}: {len(bad)} values differ from libggml, first at {bad[0].tolist()}"
    # and the same values as the eager kernel, row chunking included
    eager = torch.empty_like(fq)
    old = _kernels.IMATRIX_COMPILE_MIN_ELEMENTS
    try:
        _kernels.IMATRIX_COMPILE_MIN_ELEMENTS = w.size + 1
        eager = F.fake_quant(torch.from_numpy(w), name, imatrix=torch.from_numpy(qw))
    finally:
        _kernels.IMATRIX_COMPILE_MIN_ELEMENTS = old
    assert torch.equal(eager.view(torch.int32), fq.view(torch.int32))
