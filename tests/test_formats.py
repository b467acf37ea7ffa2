"""Byte equality of qatlm.formats with ggml's C quantizers (libggml, through llama-cpp-python) and with
gguf-py's numpy quantizers.

ggml is the ground truth. gguf-py agrees with it everywhere except one corner, which these tests pin
down: in a block whose largest |x| is 0 (Q4_0/Q5_0) or whose minimum is a zero (Q4_1/Q5_1), C and gguf-py
may store the fp16 scale d / minimum m with opposite signs of zero. qatlm follows C; the dequantized
values are the same either way.

Each case runs through every kernel path (eager, torch.compile'd where the format compiles, and the exact
branch-free path CUDA uses; the search formats, which have no separate fast rules, run eager here and
test_exact_path_equals_eager checks their exact path); together the case families cover over 32M weights per
format (1M blocks of 32, 128K super-blocks of 256; see test_weight_count_covers_a_million_blocks). No
tolerances: byte equality.

The K-quants (Q2_K..Q6_K) and IQ4_NL / IQ4_XS are checked against libggml only: gguf-py can dequantize them but
not quantize.
"""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

import qatlm.formats as F
from qatlm.formats import _kernels
from ggml_ref import ggml_quantize

FORMATS = F.names()
GGUF_PY_QUANTIZES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")  # the rest: libggml is the only reference
# formats whose encode has no separate fast rules (fast=True only adds flags): one kernel path is enough here
SEARCH = tuple(n for n in FORMATS if not F.get(n).compile)
# search formats whose searches (affine grid, make_qx_quants, Q3_K's descent) large jobs run compiled
GRID = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
SIGN_FIELD = {"q4_0": 1, "q5_0": 1, "q4_1": 3, "q5_1": 3}  # byte holding the fp16 sign bit of d or m


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN == NaN): a block whose fp16 scale overflowed to inf dequantizes 0 * inf = NaN."""
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def ref_quantize(w: np.ndarray, name: str) -> np.ndarray:
    return quants.quantize(np.ascontiguousarray(w, dtype=np.float32), GGMLQuantizationType[name.upper()])


def first_diff(ours, ref, w, f, label):
    bad = np.nonzero((ours.reshape(-1, f.type_size) != ref.reshape(-1, f.type_size)).any(1))[0]
    if len(bad) == 0:
        return
    blk = w.reshape(-1, f.block_size)[bad[0]]
    raise AssertionError(f"{f.name} vs {label}: {len(bad)} blocks differ; first {bad[0]}: {blk.tolist()}\n"
                         f"ours {ours.reshape(-1, f.type_size)[bad[0]]}\nref  {ref.reshape(-1, f.type_size)[bad[0]]}")


def assert_gguf_agrees_up_to_zero_sign(ours, w, f):
    ref = ref_quantize(w, f.name)
    assert ours.shape == ref.shape
    a, b = ours.reshape(-1, f.type_size).copy(), ref.reshape(-1, f.type_size).copy()
    differ = (a != b).any(1)
    if differ.any():
        assert f.name in SIGN_FIELD, f"{f.name}: gguf-py disagrees on {int(differ.sum())} blocks"
        blocks = w.reshape(-1, f.block_size)[differ]
        zero_case = (np.abs(blocks).max(1) == 0) if f.name in ("q4_0", "q5_0") else (blocks.min(1) == 0)
        assert zero_case.all(), "gguf-py differs from qatlm outside the signed-zero corner"
        a[:, SIGN_FIELD[f.name]] &= 0x7F
        b[:, SIGN_FIELD[f.name]] &= 0x7F
        first_diff(a, b, w, f, "gguf-py (zero sign masked)")


def assert_same_bytes(w, name):
    w = np.ascontiguousarray(w, dtype=np.float32)
    f = F.get(name)
    c_ref = ggml_quantize(w, name)
    modes = ("eager", "compiled", "exact") if f.compile else ("eager", "compiled") if name in GRID else ("eager",)
    for compiled in modes:
        with kernel_mode(compiled):
            ours = F.quantize(torch.from_numpy(w), name)
            assert ours.dtype == np.uint8 and ours.shape == c_ref.shape
            first_diff(ours, c_ref, w, f, f"libggml ({compiled})")
            # and the fake-quant path lands on exactly the dequantized bytes
            fq = F.fake_quant(torch.from_numpy(w), name)
            deq = F.dequantize(ours, name, w.shape)
            assert same_bits(fq, deq), f"{name}: fake_quant != dequantize(quantize)"
    if name in GGUF_PY_QUANTIZES:
        assert_gguf_agrees_up_to_zero_sign(ours, w, f)


class kernel_mode:
    """Force a kernel path: "eager" (fast rules + exact fix-up of flagged blocks), "compiled" (the same,
    torch.compile'd even for small tensors; the search formats' compiled grid step and make_qx_quants too) or
    "exact" (the branch-free exact rules on every block: the CUDA path, run on CPU)."""

    def __init__(self, mode):
        self.mode = {False: "eager", True: "compiled"}.get(mode, mode)

    def __enter__(self):
        self.saved = [getattr(_kernels, k) for k in self.KNOBS]
        compiled = self.mode == "compiled"
        for k in self.KNOBS[:3]:
            setattr(_kernels, k, 0 if compiled else 1 << 62)
        _kernels.REUSE_COMPILED_QX = compiled  # eager: even after the compiled search was built in this process
        _kernels.FORCE_EXACT = self.mode == "exact"

    def __exit__(self, *exc):
        for k, v in zip(self.KNOBS, self.saved):
            setattr(_kernels, k, v)

    KNOBS = ("COMPILE_MIN_ELEMENTS", "GRID_COMPILE_MIN_ELEMENTS", "QX_COMPILE_MIN_ELEMENTS", "REUSE_COMPILED_QX",
             "FORCE_EXACT")


WEIGHTS_SEEN = {name: 0 for name in FORMATS}


def run_case(w, name):
    assert_same_bytes(w, name)
    WEIGHTS_SEEN[name] += w.size


# ---- case families --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("scale", [1e-6, 0.02, 1.0, 300.0])
def test_gaussian(name, scale):
    rng = np.random.default_rng(int(scale * 1e6) % 2**32)
    rows = 2048 if name in SEARCH else 4096  # the searches are ~10x slower per weight; the suite still passes 32M
    run_case((rng.standard_normal((rows, 2048)) * scale).astype(np.float32), name)  # 131,072 / 262,144 blocks


@pytest.mark.parametrize("name", FORMATS)
def test_heavy_tailed_and_shifted(name):
    rng = np.random.default_rng(1)
    w = rng.standard_t(2, size=(2048, 1024)).astype(np.float32) + rng.uniform(-2, 2, size=(2048, 1)).astype(np.float32)
    run_case(w, name)


def _k_lattice(name, n_blocks, rng):
    """K-quant super-blocks on the format's own grid (random codes and sub-scales under a power-of-two d),
    with every other weight moved half a step: the searches meet exact ties between grids."""
    f = F.get(name)
    raw = rng.integers(0, 256, size=(n_blocks, f.type_size), dtype=np.uint8)
    d_at = (0, 2) if name == "q4_k" else (208,)  # fp16 fields: d and dmin / d
    for off in d_at:
        raw[:, off:off + 2] = (np.float16(2.0) ** rng.integers(-12, 8, size=n_blocks)).astype(np.float16).view(
            np.uint8).reshape(n_blocks, 2)
    x = F.dequantize(raw, name, (n_blocks, 256)).numpy().copy()
    codes = f.unpack(torch.from_numpy(raw))
    sub = 256 // codes.sc.shape[1]
    half = (codes.d.float() * codes.sc.float()).abs().numpy().repeat(sub, axis=1) / 2  # half a step
    x[:, ::2] += np.where(rng.random((n_blocks, 128)) < 0.5, half[:, ::2], -half[:, ::2])
    return x.astype(np.float32)


_MAX_CODE = {"q2_k": 3, "q3_k": 7, "q5_k": 31, "iq4_nl": 15, "iq4_xs": 15}
_FP16_AT = {"q2_k": (80, 82), "q3_k": (108,), "q5_k": (0, 2), "iq4_nl": (0,), "iq4_xs": (0,)}  # d (and dmin)


def _code_lattice(name, n_weights, rng):
    """Blocks of the format itself (random codes and sub-scales under power-of-two fp16 scales), dequantized,
    with every other weight moved to the midpoint toward the next code (for IQ4: the next codebook value):
    the searches meet values on their own grid and exact ties between neighbouring codes."""
    f = F.get(name)
    n = n_weights // f.block_size
    raw = rng.integers(0, 256, size=(n, f.type_size), dtype=np.uint8)
    for off in _FP16_AT[name]:
        raw[:, off:off + 2] = (np.float16(2.0) ** rng.integers(-12, 8, size=n)).astype(np.float16).view(
            np.uint8).reshape(n, 2)
    codes = f.unpack(torch.from_numpy(raw))
    up = f.pack(codes._replace(q=(codes.q.int() + 1).clamp(max=_MAX_CODE[name]).to(torch.uint8)))
    x0 = F.dequantize(raw, name, (n, f.block_size))
    x1 = F.dequantize(up, name, (n, f.block_size))
    x = torch.where(torch.from_numpy(rng.random((n, f.block_size)) < 0.5), (x0 + x1) / 2, x0)
    return x.numpy()


def _lattice_blocks(name, n_blocks, rng):
    """Blocks whose values sit exactly on the format's decision boundaries (half steps) and on its levels.

    s is a power of two so that d = s exactly and x*id is an exact half-integer: every tie rule shows.
    """
    if name in ("q4_k", "q6_k"):
        return _k_lattice(name, n_blocks // 8, rng)
    if name in _MAX_CODE:
        return _code_lattice(name, n_blocks * 32, rng)
    s = np.float32(2.0) ** rng.integers(-20, 10, size=(n_blocks, 1)).astype(np.float32)
    if name in ("q4_0", "q5_0"):
        half = 8 if name == "q4_0" else 16
        k = rng.integers(-2 * half, 2 * half, size=(n_blocks, 32))  # half-steps in [-half, half)
        x = (k.astype(np.float32) / 2) * s
        x[:, rng.integers(0, 32)] = -half * s[:, 0]  # the extreme: d = max / -half = s
    elif name in ("q4_1", "q5_1"):
        top = 15 if name == "q4_1" else 31
        m = (rng.integers(-64, 64, size=(n_blocks, 1)).astype(np.float32) / 4) * s
        k = rng.integers(0, 2 * top + 1, size=(n_blocks, 32))
        x = m + (k.astype(np.float32) / 2) * s
        x[:, 0] = m[:, 0]
        x[:, 31] = (m + top * s)[:, 0]
    else:  # q8_0: amax = 127 s -> d = s
        k = rng.integers(-254, 255, size=(n_blocks, 32))
        x = (k.astype(np.float32) / 2) * s
        x[:, rng.integers(0, 32)] = 127 * s[:, 0] * rng.choice([-1, 1])
    return x.astype(np.float32)


@pytest.mark.parametrize("name", FORMATS)
def test_exact_ties_and_half_steps(name):
    rng = np.random.default_rng(2)
    run_case(_lattice_blocks(name, 131072, rng).reshape(-1, 1024), name)


def test_round_half_away_is_c_roundf_on_every_float():
    """Q8_0's two-pass roundf against float64 (where y + 0.5 is exact) on every fp32 in [2^-3, 2^9) of both signs
    (201M values: all of Q8_0's codes, every tie, every float just below a tie), and 0.49999997 named."""
    from qatlm.formats.q8_0 import round_half_away

    for sign in (1, -1):
        for e in range(-3, 9):
            bits = np.arange(1 << 23, dtype=np.uint32) | np.uint32((127 + e) << 23)
            y = bits.view(np.float32) * np.float32(sign)
            ref = np.trunc(y.astype(np.float64) + np.copysign(0.5, y)).astype(np.int32)
            got = round_half_away(torch.from_numpy(y)).numpy()
            bad = np.flatnonzero(got != ref)
            assert bad.size == 0, f"roundf({y[bad[0]]!r}) = {ref[bad[0]]}, got {got[bad[0]]}"
    z = torch.tensor([0.49999997, -0.49999997, 0.5, -0.5, 2.5, -2.5, 1e-30, 0.0, -0.0])
    assert round_half_away(z).tolist() == [0, 0, 1, -1, 3, -3, 0, 0, 0]


@pytest.mark.parametrize("name", FORMATS)
def test_signed_max_ties_first_index_wins(name):
    """+a and -a in the same block: ggml keeps the first (strict <), which fixes the sign of d."""
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, size=(65536, 32)).astype(np.float32)
    i, j = rng.integers(0, 32, size=(2, 65536))
    a = rng.uniform(1, 2, size=65536).astype(np.float32)
    sign = rng.choice([-1, 1], size=65536).astype(np.float32)
    x[np.arange(65536), i] = a * sign
    x[np.arange(65536), j] = -a * sign
    run_case(x.reshape(-1, 256), name)


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_representable_inputs(name, dtype):
    """fp16 / bf16 weights (the usual checkpoint dtypes), upcast exactly to fp32."""
    g = torch.Generator().manual_seed(4)
    w = (torch.randn(2048, 2048, generator=g) * 0.05).to(dtype)
    run_case(w.float().numpy(), name)
    # the public API also takes the low-precision tensor directly, with the same bytes
    assert np.array_equal(F.quantize(w, name), ggml_quantize(w.float().numpy(), name))


@pytest.mark.parametrize("name", FORMATS)
def test_requantized_q5_0_lattice(name):
    """Weights that were themselves dequantized Q5_0 (a GGUF teacher): half of them sit on Q4_0 boundaries."""
    g = torch.Generator().manual_seed(5)
    w = F.fake_quant(torch.randn(2048, 1024, generator=g) * 0.03, "q5_0")
    run_case(w.numpy(), name)


@pytest.mark.parametrize("name", FORMATS)
def test_zero_and_single_nonzero_blocks(name):
    rng = np.random.default_rng(6)
    n = 65536
    x = np.zeros((n, 32), np.float32)
    one = rng.integers(0, 32, size=n)
    vals = rng.standard_normal(n).astype(np.float32) * np.float32(10.0) ** rng.integers(-8, 8, size=n)
    x[np.arange(n), one] = vals
    x[: n // 8] = 0.0  # whole zero blocks
    x[n // 8: n // 4] = -0.0  # negative zeros
    x[n // 4: n // 2: 3, 0] = -0.0  # a -0.0 first, then the single nonzero (or zeros)
    x[n // 4 + 1: n // 2: 3] = np.where(rng.random((len(range(n // 4 + 1, n // 2, 3)), 32)) < 0.5, -0.0, 0.0)
    run_case(x.reshape(-1, 512), name)


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("exp", [-44, -40, -38, -30, -8, 8, 30, 37, 38])
def test_extreme_magnitudes(name, exp):
    """Very small (down to fp32 subnormals, where 1/d overflows) and very large (where max - min and fp16(d)
    overflow) magnitudes. Mixed in gaussians so the same row holds normal blocks too."""
    rng = np.random.default_rng(exp + 100)
    x = rng.uniform(-3.4, 3.4, size=(16384, 32)).astype(np.float32)
    x[::2] *= np.float32(10.0) ** exp if exp < 38 else np.float32(1e38)
    run_case(x.reshape(-1, 256), name)


def test_weight_count_covers_a_million_blocks():
    """The suite above must have pushed at least 1M blocks of 32 (32M weights; for the K-quants, 128K
    super-blocks) through each format (run after the others)."""
    if min(WEIGHTS_SEEN.values()) == 0:
        pytest.skip("run together with the case families (pytest -p no:randomly tests/test_formats.py)")
    assert min(WEIGHTS_SEEN.values()) >= 32 * 1_000_000, WEIGHTS_SEEN


@pytest.mark.parametrize("name", SEARCH)
def test_exact_path_equals_eager(name):
    """The search formats' exact branch-free kernel (the CUDA path, run on CPU) writes the eager path's bytes, and
    libggml's: checked once here on gaussian, lattice, zero and tiny blocks rather than on every family above."""
    rng = np.random.default_rng(13)
    w = np.concatenate([(rng.standard_normal((64, 1024)) * 0.02).astype(np.float32),
                        _lattice_blocks(name, 2048, rng).reshape(-1, 1024),
                        np.zeros((2, 1024), np.float32),
                        (rng.standard_normal((2, 1024)) * 1e-30).astype(np.float32)])
    out = {}
    for mode in ("eager", "exact"):
        with kernel_mode(mode):
            out[mode] = F.quantize(torch.from_numpy(w), name), F.fake_quant(torch.from_numpy(w), name)
    assert np.array_equal(out["eager"][0], out["exact"][0]) and same_bits(out["eager"][1], out["exact"][1])
    first_diff(out["exact"][0], ggml_quantize(w, name), w, F.get(name), "libggml (exact)")


# ---- dequantize, fake quant, gradients ------------------------------------------------------------

@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("compiled", ["eager", "compiled"])
def test_dequantize_matches_gguf_on_arbitrary_bytes(name, compiled):
    """Any bytes, including fp16 scales that are inf/NaN/subnormal: same floats (NaN where gguf has NaN)."""
    f = F.get(name)
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 256, size=(512, 64 * f.type_size), dtype=np.uint8)
    with kernel_mode(compiled):
        ours = F.dequantize(raw, name, (512, 64 * f.block_size)).numpy()
    ref = quants.dequantize(raw, GGMLQuantizationType[name.upper()])
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fake_quant_equals_dequantized_export(name, dtype):
    g = torch.Generator().manual_seed(8)
    w = (torch.randn(512, 1024, generator=g) * 0.1).to(dtype)
    fq = F.fake_quant(w, name)
    assert fq.dtype == torch.float32 and fq.shape == w.shape
    assert same_bits(fq, F.dequantize(F.quantize(w, name), name, w.shape))


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_straight_through_gradient(name, dtype):
    g = torch.Generator().manual_seed(9)
    w = (torch.randn(64, 256, generator=g)).to(dtype).requires_grad_()
    up = torch.randn(64, 256, generator=g)
    (F.fake_quant(w, name) * up).sum().backward()
    assert w.grad.dtype == dtype
    assert torch.equal(w.grad, up.to(dtype))  # identity: d fake_quant / d w = 1


def test_fake_quant_trains_through_a_linear():
    """The estimator is usable end to end: a fake-quantized linear layer reduces a regression loss."""
    g = torch.Generator().manual_seed(10)
    target = torch.randn(32, 64, generator=g)
    x = torch.randn(256, 64, generator=g)
    y = x @ target.T
    w = torch.zeros(32, 64, requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.05)
    losses = []
    for _ in range(60):
        loss = ((x @ F.fake_quant(w, "q4_0").T - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", FORMATS)
def test_cuda_matches_cpu(name):
    g = torch.Generator().manual_seed(11)
    w = torch.randn(4096, 2048, generator=g) * 0.02
    w[:64] = torch.from_numpy(_lattice_blocks(name, 4096, np.random.default_rng(12)).reshape(-1, 2048)[:64])
    cpu = F.fake_quant(w, name)
    gpu = F.fake_quant(w.cuda(), name)
    assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)
    assert torch.equal(F.dequantize(F.quantize(w.cuda(), name), name, w.shape), cpu)


# ---- metadata and errors --------------------------------------------------------------------------

def test_registry_metadata():
    expect = {"q4_0": (32, 18, 4.5), "q4_1": (32, 20, 5.0), "q5_0": (32, 22, 5.5), "q5_1": (32, 24, 6.0),
              "q8_0": (32, 34, 8.5), "q2_k": (256, 84, 2.625), "q3_k": (256, 110, 3.4375), "q4_k": (256, 144, 4.5),
              "q5_k": (256, 176, 5.5), "q6_k": (256, 210, 6.5625), "iq4_nl": (32, 18, 4.5),
              "iq4_xs": (256, 136, 4.25)}
    for name, (bs, ts, bpw) in expect.items():
        f = F.get(name)
        assert (f.block_size, f.type_size, f.bits_per_weight) == (bs, ts, bpw)
        assert f.ggml_type == int(GGMLQuantizationType[name.upper()])
        assert quants.GGML_QUANT_SIZES[GGMLQuantizationType[name.upper()]] == (bs, ts)
    assert set(expect) <= set(F.names())
    assert F.get("Q4_0") is F.get("q4_0")


def test_unknown_format_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown block format 'q3_x'.*q4_0.*q8_0"):
        F.quantize(torch.zeros(1, 32), "q3_x")


@pytest.mark.parametrize("name", FORMATS)
def test_bad_inputs(name):
    bs = F.get(name).block_size
    with pytest.raises(ValueError, match=f"not a multiple of the block size {bs}"):
        F.quantize(torch.zeros(2, 48), name)
    with pytest.raises(ValueError, match="not a multiple"):
        F.fake_quant(torch.zeros(2, 48), name)
    with pytest.raises(ValueError, match="2-D"):
        F.quantize(torch.zeros(64), name)
    with pytest.raises(ValueError, match="2-D"):
        F.fake_quant(torch.zeros(2, 2, 32), name)
    for bad in (float("nan"), float("inf"), float("-inf")):
        w = torch.zeros(3, 2 * bs)
        w[2, 33] = bad
        with pytest.raises(ValueError, match=r"NaN or inf \(first at row 2, col 33\)"):
            F.quantize(w, name)
    with pytest.raises(ValueError, match="bytes do not hold"):
        F.dequantize(np.zeros(F.get(name).type_size + 1, np.uint8), name, (1, bs))
    with pytest.raises(ValueError, match="floating-point"):
        F.quantize(torch.zeros(1, bs, dtype=torch.int32), name)


@pytest.mark.parametrize("width", [1, 2, 15, 16, 17, 64, 1000])
def test_seq_sum_is_the_c_loop_bit_for_bit(width):
    """The K-quant searches' sums (numpy's add.reduce on CPU, the torch loop otherwise) against C's
    `sum += x[i]` loop replayed one fp32 add at a time: mixed magnitudes, signed zeros, inf and NaN, a
    non-contiguous input, both initialisations (from 0, from the first term)."""
    from qatlm.formats._kbase import seq_sum
    rng = np.random.default_rng(width)
    for k in (2, 8, 9, 32, 256):
        a = (rng.standard_normal((k, width)) * 2.0 ** rng.integers(-30, 30, (k, width))).astype(np.float32)
        a[:, ::5] = -0.0  # an all -0.0 column: (0 + -0) + ... is +0, -0 + ... is -0
        if width > 3:
            a[0, 1], a[k // 2, 2], a[-1, 3] = np.inf, np.nan, -np.inf
        for t in (torch.from_numpy(a), torch.from_numpy(np.asfortranarray(a))):
            for from_zero in (True, False):
                ref = np.float32(0.0) + a[0] if from_zero else a[0].copy()
                for i in range(1, k):
                    ref = (ref + a[i]).astype(np.float32)
                got = seq_sum(t, from_zero=from_zero).numpy()
                assert np.array_equal(got.view(np.int32), ref.view(np.int32)), (k, from_zero)
