"""Knowledge distillation against a cached top-k teacher (`qatlm train --teacher-cache DIR`): the teacher's k most
likely tokens per position and one "rest" bucket for everything else (qatlm.train.teacher_cache writes them).

The loss is the KL divergence between teacher and student after both distributions are coarsened to those k + 1
outcomes (the teacher's top-k set K and the rest R):

    KL_K = sum_{i in K} p_i (log p_i - log q_i)  +  p_R (log p_R - log q_R),    q_R = 1 - sum_{i in K} q_i

p: the teacher at temperature 1 (log p_i stored in fp16, log p_R in fp32), q = softmax(z_s). Coarsening never
increases a KL (data-processing inequality), so KL_K <= the full KL, and KL_K = the full KL when k = V. log q_R
is the log-sum-exp of the student's logits outside K minus its full log-sum-exp: no cancellation in 1 - sum q_i
when the top k hold almost all of the mass. Temperatures other than 1 are refused: softmax(z_t / T) over K
needs each of the rest's logits, which are not stored (only their total).

Gradient with respect to the student's logits, P = sum_K p_i + p_R (1 up to the storage rounding of p):

    dKL_K/dz_j = P q_j - p_j              j in K
               = P q_j - p_R q_j / q_R    j not in K

Like qatlm.train.kd_loss (whose structure this mirrors), the head is computed `chunk` positions at a time in one
autograd function that forms these gradients in the forward pass, so the [positions, vocab] student logits never
exist for a whole batch, and the matmuls run in the training dtype (bf16 where native) with fp32 softmax and KL.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import arch
from .kd_loss import FusedHead, ce_in_kl_units, mean_loss, student_rows


def _topk_chunk(z_s: torch.Tensor, lp_k: torch.Tensor, idx: torch.Tensor, lp_r: torch.Tensor, valid: torch.Tensor,
                ce_scale: float):
    """One chunk: student logits z_s [c, V], teacher top-k log-probs lp_k [c, k] (any float), their token ids idx
    [c, k] (int64), the rest's log-prob lp_r [c] (fp32, -inf when k = V), valid [c] (1.0 where the position has a
    next-token target) -> (sum over rows of KL_K, fp32 [c] log-sum-exp of z_s, dL/dz_s in z_s's dtype without CE's
    one-hot part)."""
    zs = z_s.float()
    lse = torch.logsumexp(zs, dim=-1)  # [c]
    lpk = lp_k.float()
    p_k = lpk.exp()  # [c, k]
    lq_k = zs.gather(1, idx) - lse[:, None]  # [c, k]
    outside = zs.scatter(1, idx, float("-inf"))  # [c, V] the student's logits off the teacher's top k
    lse_r = torch.logsumexp(outside, dim=-1)  # [c]; -inf when k = V
    p_r = lp_r.exp()  # [c]
    has_r = p_r > 0  # k = V (or a rest below fp32's range): the bucket contributes nothing
    kl = (p_k * (lpk - lq_k)).sum() + torch.where(has_r, p_r * (lp_r - (lse_r - lse)), 0.0).sum()
    # dz = (P + ce_scale * valid) q  -  p on K  -  p_R q / q_R off K       (q / q_R = exp(z - lse_r) off K, 0 on K)
    coef = p_k.sum(-1) + p_r + ce_scale * valid  # [c]
    dz = (zs - lse[:, None]).exp_().mul_(coef[:, None])
    off = outside.sub_(torch.where(torch.isfinite(lse_r), lse_r, 0.0)[:, None]).exp_()  # in place: [c, V]
    dz.sub_(off.mul_(torch.where(has_r, p_r, 0.0)[:, None]))
    dz.scatter_add_(1, idx, -p_k)
    return kl, lse, dz.to(z_s.dtype)


class _FusedHeadTopK(FusedHead):
    """Sum over positions of KL_K + ce_scale * CE for z = h @ W^T, chunk by chunk (qatlm.train.kd_loss.FusedHead:
    the same scheme as full KD, with the teacher's logits replaced by the cached top k)."""

    @staticmethod
    def forward(ctx, h_s, w_s, lp_k, idx, lp_r, targets, ce_scale, chunk, dtype):
        ctx.n_inputs = 9

        def chunk_loss(rows, z_s, valid):
            return _topk_chunk(z_s, lp_k[rows], idx[rows].long(), lp_r[rows], valid, float(ce_scale))
        return FusedHead.run(ctx, h_s, w_s, targets, ce_scale, chunk, dtype, chunk_loss)


def topk_kd_loss(student: nn.Module, cached: tuple[torch.Tensor, torch.Tensor, torch.Tensor], input_ids: torch.Tensor,
                 ce_weight: float = 0.0, chunk: int = 128, dtype: torch.dtype = torch.float32,
                 mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Mean per-position KL_K (+ ce_weight * next-token CE) over input_ids [B, T], and its parts {'kl', 'ce'}.
    `cached`: the teacher's (log-probs [B, T, k], token ids [B, T, k], rest log-prob [B, T]) of these blocks
    (TeacherCache.rows). dtype and mask: as in kd_loss (the matmuls' dtype; the positions that count).

        loss, parts = topk_kd_loss(student, cache.rows(ids), ids, ce_weight=0.1)
    """
    arch.check_softcap(student)
    lp_k, idx, lp_r = (c.to(input_ids.device) for c in cached)
    h_s, w_s, targets, rows, _ = student_rows(student, input_ids, dtype, mask)
    k = lp_k.shape[-1]
    lp_k, idx, lp_r = lp_k.reshape(-1, k), idx.reshape(-1, k), lp_r.reshape(-1)
    if rows is not None:
        lp_k, idx, lp_r = lp_k[rows], idx[rows], lp_r[rows]
    ce_scale, n_pos, n_tgt = ce_in_kl_units(targets, ce_weight)
    sums = _FusedHeadTopK.apply(h_s, w_s, lp_k, idx, lp_r, targets, ce_scale, chunk, dtype)
    return mean_loss(sums, n_pos, n_tgt, ce_weight)
