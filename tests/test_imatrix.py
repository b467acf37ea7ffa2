"""qatlm.imatrix against llama.cpp's own tools: the file formats byte for byte, the statistics within 2%.

The tools (llama-imatrix, llama-quantize) are built once per cache from the installed llama-cpp-python's sources
(tests/llama_tools.py, minutes the first time). The reference run is Gemma 3 270M (the bundled teacher, as F32
GGUF for llama.cpp, dequantized by llama-quantize), 4 chunks x 512 tokens of qatlm's GPL-3.0 text, 2 threads.
"""
import struct
import subprocess
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFValueType, GGUFWriter

import qatlm
from qatlm.imatrix import Imatrix, check_against, collect, imatrix_chunks, read_imatrix, write_imatrix
from conftest import run_tool as _run

N_CTX, N_CHUNKS, THREADS = 512, 4, 2


# ---- fixtures: llama.cpp's tools and one reference run of each side ----


@pytest.fixture(scope="session")
def text_file() -> Path:
    # found wherever the package keeps it (qatlm/corpora/ now), so a move of the data module does not break this
    return next(Path(qatlm.__file__).parent.rglob("gpl-3.0.txt"))


@pytest.fixture(scope="session")
def llama_imatrix(llama_f32_gguf, text_file, session_tmp, llama_tool) -> Path:
    out = session_tmp / "llama-imatrix.gguf"
    _run([llama_tool("llama-imatrix"), "-m", llama_f32_gguf, "-f", text_file, "-o", out, "-c", N_CTX,
          "--chunks", N_CHUNKS, "-t", THREADS, "--no-ppl"], session_tmp / "llama-imatrix.log")
    return out


@pytest.fixture(scope="session", params=["fp32", "bf16"])
def qatlm_imatrix(request, gemma_gguf, text_file) -> Imatrix:
    from qatlm.arch import gguf_names
    from qatlm.teacher import load_teacher

    torch.set_num_threads(THREADS)
    teacher = load_teacher(gemma_gguf)
    model, tok = teacher.model, teacher.tokenizer
    names = {p[: -len(".weight")]: g for p, g in gguf_names(model).items()
             if g.startswith("blk.") and isinstance(model.get_submodule(p[: -len(".weight")]), torch.nn.Linear)}
    text = text_file.read_text(encoding="utf-8")
    text = text[:-1] if text.endswith("\n") else text  # llama.cpp's -f strips one trailing newline
    # Gemma 3's GGUF has add_bos_token = true: llama.cpp tokenizes with BOS first, no other special tokens
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False).input_ids
    chunks = imatrix_chunks(ids, N_CTX, N_CHUNKS, tok.bos_token_id, data=str(text_file))
    precision = request.param
    if precision == "bf16":
        from qatlm.train.dist import native_bf16

        if not native_bf16(torch.device("cpu")):
            pytest.skip("this CPU has no native bf16")
    return collect(model, names, chunks, progress=False, datasets=[str(text_file)], precision=precision)


# ---- (b) the statistics ----


def test_tokens_match_llama_cpp(gemma_gguf, text_file):
    """The chunks collect() sees are llama-imatrix's: same token ids (llama.cpp's tokenizer, BOS first)."""
    import llama_cpp
    from transformers import AutoTokenizer
    from qatlm.teacher import gguf_to_hf_cache

    text = text_file.read_text(encoding="utf-8")[:-1]
    llm = llama_cpp.Llama(str(gemma_gguf), vocab_only=True, verbose=False)
    ref = llm.tokenize(text.encode(), add_bos=True, special=False)
    tok = AutoTokenizer.from_pretrained(gguf_to_hf_cache(Path(gemma_gguf)))
    ours = [tok.bos_token_id] + tok(text, add_special_tokens=False).input_ids
    assert ours[: N_CTX * N_CHUNKS] == ref[: N_CTX * N_CHUNKS]
    assert llm.token_bos() == tok.bos_token_id


def test_statistics_match_llama_imatrix(llama_imatrix, qatlm_imatrix):
    ref = read_imatrix(llama_imatrix)
    ours = qatlm_imatrix
    assert sorted(ours.entries) == sorted(ref.entries)
    assert len(ref) == 18 * 7  # every blk.* matmul of the 18 layers, nothing else (no token_embd, no output)
    assert (ours.chunk_count, ours.chunk_size) == (ref.chunk_count, ref.chunk_size) == (N_CHUNKS, N_CTX)
    worst = defaultdict(float)
    for name, e in ref.entries.items():
        # every position of every chunk counted, as llama-imatrix does
        assert e.counts.tolist() == ours.entries[name].counts.tolist() == [N_CTX * N_CHUNKS], name
        w_ref, w = ref.weights(name), ours.weights(name)
        rel = float(np.linalg.norm(w - w_ref) / np.linalg.norm(w_ref))
        kind = name.split(".")[2]
        worst[kind] = max(worst[kind], rel)
    print("max relative L2 of in_sum2/count per tensor type:",
          ", ".join(f"{k} {v:.2e}" for k, v in sorted(worst.items())))
    # llama.cpp computes the activations in its own kernels (its GELU, its attention with an F16 KV cache, its
    # summation order), so the sums agree closely but not bit for bit; measured max ~7.5e-4 (attn_output) in
    # fp32; bf16 rounds every matmul's inputs and outputs (8 bits of mantissa), measured max ~1e-2
    assert max(worst.values()) < 0.02, dict(worst)


# ---- (a) the files ----


def test_reads_llama_imatrix_file_and_rewrites_it_byte_for_byte(llama_imatrix, text_file, session_tmp):
    im = read_imatrix(llama_imatrix)
    assert im.datasets == [str(text_file)]
    assert not im.legacy
    out = write_imatrix(im, session_tmp / "rewritten.gguf")
    assert out.read_bytes() == llama_imatrix.read_bytes()


def test_legacy_dat_matches_llama_imatrix(llama_imatrix, llama_f32_gguf, session_tmp, llama_tool):
    """llama-imatrix converts its GGUF to the legacy format (--in-file, --output-format dat); qatlm reads that
    file to the same per-column weights and writes the same bytes."""
    dat = session_tmp / "llama-imatrix.dat"
    _run([llama_tool("llama-imatrix"), "-m", llama_f32_gguf, "--in-file", llama_imatrix, "-o", dat,
          "--output-format", "dat"], session_tmp / "to-dat.log")
    g, d = read_imatrix(llama_imatrix), read_imatrix(dat)
    assert d.legacy and d.chunk_count == g.chunk_count and d.datasets == g.datasets
    for name in g.entries:
        np.testing.assert_allclose(d.weights(name), g.weights(name), rtol=1e-6, atol=0, err_msg=name)
    assert write_imatrix(g, session_tmp / "qatlm.dat").read_bytes() == dat.read_bytes()


def test_llama_quantize_accepts_qatlm_imatrix(qatlm_imatrix, llama_f32_gguf, session_tmp, llama_tool):
    path = write_imatrix(qatlm_imatrix, session_tmp / "qatlm-imatrix.gguf")
    out = session_tmp / "q4_0-imatrix.gguf"
    log = _run([llama_tool("llama-quantize"), "--imatrix", path, llama_f32_gguf, out, "Q4_0", THREADS],
               session_tmp / "quantize-imatrix.log")
    assert f"loaded {len(qatlm_imatrix)} importance matrix entries" in log
    assert "did not find weights for blk." not in log
    from gguf import GGMLQuantizationType, GGUFReader

    types = {t.name: t.tensor_type for t in GGUFReader(out).tensors}
    # llama-quantize's rule with an imatrix: ffn_down of layers i < n_layer/8 (0, 1 of 18) becomes Q4_1
    assert types["blk.0.ffn_down.weight"] == types["blk.1.ffn_down.weight"] == GGMLQuantizationType.Q4_1
    assert types["blk.2.ffn_down.weight"] == GGMLQuantizationType.Q4_0


def _random_imatrix(seed=0) -> Imatrix:
    rng = np.random.default_rng(seed)
    im = Imatrix(datasets=["a.txt", "b.txt"], chunk_count=3, chunk_size=512)
    im.add("blk.0.attn_q.weight", rng.random(640, dtype=np.float32) * 50, 1536)
    im.add("blk.0.ffn_down.weight", rng.random(2048, dtype=np.float32), 1536)
    im.add("blk.1.ffn_down_exps.weight", rng.random((4, 64), dtype=np.float32), [512, 1024, 7, 1536])  # MoE
    return im


def test_gguf_round_trip(tmp_path):
    im = _random_imatrix()
    back = read_imatrix(write_imatrix(im, tmp_path / "x.gguf"))
    assert (back.datasets, back.chunk_count, back.chunk_size) == (im.datasets, im.chunk_count, im.chunk_size)
    assert sorted(back.entries) == sorted(im.entries)
    for name, e in im.entries.items():
        assert np.array_equal(back.entries[name].in_sum2, e.in_sum2), name
        assert np.array_equal(back.entries[name].counts, e.counts), name
        assert np.array_equal(back.weights(name), im.weights(name)), name
    # written twice: the same bytes (sorted names, no time stamps)
    assert write_imatrix(back, tmp_path / "y.gguf").read_bytes() == (tmp_path / "x.gguf").read_bytes()


def test_dat_round_trip(tmp_path):
    im = _random_imatrix()
    back = read_imatrix(write_imatrix(im, tmp_path / "x.dat"))
    assert back.legacy and back.chunk_count == im.chunk_count and back.datasets == im.datasets[-1:]
    for name in im.entries:  # (sum / count) * ncall / ncall: equal up to float rounding
        np.testing.assert_allclose(back.weights(name), im.weights(name), rtol=1e-6, atol=0, err_msg=name)
    assert write_imatrix(back, tmp_path / "y.dat").read_bytes() == (tmp_path / "x.dat").read_bytes()


def test_weights_follow_llama_quantize():
    im = Imatrix(chunk_count=1, chunk_size=512)
    im.add("blk.0.ffn_down_exps.weight", np.array([[2, 4], [6, 8]], np.float32), [2, 0])
    # quantize.cpp load_imatrix: in_sum2 / count per matrix, 1.0 for a matrix with a zero count
    assert im.weights("blk.0.ffn_down_exps.weight").tolist() == [1, 2, 1, 1]


# ---- bad input: a ValueError naming the file (and the tensor) ----


def _raw_gguf(path: Path, tensors: dict, keys=True, gtype="imatrix") -> Path:
    """An imatrix-like GGUF written with gguf-py directly (so that it can be wrong in ways write_imatrix refuses)."""
    w = GGUFWriter(path, arch="imatrix")
    w.kv_data[0].pop("general.architecture", None)
    w.add_key_value("general.type", gtype, GGUFValueType.STRING)
    if keys:
        w.add_key_value("imatrix.datasets", ["t.txt"], GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
        w.add_key_value("imatrix.chunk_count", 1, GGUFValueType.UINT32)
        w.add_key_value("imatrix.chunk_size", 512, GGUFValueType.UINT32)
    for name, arr in tensors.items():
        w.add_tensor(name, np.asarray(arr, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


GOOD = {"blk.0.attn_q.weight.in_sum2": np.ones(64), "blk.0.attn_q.weight.counts": [512.0]}


@pytest.mark.parametrize("case, tensors, keys, match", [
    ("zero count", {"blk.0.attn_q.weight.in_sum2": np.ones(64), "blk.0.attn_q.weight.counts": [0.0]}, True,
     r"tensor blk\.0\.attn_q\.weight\.counts has a count of zero"),
    ("nan", {"blk.0.attn_q.weight.in_sum2": [1.0, np.nan] * 32, "blk.0.attn_q.weight.counts": [512.0]}, True,
     r"tensor blk\.0\.attn_q\.weight\.in_sum2 has 32 non-finite"),
    ("negative", {"blk.0.attn_q.weight.in_sum2": [1.0, -2.0] * 32, "blk.0.attn_q.weight.counts": [512.0]}, True,
     r"tensor blk\.0\.attn_q\.weight\.in_sum2 has 32 negative"),
    ("no counts", {"blk.0.attn_q.weight.in_sum2": np.ones(64)}, True, r"tensor blk\.0\.attn_q\.weight has no \.counts"),
    ("split", {"blk.0.attn_q.weight.in_sum2": np.ones(64), "blk.0.attn_q.weight.counts": [1.0, 2.0, 3.0]}, True,
     r"tensor blk\.0\.attn_q\.weight: 64 sums do not split into 3"),
    ("no metadata", GOOD, False, r"imatrix metadata missing: imatrix\.datasets"),
])
def test_bad_gguf(tmp_path, case, tensors, keys, match):
    path = _raw_gguf(tmp_path / f"{case.replace(' ', '_')}.gguf", tensors, keys)
    with pytest.raises(ValueError, match=match) as e:
        read_imatrix(path)
    assert str(path) in str(e.value)


def test_truncated_and_corrupt(tmp_path):
    good = write_imatrix(_random_imatrix(), tmp_path / "good.gguf").read_bytes()
    cases = {"truncated.gguf": good[: len(good) - 100], "header.gguf": good[:40],
             "garbage.gguf": b"GGUF" + bytes(range(256)) * 4, "empty.gguf": b""}
    dat = write_imatrix(_random_imatrix(), tmp_path / "good.dat").read_bytes()
    cases |= {"truncated.dat": dat[:1000], "noise.dat": np.random.default_rng(1).bytes(500)}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError) as e:
            read_imatrix(tmp_path / name)
        assert str(tmp_path / name) in str(e.value), (name, str(e.value))


def test_not_an_imatrix(gemma_gguf, tmp_path):
    with pytest.raises(ValueError, match="a GGUF file but not an imatrix") as e:
        read_imatrix(gemma_gguf)
    assert str(gemma_gguf) in str(e.value) and "gemma3" in str(e.value)
    other = _raw_gguf(tmp_path / "other.gguf", GOOD, gtype="adapter")
    with pytest.raises(ValueError, match="not an imatrix"):
        read_imatrix(other)


def test_check_against(tmp_path):
    im = read_imatrix(write_imatrix(_random_imatrix(), tmp_path / "x.gguf"))
    shapes = {"blk.0.attn_q.weight": (1024, 640), "blk.0.ffn_down.weight": (640, 2048),
              "blk.1.ffn_down_exps.weight": (4, 32, 64)}
    check_against(im, shapes, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match=r"x\.gguf: .*no entry for 1 weight\(s\): blk\.5\.attn_k\.weight"):
        check_against(im, shapes | {"blk.5.attn_k.weight": (256, 640)}, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match=r"x\.gguf: .*wrong size: blk\.0\.ffn_down\.weight: imatrix has 1 x 2048 "
                                         r"values, the weight \(640, 1024\) needs 1 x 1024"):
        check_against(im, shapes | {"blk.0.ffn_down.weight": (640, 1024)}, tmp_path / "x.gguf")


def test_collect_rejects_bad_names_and_short_text():
    lin = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    with pytest.raises(ValueError, match="'1': a ReLU, not an nn.Linear"):
        collect(lin, {"1": "blk.0.attn_q.weight"}, [[0] * 16], progress=False)
    with pytest.raises(ValueError, match="'nope': no such module"):
        collect(lin, {"nope": "blk.0.attn_q.weight"}, [[0] * 16], progress=False)
    with pytest.raises(ValueError, match="needs at least 1024"):
        imatrix_chunks(list(range(1000)), 512)
    assert imatrix_chunks(list(range(1100)), 512, bos=7) == [[7] + list(range(1, 512)), [7] + list(range(513, 1024))]


def test_dat_layout(tmp_path):
    """The legacy layout, written by hand: n_entries, (len, name, ncall, nval, floats)..., chunk count, dataset."""
    name = b"blk.0.attn_v.weight"
    vals = np.array([3.0, 6.0], np.float32)
    raw = (struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", 3, 2) + vals.tobytes()
           + struct.pack("<i", 3) + struct.pack("<i", 5) + b"d.txt")
    (tmp_path / "h.dat").write_bytes(raw)
    im = read_imatrix(tmp_path / "h.dat")
    assert im.legacy and im.chunk_count == 3 and im.datasets == ["d.txt"] and im.chunk_size == 0
    assert im.weights("blk.0.attn_v.weight").tolist() == [1.0, 2.0]  # floats / ncall, as llama-quantize


# ---- the tools' cache (tests/llama_tools.py): built once, atomically, under a lock ----

_FAKE_BUILD = r"""
import sys, time, json
sys.path.insert(0, sys.argv[1])
import llama_tools as L

def fake_build(version, work, out):  # stands in for the minutes-long cmake build
    with open(sys.argv[2], "a") as fh:
        fh.write("build\n")
    time.sleep(1.5)
    (out / "bin").mkdir(parents=True)
    for t in L.TOOLS:
        (out / "bin" / t).write_text("#!/bin/sh\n")
    return {"llama_cpp_python": version, "tools": list(L.TOOLS), "cpu_flags": L._cpu_flags(), "build_s": 1.5}

L._build = fake_build
print(L.tool("llama-quantize"))
"""


def test_tools_cache_built_once_by_concurrent_callers(tmp_path):
    import os
    import sys

    env = dict(os.environ, QATLM_CACHE=str(tmp_path / "cache"))
    log = tmp_path / "builds.log"
    here = str(Path(__file__).parent)
    procs = [subprocess.Popen([sys.executable, "-c", _FAKE_BUILD, here, str(log)], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    version = outs[0].split(os.sep)[-3]
    expect = tmp_path / "cache" / "llama.cpp-tools" / version / "bin" / "llama-quantize"
    assert outs == [str(expect)] * 3
    assert log.read_text() == "build\n"  # one build; the others waited on the lock and found it complete
    left = sorted(p.name for p in expect.parent.parent.parent.iterdir())
    assert left == [f".{version}.lock", version]  # no temporary build directory left behind
