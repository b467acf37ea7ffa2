"""LoRA inside the fake quantizer: the student trains low-rank adapters, and still sees the GGUF's values.

    prepare(student, "q4_0"); add_lora(student, rank=16)

Every FakeQuantLinear gets a frozen base W and trainable A [rank, in], B [out, rank] (B = 0, so training starts
at exactly the same model); its forward is fake_quant(W + alpha/rank * B @ A). convert() merges the adapters
with that same computation and export quantizes the merged weight: the same bits (tested). What it gives up
against full QAT: each update of a layer lies in a rank-`rank` subspace, and embeddings are frozen. What it
saves: optimizer state (2 x the adapters instead of 2 x every weight) and weight gradients; the step still forms
the full merged weight, so its compute is about that of full QAT.
"""
from __future__ import annotations

import torch
from torch import nn

from .fakequant import FakeQuantLinear


def add_lora(model: nn.Module, rank: int, alpha: float | None = None) -> int:
    """Adapters on every fake-quant Linear, everything else frozen. Returns the trainable parameter count."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    scale = (alpha if alpha is not None else rank) / rank
    count = 0
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, FakeQuantLinear):
            out_f, in_f = m.weight.shape
            a = torch.empty(rank, in_f, dtype=torch.float32, device=m.weight.device)
            nn.init.kaiming_uniform_(a, a=5 ** 0.5)  # as nn.Linear / peft initialise A
            m.lora_A = nn.Parameter(a)
            m.lora_B = nn.Parameter(torch.zeros(out_f, rank, dtype=torch.float32, device=m.weight.device))
            m.lora_scale = scale
            count += a.numel() + m.lora_B.numel()
    if count == 0:
        raise ValueError("no fake-quant Linear layers to put LoRA adapters on; prepare(model, plan) first")
    return count
