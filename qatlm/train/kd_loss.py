"""Knowledge-distillation loss: KL(teacher || student) over the full vocabulary, in chunks of positions.

Both models run their transformer body once; the output projection, softmax and KL are then computed for
`chunk` positions at a time in one fused autograd function that also forms the gradient there (see
_FusedHeadKD), so a 262k vocabulary never holds [batch, seq, vocab] logits: per chunk [chunk, vocab]. The
student's output weight is fake-quantized once per step and shared by all chunks. This is our own code
because autograd through log_softmax keeps several vocabulary-sized tensors alive (3.1x the peak memory of
this version on a 1024-token step of the 270M model, benchmarks/kd_step.py) or, under checkpointing,
recomputes them (1.7x the step time of this version, measured while developing).

    loss = T^2 * KL(softmax(z_t / T) || softmax(z_s / T))   averaged over positions
           + ce_weight * cross-entropy(z_s, next token)
"""
from __future__ import annotations

import torch
from torch import nn

from .. import arch
from ..student.fakequant import FakeQuantLinear, FakeQuantTiedHead


def head_weight(model: nn.Module) -> torch.Tensor:
    """The output projection's weight as the model computes with it (fake-quantized when prepared)."""
    head = model.get_output_embeddings()
    if isinstance(head, (FakeQuantTiedHead, FakeQuantLinear)):
        return head.effective_weight()  # incl. LoRA adapters of an untied head
    return head.weight


def _softcap(z: torch.Tensor, cap: float | None) -> torch.Tensor:
    return torch.tanh(z / cap) * cap if cap else z


class _FusedHeadKD(torch.autograd.Function):
    """Sum over positions of T^2 KL(p_t || p_s) + ce_weight * CE, for z = h @ W^T computed chunk by chunk.

    The loss is a scalar, so its gradient with respect to a chunk's logits is known in the forward pass:
    dL/dz_s = T (softmax(z_s/T) - p_t) + ce_weight (softmax(z_s) - onehot). It is reduced at once into
    dL/dh (= dz @ W) and dL/dW (+= dz^T @ h); only those are kept for backward. Per chunk: 3 matmuls (4 when W
    is trained) and no [positions, vocab] tensor outlives its chunk. Without softcapping only (Gemma 3 has none).
    """

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, targets, temperature, ce_scale, chunk):
        """ce_scale: the CE weight in units of the KL sum (ce_weight * n_positions / n_targets)."""
        n = h_s.shape[0]
        grad_h = torch.empty_like(h_s, dtype=torch.float32)
        grad_w = torch.zeros_like(w_s, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        kl_sum = torch.zeros((), dtype=torch.float64, device=h_s.device)
        ce_sum = torch.zeros((), dtype=torch.float64, device=h_s.device)
        T = temperature
        ws, wt = w_s.float(), w_t.float()
        for a in range(0, n, chunk):
            hs, ht, tg = h_s[a:a + chunk].float(), h_t[a:a + chunk].float(), targets[a:a + chunk]
            z_s = hs @ ws.T  # [c, V]
            lp_t = torch.log_softmax((ht @ wt.T) / T, dim=-1)
            lp_s = torch.log_softmax(z_s / T, dim=-1)
            p_t = lp_t.exp()
            kl_sum += ((lp_t - lp_s) * p_t).sum().double() * T * T
            valid = tg >= 0
            rows = torch.arange(len(tg), device=tg.device)
            lp1 = lp_s if T == 1.0 else torch.log_softmax(z_s, dim=-1)  # CE is at T = 1: logged always
            ce_sum += -(lp1[rows, tg.clamp(min=0)] * valid).sum().double()
            p1 = lp1.exp() if (ce_scale and T != 1.0) else None
            dz = lp_s.exp_()  # p_s, in lp_s's memory (lp1 is not needed any more at T = 1)
            if ce_scale:  # + ce_scale (p1 - onehot) on positions with a target
                g = dz.clone() if p1 is None else p1
                g[rows, tg.clamp(min=0)] -= 1.0
                g.mul_(valid[:, None].to(g.dtype))
            dz.sub_(p_t).mul_(T)  # T (p_s - p_t)
            if ce_scale:
                dz.add_(g, alpha=ce_scale)
            del lp1, p1
            grad_h[a:a + chunk] = dz @ ws
            if grad_w is not None:
                grad_w.addmm_(dz.T, hs)
        ctx.save_for_backward(grad_h, grad_w if grad_w is not None else torch.empty(0))
        ctx.has_w = grad_w is not None
        return torch.stack([kl_sum.float(), ce_sum.float()])

    @staticmethod
    def backward(ctx, g):
        grad_h, grad_w = ctx.saved_tensors
        gk = g[0]  # only the KL sum (and the ce_weight part folded into it) is differentiated
        return (grad_h * gk, (grad_w * gk) if ctx.has_w else None, None, None, None, None, None, None)


def kd_loss(student: nn.Module, teacher: nn.Module, input_ids: torch.Tensor, temperature: float = 1.0,
            ce_weight: float = 0.0, chunk: int = 128) -> tuple[torch.Tensor, dict]:
    """Mean per-position loss over input_ids [B, T] and its parts {'kl', 'ce'} (floats, for logging)."""
    arch.check_softcap(student)
    with torch.no_grad():
        h_t = teacher.model(input_ids).last_hidden_state
        w_t = teacher.get_output_embeddings().weight
    h_s = student.model(input_ids).last_hidden_state
    w_s = head_weight(student)
    targets = torch.full_like(input_ids, -1)
    targets[:, :-1] = input_ids[:, 1:]
    H = h_s.shape[-1]
    n_pos, n_tgt = input_ids.numel(), max(1, int((targets >= 0).sum()))
    sums = _FusedHeadKD.apply(h_s.reshape(-1, H), w_s, h_t.reshape(-1, H), w_t, targets.reshape(-1),
                              temperature, ce_weight * n_pos / n_tgt, chunk)
    kl = sums[0] / n_pos  # differentiated: its gradient also carries the ce_weight part
    ce = sums[1].detach() / n_tgt
    loss = kl + ce_weight * ce if ce_weight else kl
    return loss, {"kl": float(kl.detach()), "ce": float(ce)}
