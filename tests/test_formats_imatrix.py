"""Importance-matrix quantization: byte equality of qatlm.formats with libggml's
`ggml_quantize_chunk(type, src, dst, 0, rows, cols, imatrix)`, which is what `llama-quantize --imatrix` runs
per tensor (quantize_row_q4_0_impl & co. in ggml-quants.c). No tolerances: byte equality, block by block.

The imatrix path is one set of exact, branch-free rules (no fast path), so each case runs once eager, and once
more with its searches compiled as large jobs run them (GRID: the affine grid step, make_qx_quants); tensors are wide and tall enough to cross the kernels' row chunks. The case families cover realistic
imatrix values (log-uniform over 8 orders of magnitude, as in_sum2 / counts of real activations are),
zeros in the imatrix (single columns, whole blocks, all but one column of a block: the near-singular fits
where ggml's least squares produce arbitrary scales), degenerate weights (zero, constant, single-nonzero
blocks), fp16/bf16-valued weights, exact ties on the formats' lattices and extreme magnitudes.
test_blocks_compared (run last) checks how many blocks each format went through.
"""
import contextlib

import numpy as np
import pytest
import torch

import qatlm.formats as F
from qatlm.formats import _kernels
from ggml_ref import ggml_quantize

# formats whose ggml quantizer uses the imatrix
WEIGHTED = ("q4_0", "q5_0", "q4_1", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs")
ALL = WEIGHTED + ("q8_0",)
BLOCKS_SEEN = {name: 0 for name in ALL}


# formats whose imatrix search large jobs run compiled: an affine grid search, or make_qx_quants (Q4_0 / Q5_0's
# compiled here as a one-off quantize runs it, not as training's fused fake quant: test_formats_imatrix_compiled)
GRID = ("q4_1", "q5_1", "q2_k", "q4_k", "q5_k", "q4_0", "q5_0", "q3_k", "q6_k")
SEARCH_KNOBS = ("GRID_COMPILE_MIN_ELEMENTS", "QX_COMPILE_MIN_ELEMENTS", "REUSE_COMPILED_QX")


@contextlib.contextmanager
def search_mode(compiled: bool):
    """The searches compiled for every tensor, or eager even after their compiled graphs were built."""
    saved = [getattr(_kernels, k) for k in SEARCH_KNOBS]
    for k, v in zip(SEARCH_KNOBS, (0, 0, True) if compiled else (1 << 62, 1 << 62, False)):
        setattr(_kernels, k, v)
    try:
        yield
        assert not (compiled and _kernels._compile_failed), "torch.compile failed: the eager search ran instead"
    finally:
        for k, v in zip(SEARCH_KNOBS, saved):
            setattr(_kernels, k, v)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN == NaN, -0.0 != +0.0)."""
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def assert_same_bytes(w, name, imatrix):
    """libggml with the imatrix == F.quantize(w, name, imatrix), and fake_quant lands on its dequantized values."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
    f = F.get(name)
    ref = ggml_quantize(w, name, imatrix)
    with search_mode(compiled=False):
        ours = F.quantize(torch.from_numpy(w), name, torch.from_numpy(imatrix))
    if name in GRID:  # their search, compiled as large jobs run it, writes the same bytes
        with search_mode(compiled=True):
            assert np.array_equal(F.quantize(torch.from_numpy(w), name, torch.from_numpy(imatrix)), ours), name
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    a, b = ours.reshape(-1, f.type_size), ref.reshape(-1, f.type_size)
    bad = np.nonzero((a != b).any(1))[0]
    if len(bad):
        i = bad[0]
        row, blk = divmod(i, w.shape[1] // f.block_size)
        cols = slice(blk * f.block_size, (blk + 1) * f.block_size)
        raise AssertionError(f"{name}: {len(bad)} of {len(a)} blocks differ from libggml; first: block {i} "
                             f"(row {row})\nx  {w[row, cols].tolist()}\nqw {imatrix[cols].tolist()}\n"
                             f"ours {a[i].tolist()}\nref  {b[i].tolist()}")
    fq = F.fake_quant(torch.from_numpy(w), name, imatrix=torch.from_numpy(imatrix))
    assert same_bits(fq, F.dequantize(ours, name, w.shape)), f"{name}: fake_quant != dequantize(quantize) with imatrix"
    BLOCKS_SEEN[name] += len(a)
    return ours


def realistic_imatrix(cols, rng, decades=8):
    """Per-column mean squared activations: log-uniform over `decades` orders of magnitude, a few outlier
    columns (the massive activations of real LLMs), as in_sum2 / counts look in practice."""
    qw = 10.0 ** rng.uniform(-decades / 2, decades / 2, size=cols)
    qw[rng.integers(0, cols, size=max(1, cols // 100))] *= 1e3
    return qw.astype(np.float32)


# ---- case families --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", WEIGHTED)
@pytest.mark.parametrize("scale", [1e-6, 0.02, 1.0, 300.0])
def test_gaussian(name, scale):
    rng = np.random.default_rng(int(scale * 1e6) % 2**32 + 17)
    w = (rng.standard_normal((256, 2048)) * scale).astype(np.float32)  # 16,384 blocks of 32
    assert_same_bytes(w, name, realistic_imatrix(2048, rng))


@pytest.mark.parametrize("name", WEIGHTED)
def test_heavy_tailed_and_shifted(name):
    """Student-t(2) weights plus a per-row offset (all-positive and all-negative blocks for the _1 formats)."""
    rng = np.random.default_rng(1)
    w = rng.standard_t(2, size=(512, 1024)) + rng.uniform(-3, 3, size=(512, 1))
    assert_same_bytes(w.astype(np.float32) * 0.05, name, realistic_imatrix(1024, rng))


@pytest.mark.parametrize("name", WEIGHTED)
def test_uniform_and_narrow_imatrix(name):
    """All-ones (the weights reduce to sqrt(sigma2 + x^2)), and one decade of spread."""
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((256, 1536)) * 0.03).astype(np.float32)
    assert_same_bytes(w, name, np.ones(1536, np.float32))
    assert_same_bytes(w, name, realistic_imatrix(1536, rng, decades=1))


@pytest.mark.parametrize("name", WEIGHTED)
def test_zeros_in_the_imatrix(name):
    """Zero importance: scattered columns, whole 32- and 256-column spans, blocks where only one or two columns
    count (ggml's least-squares fits become near-singular there), and an all-zero imatrix."""
    rng = np.random.default_rng(3)
    cols = 4096
    w = (rng.standard_normal((128, cols)) * 0.02).astype(np.float32)
    qw = realistic_imatrix(cols, rng)
    qw[rng.random(cols) < 0.3] = 0  # scattered
    qw[256:512] = 0  # a whole super-block
    qw[1024:1056] = 0  # a whole 32-block
    for b in range(2048, cols, 32):  # one or two columns per 32-block count, the rest is 0
        keep = qw[b + rng.integers(0, 32, size=rng.integers(1, 3))].copy()
        qw[b:b + 32] = 0
        qw[b + rng.integers(0, 32, size=len(keep))] = keep
    assert_same_bytes(w, name, qw)
    assert_same_bytes(w[:32], name, np.zeros(cols, np.float32))


@pytest.mark.parametrize("name", ["q4_k", "q5_k", "q2_k", "q3_k"])
def test_negative_sub_block_scales(name):
    """With one or two weighted columns per sub-block, ggml's make_qkx3_quants can return a negative scale;
    make_qp_quants then stores a wrapped uint8 code (> 63) whose high bits spill into a neighbour's 6-bit field
    of Q4_K's `scales` (Q5_K clamps it to 63; Q2_K's 4-bit codes spill into the min's nibble; Q3_K's
    make_qx_quants sees the sign). The bytes must still be ggml's, and fake_quant must use the fields as
    llama.cpp reads them."""
    rng = np.random.default_rng(15)
    cols = 4096
    w = (rng.standard_normal((64, cols)) * 0.02).astype(np.float32)
    qw = np.zeros(cols, np.float32)
    sub = 16 if name in ("q2_k", "q3_k") else 32
    for b in range(0, cols, sub):
        qw[b + rng.integers(0, sub, size=rng.integers(1, 3))] = 10.0 ** rng.uniform(-3, 3)
    if name == "q4_k":
        f = F.get("q4_k")
        blocks = torch.from_numpy(w).reshape(-1, 256)
        qw_blocks = torch.from_numpy(qw).view(1, -1, 256).expand(64, -1, -1).reshape(-1, 256)
        codes = f.encode_imatrix(blocks, qw_blocks, None)
        assert (codes.sc > 63).any(), "the case family no longer reaches the wrapped-code corner"
    assert_same_bytes(w, name, qw)


@pytest.mark.parametrize("name", WEIGHTED)
def test_degenerate_blocks(name):
    """All-zero blocks (+0.0 and -0.0), a single nonzero weight, constant blocks (positive and negative),
    blocks of two values, next to ordinary ones in the same rows (sigma2 is a row mean)."""
    rng = np.random.default_rng(4)
    n = 8192
    x = (rng.standard_normal((n, 32)) * 0.1).astype(np.float32)
    x[0::8] = 0.0
    x[1::8] = -0.0
    x[2::8] = np.where(rng.random((n // 8, 32)) < 0.5, -0.0, 0.0)
    single = np.zeros((n // 8, 32), np.float32)
    single[np.arange(n // 8), rng.integers(0, 32, n // 8)] = rng.standard_normal(n // 8) * 10.0 ** rng.integers(-6, 3, n // 8)
    x[3::8] = single
    x[4::8] = rng.standard_normal((n // 8, 1)).astype(np.float32)  # constant, either sign
    x[5::8] = np.where(rng.random((n // 8, 32)) < 0.5, 1.0, -0.5).astype(np.float32) * rng.uniform(0.1, 2, (n // 8, 1))
    x[6::8] = np.abs(x[6::8])  # all >= 0: the _1 formats clip min to 0
    w = x.reshape(-1, 1024)  # 256 rows
    assert_same_bytes(w, name, realistic_imatrix(1024, rng))
    assert_same_bytes(np.zeros((8, 1024), np.float32), name, realistic_imatrix(1024, rng))  # an all-zero tensor


@pytest.mark.parametrize("name", WEIGHTED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_valued_inputs(name, dtype):
    """Checkpoint dtypes, upcast exactly: the public API takes the low-precision tensor directly too."""
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(256, 2048, generator=g) * 0.05).to(dtype)
    qw = realistic_imatrix(2048, np.random.default_rng(5))
    ours = assert_same_bytes(w.float().numpy(), name, qw)
    assert np.array_equal(F.quantize(w, name, imatrix=qw), ours)


def _lattice(name, rows, cols, rng):
    """Weights on dyadic half steps (k/2 * 2^e per block): sums, scales and grid points meet exact ties."""
    e = rng.integers(-12, 4, size=(rows * cols // 32, 1)).astype(np.float32)
    k = rng.integers(-16, 17, size=(rows * cols // 32, 32)).astype(np.float32)
    return ((k / 2) * np.float32(2.0) ** e).reshape(rows, cols)


@pytest.mark.parametrize("name", WEIGHTED)
def test_exact_ties(name):
    """Dyadic weights with power-of-two (and all-ones) importance: products and sums are exact, so candidate
    grids tie exactly and the strict comparisons of ggml's searches decide."""
    rng = np.random.default_rng(6)
    w = _lattice(name, 256, 1024, rng)
    assert_same_bytes(w, name, (2.0 ** rng.integers(-4, 5, size=1024)).astype(np.float32))
    assert_same_bytes(w, name, np.ones(1024, np.float32))


@pytest.mark.parametrize("name", WEIGHTED)
def test_requantized_q5_0_lattice(name):
    """Weights that were themselves dequantized Q5_0 (a GGUF teacher), with a realistic imatrix."""
    g = torch.Generator().manual_seed(7)
    w = F.fake_quant(torch.randn(256, 2048, generator=g) * 0.03, "q5_0")
    assert_same_bytes(w.numpy(), name, realistic_imatrix(2048, np.random.default_rng(7)))


@pytest.mark.parametrize("name", WEIGHTED)
@pytest.mark.parametrize("exp", [-30, -12, 6, 15])
def test_extreme_magnitudes(name, exp):
    """Tiny and large weights (every other block scaled by 10^exp, so rows mix them) and large imatrix values."""
    rng = np.random.default_rng(exp + 100)
    x = rng.uniform(-3.4, 3.4, size=(8192, 32)).astype(np.float32)
    x[::2] *= np.float32(10.0) ** exp
    assert_same_bytes(x.reshape(-1, 1024), name, realistic_imatrix(1024, rng) * np.float32(1e6))


@pytest.mark.parametrize("name", WEIGHTED)
def test_row_lengths(name):
    """One block per row (sigma2 from that block alone) and very long rows (many chunks of the kernel)."""
    rng = np.random.default_rng(8)
    bs = F.get(name).block_size
    assert_same_bytes((rng.standard_normal((2048, bs)) * 0.1).astype(np.float32), name, realistic_imatrix(bs, rng))
    assert_same_bytes((rng.standard_normal((24, 16384)) * 0.1).astype(np.float32), name, realistic_imatrix(16384, rng))


def test_q8_0_ignores_the_imatrix():
    """ggml's quantize_q8_0 drops quant_weights: same bytes with and without; ours too."""
    rng = np.random.default_rng(9)
    w = (rng.standard_normal((512, 1024)) * 0.05).astype(np.float32)
    qw = realistic_imatrix(1024, rng)
    ref = assert_same_bytes(w, "q8_0", qw)
    assert np.array_equal(ggml_quantize(w, "q8_0"), ref)
    assert np.array_equal(F.quantize(w, "q8_0"), ref)


@pytest.mark.parametrize("name", ALL)
def test_without_imatrix_unchanged(name):
    """imatrix=None is the reference path, still byte-identical to libggml's (a regression check: Q4_K and
    Q6_K share code with the weighted path)."""
    rng = np.random.default_rng(10)
    w = (rng.standard_normal((128, 2048)) * 0.05).astype(np.float32)
    assert np.array_equal(F.quantize(w, name), ggml_quantize(w, name))
    assert np.array_equal(F.quantize(w, name, imatrix=None), ggml_quantize(w, name))
    if name in WEIGHTED:  # and the imatrix does change the result (the weighted path is really taken)
        assert not np.array_equal(F.quantize(w, name, realistic_imatrix(2048, rng)), ggml_quantize(w, name))


def test_blocks_compared():
    """Every format went through at least 190K blocks of 32 (256-weight formats: 23K super-blocks) above (run
    last)."""
    if min(BLOCKS_SEEN[n] for n in WEIGHTED) == 0:
        pytest.skip("run together with the case families (pytest -p no:randomly tests/test_formats_imatrix.py)")
    print({n: BLOCKS_SEEN[n] for n in ALL})
    for name in WEIGHTED:
        need = 190_000 if F.get(name).block_size == 32 else 23_000
        assert BLOCKS_SEEN[name] >= need, (name, BLOCKS_SEEN[name])


# ---- fake quant, gradients, API -------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fake_quant_equals_dequantized_export(name, dtype):
    g = torch.Generator().manual_seed(11)
    w = (torch.randn(128, 1024, generator=g) * 0.1).to(dtype)
    qw = torch.rand(1024, generator=g) * 100
    fq = F.fake_quant(w, name, qw)
    assert fq.dtype == torch.float32 and fq.shape == w.shape
    assert same_bits(fq, F.dequantize(F.quantize(w, name, qw), name, w.shape))


@pytest.mark.parametrize("name", WEIGHTED)
def test_straight_through_gradient(name):
    g = torch.Generator().manual_seed(12)
    w = torch.randn(64, 512, generator=g).requires_grad_()
    up = torch.randn(64, 512, generator=g)
    (F.fake_quant(w, name, imatrix=torch.rand(512, generator=g)) * up).sum().backward()
    assert torch.equal(w.grad, up)


def test_imatrix_accepts_numpy_lists_and_float64():
    rng = np.random.default_rng(13)
    w = torch.from_numpy((rng.standard_normal((4, 64)) * 0.1).astype(np.float32))
    qw = rng.uniform(0, 5, size=64)  # float64: converted to fp32, as llama-quantize reads floats
    ref = ggml_quantize(w.numpy(), "q4_0", qw.astype(np.float32))
    for form in (qw, qw.astype(np.float32), torch.from_numpy(qw), qw.tolist()):
        assert np.array_equal(F.quantize(w, "q4_0", form), ref)


@pytest.mark.parametrize("name", ALL)
def test_bad_imatrix(name):
    cols = 2 * F.get(name).block_size
    w = torch.randn(3, cols)
    with pytest.raises(ValueError, match=rf"imatrix of shape \({cols - 1},\).*1-D vector of {cols} importance"):
        F.quantize(w, name, torch.ones(cols - 1))
    with pytest.raises(ValueError, match=rf"1-D vector of {cols}"):
        F.fake_quant(w, name, torch.ones(1, cols))
    for bad in (float("nan"), float("inf"), float("-inf"), 1e300):
        qw = np.ones(cols)
        qw[5] = bad
        with pytest.raises(ValueError, match=r"imatrix holds NaN or inf \(first at column 5"):
            F.quantize(w, name, qw)
        with pytest.raises(ValueError, match="NaN or inf"):
            F.fake_quant(w, name, qw)
    qw = torch.ones(cols)
    qw[7] = -0.5
    with pytest.raises(ValueError, match=r"negative weight \(-0.5 at column 7\).*must be >= 0"):
        F.quantize(w, name, qw)
    with pytest.raises(ValueError, match="negative"):
        F.fake_quant(w, name, qw)
    with pytest.raises(ValueError, match="torch.Tensor or numpy.ndarray"):
        F.quantize(w, name, "imatrix.gguf")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", WEIGHTED)
def test_cuda_matches_cpu(name):
    g = torch.Generator().manual_seed(14)
    w = torch.randn(512, 2048, generator=g) * 0.02
    qw = torch.from_numpy(realistic_imatrix(2048, np.random.default_rng(14)))
    cpu = F.fake_quant(w, name, qw)
    gpu = F.fake_quant(w.cuda(), name, qw.cuda())
    assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)
    assert np.array_equal(F.quantize(w.cuda(), name, qw.cuda()), F.quantize(w, name, qw))
