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

With a token mask (--kd-on assistant: qatlm.train.chat), only positions whose next token is masked in count, for
both terms, and the mean is over those positions; the others' rows are never passed to the head.
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


def frozen_cast(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """w in `dtype`, cached on w while w is unchanged (a frozen weight: the teacher's head, a frozen tied head's
    fake quant), so the 262k x 640 vocabulary matrix is not converted again at every step."""
    if w.dtype == dtype:
        return w
    key = (w._version, w.data_ptr(), dtype)
    hit = getattr(w, "_qatlm_cast", None)
    if hit is None or hit[0] != key:
        hit = (key, w.detach().to(dtype))
        w._qatlm_cast = hit
    return hit[1]


def _kd_chunk(z_s: torch.Tensor, z_t: torch.Tensor, valid: torch.Tensor, T: float, ce_scale: float):
    """One chunk's logits [c, V] (any float dtype) and valid [c] (1.0 where the position has a target) ->
    (T^2 * sum of KL(p_t || p_s) over rows, fp32 [c] log-sum-exp of z_s at T = 1, dL/dz_s in z_s's dtype
    without CE's one-hot part). Softmax and KL in fp32."""
    zs, zt = z_s.float(), z_t.float()
    lp_s = torch.log_softmax(zs / T, dim=-1)
    lp_t = torch.log_softmax(zt / T, dim=-1)
    p_t = lp_t.exp()
    kl = ((lp_t - lp_s) * p_t).sum() * (T * T)
    lse1 = torch.logsumexp(zs, dim=-1)
    dz = (lp_s.exp() - p_t) * T  # T (p_s - p_t)
    if ce_scale:
        dz = dz + (ce_scale * valid)[:, None] * torch.exp(zs - lse1[:, None])  # + ce_scale softmax(z_s) (T = 1)
    return kl, lse1, dz.to(z_s.dtype)


_compiled_chunk = None


def _chunk_fn(z: torch.Tensor):
    """_kd_chunk, torch.compile'd on CPU for chunks large enough to pay back the compile (one fused pass per
    row instead of ~12 passes over [c, V] fp32 temporaries: most of the head's non-matmul time). Falls back
    to eager, saying so once, where compilation is off (QATLM_COMPILE=0) or unavailable."""
    global _compiled_chunk
    from ..formats import _kernels

    if z.device.type != "cpu" or z.numel() < _kernels.COMPILE_MIN_ELEMENTS or not _kernels.compile_enabled():
        return _kd_chunk
    if _compiled_chunk is None:
        compiled = torch.compile(_kd_chunk, dynamic=True)

        def run(*args):
            global _compiled_chunk
            try:
                return compiled(*args)
            except Exception as e:  # no compiler: say so once, and stay on the (identical math) eager path
                import warnings
                warnings.warn(f"qatlm: torch.compile unavailable for the KD head ({type(e).__name__}: "
                              f"{str(e)[:200]}); using eager PyTorch (same math, slower)")
                _compiled_chunk = _kd_chunk
                return _kd_chunk(*args)
        _compiled_chunk = run
    return _compiled_chunk


class FusedHead(torch.autograd.Function):
    """Base of the fused, chunked output-projection losses (full KD here, top-k KD in qatlm.train.topk_kd): the
    loss is a scalar, so its gradient with respect to a chunk's logits is known in the forward pass. `run` reduces
    each chunk's dL/dz at once into dL/dh (= dz @ W) and dL/dW (+= dz^T @ h) and keeps only those for backward."""

    @staticmethod
    def run(ctx, h_s, w_s, targets, ce_scale, chunk, dtype, chunk_loss):
        """Sum over positions of the loss + ce_scale * CE for z_s = h_s @ w_s^T, `chunk` rows at a time.

        chunk_loss(rows: slice, z_s [c, V] in dtype, valid [c] float) -> (loss sum, fp32 [c] log-sum-exp of z_s,
        dL/dz_s without CE's one-hot part): the one piece that differs between the losses. Returns the fp32
        [loss sum, CE sum] that forward returns; the gradients go to ctx for `backward`."""
        n = h_s.shape[0]
        grad_h = torch.empty(h_s.shape, dtype=torch.float32, device=h_s.device)
        grad_w = torch.zeros_like(w_s, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        kl_sum = torch.zeros((), dtype=torch.float64, device=h_s.device)
        ce_sum = torch.zeros((), dtype=torch.float64, device=h_s.device)
        ws = w_s.detach().to(dtype)
        with torch.autocast(h_s.device.type, enabled=False):  # dtypes are explicit here
            for a in range(0, n, chunk):
                hs, tg = h_s[a:a + chunk].detach().to(dtype), targets[a:a + chunk]
                z_s = hs @ ws.T  # [c, V] in dtype
                valid = tg >= 0
                kl, lse1, dz = chunk_loss(slice(a, a + chunk), z_s, valid.float())
                kl_sum += kl.double()
                rows = torch.arange(len(tg), device=tg.device)
                picked = tg.clamp(min=0)
                ce_sum += -((z_s[rows, picked].float() - lse1) * valid).sum().double()  # CE at T = 1
                if ce_scale:  # the one-hot part of ce_scale (softmax(z_s) - onehot), on positions with a target
                    dz[rows, picked] -= (ce_scale * valid).to(dz.dtype)
                del z_s
                grad_h[a:a + chunk] = dz @ ws
                if grad_w is not None and dtype == torch.float32:
                    grad_w.addmm_(dz.T, hs)
                elif grad_w is not None:  # bf16 product, fp32 accumulation
                    grad_w.add_(dz.T @ hs)
        ctx.save_for_backward(grad_h.to(h_s.dtype), grad_w if grad_w is not None else torch.empty(0))
        ctx.has_w = grad_w is not None
        return torch.stack([kl_sum.float(), ce_sum.float()])

    @staticmethod
    def backward(ctx, g):
        grad_h, grad_w = ctx.saved_tensors
        gk = g[0]  # only the loss sum (and the ce_scale part folded into it) is differentiated
        return (grad_h * gk, (grad_w * gk) if ctx.has_w else None) + (None,) * (ctx.n_inputs - 2)


class _FusedHeadKD(FusedHead):
    """Sum over positions of T^2 KL(p_t || p_s) + ce_weight * CE, for z = h @ W^T computed chunk by chunk.

    dL/dz_s = T (softmax(z_s/T) - p_t) + ce_weight (softmax(z_s) - onehot). Per chunk: 3 matmuls (4 when W is
    trained) and no [positions, vocab] tensor outlives its chunk. Without softcapping only (Gemma 3 has none).

    The matmuls run in `dtype` (bf16 where the hardware has it: the head is most of a small model's FLOPs;
    bf16 logits move KL(p_fp32 || p_bf16) by ~4e-4 per token on Gemma 3 270M, ~0.1% of a Q4_0 student's KL);
    logits are upcast, and softmax, KL, CE and the gradients' accumulation are fp32.
    """

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, targets, temperature, ce_scale, chunk, dtype):
        """ce_scale: the CE weight in units of the KL sum (ce_weight * n_positions / n_targets)."""
        ctx.n_inputs = 9
        wt = w_t.to(dtype)

        def chunk_loss(rows, z_s, valid):
            z_t = h_t[rows].to(dtype) @ wt.T  # [c, V] in dtype (autocast is off inside run)
            return _chunk_fn(z_s)(z_s, z_t, valid, float(temperature), float(ce_scale))
        return FusedHead.run(ctx, h_s, w_s, targets, ce_scale, chunk, dtype, chunk_loss)


def kd_loss(student: nn.Module, teacher: nn.Module, input_ids: torch.Tensor, temperature: float = 1.0,
            ce_weight: float = 0.0, chunk: int = 128,
            dtype: torch.dtype = torch.float32, teacher_dtype: torch.dtype | None = None,
            mask: torch.Tensor | None = None, hidden_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Mean per-position loss over input_ids [B, T] and its parts {'kl', 'ce'} (floats, for logging).

    dtype: the matmuls' dtype for the student's body and both heads (bf16: under autocast; fp32: everything
    fp32); teacher_dtype: the teacher body's (default: dtype). mask [B, T] bool (None: every position counts):
    position t counts when mask[:, t + 1] (its target token is, e.g., an assistant turn's); the mean (KL and
    CE) is over those positions, 0 when there are none. hidden_weight > 0 adds hidden_weight * hidden_mse (the
    layers' outputs against the teacher's, over the same positions; its value logged as 'hidden')."""
    arch.check_softcap(student)
    td = dtype if teacher_dtype is None else teacher_dtype
    hidden = hidden_weight > 0
    with torch.no_grad(), torch.autocast(input_ids.device.type, dtype=td, enabled=td != torch.float32):
        out_t = teacher.model(input_ids, use_cache=False, output_hidden_states=hidden)
    h_t = out_t.last_hidden_state
    w_t = frozen_cast(teacher.get_output_embeddings().weight, dtype)
    h_s, w_s, targets, rows, layers_s = student_rows(student, input_ids, dtype, mask, hidden=hidden)
    h_t = h_t.reshape(-1, h_t.shape[-1])
    h_t = h_t if rows is None else h_t[rows]
    ce_scale, n_pos, n_tgt = ce_in_kl_units(targets, ce_weight)
    sums = _FusedHeadKD.apply(h_s, w_s, h_t, w_t, targets, temperature, ce_scale, chunk, dtype)
    loss, parts = mean_loss(sums, n_pos, n_tgt, ce_weight)
    if hidden:
        mse = hidden_mse(layers_s, out_t.hidden_states, rows)
        loss = loss + hidden_weight * mse
        parts["hidden"] = float(mse.detach())
    return loss, parts


def hidden_mse(layers_s, layers_t, rows: torch.Tensor | None) -> torch.Tensor:
    """The layers' hidden-state matching term: for each decoder layer but the last (HF hidden_states[1:-1]: the
    residual stream after layer l; the last entry is the final norm's output, which the KL term already
    constrains), sum over the counted positions of ||h_s - h_t||^2 divided by the teacher's sum of ||h_t||^2 (a
    relative error, so layers whose residual stream has a larger norm weigh no more), averaged over the layers.
    fp32; the teacher's side carries no gradient."""
    terms = []
    for hs, ht in zip(layers_s[1:-1], layers_t[1:-1]):
        hs, ht = hs.reshape(-1, hs.shape[-1]).float(), ht.reshape(-1, ht.shape[-1]).float()
        if rows is not None:
            hs, ht = hs[rows], ht[rows]
        terms.append((hs - ht).pow(2).sum() / ht.pow(2).sum().clamp_min(1e-30))
    return torch.stack(terms).mean()


def student_rows(student: nn.Module, input_ids: torch.Tensor, dtype: torch.dtype, mask: torch.Tensor | None,
                 hidden: bool = False):
    """The student's side of a fused-head loss (kd_loss, topk_kd_loss): (hidden states [N, H] under autocast in
    `dtype`, the output weight it computes with (cast once when frozen), next-token targets [N] (-1: none), the
    flat indices of the counted positions or None for all, and with `hidden` every layer's hidden states (HF
    hidden_states; else None)). Position t counts when mask[:, t + 1]."""
    with torch.autocast(input_ids.device.type, dtype=dtype, enabled=dtype != torch.float32):
        out = student.model(input_ids, use_cache=False, output_hidden_states=hidden)
    h_s = out.last_hidden_state
    w_s = head_weight(student)
    if not w_s.requires_grad:
        w_s = frozen_cast(w_s, dtype)
    targets = torch.full_like(input_ids, -1)
    targets[:, :-1] = input_ids[:, 1:]
    h_s, targets = h_s.reshape(-1, h_s.shape[-1]), targets.reshape(-1)
    rows = None
    if mask is not None:  # only the counted positions' rows are passed to the head
        keep = torch.zeros_like(mask)
        keep[:, :-1] = mask[:, 1:]
        rows = keep.reshape(-1).nonzero().squeeze(1)
        h_s, targets = h_s[rows], targets[rows]
    return h_s, w_s, targets, rows, (out.hidden_states if hidden else None)


def ce_in_kl_units(targets: torch.Tensor, ce_weight: float) -> tuple[float, int, int]:
    """(ce_weight in units of the loss sum, positions, positions with a target): the fused heads' ce_scale."""
    n_pos, n_tgt = max(1, targets.numel()), max(1, int((targets >= 0).sum()))
    return ce_weight * n_pos / n_tgt, n_pos, n_tgt


def mean_loss(sums: torch.Tensor, n_pos: int, n_tgt: int, ce_weight: float) -> tuple[torch.Tensor, dict]:
    """A fused head's [loss sum, CE sum] -> (mean loss, {'kl', 'ce'}). Only the loss sum is differentiated: its
    gradient already carries the ce_weight part."""
    kl = sums[0] / n_pos
    ce = sums[1].detach() / n_tgt
    loss = kl + ce_weight * ce if ce_weight else kl
    return loss, {"kl": float(kl.detach()), "ce": float(ce)}
