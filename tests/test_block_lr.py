"""Block-relative learning rates (qatlm.train.block_lr): each 32-weight block of a fake-quantized Linear moves by
its factor (its max |w| over the model's median block) times what AdamW alone would move it; nothing else
changes. Training with them resumes bit for bit (test_train.test_resume_is_bit_identical)."""
import copy

import pytest
import torch
from torch import nn

from qatlm.student import FakeQuantLinear
from qatlm.train.block_lr import CLAMP, BlockLR
from qatlm.train.config import TrainConfig


def _model():
    g = torch.Generator().manual_seed(0)
    a, b = nn.Linear(64, 4, bias=False), nn.Linear(96, 4, bias=False)
    with torch.no_grad():
        a.weight.copy_(torch.randn(4, 64, generator=g) * 0.02)
        a.weight[0, :32] *= 4  # a large block
        a.weight[1, 32:] *= 0.1  # a small one
        a.weight[2, :32] = 0.0  # an all-zero block: clamped to the lowest factor, not 0
        b.weight.copy_(torch.randn(4, 96, generator=g) * 0.01)
    m = nn.Module()
    m.a, m.b = FakeQuantLinear.from_linear(a, "q4_0"), FakeQuantLinear.from_linear(b, "q4_0")
    m.norm = nn.Parameter(torch.ones(8))  # not a fake-quantized weight: AdamW's own step
    return m


def test_each_block_moves_by_its_factor():
    model = _model()
    blr = BlockLR.of(model)
    sizes = torch.cat([w.detach().reshape(4, -1, 32).abs().amax(-1).flatten() for w in (model.a.weight,
                                                                                          model.b.weight)])
    median = sizes.median()
    fa = dict((id(w), f) for w, f in blr.weights)[id(model.a.weight)]
    assert torch.equal(fa, (model.a.weight.detach().reshape(4, 2, 32).abs().amax(-1) / median).clamp(*CLAMP))
    assert fa[0, 0] > 2 and fa[1, 1] < 0.5 and fa[2, 0] == CLAMP[0]

    g = torch.Generator().manual_seed(1)
    grads = [{n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()} for _ in range(3)]
    plain = copy.deepcopy(model)
    moved = []
    for m, stepper in ((model, blr.step), (plain, lambda opt: opt.step())):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.0)
        start = {n: p.detach().clone() for n, p in m.named_parameters()}
        for step_grads in grads:  # three steps: AdamW's moments build up from the same gradients in both
            for n, p in m.named_parameters():
                p.grad = step_grads[n].clone()
            stepper(opt)
        moved.append({n: p.detach() - start[n] for n, p in m.named_parameters()})
    assert torch.equal(moved[0]["norm"], moved[1]["norm"])  # not a fake-quantized weight: untouched by block_lr
    for w, f in blr.weights:
        name = "a.weight" if w is model.a.weight else "b.weight"
        got, plain_moved = moved[0][name].reshape(4, -1, 32), moved[1][name].reshape(4, -1, 32)
        # tolerance: each step's change is the difference of two rounded fp32 weights, scaled, then added back
        assert torch.allclose(got, plain_moved * f.unsqueeze(-1), rtol=1e-4, atol=1e-10), \
            (got - plain_moved * f.unsqueeze(-1)).abs().max()
        assert not torch.allclose(got, plain_moved, rtol=1e-2)  # the factors mattered


def test_refused_with_lora_and_without_quantized_weights():
    with pytest.raises(ValueError, match="block_lr.*LoRA"):
        TrainConfig(block_lr=True, lora_rank=8).validate()
    m = _model()
    for p in m.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="block_lr: no trainable"):
        BlockLR.of(m)
