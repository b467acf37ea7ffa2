"""A type plan mapped onto a model in memory: which GGUF type each Hugging Face parameter gets, and the model
with every weight replaced by exactly what the GGUF will hold.

The plan is resolved on GGUF names (arch.gguf_names), so llama-quantize's per-tensor rules apply unchanged.
`apply_plan_` is what the torch evaluation engine uses to measure PTQ without writing a file. Fix-ups that
export applies do not change the result: Gemma's norm +1 touches only F32 norms, and Llama's q/k rotary
permutation reorders rows, which commutes with quantizing each row in blocks (tests check the result against
the dequantized exported file).
"""
from __future__ import annotations

import torch

from .. import arch, formats
from ..gguf.plans import parse_plan


@torch.no_grad()
def plan_types(model: torch.nn.Module, plan: str, overrides: tuple[str, ...] = (), imatrix=None) -> dict[str, str]:
    """HF parameter name -> planned GGUF type (with an imatrix: llama-quantize's imatrix rules too)."""
    names = arch.gguf_names(model)
    params = dict(model.named_parameters(remove_duplicate=True))
    types = parse_plan(plan, overrides).types([(g, tuple(reversed(params[n].shape)), "f32") for n, g in names.items()],
                                              imatrix=imatrix is not None)
    return {n: types[g] for n, g in names.items()}


def imatrix_weights(model: torch.nn.Module, imatrix) -> dict[str, torch.Tensor]:
    """HF parameter name -> the per-column importance llama-quantize would pass for that weight (only weights
    the imatrix has an entry for: llama-imatrix collects the blk.* matrices, not token_embd / output)."""
    if imatrix is None:
        return {}
    return {n: torch.from_numpy(imatrix.weights(g)) for n, g in arch.gguf_names(model).items() if g in imatrix}


@torch.no_grad()
def apply_plan_(model: torch.nn.Module, plan: str, overrides: tuple[str, ...] = (), imatrix=None) -> dict[str, str]:
    """Replace every weight in place by its value under `plan` (quantized with `imatrix`, an Imatrix, if
    given); returns {param name: type}."""
    types = plan_types(model, plan, overrides, imatrix)
    qw = imatrix_weights(model, imatrix)
    for name, p in model.named_parameters(remove_duplicate=True):
        t = types[name]
        if formats.is_format(t):
            p.copy_(formats.fake_quant(p.detach().reshape(-1, p.shape[-1]), t, qw.get(name)).reshape(p.shape))
        elif t == "f16":
            p.copy_(p.to(torch.float16).to(p.dtype))
    return types
