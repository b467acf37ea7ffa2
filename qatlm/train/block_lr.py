"""Block-relative learning rates (`block_lr`, issue 12's candidate "learned rounding"): every 32-weight block of a
fake-quantized Linear weight moves at lr times its own size over the model's median block size.

AdamW moves every weight by about lr per step whatever its magnitude, but what QAT changes is codes, and a code
is one quantization step d of its block (Q4_0: d = max|w| / 8). On Gemma 3 270M the blocks' d spans 11x between
the 1st and 99th percentile (3.7x from the 10th to the 90th), so one lr moves small blocks across several codes
while large ones barely reach a decision boundary. With block_lr each block's update is scaled by
    f = max|w| of the block / median over all trained blocks of the model, clamped to [0.1, 10]
(computed once from the student's starting weights, so a resumed run recomputes the same factors), which makes lr
mean "the median block's step": every block then moves the same fraction of its quantization step, as
AutoRound's rounding offsets do.

How: AdamW (torch's, unchanged, its state and checkpoints as usual) takes its step; the change of each scaled
weight is then multiplied by its block's factor: w <- w0 + f * (w - w0). That holds a copy of the scaled weights
during the step (torch's AdamW has no per-element learning rate). Single process only (FSDP2 shards the
weights' rows; refused in qatlm.train.loop).
"""
from __future__ import annotations

import torch

from ..student import FakeQuantLinear

GROUP = 32  # weights per block: every block format's rows are whole 32-weight groups (K-quants' sub-blocks: 16/32)
CLAMP = (0.1, 10.0)


class BlockLR:
    """The factors of every trainable FakeQuantLinear weight, and the step that applies them."""

    def __init__(self, weights: list[tuple[torch.nn.Parameter, torch.Tensor]]):
        self.weights = weights  # (weight [out, in], factor [out, in // GROUP])

    @classmethod
    def of(cls, model: torch.nn.Module) -> "BlockLR":
        mods = [m for m in model.modules() if isinstance(m, FakeQuantLinear) and m.weight.requires_grad]
        if not mods:
            raise ValueError("block_lr: no trainable fake-quantized Linear weight (LoRA trains adapters, not weights; "
                             "a plan that quantizes no Linear): train without block_lr")
        with torch.no_grad():
            sizes = [m.weight.detach().float().reshape(m.out_features, -1, GROUP).abs().amax(-1) for m in mods]
            median = torch.cat([s.flatten() for s in sizes]).median()
            if not median > 0:
                raise ValueError("block_lr: the model's median block of quantized weights is all zeros")
            return cls([(m.weight, (s / median).clamp(*CLAMP)) for m, s in zip(mods, sizes)])

    def step(self, opt: torch.optim.Optimizer) -> None:
        """opt.step(), with each scaled weight's change multiplied by its blocks' factors."""
        before = [w.detach().clone() for w, _ in self.weights]
        opt.step()
        with torch.no_grad():
            for (w, f), w0 in zip(self.weights, before):
                delta = (w - w0).view(f.shape[0], f.shape[1], GROUP) * f.unsqueeze(-1)
                w.copy_(w0 + delta.view_as(w))
