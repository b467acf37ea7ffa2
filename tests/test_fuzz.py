"""Hostile input (issue 14): seeded fuzzing of every command that reads user files, plus one focused test per
bug the first fuzzing pass found.

Valid seeds are built here (a 2-layer Llama as a Hugging Face directory and as a GGUF, its imatrix, training
text, a one-step training run) and mutated: GGUF headers field by field (interesting integers, bit flips,
truncation, insertion), GGUF files rewritten with bad metadata or weights, config.json fields and whole files,
safetensors files and indexes, tokenizer files, JSONL rows, run directories, imatrix files. Each case runs
`qatlm.cli.main([...])` in-process (stderr captured; a per-case alarm turns a hang into a failure) and must end
either in a clean refusal (exit code 2, exactly one stderr line `qatlm CMD: error: ...` naming the file, no
traceback, an existing output untouched and no temporary left behind) or, for mutations a valid file can
survive, in a correct result; mutations that damage the model (layers dropped, weights re-initialized or cast,
NaN) must be refused. Special files (FIFOs) are read in a subprocess with a timeout, since a blocked open()
could otherwise hang the test run.

    pytest -s tests/test_fuzz.py                # prints the counts per family
    QATLM_FUZZ_SEED=7 QATLM_FUZZ_SCALE=3 pytest -s tests/test_fuzz.py    # another seed, 3x the cases
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

from qatlm.cli import main
from tiny_models import TEXT, tiny_llama

SEED = int(os.environ.get("QATLM_FUZZ_SEED", "0"))
SCALE = float(os.environ.get("QATLM_FUZZ_SCALE", "1"))
CASE_TIMEOUT = 30  # seconds; every case here takes well under one
STATS: dict[str, Counter] = defaultdict(Counter)
SECONDS: dict[str, float] = defaultdict(float)


def n(count: int) -> int:
    return max(1, int(count * SCALE))


class Hang(BaseException):
    """Raised by the alarm: a BaseException, so that no `except Exception` in the code under test swallows it."""


def _alarm(signum, frame):
    raise Hang()


# ---- the harness --------------------------------------------------------------------------------------------

_BAR = re.compile(r"\d+%\|.*\|\s*\d+/\d+ \[|\|\s*\d+/\d+ \[")  # a tqdm progress bar (redrawn with \r)


def error_lines(text: str) -> list[str]:
    """What stderr says, without the progress bars a command drew before it stopped."""
    return [ln for ln in re.split(r"[\r\n]+", text) if ln.strip() and not _BAR.search(ln)]


class Family:
    """Cases of one kind; problems are collected (with the case) and asserted at the end of the test."""

    def __init__(self, name: str):
        self.name, self.problems, self.t0 = name, [], time.perf_counter()

    def case(self, argv: list[str], names: list, must_fail: bool = False, out: Path | None = None,
             after_ok=None, what: str = "") -> int | None:
        cmd = argv[0]
        sentinel = None
        if out is not None and out.is_file():
            sentinel = out.read_bytes()
        err, stdout = io.StringIO(), io.StringIO()
        rc, crash = None, None
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(CASE_TIMEOUT)
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(stdout):
                rc = main([str(a) for a in argv])
        except Hang:
            crash = "hang"
        except SystemExit as e:  # argparse
            rc = e.code
        except BaseException as e:  # noqa: BLE001 - any escaping exception is a crash
            crash = f"crash {type(e).__name__}: {str(e)[:300]}"
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        STATS[self.name]["cases"] += 1
        problem = crash
        text = err.getvalue()
        lines = error_lines(text)
        if problem is None and rc == 0:
            STATS[self.name]["accepted"] += 1
            if must_fail:
                problem = "silently accepted"
            elif after_ok is not None:
                problem = after_ok()
        elif problem is None:
            STATS[self.name]["refused"] += 1
            names = [str(x) for x in names]
            if "Traceback" in text:
                problem = "traceback on stderr"
            elif len(lines) != 1:
                problem = f"{len(lines)} stderr lines"
            elif not lines[0].startswith(f"qatlm {cmd}: error: "):
                problem = "not a qatlm error line"
            elif not any(x in lines[0] for x in names):
                problem = f"the file is not named (expected one of {[Path(x).name for x in names]})"
            elif out is not None and sentinel is not None and out.read_bytes() != sentinel:
                problem = "the existing output was changed"
            elif out is not None and list(out.parent.glob(f".{out.name}.*.partial")):
                problem = "a temporary file was left behind"
        if problem:
            STATS[self.name][problem.split(":")[0].split(" (")[0]] += 1
            self.problems.append(f"{what or ' '.join(map(str, argv))}: {problem}\n    stderr: {text.strip()[-600:]}")
        return None if crash else rc

    def done(self):
        SECONDS[self.name] += time.perf_counter() - self.t0
        assert not self.problems, f"{len(self.problems)} problems in {self.name}:\n" + "\n".join(self.problems[:15])


# ---- seeds ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    import qatlm.teacher as teacher_mod
    from qatlm.gguf.export import export_gguf
    from qatlm.imatrix.compute import compute_imatrix
    from qatlm.teacher import load_teacher

    root = tmp_path_factory.mktemp("fuzz")
    mp = pytest.MonkeyPatch()
    mp.setattr(teacher_mod, "CACHE", root / "cache")  # converted GGUF teachers: per test run
    mp.setenv("TQDM_DISABLE", "1")
    hf = tiny_llama(root / "hf")
    data = root / "data.txt"
    data.write_text(TEXT * 3)
    t = load_teacher(hf)
    gguf = export_gguf(t.model, root / "model.gguf", "f32", hf_dir=hf, progress=False)
    im = compute_imatrix(None, [str(data)], root / "im.gguf", ctx=64, chunks=2, teacher=t, progress=False)
    run = root / "run"
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", "--teacher", str(hf), "--data", str(data), "--steps", "1", "--seq-len", "32",
                     "--batch-size", "2", "--out", str(run)]) == 0
    yield {"root": root, "hf": hf, "gguf": gguf, "data": data, "im": im, "run": run, "cases": root / "cases"}
    mp.undo()


def fresh(seeds, name: str) -> Path:
    d = seeds["cases"] / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return d


# ---- GGUF mutation ----------------------------------------------------------------------------------------------

_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def header_fields(data: bytes) -> tuple[list[tuple[int, int, str]], int]:
    """(position, width, kind) of every integer field of a valid GGUF header, and where the header ends."""
    out = [(4, 4, "version"), (8, 8, "n_tensors"), (16, 8, "n_kv")]
    n_t, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24

    def string(kind):
        nonlocal pos
        out.append((pos, 8, kind))
        pos += 8 + struct.unpack_from("<Q", data, pos)[0]

    for _ in range(n_kv):
        string("key_len")
        vt = struct.unpack_from("<I", data, pos)[0]
        out.append((pos, 4, "vtype"))
        pos += 4
        if vt in _SIZES:
            out.append((pos, _SIZES[vt], "value"))
            pos += _SIZES[vt]
        elif vt == 8:
            string("str_len")
        else:
            et, cnt = struct.unpack_from("<IQ", data, pos)
            out += [(pos, 4, "etype"), (pos + 4, 8, "count")]
            pos += 12
            if et == 8:
                for _ in range(cnt):
                    string("item_len")
            else:
                pos += cnt * _SIZES[et]
    for _ in range(n_t):
        string("name_len")
        nd = struct.unpack_from("<I", data, pos)[0]
        out.append((pos, 4, "n_dims"))
        pos += 4
        out += [(pos + 8 * i, 8, "dim") for i in range(nd)]
        pos += 8 * nd
        out += [(pos, 4, "ttype"), (pos + 4, 8, "offset")]
        pos += 12
    return out, pos


INTERESTING = [0, 1, 2, 3, 4, 7, 8, 12, 13, 16, 31, 32, 63, 64, 255, 256, 1 << 16, (1 << 31) - 1, 1 << 31,
               (1 << 32) - 1, 1 << 32, (1 << 62), (1 << 63) - 1, 1 << 63, (1 << 64) - 1]


def mutate_gguf(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    fields, end = header_fields(data)
    op = rng.choice(["int", "int", "int", "bitflip", "byte", "truncate", "insert", "delete", "data"])
    if op == "int":
        kinds = sorted({k for _, _, k in fields})
        kind = rng.choice(kinds)
        pos, width, _ = rng.choice([f for f in fields if f[2] == kind])
        old = int.from_bytes(data[pos:pos + width], "little")
        v = rng.choice(INTERESTING + [old + 1, old - 1, old * 2, rng.getrandbits(width * 8)]) % (1 << (8 * width))
        return data[:pos] + v.to_bytes(width, "little") + data[pos + width:], f"{kind}@{pos}={v}"
    if op == "bitflip":
        pos = rng.randrange(end)
        return data[:pos] + bytes([data[pos] ^ (1 << rng.randrange(8))]) + data[pos + 1:], f"bitflip@{pos}"
    if op == "byte":
        pos = rng.randrange(end)
        return data[:pos] + bytes([rng.randrange(256)]) + data[pos + 1:], f"byte@{pos}"
    if op == "truncate":
        pos = rng.randrange(len(data))
        return data[:pos], f"truncate@{pos}"
    if op == "insert":
        pos, k = rng.randrange(end), rng.randint(1, 16)
        return data[:pos] + bytes(rng.randrange(256) for _ in range(k)) + data[pos:], f"insert{k}@{pos}"
    if op == "delete":
        pos, k = rng.randrange(end), rng.randint(1, 16)
        return data[:pos] + data[pos + k:], f"delete{k}@{pos}"
    pos = rng.randrange(end, len(data))  # tensor data: the file stays valid, a weight changes (maybe to NaN/inf)
    return data[:pos] + bytes([data[pos] ^ (1 << rng.randrange(8))]) + data[pos + 1:], f"data@{pos}"


def gguf_names(path: Path) -> list[str]:
    from qatlm.gguf.io import validate

    return [t.name for t in validate(path).tensors]


def quantize_ok(src: Path, out: Path):
    """After a successful quantize: the output is a valid GGUF with the source's tensors, in llama-quantize's
    order."""
    from qatlm.gguf.ptq import llama_order

    def check():
        try:
            if gguf_names(out) != sorted(gguf_names(src), key=llama_order):
                return "silently changed: the output's tensors differ from the source's"
        except ValueError as e:
            return f"silently changed: the output does not validate ({e})"
        return None
    return check


def rewrite_gguf(seed: Path, out: Path, kv: dict | None = None, drop: tuple = (), tensors=None,
                 arch: str | None = "llama") -> Path:
    """A copy of a GGUF through gguf-py with metadata replaced (`kv`: key -> (value, type[, sub_type]) or None to
    delete) and tensors transformed (`tensors(list of (name, array, type))` -> the new list)."""
    r = GGUFReader(seed)
    w = GGUFWriter(str(out), arch or "llama")
    if arch is None or kv and "general.architecture" in kv:
        del w.kv_data[0]["general.architecture"]
    kv = dict(kv or {})
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop or key in kv:
            continue
        vtype = GGUFValueType(f.types[0])
        w.add_key_value(key, f.contents(), vtype, sub_type=GGUFValueType(f.types[-1]) if vtype == GGUFValueType.ARRAY
                        else None)
    for key, spec in kv.items():
        if spec is not None:
            w.add_key_value(key, spec[0], spec[1], sub_type=spec[2] if len(spec) > 2 else None)
    ts = [(t.name, np.array(t.data), GGMLQuantizationType(t.tensor_type)) for t in r.tensors]
    if tensors is not None:
        ts = tensors(ts)
    for name, data, typ in ts:
        w.add_tensor(name, data, raw_dtype=typ)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _retype(name: str, dtype, typ):
    def f(ts):
        return [(n, d.astype(dtype) if n == name else d, typ if n == name else t) for n, d, t in ts]
    return f


def _set_value(name: str, index: int, value: float):
    def f(ts):
        out = []
        for n_, d, t in ts:
            if n_ == name:
                d = d.copy()
                d.reshape(-1)[index] = value
            out.append((n_, d, t))
        return out
    return f


U32, I32, STR, F32, BOOL, ARR = (GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.STRING,
                                 GGUFValueType.FLOAT32, GGUFValueType.BOOL, GGUFValueType.ARRAY)


def gguf_semantic_variants(seed: Path):
    """(name, builder(out) -> path, must_fail for: a set of commands) for GGUFs with bad content."""
    q = "blk.0.attn_q.weight"
    model_cmds = {"quantize", "memory", "teacher"}
    weight_cmds = {"quantize", "teacher"}  # memory reads shapes only: a weight's type or value is not its business
    teacher_cmds = {"memory", "teacher"}
    v = []

    def add(name, fails, **kw):
        v.append((name, lambda out, kw=kw: rewrite_gguf(seed, out, **kw), fails))

    add("arch-u32", model_cmds, kv={"general.architecture": (7, U32)})
    add("arch-bool", model_cmds, kv={"general.architecture": (True, BOOL)})
    add("arch-array", model_cmds, kv={"general.architecture": (["llama"], ARR, STR)})
    add("arch-empty", model_cmds, kv={"general.architecture": ("", STR)})
    add("arch-unknown", teacher_cmds, kv={"general.architecture": ("gpt9", STR)})
    add("arch-missing", model_cmds, arch=None)
    for dtype, typ in [(np.int8, GGMLQuantizationType.I8), (np.int16, GGMLQuantizationType.I16),
                       (np.int32, GGMLQuantizationType.I32), (np.int64, GGMLQuantizationType.I64),
                       (np.float64, GGMLQuantizationType.F64)]:
        add(f"weight-{typ.name}", weight_cmds, tensors=_retype(q, dtype, typ))
    for k, (name, idx, val) in enumerate([(q, 5, np.nan), ("blk.1.ffn_down.weight", 0, np.inf),
                                          ("blk.0.attn_norm.weight", 3, -np.inf), ("token_embd.weight", 7, np.nan)]):
        add(f"nonfinite-{k}", weight_cmds, tensors=_set_value(name, idx, val))
    for bc, typ in [(0, U32), (1, U32), (3, U32), ((1 << 31) - 1, U32), (-1, I32), ("2", STR), (2.0, F32)]:
        add(f"block_count-{bc}", teacher_cmds, kv={"llama.block_count": (bc, typ)})
    add("block_count-missing", teacher_cmds, drop=("llama.block_count",))
    for key, val in [("llama.attention.head_count", 0), ("llama.attention.head_count", 3),
                     ("llama.attention.head_count_kv", 3), ("llama.embedding_length", 32),
                     ("llama.embedding_length", 0), ("llama.context_length", 0)]:
        add(f"{key}-{val}", teacher_cmds, kv={key: (val, U32)})
    for val, typ in [(320, U32), (10 ** 6, U32), (-1, I32), (1.5, F32)]:
        add(f"bos-{val}", teacher_cmds, kv={"tokenizer.ggml.bos_token_id": (val, typ)})
    add("tokens-missing", teacher_cmds, drop=("tokenizer.ggml.tokens",))
    add("tokens-short", teacher_cmds, kv={"tokenizer.ggml.tokens": ([f"t{i}" for i in range(100)], ARR, STR)})
    add("tensor-missing", {"teacher"}, tensors=lambda ts: [t for t in ts if t[0] != "blk.1.ffn_up.weight"])
    add("tensor-extra", {"teacher"}, tensors=lambda ts: ts + [("extra.weight", np.ones((4, 64), np.float32),
                                                                GGMLQuantizationType.F32)])
    add("layer-extra", teacher_cmds, tensors=lambda ts: ts + [("blk.2.attn_q.weight", np.ones((64, 64), np.float32),
                                                               GGMLQuantizationType.F32)])
    add("tensor-empty", model_cmds | {"plan"}, tensors=lambda ts: ts + [("blk.0.empty.weight",
                                                                        np.ones((0, 64), np.float32),
                                                                        GGMLQuantizationType.F32)])
    add("name-64", model_cmds | {"plan"}, tensors=lambda ts: ts + [("x" * 64, np.ones((4, 64), np.float32),
                                                                   GGMLQuantizationType.F32)])
    return v


# ---- the GGUF families -----------------------------------------------------------------------------------------

def test_gguf_header_mutations(seeds):
    """plan, quantize and memory on GGUFs mutated field by field: refused cleanly, or (when the mutation
    leaves a valid file) a quantized output with the source's tensors."""
    fam = Family("gguf header (plan/quantize/memory)")
    rng = random.Random(SEED * 1000 + 1)
    base = seeds["gguf"].read_bytes()
    d = fresh(seeds, "gguf-header")
    out = d / "out.gguf"
    out.write_bytes(b"an earlier output that a failed run must not touch")
    for i in range(n(400)):
        data, what = mutate_gguf(base, rng)
        f = d / f"m{i % 8}.gguf"
        f.write_bytes(data)
        fam.case(["plan", f], [f], what=f"plan {what}")
        fam.case(["memory", f], [f], what=f"memory {what}")
        fam.case(["quantize", f, out, "--plan", rng.choice(["q4_0", "q8_0", "q4_k_m"])], [f], out=out,
                 after_ok=quantize_ok(f, out), what=f"quantize {what}")
        if out.read_bytes()[:4] == b"GGUF":  # keep a sentinel that a failed run must leave as it is
            out.write_bytes(b"an earlier output that a failed run must not touch")
    fam.done()


def test_gguf_teacher_mutations(seeds):
    """GGUF files as teachers (imatrix, eval --engine torch, compare): a header mutation is refused cleanly or
    converts to a model whose tensors are exactly the file's."""
    fam = Family("gguf teacher (imatrix/eval/compare)")
    rng = random.Random(SEED * 1000 + 2)
    base = seeds["gguf"].read_bytes()
    d = fresh(seeds, "gguf-teacher")
    data = seeds["data"]
    for i in range(n(90)):
        mutated, what = mutate_gguf(base, rng)
        f = d / f"t{i % 4}.gguf"
        f.write_bytes(mutated)
        cmd = rng.choice(["imatrix", "imatrix", "eval", "compare"])
        if cmd == "imatrix":
            fam.case(["imatrix", f, "--data", data, "--ctx", "64", "--chunks", "2", "-o", d / "im.gguf"], [f],
                     what=f"imatrix {what}")
        elif cmd == "eval":
            fam.case(["eval", f, "--data", data, "--ctx", "64", "--chunks", "1", "--engine", "torch"], [f],
                     what=f"eval {what}")
        else:
            fam.case(["compare", "--teacher", seeds["gguf"], f, "--data", data, "--ctx", "64", "--chunks", "1",
                      "--engine", "torch"], [f], what=f"compare {what}")
    fam.done()


def test_gguf_semantic_mutations(seeds):
    """Structurally valid GGUFs with bad content, through every command that reads a GGUF model."""
    fam = Family("gguf content (all model commands)")
    d = fresh(seeds, "gguf-semantic")
    data = seeds["data"]
    out = d / "out.gguf"
    for name, build, fails in gguf_semantic_variants(seeds["gguf"]):
        f = build(d / f"{name}.gguf")
        fam.case(["plan", f], [f], must_fail="plan" in fails, what=f"plan {name}")
        fam.case(["quantize", f, out], [f], must_fail="quantize" in fails, out=out, what=f"quantize {name}")
        fam.case(["memory", f], [f], must_fail="memory" in fails, what=f"memory {name}")
        tf = "teacher" in fails
        fam.case(["imatrix", f, "--data", data, "--ctx", "64", "--chunks", "2", "-o", d / "im.gguf"], [f],
                 must_fail=tf, what=f"imatrix {name}")
        fam.case(["eval", f, "--data", data, "--ctx", "64", "--chunks", "1", "--engine", "torch"], [f],
                 must_fail=tf, what=f"eval {name}")
        fam.case(["train", "--teacher", f, "--data", data, "--steps", "1", "--seq-len", "32", "--batch-size", "2",
                  "--out", d / "run"], [f], must_fail=tf, what=f"train {name}")
        fam.case(["run", "--teacher", f, "--data", data, "--eval-text", data, "--steps", "1", "--set", "data_free=0",
                  "--out", d / "job"], [f], must_fail=tf, what=f"run {name}")
        fam.case(["compare", "--teacher", seeds["gguf"], f, "--data", data, "--ctx", "64", "--chunks", "1",
                  "--engine", "torch"], [f], must_fail=tf, what=f"compare {name}")
        if "plan" in fails:  # refused by the validator: safe to hand to llama.cpp in this process
            fam.case(["eval", f, "--data", data, "--ctx", "64", "--chunks", "1"], [f], must_fail=True,
                     what=f"eval llama.cpp {name}")
        for j in range(n(4)):  # the same content with random header damage on top
            mutated, what = mutate_gguf(f.read_bytes(), random.Random(f"{SEED}-{name}-{j}"))
            g = d / "m.gguf"
            g.write_bytes(mutated)
            fam.case(["quantize", g, out], [g], out=out, after_ok=quantize_ok(g, out), what=f"quantize {name} {what}")
    # millions of empty strings in a small file: refused before gguf-py builds a view per item
    f = d / "amplify.gguf"
    count = (1 << 22) + 1
    with open(f, "wb") as fh:
        fh.write(b"GGUF" + struct.pack("<IQQ", 3, 0, 2) + struct.pack("<Q", 20) + b"general.architecture"
                 + struct.pack("<IQ", 8, 5) + b"llama" + struct.pack("<Q", 5) + b"x.big" + struct.pack("<IIQ", 9, 8, count))
        fh.write(bytes(8 * count))
    for cmd in (["plan", f], ["quantize", f, out], ["memory", f], ["imatrix", f, "--data", data]):
        t0 = time.perf_counter()
        fam.case(cmd, [f], must_fail=True, what=f"{cmd[0]} amplify")
        assert time.perf_counter() - t0 < 5, "the amplification file was not refused up front"
    fam.done()


# ---- Hugging Face directories ----------------------------------------------------------------------------------

DEEP = "[" * 100000 + "]" * 100000
VALUES = [None, -1, 0, 1, 2, 3, 7, 1 << 31, 1 << 63, 1.5, -0.5, 1e308, "x", "", [], [1], {}, {"a": 1}, True, False]


def _config(d: Path) -> dict:
    return json.loads((d / "config.json").read_text())


def _save_config(d: Path, cfg) -> None:
    (d / "config.json").write_text(json.dumps(cfg))


def _rewrite_st(d: Path, change, name: str = "model.safetensors") -> None:
    from safetensors.torch import load_file, save_file

    f = d / name
    sd = load_file(str(f))
    change(sd)
    save_file(sd, str(f), metadata={"format": "pt"})


def hf_config_must_fail(key, value, orig) -> bool:
    """Config changes the weights cannot follow: layers dropped or invented, shapes changed, heads tied."""
    if key == "num_hidden_layers":
        return value != orig
    if key in ("vocab_size", "hidden_size", "intermediate_size", "num_key_value_heads"):
        return value != orig and value is not None
    if key == "tie_word_embeddings":
        return value is not False and value != 0
    return key in ("quantization_config", "model_type") and value != orig


def test_hf_config_mutations(seeds):
    """config.json fields replaced by values of every JSON type, through memory (config only) and the teacher
    loaders (imatrix, eval --engine torch)."""
    fam = Family("hf config.json fields (memory/imatrix/eval)")
    rng = random.Random(SEED * 1000 + 3)
    orig = _config(seeds["hf"])
    keys = sorted(orig) + ["quantization_config", "attn_implementation", "transformers_weights", "rope_scaling",
                           "layer_types", "head_dim", "dtype", "sliding_window", "text_config"]
    d = fresh(seeds, "hf-config")
    m = d / "m"
    shutil.copytree(seeds["hf"], m)
    data = seeds["data"]
    for i in range(n(310)):
        key, value = rng.choice(keys), rng.choice(VALUES)
        cfg = dict(orig)
        if rng.random() < 0.1:
            cfg.pop(key, None)
            value = None
        else:
            cfg[key] = value
        _save_config(m, cfg)
        fails = hf_config_must_fail(key, value, orig.get(key))
        fam.case(["memory", m], [m], what=f"memory {key}={value!r}")
        if i % 3 == 0:
            cmd = ["imatrix", m, "--data", data, "--ctx", "64", "--chunks", "2", "-o", d / "im.gguf"] if i % 2 else \
                ["eval", m, "--data", data, "--ctx", "64", "--chunks", "1", "--engine", "torch"]
            fam.case(cmd, [m], must_fail=fails, what=f"{cmd[0]} {key}={value!r}")
    # whole-file damage
    for name, raw in [("list", b"[1, 2]"), ("string", b'"llama"'), ("number", b"3"), ("null", b"null"),
                      ("empty", b""), ("deep", DEEP.encode()), ("latin1", '{"model_type": "llamaé"}'.encode("latin1")),
                      ("truncated", json.dumps(orig).encode()[:50]), ("nan", json.dumps({**orig, "rms_norm_eps": float("nan")}).encode()),
                      ("model_type-list", json.dumps({**orig, "model_type": ["llama"]}).encode()),
                      ("model_type-dict", json.dumps({**orig, "model_type": {"a": 1}}).encode()),
                      ("flash", json.dumps({**orig, "attn_implementation": "flash_attention_2"}).encode()),
                      ("bnb", json.dumps({**orig, "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}).encode()),
                      ("gptq", json.dumps({**orig, "quantization_config": {"quant_method": "gptq", "bits": 4}}).encode()),
                      ("awq", json.dumps({**orig, "quantization_config": {"quant_method": "awq", "bits": 4}}).encode()),
                      ("heads-0", json.dumps({**orig, "num_attention_heads": 0}).encode()),
                      ("kv-3", json.dumps({**orig, "num_key_value_heads": 3}).encode()),
                      ("hidden-neg", json.dumps({**orig, "hidden_size": -64}).encode())]:
        (m / "config.json").write_bytes(raw)
        for cmd in (["memory", m], ["imatrix", m, "--data", data, "--ctx", "64", "--chunks", "2", "-o", d / "im.gguf"],
                    ["train", "--teacher", m, "--data", data, "--steps", "1", "--out", d / "run"]):
            fam.case(cmd, [m], must_fail=name != "nan" or cmd[0] != "memory", what=f"{cmd[0]} config {name}")
    fam.done()


def hf_weight_variants(seeds):
    """(name, change(dir), must_fail) for the weights and the other files of a Hugging Face directory."""
    from safetensors.torch import save_file

    q = "model.layers.0.self_attn.q_proj.weight"

    def stray(d):  # the silent-damage case: a tensor missing from model.safetensors, present in a stray file
        keep = {}
        _rewrite_st(d, lambda sd: keep.update({q: sd.pop(q)}))
        save_file(keep, str(d / "other.safetensors"))

    def retype(dtype):
        return lambda d: _rewrite_st(d, lambda sd: sd.update({q: (sd[q] * 10).to(dtype)}))

    def value(name, idx, val):
        def f(d):
            def ch(sd):
                sd[name] = sd[name].clone()
                sd[name].view(-1)[idx] = val
            _rewrite_st(d, ch)
        return f

    def cfg(**kw):
        return lambda d: _save_config(d, {**_config(d), **kw})

    def index(weight_map=None, raw=None, shard="model-00001-of-00001.safetensors"):
        def f(d):
            (d / "model.safetensors").rename(d / shard)
            if raw is not None:
                (d / "model.safetensors.index.json").write_bytes(raw)
                return
            from safetensors import safe_open

            with safe_open(str(d / shard), "pt") as st:
                keys = list(st.keys())
            wm = weight_map(keys, shard) if weight_map else {k: shard for k in keys}
            (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
        return f

    def flip(k):
        def f(d):
            b = bytearray((d / "model.safetensors").read_bytes())
            b[k % len(b)] ^= 0x40
            (d / "model.safetensors").write_bytes(bytes(b))
        return f

    v = [("stray-safetensors", stray, True),
         ("renamed", lambda d: (d / "model.safetensors").rename(d / "weights.safetensors"), True),
         ("num_hidden_layers-1", cfg(num_hidden_layers=1), True),
         ("num_hidden_layers-0", cfg(num_hidden_layers=0), True),
         ("num_hidden_layers--1", cfg(num_hidden_layers=-1), True),
         ("num_hidden_layers-3", cfg(num_hidden_layers=3), True),
         ("num_hidden_layers-huge", cfg(num_hidden_layers=(1 << 31) - 1), True),
         ("tie-true", cfg(tie_word_embeddings=True), True),
         ("tie-true-no-head", lambda d: (cfg(tie_word_embeddings=True)(d),
                                         _rewrite_st(d, lambda sd: sd.pop("lm_head.weight"))), False),
         ("missing", lambda d: _rewrite_st(d, lambda sd: sd.pop("model.norm.weight")), True),
         ("extra-layer", lambda d: _rewrite_st(d, lambda sd: sd.update(
             {"model.layers.2.mlp.up_proj.weight": torch.zeros(128, 64)})), True),
         ("extra-tensor", lambda d: _rewrite_st(d, lambda sd: sd.update({"foo": torch.zeros(2)})), True),
         ("shape", lambda d: _rewrite_st(d, lambda sd: sd.update({q: sd[q][:32].clone()})), True),
         ("f16", retype(torch.float16), False), ("bf16", retype(torch.bfloat16), False),
         ("f64", retype(torch.float64), False),
         ("index-ok", index(), False),
         ("index-missing-shard", index(lambda ks, s: {k: "nope.safetensors" for k in ks}), True),
         ("index-escape", index(lambda ks, s: {k: "../" + s for k in ks}), True),
         ("index-partial", index(lambda ks, s: {k: s for k in ks[1:]}), True),
         ("index-extra", index(lambda ks, s: {**{k: s for k in ks}, "foo": s}), True),
         ("index-list", index(raw=b"[]"), True), ("index-deep", index(raw=DEEP.encode()), True),
         ("index-latin1", index(raw='{"weight_map": "é"}'.encode("latin1")), True),
         ("index-no-map", index(raw=b'{"metadata": {}}'), True),
         ("index-no-metadata", index(raw=b'{"weight_map": {}}'), True),
         ("weights-dir", lambda d: ((d / "model.safetensors").unlink(), (d / "model.safetensors").mkdir()), True),
         ("weights-dangling-link", lambda d: ((d / "model.safetensors").unlink(),
                                              (d / "model.safetensors").symlink_to(d / "nowhere")), True),
         ("weights-link", lambda d: ((d / "model.safetensors").rename(d / "real.bin"),
                                     (d / "model.safetensors").symlink_to(d / "real.bin")), False),
         ("truncated", lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100]),
          True),
         ("empty", lambda d: (d / "model.safetensors").write_bytes(b""), True),
         ("tokenizer-garbage", lambda d: (d / "tokenizer.json").write_bytes(b"\x00garbage"), True),
         ("tokenizer-list", lambda d: (d / "tokenizer.json").write_text("[]"), True),
         ("tokenizer-config-garbage", lambda d: (d / "tokenizer_config.json").write_text("{nope"), True),
         ("generation-config-garbage", lambda d: (d / "generation_config.json").write_text("{nope"), None)]
    for dt in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool):
        v.append((f"dtype-{dt}", retype(dt), True))
    for k, (name, idx, val) in enumerate([(q, 0, float("nan")), ("model.norm.weight", 3, float("inf")),
                                          ("lm_head.weight", 9, float("-inf")),
                                          ("model.embed_tokens.weight", 1, float("nan"))]):
        v.append((f"nonfinite-{k}", value(name, idx, val), True))
    rng = random.Random(SEED * 1000 + 4)
    for _ in range(n(40)):
        k = rng.randrange(8, 2000)  # the header (and the first tensor bytes)
        v.append((f"flip@{k}", flip(k), None))
    return v


def test_hf_weight_mutations(seeds):
    """Hugging Face directories with damaged or mismatched weights, indexes and tokenizer files, through the
    commands that load a teacher (train, imatrix, eval, run) and memory."""
    fam = Family("hf weights/files (train/imatrix/eval/run)")
    d = fresh(seeds, "hf-weights")
    data = seeds["data"]
    for i, (name, change, fails) in enumerate(hf_weight_variants(seeds)):
        m = d / f"m{i}"
        shutil.copytree(seeds["hf"], m)
        change(m)
        must = bool(fails)
        fam.case(["train", "--teacher", m, "--data", data, "--steps", "1", "--seq-len", "32", "--batch-size", "2",
                  "--out", d / f"run{i}"], [m], must_fail=must, what=f"train {name}")
        fam.case(["imatrix", m, "--data", data, "--ctx", "64", "--chunks", "2", "-o", d / "im.gguf"], [m],
                 must_fail=must, what=f"imatrix {name}")
        fam.case(["eval", m, "--data", data, "--ctx", "64", "--chunks", "1", "--engine", "torch"], [m],
                 must_fail=must, what=f"eval {name}")
        if must:
            fam.case(["run", "--teacher", m, "--data", data, "--eval-text", data, "--steps", "1", "--set",
                      "data_free=0", "--out", d / "job"], [m], must_fail=True, what=f"run {name}")
        shutil.rmtree(m)
    fam.done()


# ---- training data -----------------------------------------------------------------------------------------------

BAD_ROWS = [b"5", b"null", b'"just a string"', b"[1, 2]", b"true", b'{"nope": 1}', b'{"text": 5}', b'{"text": null}',
            b'{"text": ["a"]}', b'{"text": {"a": "b"}}', b'{"text": "\\ud800 lone"}', b'{"text": "a\\udfff"}',
            b"[" * 50000 + b"]" * 50000, b'{"text": "caf\xe9"}', b"\xff\xfe{}", b'{"text": "unterminated',
            b'{"messages": 5}', b'{"messages": [1]}', b'{"messages": [{"role": "user", "content": "hi"}]}',
            b'{"messages": [{"role": 3, "content": "hi"}]}', b'{"messages": [{"role": "user", "content": 7}]}']


def test_data_mutations(seeds):
    """--data: JSONL with one bad row among good ones (the error names file:line), damaged .txt files, through
    train; text files through eval and imatrix."""
    fam = Family("data (train/eval/imatrix)")
    rng = random.Random(SEED * 1000 + 5)
    d = fresh(seeds, "data")
    hf = seeds["hf"]
    words = TEXT.split()
    for i in range(n(150)):
        rows = [json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(1, 40)))}).encode()
                for _ in range(rng.randint(0, 8))]
        bad = rng.choice(BAD_ROWS)
        at = rng.randint(0, len(rows))
        rows.insert(at, bad)
        f = d / f"d{i % 3}.jsonl"
        f.write_bytes(b"\n".join(rows) + b"\n")
        fam.case(["train", "--teacher", hf, "--data", f, "--steps", "1", "--seq-len", "32", "--batch-size", "2",
                  "--out", d / "run"], [f"{f}:{at + 1}"], must_fail=True, what=f"train row {bad[:40]!r} at {at + 1}")
    for i in range(n(40)):
        f = d / f"t{i % 3}.txt"
        kind = rng.choice(["latin1", "random", "empty", "short", "nul"])
        raw = {"latin1": "Ça va très bien. ".encode("latin1") * 20, "random": bytes(rng.randrange(256) for _ in range(300)),
               "empty": b"", "short": b"hi", "nul": b"\x00" * 10}[kind]
        f.write_bytes(raw)
        for cmd in (["train", "--teacher", hf, "--data", f, "--steps", "1", "--seq-len", "32", "--batch-size", "2",
                     "--out", d / "run"],
                    ["eval", hf, "--data", f, "--ctx", "64", "--engine", "torch"],
                    ["imatrix", hf, "--data", f, "--ctx", "64", "-o", d / "im.gguf"]):
            fam.case(cmd, [f], must_fail=True, what=f"{cmd[0]} txt {kind}")
    fam.done()


# ---- run directories (export) and imatrix files ------------------------------------------------------------------

def run_variants(run: Path):
    ck = run / "checkpoint"

    def write(rel, raw):
        return lambda d: (d / rel).write_bytes(raw)

    def trunc(rel, k):
        return lambda d: (d / rel).write_bytes((d / rel).read_bytes()[:k])

    shard = next(p.name for p in ck.iterdir() if p.suffix == ".distcp")
    v = [("config-garbage", write("config.yaml", b"{nope: [")),
         ("config-list", write("config.yaml", b"- 1\n- 2\n")),
         ("config-deep", write("config.yaml", b"[" * 20000 + b"]" * 20000)),
         ("config-latin1", write("config.yaml", "teacher: é\n".encode("latin1"))),
         ("config-unknown", lambda d: (d / "config.yaml").write_text((d / "config.yaml").read_text() + "bogus: 1\n")),
         ("config-steps-str", lambda d: (d / "config.yaml").write_text(
             (d / "config.yaml").read_text().replace("steps: ", "steps: x", 1))),
         ("config-teacher-missing", lambda d: (d / "config.yaml").write_text(
             "\n".join("teacher: /nonexistent/model" if ln.startswith("teacher:") else ln
                       for ln in (d / "config.yaml").read_text().splitlines()))),
         ("state-garbage", write("checkpoint/state.pt", b"garbage")),
         ("state-empty", write("checkpoint/state.pt", b"")),
         ("state-list", lambda d: torch.save([1, 2], d / "checkpoint/state.pt")),
         ("state-negative", lambda d: torch.save({"step": -1, "torch_rng": torch.get_rng_state()},
                                                 d / "checkpoint/state.pt")),
         ("state-rng", lambda d: torch.save({"step": 1, "torch_rng": torch.zeros(3)}, d / "checkpoint/state.pt")),
         ("metadata-garbage", write("checkpoint/.metadata", b"garbage")),
         ("metadata-missing", lambda d: (d / "checkpoint/.metadata").unlink()),
         ("shard-missing", lambda d: (d / "checkpoint" / shard).unlink()),
         ("shard-garbage", write(f"checkpoint/{shard}", b"garbage")),
         ("checkpoint-missing", lambda d: shutil.rmtree(d / "checkpoint"))]
    for k in (1, 10, 100, 1000):
        v.append((f"state-trunc{k}", trunc("checkpoint/state.pt", k)))
        v.append((f"metadata-trunc{k}", trunc("checkpoint/.metadata", k)))
        v.append((f"shard-trunc{k}", trunc(f"checkpoint/{shard}", k)))
    return v


def test_run_dir_and_imatrix_mutations(seeds):
    """export on damaged run directories; quantize --imatrix on damaged imatrix files."""
    from qatlm.imatrix.file import read_imatrix, write_imatrix

    fam = Family("run dirs (export) + imatrix files (quantize)")
    d = fresh(seeds, "runs")
    for name, change in run_variants(seeds["run"]):  # config-teacher-missing names the missing teacher
        r = d / "run"
        if r.exists():
            shutil.rmtree(r)
        shutil.copytree(seeds["run"], r)
        change(r)
        out = d / "out.gguf"
        out.write_bytes(b"sentinel")
        fam.case(["export", r, out, "--hf", d / "out-hf"], [r, "/nonexistent/model"], must_fail=True, out=out,
                 what=f"export {name}")
    rng = random.Random(SEED * 1000 + 6)
    base = seeds["im"].read_bytes()
    out = d / "q.gguf"
    for i in range(n(170)):
        mutated, what = mutate_gguf(base, rng)
        f = d / "im.gguf"
        f.write_bytes(mutated)
        fam.case(["quantize", seeds["gguf"], out, "--imatrix", f], [f], out=out,
                 after_ok=quantize_ok(seeds["gguf"], out), what=f"imatrix {what}")
    im = read_imatrix(seeds["im"])
    import copy

    for name, change in [("nan", lambda e: e.in_sum2.__setitem__((0, 0), np.nan)),
                         ("negative", lambda e: e.in_sum2.__setitem__((0, 1), -1.0)),
                         ("zero-count", lambda e: e.counts.__setitem__(0, 0.0)),
                         ("short", None), ("missing", None)]:
        bad = copy.deepcopy(im)
        first = sorted(bad.entries)[0]
        if name == "short":
            bad.entries[first].in_sum2 = bad.entries[first].in_sum2[:, :32].copy()
        elif name == "missing":
            del bad.entries[first]
        else:
            change(bad.entries[first])
        f = d / f"im-{name}.gguf"
        try:
            write_imatrix(bad, f)
        except ValueError:
            continue  # the writer itself refuses it: nothing to read
        fam.case(["quantize", seeds["gguf"], out, "--imatrix", f], [f], must_fail=True, what=f"imatrix {name}")
    for i in range(n(30)):  # legacy .dat files of random bytes
        f = d / f"r{i % 3}.dat"
        f.write_bytes(struct.pack("<i", rng.choice([0, 1, 2, -1, 1 << 30])) + bytes(rng.randrange(256)
                                                                                    for _ in range(rng.randrange(64))))
        fam.case(["quantize", seeds["gguf"], out, "--imatrix", f], [f], must_fail=True, what=f"dat {i}")
    fam.done()


# ---- special files: in a subprocess with a timeout ---------------------------------------------------------------

def test_special_files_never_block(seeds):
    """A FIFO wherever a command reads a file (GGUF, model.safetensors, config.json, --data, a --data folder,
    config.yaml, state.pt, imatrix): refused before it is opened, one line each, no hang."""
    d = fresh(seeds, "fifo")
    hf, data, gguf = seeds["hf"], seeds["data"], seeds["gguf"]
    fifo = d / "pipe.gguf"
    os.mkfifo(fifo)
    m = d / "hf"
    shutil.copytree(hf, m)
    (m / "model.safetensors").unlink()
    os.mkfifo(m / "model.safetensors")
    c = d / "hfc"
    shutil.copytree(hf, c)
    (c / "config.json").unlink()
    os.mkfifo(c / "config.json")
    t = d / "hft"
    shutil.copytree(hf, t)
    (t / "tokenizer.json").unlink()
    os.mkfifo(t / "tokenizer.json")
    txt = d / "pipe.txt"
    os.mkfifo(txt)
    ddir = d / "texts"
    ddir.mkdir()
    shutil.copy(data, ddir / "a.txt")
    os.mkfifo(ddir / "b.txt")
    run = d / "run"
    shutil.copytree(seeds["run"], run)
    (run / "config.yaml").unlink()
    os.mkfifo(run / "config.yaml")
    run2 = d / "run2"
    shutil.copytree(seeds["run"], run2)
    shard = next(p for p in (run2 / "checkpoint").iterdir() if p.suffix == ".distcp")
    shard.unlink()
    os.mkfifo(shard)
    im = d / "im.dat"
    os.mkfifo(im)
    out = d / "out.gguf"
    cases = [(["plan", fifo], fifo), (["quantize", fifo, out], fifo), (["memory", fifo], fifo),
             (["quantize", gguf, out, "--imatrix", im], im),
             (["train", "--teacher", m, "--data", data, "--out", d / "r"], m / "model.safetensors"),
             (["memory", c], c / "config.json"), (["imatrix", t, "--data", data, "-o", d / "i.gguf"], t / "tokenizer.json"),
             (["train", "--teacher", hf, "--data", txt, "--out", d / "r"], txt),
             (["train", "--teacher", hf, "--data", ddir, "--out", d / "r"], ddir / "b.txt"),
             (["eval", hf, "--data", txt, "--engine", "torch"], txt),
             (["imatrix", hf, "--data", txt, "-o", d / "i.gguf"], txt),
             (["eval", fifo, "--data", data], fifo),
             (["compare", "--teacher", gguf, fifo, "--data", data], fifo),
             (["export", run, out], run / "config.yaml"), (["export", run2, out], shard),
             (["run", "--teacher", m, "--data", data, "--eval-text", data, "--set", "data_free=0", "--out", d / "job"],
              m / "model.safetensors")]
    script = textwrap.dedent("""
        import contextlib, io, json, sys, os
        os.environ["TQDM_DISABLE"] = "1"
        from qatlm.cli import main
        for argv, name in json.loads(sys.argv[1]):
            print("START", argv[0], name, flush=True)
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    rc = main(argv)
            except BaseException as e:
                rc = f"crash {type(e).__name__}: {e}"
            print("RESULT", json.dumps({"rc": rc, "err": err.getvalue(), "name": name, "cmd": argv[0]}), flush=True)
    """)
    t0 = time.perf_counter()
    payload = json.dumps([[[str(a) for a in argv], str(name)] for argv, name in cases])
    env = {**os.environ, "QATLM_CACHE": str(d / "cache"), "HF_HUB_OFFLINE": "1"}
    try:
        r = subprocess.run([sys.executable, "-c", script, payload], capture_output=True, text=True, timeout=240,
                           env=env, cwd=Path(__file__).parent.parent)
    except subprocess.TimeoutExpired as e:
        last = [ln for ln in (e.stdout or b"").decode(errors="replace").splitlines() if ln.startswith("START")]
        STATS["special files (subprocess)"]["hang"] += 1
        pytest.fail(f"hang: {last[-1] if last else 'at start-up'}")
    SECONDS["special files (subprocess)"] += time.perf_counter() - t0
    results = [json.loads(ln[7:]) for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert len(results) == len(cases), r.stdout[-2000:] + r.stderr[-2000:]
    problems = []
    for res in results:
        STATS["special files (subprocess)"]["cases"] += 1
        lines = error_lines(res["err"])
        ok = (res["rc"] == 2 and len(lines) == 1 and lines[0].startswith(f"qatlm {res['cmd']}: error: ")
              and res["name"] in lines[0] and ("FIFO" in lines[0] or "not a regular file" in lines[0]))
        STATS["special files (subprocess)"]["refused" if ok else "problem"] += 1
        if not ok:
            problems.append(f"{res['cmd']} {res['name']}: rc {res['rc']}: {res['err'][-400:]}")
    assert not problems, "\n".join(problems)


# ---- training a tiny model: valid inputs still work end to end --------------------------------------------------

def test_valid_seeds_still_train_and_export(seeds):
    """A few cases all the way through: the seeds (and benign variants of them) are accepted."""
    fam = Family("valid end to end (train/export)")
    d = fresh(seeds, "valid")
    hf = d / "hf"
    shutil.copytree(seeds["hf"], hf)
    (hf / "model.safetensors").rename(hf / "model-00001-of-00001.safetensors")
    from safetensors import safe_open

    with safe_open(str(hf / "model-00001-of-00001.safetensors"), "pt") as st:
        wm = {k: "model-00001-of-00001.safetensors" for k in st.keys()}
    (hf / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    (d / "a.jsonl").write_text("\n".join(json.dumps({"text": TEXT[i:i + 300]}) for i in range(0, 3000, 300)))
    for teacher in (hf, seeds["gguf"]):
        run = d / f"run-{Path(teacher).name}"
        rc = fam.case(["train", "--teacher", teacher, "--data", d / "a.jsonl", seeds["data"], "--steps", "1",
                       "--seq-len", "32", "--batch-size", "2", "--out", run], [teacher])
        assert rc == 0
        link = d / f"link-{Path(teacher).name}.gguf"
        real = d / f"real-{Path(teacher).name}.gguf"
        real.write_bytes(b"old")
        link.symlink_to(real)
        assert fam.case(["export", run, link, "--hf", d / f"hf-{Path(teacher).name}"], [run]) == 0
        assert link.is_symlink() and real.read_bytes()[:4] == b"GGUF"  # written through the link
    fam.done()


def test_zz_summary(capsys):
    """The counts (printed with -s, and always in the report of a failure)."""
    rows = [f"{'family':<48} {'cases':>6} {'refused':>8} {'accepted':>9} {'problems':>9} {'seconds':>8}"]
    total = Counter()
    for fam, c in STATS.items():
        probs = sum(v for k, v in c.items() if k not in ("cases", "refused", "accepted"))
        rows.append(f"{fam:<48} {c['cases']:>6} {c['refused']:>8} {c['accepted']:>9} {probs:>9} "
                    f"{SECONDS.get(fam, 0):>8.1f}")
        total.update(c)
    kinds = {k: v for k, v in total.items() if k not in ("cases", "refused", "accepted")}
    rows.append(f"{'total':<48} {total['cases']:>6} {total['refused']:>8} {total['accepted']:>9} "
                f"{sum(kinds.values()):>9}   problems by kind: {dict(kinds) or 'none'} (seed {SEED})")
    with capsys.disabled():
        print("\n" + "\n".join(rows))
    if len(STATS) >= 8:  # the whole file ran
        assert total["cases"] >= 3000 * min(SCALE, 1), total


# ---- focused regressions: one per bug of issue 14 ----------------------------------------------------------------

def refused(argv, *needles) -> str:
    """Run a command that must fail; returns its one error line after checking it contains every needle."""
    err = io.StringIO()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_TIMEOUT)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main([str(a) for a in argv])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    lines = error_lines(err.getvalue())
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err.getvalue(), err.getvalue()
    for x in needles:
        assert str(x) in lines[0], (x, lines[0])
    return lines[0]


@pytest.mark.parametrize("typ", ["I8", "I16", "I32", "I64", "F64", "Q8_1"])
def test_quantize_refuses_non_float_weights(seeds, tmp_path, typ):
    t = GGMLQuantizationType[typ]
    if typ == "Q8_1":  # 2 blocks of 40 bytes per 64-wide row
        tweak = lambda ts: [(n_, np.zeros((d.shape[0], 80), np.uint8) if n_ == "blk.0.attn_q.weight" else d,  # noqa: E731
                             t if n_ == "blk.0.attn_q.weight" else tt) for n_, d, tt in ts]
    else:
        tweak = _retype("blk.0.attn_q.weight", {"I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64,
                                                "F64": np.float64}[typ], t)
    f = rewrite_gguf(seeds["gguf"], tmp_path / "m.gguf", tensors=tweak)
    refused(["quantize", f, tmp_path / "o.gguf"], f, "blk.0.attn_q.weight", typ)
    refused(["train", "--teacher", f, "--data", seeds["data"], "--out", tmp_path / "r"], f, "blk.0.attn_q.weight")
    assert not (tmp_path / "o.gguf").exists()


@pytest.mark.parametrize("value,typ", [(7, U32), (True, BOOL), (["llama"], ARR)])
def test_architecture_must_be_a_string(seeds, tmp_path, value, typ):
    f = rewrite_gguf(seeds["gguf"], tmp_path / "m.gguf", kv={"general.architecture": (value, typ, STR)})
    refused(["quantize", f, tmp_path / "o.gguf"], f, "general.architecture")


def test_zero_element_tensor_and_empty_array(seeds, tmp_path):
    f = rewrite_gguf(seeds["gguf"], tmp_path / "z.gguf", tensors=lambda ts: ts + [
        ("blk.0.z.weight", np.ones((0, 4), np.float32), GGMLQuantizationType.F32)])
    refused(["quantize", f, tmp_path / "o.gguf"], f, "blk.0.z.weight", "zero dimension")
    # an empty metadata array (gguf-py cannot write one: a 1-item u8 array with its count set to 0)
    g = rewrite_gguf(seeds["gguf"], tmp_path / "e.gguf", kv={"x.empty": ([7], ARR, GGUFValueType.UINT8)})
    data = g.read_bytes()
    key = struct.pack("<Q", 7) + b"x.empty" + struct.pack("<IIQ", 9, 0, 1)
    i = data.index(key) + len(key)
    _, end = header_fields(data)
    data = data[:i - 8] + struct.pack("<Q", 0) + data[i + 1:end] + b"\0" + data[end:]  # padding keeps the data put
    g.write_bytes(data)
    # quantize copies metadata entries byte for byte, as llama-quantize does: the empty array is kept, not refused
    from qatlm.cli import main
    from qatlm.gguf.io import validate

    assert main(["quantize", str(g), str(tmp_path / "o.gguf")]) == 0
    assert "x.empty" in validate(tmp_path / "o.gguf").keys


def test_validator_matches_gguf_cpp_on_names(seeds, tmp_path):
    from qatlm.gguf.io import validate

    ok = rewrite_gguf(seeds["gguf"], tmp_path / "ok.gguf", tensors=lambda ts: ts + [
        ("x" * 63, np.ones((4, 64), np.float32), GGMLQuantizationType.F32)])
    validate(ok)  # 63 bytes + NUL fit GGML_MAX_NAME
    long = rewrite_gguf(seeds["gguf"], tmp_path / "long.gguf", tensors=lambda ts: ts + [
        ("x" * 64, np.ones((4, 64), np.float32), GGMLQuantizationType.F32)])
    refused(["quantize", long, tmp_path / "o.gguf"], long, "64 bytes")
    empty = rewrite_gguf(seeds["gguf"], tmp_path / "k.gguf", kv={"": ("v", STR)})
    refused(["plan", empty], empty, "empty key")


def test_amplification_is_refused_up_front(seeds, tmp_path):
    f = tmp_path / "big.gguf"
    count = 4_000_000
    with open(f, "wb") as fh:  # 32 MB of empty strings: gguf-py would need ~6 GB for it
        fh.write(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 5) + b"x.big" + struct.pack("<IIQ", 9, 8, count))
        fh.write(bytes(8 * count))
    t0 = time.perf_counter()
    refused(["quantize", f, tmp_path / "o.gguf"], f, "metadata array items")
    assert time.perf_counter() - t0 < 2
    small = tmp_path / "small.gguf"  # 70,000 items in a 560 kB file: also more than one per 64 bytes
    with open(small, "wb") as fh:
        fh.write(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 5) + b"x.big" + struct.pack("<IIQ", 9, 8, 70000))
        fh.write(bytes(8 * 70000))
    refused(["plan", small], small, "metadata array items")


@pytest.mark.parametrize("key,val,typ", [("llama.block_count", 0, U32), ("llama.block_count", 1, U32),
                                         ("llama.block_count", (1 << 31) - 1, U32),
                                         ("tokenizer.ggml.bos_token_id", 320, U32)])
def test_gguf_teacher_hyperparameters(seeds, tmp_path, key, val, typ):
    f = rewrite_gguf(seeds["gguf"], tmp_path / "m.gguf", kv={key: (val, typ)})
    t0 = time.perf_counter()
    refused(["imatrix", f, "--data", seeds["data"]], f, key)
    assert time.perf_counter() - t0 < 5


def test_gguf_nan_weight_is_named(seeds, tmp_path):
    f = rewrite_gguf(seeds["gguf"], tmp_path / "m.gguf", tensors=_set_value("blk.1.ffn_down.weight", 3, np.nan))
    refused(["quantize", f, tmp_path / "o.gguf"], f, "blk.1.ffn_down.weight", "NaN/inf")
    refused(["imatrix", f, "--data", seeds["data"]], f, "blk.1.ffn_down.weight", "NaN/inf")


def _hf(seeds, tmp_path, change=None, **cfg):
    d = tmp_path / "m"
    shutil.copytree(seeds["hf"], d)
    if cfg:
        _save_config(d, {**_config(d), **cfg})
    if change:
        change(d)
    return d


@pytest.mark.parametrize("raw,needle", [(b"[1]", "holds a list"), (b'"x"', "holds a str"), (b"3", "holds a int"),
                                        (DEEP.encode(), "nested too deeply"), ('{"a": "é"}'.encode("latin1"), "not UTF-8"),
                                        (b'{"model_type": ["llama"]}', "model_type ['llama']"),
                                        (b'{"model_type": {"a": 1}}', "is not supported")])
def test_hf_config_json_kinds(seeds, tmp_path, raw, needle):
    d = _hf(seeds, tmp_path, lambda d: (d / "config.json").write_bytes(raw))
    refused(["train", "--teacher", d, "--data", seeds["data"], "--out", tmp_path / "r"], d / "config.json", needle)


@pytest.mark.parametrize("cfg,needle", [
    ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quantization_config"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    ({"attn_implementation": "flash_attention_2"}, "flash_attention_2"),
    ({"num_attention_heads": 0}, "num_attention_heads"), ({"hidden_size": -64}, "hidden_size"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"), ({"num_hidden_layers": 0}, "num_hidden_layers"),
    ({"num_hidden_layers": 1}, "num_hidden_layers"), ({"num_hidden_layers": -1}, "num_hidden_layers"),
    ({"rope_scaling": {"rope_type": "yarn"}}, "transformers cannot build a model")])
def test_hf_config_fields(seeds, tmp_path, cfg, needle):
    d = _hf(seeds, tmp_path, **cfg)
    refused(["imatrix", d, "--data", seeds["data"]], d / "config.json", needle)


def test_stray_safetensors_is_not_pooled(seeds, tmp_path):
    """transformers loads model.safetensors only: a tensor found in another file would be re-initialized."""
    from safetensors.torch import save_file

    q = "model.layers.1.mlp.down_proj.weight"
    keep = {}
    d = _hf(seeds, tmp_path, lambda d: _rewrite_st(d, lambda sd: keep.update({q: sd.pop(q)})))
    save_file(keep, str(d / "other.safetensors"))
    refused(["train", "--teacher", d, "--data", seeds["data"], "--out", tmp_path / "r"], q, "missing")


def test_tied_head_and_weight_kinds(seeds, tmp_path):
    d = _hf(seeds, tmp_path, tie_word_embeddings=True)
    refused(["imatrix", d, "--data", seeds["data"]], "lm_head.weight", "tie_word_embeddings")
    q = "model.layers.0.self_attn.q_proj.weight"
    for dt in (torch.int8, torch.int32, torch.bool):
        shutil.rmtree(d)
        d = _hf(seeds, tmp_path, lambda d: _rewrite_st(d, lambda sd: sd.update({q: sd[q].to(dt)})))
        refused(["imatrix", d, "--data", seeds["data"]], q, "not a float type")
    shutil.rmtree(d)

    def nan(sd):
        sd["model.norm.weight"] = sd["model.norm.weight"].clone()
        sd["model.norm.weight"][5] = float("inf")
    d = _hf(seeds, tmp_path, lambda d: _rewrite_st(d, nan))
    refused(["imatrix", d, "--data", seeds["data"]], "model.norm.weight", "NaN/inf", d / "model.safetensors")


def test_tokenizer_errors_name_the_directory(seeds, tmp_path):
    d = _hf(seeds, tmp_path, lambda d: (d / "tokenizer.json").write_text("[]"))
    refused(["imatrix", d, "--data", seeds["data"]], d, "tokenizer")


@pytest.mark.parametrize("row,needle", [(b"5", "got a int"), (b"null", "got a NoneType"), (b'"s"', "got a str"),
                                        (b"[" * 50000 + b"]" * 50000, "nested too deeply"),
                                        (b'{"text": "\\ud800"}', "lone surrogate"), (b'{"text": 5}', "not a string"),
                                        (b'{"text": "caf\xe9"}', "not UTF-8")])
def test_jsonl_rows(seeds, tmp_path, row, needle):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"text": "fine"}\n' + row + b"\n")
    refused(["train", "--teacher", seeds["hf"], "--data", f, "--out", tmp_path / "r"], f"{f}:2", needle)


def test_fifo_in_a_data_folder_is_refused(seeds, tmp_path):
    (tmp_path / "texts").mkdir()
    shutil.copy(seeds["data"], tmp_path / "texts" / "a.txt")
    os.mkfifo(tmp_path / "texts" / "b.txt")
    refused(["train", "--teacher", seeds["hf"], "--data", tmp_path / "texts", "--out", tmp_path / "r"],
            tmp_path / "texts" / "b.txt", "FIFO")


def test_token_cache_is_keyed_by_reader(seeds, tmp_path):
    """The same bytes as .txt and as .jsonl are different documents; the cache must not mix them up."""
    from qatlm.train.data import tokenize_file
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(seeds["hf"])
    raw = "\n".join(json.dumps({"text": f"row {i} " + TEXT[:40]}) for i in range(6))
    (tmp_path / "a.txt").write_text(raw)
    (tmp_path / "a.jsonl").write_text(raw)
    cache = tmp_path / "cache"
    as_txt = tokenize_file(tmp_path / "a.txt", tok, cache)
    as_jsonl = tokenize_file(tmp_path / "a.jsonl", tok, cache)
    assert len(as_jsonl) < len(as_txt)
    assert np.array_equal(as_jsonl, tokenize_file(tmp_path / "a.jsonl", tok, None))


def test_stale_partials_of_dead_processes_are_removed(tmp_path):
    from qatlm.atomic import _owner, atomic_dir, atomic_write_text

    host = _owner().rsplit("-", 1)[0]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.txt.{host}-{dead.pid}.abc123.partial"
    stale.write_bytes(b"x" * 1000)
    mine = tmp_path / f".out.txt.{_owner()}.zzz.partial"  # this process: in use
    mine.write_bytes(b"x")
    old = tmp_path / ".out.txt.q1w2e3r4.partial"  # an older qatlm's name, an hour old
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    atomic_write_text(tmp_path / "out.txt", "hello")
    assert not stale.exists() and not old.exists() and mine.exists()
    sdir = tmp_path / f".qat-hf.{host}-{dead.pid}.xyz.partial"
    (sdir / "sub").mkdir(parents=True)
    with atomic_dir(tmp_path / "qat-hf") as t:
        (t / "f").write_text("1")
    assert not sdir.exists() and (tmp_path / "qat-hf" / "f").read_text() == "1"


def test_full_disk_during_export_hf_is_one_clear_line(seeds, tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*a, **k):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "hf"
    refused(["export", seeds["run"], tmp_path / "o.gguf", "--hf", out], "no space left", out, "free disk space")
    assert not out.exists() and not list(tmp_path.glob(".hf.*.partial"))


def test_symlinked_and_special_outputs(seeds, tmp_path):
    real = tmp_path / "real.gguf"
    real.write_bytes(b"old")
    link = tmp_path / "link.gguf"
    link.symlink_to(real)
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert main(["quantize", str(seeds["gguf"]), str(link)]) == 0
    assert link.is_symlink() and real.read_bytes()[:4] == b"GGUF"  # written through the link
    (tmp_path / "dir.gguf").mkdir()
    refused(["quantize", seeds["gguf"], tmp_path / "dir.gguf"], tmp_path / "dir.gguf", "is a directory")
