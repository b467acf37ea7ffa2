"""QAT with every K-quant and IQ4 plan (issue 16): a tiny Gemma 3 whose rows are multiples of 256 (so the
K-quants apply without fallbacks) trains a few steps per plan, the exported GGUF holds exactly the student's
fake quant (RTN rule: every block tensor dequantizes to fake_quant of its latent weight; imatrix rule: the file
is byte for byte the imatrix quantization of the unquantized checkpoint, i.e. llama-quantize --imatrix, see
tests/test_ptq.py), and llama.cpp loads and runs it."""
import numpy as np
import pytest
import torch

from qatlm.arch import gguf_tensors
from qatlm.gguf.export import export_gguf
from qatlm.gguf.ptq import quantize_gguf
from qatlm.train.config import TrainConfig
from qatlm.train.loop import load_imatrix, load_run, train
from ggml_ref import assert_export_is_fake_quant, runs_in_llama_cpp, tensors_by_name
from tiny_models import TEXT, tiny_gemma3

# plan -> a block type the file must hold (what the plan is about), with 256-wide rows
PLANS = {"q2_k": "Q2_K", "q3_k_s": "Q3_K", "q3_k_m": "Q3_K", "q3_k_l": "Q3_K", "q4_k_s": "Q4_K", "q4_k_m": "Q4_K",
         "q5_k_s": "Q5_K", "q5_k_m": "Q5_K", "q6_k": "Q6_K", "iq4_nl": "IQ4_NL", "iq4_xs": "IQ4_XS"}


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    root = tmp_path_factory.mktemp("kquant")
    data = root / "train.txt"
    data.write_text(TEXT * 3)
    teacher = tiny_gemma3(root / "gemma3", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64)
    return {"teacher": teacher, "data": data, "root": root}


def _train(wide, out, plan, **kw):
    cfg = TrainConfig(teacher=str(wide["teacher"]), data=[str(wide["data"])], out=str(out), steps=3, seq_len=32,
                      batch_size=2, lr=3e-4, warmup=1, save_every=100, plan=plan, **kw)
    return train(cfg, progress=False)


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_qat_with_plan_exports_its_fake_quant(wide, tmp_path, plan):
    run = _train(wide, tmp_path / "run", plan)
    cfg, t, student = load_run(run)
    out = export_gguf(student, tmp_path / "qat.gguf", plan, hf_dir=t.hf_dir, progress=False)
    types = {typ for typ, _ in tensors_by_name(out).values()}
    assert PLANS[plan] in types, (plan, types)
    latent = dict(gguf_tensors(student))
    n_block = sum(1 for typ, _ in tensors_by_name(out).values() if typ not in ("F32", "F16", "BF16"))
    assert assert_export_is_fake_quant(out, latent) == n_block == 2 * 7 + 1  # 7 matrices a layer + tied embedding
    runs_in_llama_cpp(out, student, t.tokenizer)


@pytest.mark.parametrize("plan", ["q3_k_m", "iq4_xs"])
def test_imatrix_qat_with_plan_is_quantize_imatrix_of_its_checkpoint(wide, tmp_path, plan):
    from qatlm.imatrix.compute import compute_imatrix

    im = compute_imatrix(wide["teacher"], [str(wide["data"])], tmp_path / "imatrix.gguf", ctx=64, chunks=4,
                         progress=False)
    run = _train(wide, tmp_path / "run", plan, imatrix=str(im))
    cfg, t, student = load_run(run)
    qat = export_gguf(student, tmp_path / "qat.gguf", plan, hf_dir=t.hf_dir, progress=False,
                      imatrix=load_imatrix(cfg, student))
    f32 = export_gguf(student, tmp_path / "f32.gguf", "f32", hf_dir=t.hf_dir, progress=False)
    again = quantize_gguf(f32, tmp_path / "again.gguf", plan, imatrix=im, progress=False)
    a, b = tensors_by_name(qat), tensors_by_name(again)
    assert a.keys() == b.keys() and all(a[n][0] == b[n][0] and np.array_equal(a[n][1], b[n][1]) for n in a)
    assert PLANS[plan] in {typ for typ, _ in a.values()}
    rtn = quantize_gguf(f32, tmp_path / "rtn.gguf", plan, progress=False)
    assert any(not np.array_equal(a[n][1], v[1]) for n, v in tensors_by_name(rtn).items())  # the rule mattered
    runs_in_llama_cpp(qat, student, t.tokenizer)


def test_qat_with_mxfp4_override_exports_its_fake_quant(wide, tmp_path):
    """MXFP4 has no llama-quantize file type for dense models (its MXFP4_MOE puts it on MoE experts only), so it is
    reached by an override: every 2-D weight of the blocks as MXFP4 (the embedding stays Q8_0). The exported file
    holds exactly the student's fake quant, and llama.cpp runs it."""
    over = ("blk\\..*=mxfp4",)
    run = _train(wide, tmp_path / "run", "q8_0", overrides=list(over))
    cfg, t, student = load_run(run)
    out = export_gguf(student, tmp_path / "qat.gguf", "q8_0", over, hf_dir=t.hf_dir, progress=False)
    types = [typ for typ, _ in tensors_by_name(out).values()]
    assert types.count("MXFP4") == 2 * 7, types
    latent = dict(gguf_tensors(student))
    assert assert_export_is_fake_quant(out, latent) == 2 * 7 + 1
    runs_in_llama_cpp(out, student, t.tokenizer)
