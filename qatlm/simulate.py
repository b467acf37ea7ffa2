"""Simulate a type plan on a model in memory: every weight replaced by exactly what the GGUF will hold.

Used by the torch evaluation engine (`qatlm eval MODEL --plan q4_0`) to measure PTQ without writing a file.
The plan is resolved on GGUF names (so llama-quantize's per-tensor rules apply), then each weight is
replaced by fake_quant(weight). Fix-ups that export applies do not change this: Gemma's norm +1 touches
only F32 norms, and Llama's q/k rotary permutation reorders rows, which commutes with quantizing each row
in blocks (tests check the result against the dequantized exported file).
"""
from __future__ import annotations

import torch
from gguf import get_tensor_name_map

from . import formats
from .models import SUPPORTED
from .plans import parse_plan


def gguf_names(model: torch.nn.Module) -> dict[str, str]:
    """HF parameter name -> GGUF tensor name (gguf-py's own map); tied lm_head left out."""
    from .export import _ARCH

    arch = SUPPORTED[model.config.model_type]
    cfg = getattr(model.config, "text_config", model.config)
    tmap = get_tensor_name_map(_ARCH[arch], cfg.num_hidden_layers)
    out = {}
    for name, p in model.named_parameters(remove_duplicate=True):
        g = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if g is None:
            raise ValueError(f"parameter {name!r} has no GGUF name for {arch}")
        out[name] = g
    return out


@torch.no_grad()
def plan_types(model: torch.nn.Module, plan: str, overrides: tuple[str, ...] = ()) -> dict[str, str]:
    """HF parameter name -> planned GGUF type."""
    names = gguf_names(model)
    params = dict(model.named_parameters(remove_duplicate=True))
    types = parse_plan(plan, overrides).types([(g, tuple(reversed(params[n].shape)), "f32") for n, g in names.items()])
    return {n: types[g] for n, g in names.items()}


@torch.no_grad()
def apply_plan_(model: torch.nn.Module, plan: str, overrides: tuple[str, ...] = ()) -> dict[str, str]:
    """Replace every weight in place by its value under `plan`; returns {param name: type}."""
    types = plan_types(model, plan, overrides)
    for name, p in model.named_parameters(remove_duplicate=True):
        t = types[name]
        if t in formats.names():
            p.copy_(formats.fake_quant(p.detach().reshape(-1, p.shape[-1]), t).reshape(p.shape))
        elif t == "f16":
            p.copy_(p.to(torch.float16).to(p.dtype))
    return types
