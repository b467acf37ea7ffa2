"""LoRA inside the fake quantizer (qatlm.student.lora): adapters train, merge exactly, export exactly."""
import copy
import json

import numpy as np
import pytest
import torch

import qatlm.formats as F
from qatlm.arch import gguf_tensors
from qatlm.gguf.export import export_gguf
from qatlm.student import FakeQuantLinear, add_lora, convert, prepare
from qatlm.teacher import load_teacher
from qatlm.train.config import TrainConfig
from qatlm.train.loop import load_run, train
from ggml_ref import assert_export_is_fake_quant
from tiny_models import TEXT, tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    data = root / "train.txt"
    data.write_text(TEXT * 3)
    return {"llama": tiny_llama(root / "llama"), "data": data}


def kls(run):
    return [json.loads(line)["kl"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_lora_trains_and_exports_exactly(tiny, tmp_path):
    """--lora: only adapters train (base frozen), the loss falls, and the exported GGUF is fake quant of the
    merged weights, which are bit for bit the weights the student's forward quantized."""
    cfg = TrainConfig(teacher=str(tiny["llama"]), data=[str(tiny["data"])], out=str(tmp_path / "run"), steps=25,
                      seq_len=32, batch_size=4, lr=3e-3, warmup=2, save_every=100, plan="q4_0", lora_rank=4,
                      device="cpu")
    run = train(cfg, progress=False)
    k = kls(run)
    assert np.mean(k[-5:]) < 0.7 * k[0], k
    from qatlm.train.checkpoint import load_checkpoint
    from qatlm.train.loop import build_student

    trained = build_student(cfg, load_teacher(cfg.teacher).model)
    load_checkpoint(run, trained)
    b = {n: float(p.abs().max()) for n, p in trained.named_parameters() if n.endswith("lora_B")}
    assert len(b) == 2 * 7 + 1 and min(b.values()) > 0, b  # every adapter trained, the output head's too
    cfg, t, student = load_run(run)
    # the checkpoint holds adapters; base weights are the teacher's after the PTQ snap, untouched by training
    assert "lora_A" not in "".join(n for n, _ in student.named_parameters())  # merged by convert()
    out = export_gguf(student, tmp_path / "lora.gguf", "q4_0", hf_dir=t.hf_dir, progress=False)
    assert assert_export_is_fake_quant(out, dict(gguf_tensors(student))) == 2 * 7 + 2


def test_lora_merge_equals_forward_weights_on_the_bundled_model(gemma_gguf, tmp_path):
    """On Gemma 3 270M: adapters set to random values (as after training); convert() merges them into exactly
    the weights the fake-quant forward used, and the exported GGUF holds exactly their Q4_0 bytes."""
    t = load_teacher(str(gemma_gguf))
    student = copy.deepcopy(t.model)
    prepare(student, "q4_0")
    trainable = add_lora(student, rank=8)
    assert trainable == sum(p.numel() for p in student.parameters() if p.requires_grad)
    g = torch.Generator().manual_seed(0)
    seen = {}
    with torch.no_grad():
        for name, m in student.named_modules():
            if isinstance(m, FakeQuantLinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 1e-3)
                seen[name] = (m.fmt, F.fake_quant(m.merged_weight(), m.fmt))  # what the forward computes with
    convert(student)
    mods = dict(student.named_modules())
    for name, (fmt, fq) in seen.items():
        assert torch.equal(F.fake_quant(mods[name].weight, fmt), fq), name
    out = export_gguf(student, tmp_path / "lora.gguf", "q4_0", source_gguf=t.gguf_path, progress=False)
    assert assert_export_is_fake_quant(out, dict(gguf_tensors(student)), {"q4_0"}) == 18 * 7
