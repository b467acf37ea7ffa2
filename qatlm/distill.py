"""Knowledge-distillation loss: KL(teacher || student) over the full vocabulary, in chunks of positions.

Both models run their transformer body once; the output projection, softmax and KL are then computed for
`chunk` positions at a time under activation checkpointing, so a 262k vocabulary never holds [batch, seq,
vocab] logits of both models at once (per chunk: [batch, chunk, vocab]). The student's output weight is
fake-quantized once per step and shared by all chunks.

    loss = T^2 * KL(softmax(z_t / T) || softmax(z_s / T))   averaged over positions
           + ce_weight * cross-entropy(z_s, next token)
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import formats
from .fakequant import FakeQuantLinear, FakeQuantTiedHead


def head_weight(model: nn.Module) -> torch.Tensor:
    """The output projection's weight as the model computes with it (fake-quantized when prepared)."""
    head = model.get_output_embeddings()
    if isinstance(head, FakeQuantTiedHead):
        return formats.fake_quant(head.embedding.weight, head.fmt) if head.enabled else head.embedding.weight
    if isinstance(head, FakeQuantLinear) and head.enabled:
        return formats.fake_quant(head.weight, head.fmt)
    return head.weight


def _softcap(z: torch.Tensor, cap: float | None) -> torch.Tensor:
    return torch.tanh(z / cap) * cap if cap else z


def _chunk_terms(h_s, w_s, h_t, w_t, targets, temperature: float, cap):
    z_s = _softcap(h_s.float() @ w_s.float().T, cap)  # [B, c, V]
    with torch.no_grad():
        lp_t = torch.log_softmax(_softcap(h_t.float() @ w_t.float().T, cap) / temperature, dim=-1)
    lp_s = torch.log_softmax(z_s / temperature, dim=-1)
    kl = (lp_t.exp() * (lp_t - lp_s)).sum(-1).sum() * temperature ** 2
    lp1 = torch.log_softmax(z_s, dim=-1) if temperature != 1.0 else lp_s
    valid = targets >= 0
    ce = -(lp1.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * valid).sum()
    return torch.stack([kl, ce])


def kd_loss(student: nn.Module, teacher: nn.Module, input_ids: torch.Tensor, temperature: float = 1.0,
            ce_weight: float = 0.0, chunk: int = 128) -> tuple[torch.Tensor, dict]:
    """Mean per-position loss over input_ids [B, T] and its parts {'kl', 'ce'} (floats, for logging)."""
    cap = getattr(getattr(student.config, "text_config", student.config), "final_logit_softcapping", None)
    with torch.no_grad():
        h_t = teacher.model(input_ids).last_hidden_state
        w_t = teacher.get_output_embeddings().weight
    h_s = student.model(input_ids).last_hidden_state
    w_s = head_weight(student)
    targets = torch.full_like(input_ids, -1)
    targets[:, :-1] = input_ids[:, 1:]
    total = torch.zeros(2, dtype=torch.float32)
    T = input_ids.shape[1]
    for a in range(0, T, chunk):
        total = total + checkpoint(_chunk_terms, h_s[:, a:a + chunk], w_s, h_t[:, a:a + chunk], w_t,
                                   targets[:, a:a + chunk], temperature, cap, use_reentrant=False)
    n_pos = input_ids.numel()
    kl, ce = total[0] / n_pos, total[1] / max(1, int((targets >= 0).sum()))
    loss = kl + ce_weight * ce if ce_weight else kl
    return loss, {"kl": float(kl.detach()), "ce": float(ce.detach())}
