"""Held-out validation during training: the KD loss of the fake-quantized student on a few held-out blocks.

Every `eval_every` steps and at the last step, train() measures the KL it trains on (the same kd_loss, same
temperature, kd_on mask and precision) without gradients, with fake quant on and the student in eval mode, on
`eval_blocks` blocks of heldout.pt spread evenly over it (the same blocks all run long), and writes it as
"heldout_kl" into that step's record of metrics.jsonl. It changes no weight, no optimizer state and no random
state (it runs under torch.random.fork_rng), so the training trajectory, and a resumed run's metrics, are exactly
what they are without it. With --budget-minutes it also runs at step 2, where the schedule is sized: its time
(per eval_every steps) counts against the budget. Cost: forward passes of both models over eval_blocks blocks,
about a third of a training step's compute per batch_size blocks (measured on Gemma 3 270M, CPU: 4 blocks of
256 tokens took 0.6-0.75x one 2 x 256 training step), so ~7% of the training time with the defaults.

    qatlm train ... --eval-every 10 --set eval_blocks=8
"""
from __future__ import annotations

import numpy as np
import torch

from ..student.fakequant import FAKE_QUANT_MODULES
from .data import split_mask


def eval_subset(held: torch.Tensor, n: int) -> torch.Tensor:
    """At most n of the held-out blocks [N, T], evenly spread (first and last included): [min(n, N), T]."""
    if len(held) <= n:
        return held
    return held[torch.from_numpy(np.linspace(0, len(held) - 1, n).round().astype(np.int64))]


def is_eval_step(step: int, last: int, every: int) -> bool:
    """Whether the held-out loss is measured after optimizer step `step` (1-based) of a run of `last` steps."""
    return every > 0 and (step % every == 0 or step == last)


def counted_positions(blocks: torch.Tensor, kd_on: str) -> int:
    """How many positions kd_loss averages over in blocks [B, T]: all, or those with an assistant target."""
    _, mask = split_mask(blocks, kd_on)
    return blocks.numel() if mask is None else int(mask[:, 1:].sum())


@torch.no_grad()
def heldout_kl(loss_fn, student: torch.nn.Module, blocks: torch.Tensor, batch: int, kd_on: str,
               device: torch.device) -> float | None:
    """The KL part of loss_fn(blocks) over `blocks` [N, T] (as stored: sign-encoded with kd_on="assistant"), in
    micro-batches of `batch`, averaged over their counted positions; fake quant on, eval mode. `loss_fn(ids)`:
    train()'s per-micro-batch loss, (loss, {"kl": float, ...}). The student's training mode and fake-quant state
    are put back as they were. None when no block has a counted position (assistant mode)."""
    was_training = student.training
    fq = [m for m in student.modules() if isinstance(m, FAKE_QUANT_MODULES)]
    states = [m.enabled for m in fq]
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        student.eval()
        for m in fq:
            m.enabled = True
        try:
            total = weight = 0.0
            for a in range(0, len(blocks), batch):
                part = blocks[a:a + batch]
                n = counted_positions(part, kd_on)
                if n:
                    total += loss_fn(part.to(device))[1]["kl"] * n
                    weight += n
        finally:
            for m, on in zip(fq, states):
                m.enabled = on
            student.train(was_training)
    return total / weight if weight else None
