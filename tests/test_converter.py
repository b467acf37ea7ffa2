"""The unquantized QAT checkpoint goes through llama.cpp's own tools to the very GGUF qatlm exports.

For every architecture qatlm exports (qatlm.arch: Gemma 3, Llama, Qwen2, Qwen3), a tiny model is trained a few
steps, `qatlm export RUN OUT.gguf --hf DIR` writes the QAT GGUF and the unquantized checkpoint, and then, as a
user would: llama.cpp's convert_hf_to_gguf.py (from the llama-cpp-python sdist, tests/llama_tools.py) turns DIR
into an F32 GGUF, and llama-quantize with the run's plan (and --imatrix where the run trained with one) quantizes
it. The result must equal qatlm's GGUF tensor for tensor, byte for byte: same names, same types, same bytes.
"""
import subprocess
import sys

import numpy as np
import pytest

from conftest import run_tool
from ggml_ref import tensors_by_name
from qatlm.cli import main
from qatlm.imatrix.compute import compute_imatrix
from qatlm.train.config import TrainConfig
from qatlm.train.loop import train
from tiny_models import TEXT, tiny_gemma3, tiny_llama, tiny_qwen

# architecture -> (tiny model builder, plan, llama-quantize file type, whether the run uses an imatrix)
CASES = {
    "gemma3": (lambda d: tiny_gemma3(d, tokenizer="spm"), "q4_0", "Q4_0", True),  # the default recipe's setting
    "llama": (lambda d: tiny_llama(d, tokenizer="spm"), "q4_k_m", "Q4_K_M", False),  # 64-wide rows: K fallbacks
    "qwen2": (lambda d: tiny_qwen(d, 2, tokenizer="spm"), "q8_0", "Q8_0", False),
    "qwen3": (lambda d: tiny_qwen(d, 3, tokenizer="spm"), "q4_0", "Q4_0", False),
}

# 64-wide rows: Q6_K -> Q8_0 for the output / tied embedding; Q4_K_M's Q4_K -> Q5_0 and Q6_K -> Q8_0
EXPECTED_TYPES = {"gemma3": ["F32", "Q4_0", "Q8_0"], "llama": ["F32", "Q5_0", "Q8_0"], "qwen2": ["F32", "Q8_0"],
                  "qwen3": ["F32", "Q4_0", "Q8_0"]}


@pytest.fixture(scope="module")
def convert_script():
    from llama_tools import converter

    return converter()


@pytest.mark.parametrize("arch", list(CASES))
def test_converter_and_llama_quantize_reproduce_the_qat_gguf(arch, tmp_path, convert_script, llama_tool):
    build, plan, ftype, use_imatrix = CASES[arch]
    teacher = build(tmp_path / "teacher")
    data = tmp_path / "train.txt"
    data.write_text(TEXT * 3)
    imatrix = None
    if use_imatrix:
        imatrix = compute_imatrix(teacher, [str(data)], tmp_path / "imatrix.gguf", ctx=64, chunks=4, progress=False)
    run = tmp_path / "run"
    train(TrainConfig(teacher=str(teacher), data=[str(data)], out=str(run), plan=plan, steps=3, seq_len=32,
                      batch_size=2, lr=3e-4, warmup=1, imatrix=str(imatrix) if imatrix else None), progress=False)
    qat, hf = tmp_path / "qat.gguf", tmp_path / "qat-hf"
    assert main(["export", str(run), str(qat), "--hf", str(hf)]) == 0

    # llama.cpp's converter on the unquantized checkpoint, as a user runs it (this interpreter's packages)
    f32 = tmp_path / "converted-f32.gguf"
    r = subprocess.run([sys.executable, str(convert_script), str(hf), "--outfile", str(f32), "--outtype", "f32"],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"convert_hf_to_gguf.py failed on {hf}:\n{r.stderr[-3000:]}"
    requantized = tmp_path / "converted-quantized.gguf"
    run_tool([llama_tool("llama-quantize"), *(["--imatrix", imatrix] if imatrix else []), f32, requantized, ftype,
              "2"], tmp_path / "quantize.log")

    ours, theirs = tensors_by_name(qat), tensors_by_name(requantized)
    assert sorted(ours) == sorted(theirs)
    assert {n: t for n, (t, _) in ours.items()} == {n: t for n, (t, _) in theirs.items()}
    differ = [n for n in ours if not np.array_equal(ours[n][1], theirs[n][1])]
    assert differ == [], f"{len(differ)}/{len(ours)} tensors differ: {differ[:5]}"
    types = sorted({t for t, _ in ours.values()})
    print(f"{arch}: {len(ours)} tensors equal byte for byte ({sum(len(b) for _, b in ours.values())} bytes), "
          f"types {types}")
    assert types == EXPECTED_TYPES[arch]  # the plan's rules (and fallbacks) were exercised, not only F32
