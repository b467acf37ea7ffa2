"""Learned block scales (issue 12's lever): a trained factor on each 32-weight block's fp16 d, written into the GGUF.

The codes stay libggml's decisions (with and without an importance matrix: the bytes before scaling are
ggml_quantize_chunk's), `fake_quant_scaled` equals the dequantized scaled export bit for bit (eager and compiled
search), the factors get the exact gradient, and a tiny Gemma 3 trained with them exports a GGUF whose every scaled
tensor is exactly what the student's modules computed with; llama.cpp runs it."""
import numpy as np
import pytest
import torch

import qatlm.formats as F
from qatlm import arch
from qatlm.gguf.export import export_gguf, export_hf
from qatlm.student import FakeQuantLinear, learned_block_scales
from qatlm.train.checkpoint import load_checkpoint
from qatlm.train.config import TrainConfig
from qatlm.train.loop import build_student, load_imatrix, load_run, train
from ggml_ref import ggml_quantize, runs_in_llama_cpp, tensors_by_name
from tiny_models import TEXT, tiny_gemma3


def _case(rows: int, imx: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, 256, generator=g) * 0.02
    w[0, :32] = 0.0  # an all-zero block: d = 0 whatever the factor
    im = torch.rand(256, generator=g) + 0.1 if imx else None
    s = 1 + 0.2 * (torch.rand(rows, 8, generator=g) - 0.5)
    return w, im, s


@pytest.mark.parametrize("rows", [8, 2048])  # 2048 x 256 = 2^19 weights: Q4_0/Q5_0's compiled imatrix search
@pytest.mark.parametrize("imx", [False, True])
@pytest.mark.parametrize("fmt", F.SCALED_FORMATS)
def test_scaled_fake_quant_is_the_scaled_export(fmt, imx, rows):
    w, im, s = _case(rows, imx)
    raw = F.quantize(w, fmt, im)
    assert np.array_equal(raw, ggml_quantize(w.numpy(), fmt, None if im is None else im.numpy()))
    assert torch.equal(F.fake_quant_scaled(w, fmt, torch.ones_like(s), im), F.fake_quant(w, fmt, im))
    scaled = F.scale_blocks(raw, fmt, s)
    f = F.get(fmt)
    before = f.unpack(torch.from_numpy(raw).reshape(-1, f.type_size))
    after = f.unpack(torch.from_numpy(scaled).reshape(-1, f.type_size))
    assert torch.equal(before.q, after.q)  # only the scales changed
    assert torch.equal(after.d, (before.d.float() * s.reshape(-1, 1)).half())
    assert not torch.equal(before.d, after.d)
    assert torch.equal(F.fake_quant_scaled(w, fmt, s, im), F.dequantize(scaled, fmt, w.shape))


def test_scale_gradient():
    w, im, s = _case(64, True, seed=1)
    w.requires_grad_(True)
    s.requires_grad_(True)
    gout = torch.randn(w.shape, generator=torch.Generator().manual_seed(2))
    F.fake_quant_scaled(w, "q4_0", s, im).backward(gout)
    assert torch.equal(w.grad, gout)  # straight through
    codes = F.get("q4_0").unpack(torch.from_numpy(F.quantize(w.detach(), "q4_0", im)).reshape(-1, 18))
    u, d = codes.q.float() - 8, codes.d.float()
    expected = (gout.reshape(-1, 32) * u).sum(1, keepdim=True) * d  # d/ds of u * (d * s), summed over the block
    # tolerance: the same sum, possibly reduced in another order
    assert torch.allclose(s.grad.reshape(-1, 1), expected, rtol=1e-5, atol=1e-9)
    assert float(s.grad.abs().sum()) > 0


def test_scaled_formats_only():
    with pytest.raises(ValueError, match="one fp16 scale per 32 weights"):
        F.fake_quant_scaled(torch.randn(4, 256), "q4_k", torch.ones(4, 8))
    with pytest.raises(ValueError, match="do not fit"):
        F.fake_quant_scaled(torch.randn(4, 256), "q4_0", torch.ones(4, 4))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from qatlm.imatrix.compute import compute_imatrix

    root = tmp_path_factory.mktemp("scales")
    data = root / "train.txt"
    data.write_text(TEXT * 3)
    teacher = tiny_gemma3(root / "gemma3")
    im = compute_imatrix(teacher, [str(data)], root / "imatrix.gguf", ctx=64, chunks=4, progress=False)
    return {"teacher": teacher, "data": data, "imatrix": im}


def test_training_learns_scales_and_exports_what_the_student_computed(tiny, tmp_path):
    cfg = TrainConfig(teacher=str(tiny["teacher"]), data=[str(tiny["data"])], out=str(tmp_path / "run"), steps=4,
                      seq_len=32, batch_size=2, lr=3e-4, warmup=1, save_every=100, plan="q4_0",
                      imatrix=str(tiny["imatrix"]), learn_scales=True, scale_lr=1e-2)
    run = train(cfg, progress=False)
    cfg, t, student = load_run(run)
    scales = learned_block_scales(student)
    assert len(scales) == 2 * 7  # every Linear weight of both layers (the embedding is Q8_0 and not a Linear)
    assert all(bool((s != 1).any()) for s in scales.values())  # they trained
    out = export_gguf(student, tmp_path / "qat.gguf", cfg.plan, hf_dir=t.hf_dir, progress=False,
                      imatrix=load_imatrix(cfg, student))
    written = tensors_by_name(out)
    # the student as it trained (fake-quant modules, checkpoint loaded): each module's weight is the file's tensor
    trained = build_student(cfg, t.model)
    load_checkpoint(run, trained)
    names = arch.gguf_names(trained)
    checked = 0
    for mname, m in trained.named_modules():
        if isinstance(m, FakeQuantLinear) and m.qat_block_scale is not None:
            typ, data = written[names[mname + ".weight"]]
            with torch.no_grad():
                assert torch.equal(F.dequantize(data.reshape(-1), typ.lower(), m.weight.shape), m.effective_weight())
            checked += 1
    assert checked == len(scales)
    hf = export_hf(student, t.tokenizer, tmp_path / "hf", t.hf_dir)
    assert (hf / "qat_block_scales.safetensors").is_file()
    runs_in_llama_cpp(out, trained.eval(), t.tokenizer)  # against the student's own (fake-quant) forward
