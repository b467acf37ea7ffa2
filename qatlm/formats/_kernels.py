"""Whole-tensor kernels built from a format's pure steps, compiled on CPU where it pays.

Eager PyTorch runs a block format as ~15 separate passes over memory; torch.compile (Inductor's C++
backend) fuses pack(encode(x)) into one vectorized, multi-threaded loop: on the 2-core reference machine
that quantizes a 262144 x 640 tensor ~5x faster than ggml's own C reference and >10x faster than gguf-py
(benchmarks/quantize_speed.py). The compiled code is the same torch program, and it stays bit-exact
because Inductor builds C++ with -ffp-contract=off (no FMA; pinned below so an environment variable
cannot change it) and is told to honour the fp16 rounding of the scales (emulate_precision_casts:
without it, Inductor drops the fp32 -> fp16 -> fp32 round trip and fake quant drifts off the export). The tests run both the eager and the compiled kernels against libggml byte for byte.

The search formats (the K-quants, IQ4_NL, IQ4_XS) run eager: their searches unroll into graphs of thousands of
nodes that Inductor takes minutes to compile (162 s for Q4_K, measured) for a 2x gain. The affine grid search
(Q4_K, Q5_K, Q2_K; Q4_1 / Q5_1 / Q4_K / Q5_K with an imatrix) instead compiles one grid step, a small static graph
(~9 s cold), called 21-37 times per slice of sub-blocks: ~3x faster, used for jobs large enough to pay it back;
make_qx_quants (Q6_K's search; with an imatrix Q3_K's, and Q4_0 / Q5_0's in a one-off quantize) compiles whole, a
pointwise graph over its [19, sub-blocks] state (compiled_qx_search: ~9x faster), and so does one pass of Q3_K's
coordinate descent (compiled_q3_pass: ~8x), likewise for large jobs.
With an importance matrix (run_imatrix) the exact rules run; for Q4_0/Q5_0 (the default QAT job's imatrix rule,
whose fake quant runs on every weight at every step) they are compiled on large CPU tensors for training's fake
quant: make_qx_quants keeps its 19 grids as one [19, blocks] state updated element by element (_weighted), a
graph of a few hundred pointwise nodes that Inductor fuses into one loop over the blocks (compiled once per
machine: Inductor caches it on disk). An earlier compiled version, one grid at a time with amax/argmax
reductions and clamp before nan_to_num, disagreed with libggml on extreme magnitudes; this one uses only
pointwise steps whose fp32 semantics Inductor's C++ keeps (NaN handled before any min/max), and
tests/test_formats_imatrix_compiled.py checks it against libggml byte for byte on every case family, after the
other compiled kernels have run in the same process.
Small tensors and CUDA use the eager kernels: compiling costs seconds once per process (less with
Inductor's on-disk cache), and Triton fuses multiply-adds into FMAs by default, which would change
rounding. QATLM_COMPILE=0 turns compilation off; if compilation itself fails (no C++ compiler), qatlm
warns once and continues on the eager kernels, which give identical bytes, only slower.
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings
from typing import Callable

import torch

from ._base import BlockFormat, Codes
from . import _kbase, _weighted, q3_k
from ._kbase import seq_sum
from ._weighted import block_weights, row_sigma2

COMPILE_MIN_ELEMENTS = 1 << 20  # below this, compile time is not paid back in one call
EAGER_CHUNK = 1 << 18  # elements per eager step: intermediates stay cache-sized
IMATRIX_CHUNK = 1 << 19  # elements per step of the imatrix searches, whose inner loops run row by row
IMATRIX_COMPILE_MIN_ELEMENTS = 1 << 16  # one dynamic-shape graph serves every tensor of a run: compile it early
COMPILED_CHUNK = 1 << 22  # elements per compiled step: bounds peak memory of the outputs

FORCE_EXACT = False  # tests: run the exact branch-free rules (the CUDA path) on CPU for every block
_compiled: dict[tuple[str, str], Callable] = {}
_compile_failed = False


def quantize_blocks(f: BlockFormat, blocks: torch.Tensor):
    """fp32 [n, B] -> uint8 [n, type_size] GGUF bytes (exact rules everywhere)."""
    return f.pack(f.encode(blocks))


def fake_blocks(f: BlockFormat, blocks: torch.Tensor):
    """fp32 [n, B] -> fp32 [n, B]: quantized then dequantized, without materializing bytes."""
    return f.decode(f.encode(blocks))


def dequantize_blocks(f: BlockFormat, raw: torch.Tensor):
    """uint8 [n, type_size] -> fp32 [n, B]."""
    return f.decode(f.unpack(raw))


def quantize_blocks_fast(f: BlockFormat, blocks: torch.Tensor):
    """Common-case rules only: (bytes, blocks to redo exactly [n, 1], finite blocks [n, 1])."""
    codes = f.encode(blocks, fast=True)
    return f.pack(codes), codes.fix, codes.finite


def fake_blocks_fast(f: BlockFormat, blocks: torch.Tensor):
    codes = f.encode(blocks, fast=True)
    return f.decode(codes), codes.fix, codes.finite


_EXACT = {"quantize": quantize_blocks, "fake": fake_blocks, "dequantize": dequantize_blocks}
_FAST = {"quantize": quantize_blocks_fast, "fake": fake_blocks_fast, "dequantize": dequantize_blocks}


def compile_enabled() -> bool:
    return os.environ.get("QATLM_COMPILE", "1") != "0" and not _compile_failed


def _exact_inductor() -> None:
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    # each kernel kind is one code object (e.g. _compiled_kernel's lambda) compiled once per format, a recompile in
    # Dynamo's eyes: past its limit (8) a fullgraph compile fails and every format after it would run eager
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)

    inductor_config.cpp.enable_floating_point_contract_flag = "off"  # no FMA: exactness depends on it
    # keep fp32 -> fp16 -> fp32 round trips of the scales: by default Inductor elides such casts
    inductor_config.emulate_precision_casts = True


def _compiled_kernel(f: BlockFormat, kind: str) -> Callable:
    key = (f.name, kind)
    if key not in _compiled:
        _exact_inductor()
        fn = _FAST[kind]
        _compiled[key] = torch.compile(lambda x: fn(f, x), dynamic=True, fullgraph=True)
    return _compiled[key]


def _imatrix_kernel(f: BlockFormat, kind: str, blocks, qw, sig):
    codes = f.encode_imatrix(blocks, qw, sig)
    return f.pack(codes) if kind == "quantize" else f.decode(codes)


_IMATRIX_COLUMNS = {"fake": "fake_imatrix_columns", "codes": "imatrix_codes_columns"}  # kind -> BlockFormat method


def _compiled_imatrix(f: BlockFormat, kind: str) -> Callable:
    """(x [B, nb, r], qw [B, nb, 1], sigma2 [1, 1, r]) -> f.<method>(x, weights) (block element first, rows
    innermost: see run_imatrix): two compiled graphs, the block weights and then the search, so that the weights
    are computed once (see _weighted.fake_symmetric_imatrix_columns). kind: "fake" (f.fake_imatrix_columns: the
    fake-quantized values [B, nb, r], training's fake quant) or "codes" (f.imatrix_codes_columns: the search's
    decisions, d [nb, r] fp16 and codes [B, nb, r], training with learned block scales: encode_rows)."""
    key = (f.name, f"{kind}+imatrix")
    method = _IMATRIX_COLUMNS[kind]
    if key not in _compiled:
        _exact_inductor()
        weights = torch.compile(block_weights, dynamic=True, fullgraph=True)
        search = torch.compile(lambda x, w: getattr(f, method)(x, w), dynamic=True, fullgraph=True)
        _compiled[key] = lambda x, qw, sig: search(x, weights(x, qw, sig))
    return _compiled[key]


def _call_compiled_imatrix(f: BlockFormat, kind: str, part: torch.Tensor, imatrix: torch.Tensor):
    """_compiled_imatrix(f, kind) on fp32 rows `part` [r, width] laid out in columns, or None if compiling is
    unavailable. [nb, B, r]: C's order along a row (block, then element) outermost, so sigma2 (the mean x^2 of each
    row) is a sequential column sum, and the rows innermost, so the search's vectors run along contiguous memory."""
    r, width = part.shape
    bs = f.block_size
    nb = width // bs
    x = part.view(r, nb, bs).permute(1, 2, 0).contiguous()
    sig = seq_sum((x * x).view(width, r), from_zero=False) / float(width)
    return _call_compiled(_compiled_imatrix(f, kind), x.transpose(0, 1), imatrix.view(nb, bs, 1).transpose(0, 1),
                          sig.view(1, 1, r))


def encode_rows(f: BlockFormat, rows: torch.Tensor, imatrix: torch.Tensor | None = None) -> Codes:
    """The exact Codes of a whole [R, width] float tensor: q [R, width] as stored, d [R, width // B] fp16, m the
    same or None (32-weight formats; `imatrix` fp32 [width] or None). What training with learned block scales
    computes at every step; with an imatrix on large CPU tensors, Q4_0/Q5_0's search runs compiled as in
    run_imatrix (same decisions: the same fp32 program)."""
    width, bs = rows.shape[1], f.block_size
    nb = width // bs
    use_compiled = (imatrix is not None and rows.device.type == "cpu" and f.imatrix_codes_columns is not None
                    and compile_enabled() and rows.numel() >= IMATRIX_COMPILE_MIN_ELEMENTS)
    sigma2 = None
    step = max(1, (COMPILED_CHUNK if use_compiled else IMATRIX_CHUNK) // max(1, width))
    qs, ds, ms = [], [], []
    for a in range(0, rows.shape[0], step):
        part = rows[a:a + step].to(torch.float32)
        r = part.shape[0]
        if use_compiled:
            res = _call_compiled_imatrix(f, "codes", part, imatrix)
            if res is not None:
                d, L = res
                qs.append(L.permute(2, 1, 0).reshape(r, width).to(torch.uint8))
                ds.append(d.T.contiguous())
                continue
            use_compiled = False
        blocks = part.reshape(-1, bs)
        if imatrix is None:
            c = f.encode(blocks)
        else:
            if sigma2 is None and f.imatrix_use == "row":
                sigma2 = row_sigma2(rows.to(torch.float32))
            qw = imatrix.view(1, nb, bs).expand(r, nb, bs).reshape(-1, bs)
            sig = None if sigma2 is None else sigma2[a:a + r].expand(r, nb).reshape(-1, 1)
            c = f.encode_imatrix(blocks, qw, sig)
        qs.append(c.q.reshape(r, width))
        ds.append(c.d.reshape(r, nb))
        if c.m is not None:
            ms.append(c.m.reshape(r, nb))
    return Codes(torch.cat(qs), torch.cat(ds), torch.cat(ms) if ms else None)


GRID_SLICE = 1 << 13  # sub-blocks per compiled grid search: one static shape for every tensor (padded)
# Compiling the affine grid search (Q4_K, Q5_K, Q2_K; with an imatrix Q4_1, Q5_1 too) pays back from about this
# many weights in one call: its step graph compiles in ~9 s cold (~3 s from Inductor's disk cache) and saves
# ~90 ns per weight (Q4_K on 20.9M weights: 2.8 s eager, 0.86 s with the compiled step; 2-core Zen 5)
GRID_COMPILE_MIN_ELEMENTS = 1 << 27


def _grid_step_kernel(nmax: int, mad: bool, n: int) -> Callable:
    key = (f"grid_step{nmax}/{int(mad)}/{n}", "search")
    if key not in _compiled:
        _exact_inductor()
        _compiled[key] = torch.compile(functools.partial(_kbase.grid_step, nmax=nmax, mad=mad), dynamic=False,
                                       fullgraph=True)
    return _compiled[key]


def compiled_grid_search(x, w, sum_w, sum_x, mx, state, numers, nmax: int, mad: bool):
    """_kbase.affine_grid_search with each grid_step torch.compile'd (one fused pass over the sub-blocks instead of
    ~20 eager ones; the same fp32 operations, so the same bytes: the tests run both against libggml): the
    sub-blocks go GRID_SLICE at a time, all grids on one slice before the next, the last slice zero-padded, so
    every tensor of every width uses one static-shape graph per (nmax, mad, sub-block size)."""
    kernel = _grid_step_kernel(nmax, mad, x.shape[0])
    S = x.shape[1]
    out = tuple(t.clone() for t in state)  # (L, best, scale, min)
    for a in range(0, S, GRID_SLICE):
        n = min(GRID_SLICE, S - a)
        part = [t[..., a:a + n] for t in (x, w, sum_w, sum_x, mx) + state]
        if n < GRID_SLICE:
            part = [torch.nn.functional.pad(t, (0, GRID_SLICE - n)) for t in part]
        else:
            part = [t.contiguous() for t in part]
        px, pw, psw, psx, pmx, L, best, scale, mn = part
        for numer in numers:
            r = _call_compiled(kernel, px, pw, psw, psx, mn, pmx, L, best, scale, numer) if not _compile_failed else None
            if r is None:  # compilation unavailable: this slice eager from its start (same bytes)
                L, best, scale, mn = part[5:]
                for nm in numers:
                    L, best, scale, mn = _kbase.grid_step(px, pw, psw, psx, mn, pmx, L, best, scale, nm, nmax, mad)
                break
            L, best, scale, mn = r
        for o, t in zip(out, (L, best, scale, mn)):
            o[..., a:a + n] = t[..., :n]
    return out


# make_qx_quants compiled (Q6_K's search on every sub-block of 16; with an imatrix also Q3_K's, and Q4_0 / Q5_0's
# in a one-off quantize): ~20 s to compile cold, ~10 s from Inductor's disk cache, then ~9x faster than eager (Q6_K,
# 20.9M weights: 7.1 -> 0.8 s, 2-core Zen 5 with a second job running), ~300 ns saved per weight: it pays back from
# ~2^25 weights in one call, and on every later call of the process once compiled (_qx_compiled)
QX_COMPILE_MIN_ELEMENTS = 1 << 25


REUSE_COMPILED_QX = True  # tests turn it off to run the eager search after the compiled one was built


def _qx_compiled() -> bool:
    return REUSE_COMPILED_QX and any(kind == "search" and name.startswith(("qx", "q3pass")) for name, kind in _compiled)


def compiled_qx_search(x: torch.Tensor, nmax: int, w: torch.Tensor):
    """_weighted.make_qx_quants(x, nmax, w) torch.compile'd (dynamic shapes: one graph per nmax serves every block
    size and count): the same fp32 program, so the same decisions (the format tests run it against libggml on
    every case family). None if compiling is unavailable (the caller then runs eager)."""
    return _compiled_search(f"qx{nmax}", lambda x, w: _weighted.make_qx_quants(x, nmax, w), x, w)


def compiled_q3_pass(x, w, wx, L, sumlx, suml2):
    """q3_k.descent_pass torch.compile'd (Q3_K's coordinate descent: ~13 s to compile cold, then ~8x faster than
    eager: 5.2M weights 0.63 -> 0.08 s; the same fp32 program, tested against libggml like the eager one), or None
    if compiling is unavailable."""
    return _compiled_search("q3pass", q3_k.descent_pass, x, w, wx, L, sumlx, suml2)


def _compiled_search(name: str, fn: Callable, *args):
    """fn(*args) torch.compile'd once per process under `name` (dynamic shapes: one graph for every tensor), or
    None if compiling is unavailable."""
    key = (name, "search")
    if key not in _compiled:
        _exact_inductor()
        _compiled[key] = torch.compile(fn, dynamic=True, fullgraph=True)
    return None if _compile_failed else _call_compiled(_compiled[key], *args)


@contextlib.contextmanager
def compiled_searches(grid: bool, qx: bool = False):
    """Within: the K-quant grid searches (compiled_grid_search) when `grid`, and make_qx_quants
    (compiled_qx_search) and Q3_K's descent (compiled_q3_pass) when `qx`, run compiled, if compiling is on."""
    saved = _kbase.compiled_grid_search, _weighted.compiled_qx_search, q3_k.compiled_descent_pass
    if compile_enabled():
        if grid:
            _kbase.compiled_grid_search = compiled_grid_search
        if qx:
            _weighted.compiled_qx_search = compiled_qx_search
            q3_k.compiled_descent_pass = compiled_q3_pass
    try:
        yield
    finally:
        _kbase.compiled_grid_search, _weighted.compiled_qx_search, q3_k.compiled_descent_pass = saved


def _call_compiled(kernel: Callable, *args):
    """kernel(*args), or None after saying once that compilation is unavailable (the caller then runs eager)."""
    global _compile_failed
    try:
        return kernel(*args)
    except Exception as e:  # no compiler, unsupported platform: say so once, stay exact
        _compile_failed = True
        warnings.warn(f"qatlm: torch.compile unavailable ({type(e).__name__}: {str(e)[:200]}); "
                      "using eager kernels (identical bytes, slower). Set QATLM_COMPILE=0 to skip trying.")
        return None


def run(f: BlockFormat, kind: str, rows: torch.Tensor, out: torch.Tensor, compile: bool | None = None) -> bool:
    """Apply kernel `kind` ("quantize", "fake", "dequantize") to `rows` ([R, width]: floats, or bytes for
    "dequantize") in chunks of whole rows, writing the matching rows of `out`. Returns whether every
    input value was finite (always True for "dequantize" and on CUDA, which never syncs to check).

    On CPU: the fast rules (torch.compile'd when enabled and `compile` says so; None: when the tensor is large),
    then the flagged corner blocks redone with the exact rules, so the result is exact. On CUDA: the exact,
    branch-free rules.
    """
    cpu = rows.device.type == "cpu"
    fast = cpu and not FORCE_EXACT
    large = rows.numel() >= COMPILE_MIN_ELEMENTS
    use_compiled = fast and f.compile and compile_enabled() and (large if compile is None else compile)
    # the search formats compile only their searches (the affine grid's step, make_qx_quants), for large jobs
    search = fast and not f.compile and kind != "dequantize"
    n = rows.numel()
    if compile is None:  # by size: where compiling pays back within the call (or was already paid in this process)
        grid_on, qx_on = n >= GRID_COMPILE_MIN_ELEMENTS, n >= QX_COMPILE_MIN_ELEMENTS or _qx_compiled()
    else:
        grid_on = qx_on = compile
    with compiled_searches(search and grid_on, search and qx_on):
        return _run(f, kind, rows, out, fast, use_compiled)


def _run(f: BlockFormat, kind: str, rows: torch.Tensor, out: torch.Tensor, fast: bool, use_compiled: bool) -> bool:
    step = max(1, (COMPILED_CHUNK if use_compiled else EAGER_CHUNK) // max(1, rows.shape[1]))
    width = f.type_size if kind == "dequantize" else f.block_size
    finite = True
    for a in range(0, rows.shape[0], step):
        part = rows[a:a + step]
        part = (part if kind == "dequantize" else part.to(torch.float32)).reshape(-1, width)
        result = _call_compiled(_compiled_kernel(f, kind), part) if use_compiled else None
        if result is None:
            use_compiled = False
            result = (_FAST if fast else _EXACT)[kind](f, part)
        if isinstance(result, tuple):  # fast rules: redo the flagged corner blocks exactly
            result, fix, ok = result
            finite = finite and bool(ok.all())
            idx = fix.view(-1).nonzero().view(-1)
            if idx.numel():
                result[idx] = _EXACT[kind](f, part[idx])
        out[a:a + step] = result.view(min(step, rows.shape[0] - a), -1)
    return finite


def run_imatrix(f: BlockFormat, kind: str, rows: torch.Tensor, out: torch.Tensor, imatrix: torch.Tensor) -> bool:
    """As `run` ("quantize" or "fake"), with an importance matrix: imatrix fp32 [width], one weight per column,
    on rows' device. Always the exact, branch-free rules (f.encode_imatrix); for training's fake quant of Q4_0 /
    Q5_0 on large CPU tensors, torch.compile'd (module docstring; the compile pays back within a training run,
    while a one-off `quantize --imatrix` stays eager, whose cold call would not). Returns whether rows were all
    finite (checked for "quantize" on CPU only; True otherwise).
    """
    cpu, n = rows.device.type == "cpu", rows.numel()
    with compiled_searches(cpu and n >= GRID_COMPILE_MIN_ELEMENTS,
                           cpu and (n >= QX_COMPILE_MIN_ELEMENTS or _qx_compiled())):
        return _run_imatrix(f, kind, rows, out, imatrix)


def _run_imatrix(f: BlockFormat, kind: str, rows: torch.Tensor, out: torch.Tensor, imatrix: torch.Tensor) -> bool:
    width, bs = rows.shape[1], f.block_size
    nb = width // bs
    finite = True
    check = kind == "quantize" and rows.device.type == "cpu"  # fake quant's callers do not ask
    use_compiled = (kind == "fake" and rows.device.type == "cpu" and f.fake_imatrix_columns is not None
                    and compile_enabled() and rows.numel() >= IMATRIX_COMPILE_MIN_ELEMENTS)
    # the mean x^2 of each whole row (ggml quantize_row_q4_0_impl & co.), summed in C order over the row
    sigma2 = (row_sigma2(rows.to(torch.float32)) if f.imatrix_use == "row" and not use_compiled
              else None)  # [R, 1]
    step = max(1, (COMPILED_CHUNK if use_compiled else IMATRIX_CHUNK) // max(1, width))
    for a in range(0, rows.shape[0], step):
        part = rows[a:a + step].to(torch.float32)
        r = part.shape[0]
        if check:
            finite = finite and bool(torch.isfinite(part).all())
        if use_compiled:
            vals = _call_compiled_imatrix(f, "fake", part, imatrix)
            if vals is not None:
                out[a:a + r].view(r, nb, bs).copy_(vals.permute(2, 1, 0))
                continue
            use_compiled = False
            if f.imatrix_use == "row":
                sigma2 = row_sigma2(rows.to(torch.float32))
        blocks = part.reshape(-1, bs)  # [r * nb, B]
        qw = imatrix.view(1, nb, bs).expand(r, nb, bs).reshape(-1, bs)
        sig = None if sigma2 is None else sigma2[a:a + r].expand(r, nb).reshape(-1, 1)
        out[a:a + step] = _imatrix_kernel(f, kind, blocks, qw, sig).reshape(r, -1)
    return finite
