"""Fake-quant modules (qatlm.student.fakequant): the student computes with exactly the simulated plan's values,
convert() gives plain modules back, and the snap starts training exactly at PTQ on the real Gemma 3 270M."""
import copy

import pytest
import torch
from torch import nn

import qatlm.formats as F
from qatlm.student import FakeQuantEmbedding, FakeQuantLinear, FakeQuantTiedHead, apply_plan_, convert, prepare
from qatlm.student import snap_toward_grid_
from qatlm.student.plan import plan_types
from qatlm.teacher import load_teacher
from tiny_models import tiny_gemma3, tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("fq")
    return {"llama": tiny_llama(root / "llama"), "gemma3": tiny_gemma3(root / "gemma3")}


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("plan", ["q4_0", "pure:q8_0"])
def test_student_forward_equals_the_simulated_plan(tiny, arch, plan):
    """prepare(model, plan) computes bit for bit what the model with every weight replaced by its GGUF value
    computes (Gemma: tied head and the sqrt(hidden) embedding scale from the architecture registry)."""
    t = load_teacher(tiny[arch])
    student, simulated = copy.deepcopy(t.model), copy.deepcopy(t.model)
    keys = list(student.state_dict())
    types = prepare(student, plan)
    apply_plan_(simulated, plan)
    ids = torch.randint(0, student.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(student(ids).logits, simulated(ids).logits)
    fq = [m for m in student.modules() if isinstance(m, (FakeQuantLinear, FakeQuantEmbedding, FakeQuantTiedHead))]
    assert len(fq) == sum(t in F.names() for t in types.values()) + (arch == "gemma3")  # + the tied head
    # the same parameters under the same names (Gemma's tied head holds the embedding itself)
    assert [k.replace("lm_head.embedding.", "lm_head.") for k in student.state_dict()] == keys
    convert(student)
    assert not any(isinstance(m, (FakeQuantLinear, FakeQuantEmbedding, FakeQuantTiedHead)) for m in student.modules())
    assert type(student.get_input_embeddings()) is type(t.model.get_input_embeddings())
    assert list(student.state_dict()) == keys
    if arch == "gemma3":
        assert student.lm_head.weight is student.get_input_embeddings().weight  # still tied
    for (n, a), b in zip(student.state_dict().items(), t.model.state_dict().values()):
        assert torch.equal(a, b), n  # convert() keeps the latent weights


def test_fake_quant_modules_declare_their_state(tiny):
    t = load_teacher(tiny["llama"])
    prepare(t.model, "q4_0")
    m = t.model.model.layers[0].self_attn.q_proj
    assert type(m) is FakeQuantLinear and m.fmt == "q4_0" and m.enabled and m.lora_A is None
    assert isinstance(m, nn.Linear)


def test_snap_starts_exactly_at_ptq_and_off_the_boundaries(gemma_gguf):
    """The quantized-teacher trap (Gemma 3 270M: Q5_0 tensors on Q4_0 boundaries): after the snap, every
    weight quantizes to exactly its PTQ value, and a tiny update no longer flips codes."""
    model = load_teacher(gemma_gguf).model
    types = plan_types(model, "q4_0")
    name = "model.layers.0.mlp.gate_proj.weight"  # stored as Q5_0 in the teacher file
    assert types[name] == "q4_0"
    w0 = dict(model.named_parameters())[name].detach().clone()

    def flips(w):
        bump = w * (1 + 1e-6 * torch.sign(torch.randn(w.shape, generator=torch.Generator().manual_seed(0))))
        return float((F.fake_quant(bump, "q4_0") != F.fake_quant(w, "q4_0")).float().mean())

    before = flips(w0)

    def ptq_values():
        return {n: F.fake_quant(p.detach().reshape(-1, p.shape[-1]), types[n])
                for n, p in model.named_parameters() if types[n] in F.names()}

    ptq = ptq_values()
    assert snap_toward_grid_(model, "q4_0") > 1_000_000
    w1 = dict(model.named_parameters())[name].detach()
    assert not torch.equal(w1, w0)
    after = ptq_values()
    assert all(torch.equal(after[n], ptq[n]) for n in ptq)  # the student starts exactly at PTQ
    assert before > 0.1 and flips(w1) == 0.0, (before, flips(w1))


