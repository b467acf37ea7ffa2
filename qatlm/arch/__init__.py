"""The architecture registry: everything qatlm knows about a model family, one small file per family.

    from qatlm import arch
    a = arch.of(model)                    # the Arch of a transformers model (by config.model_type)
    arch.gguf_names(model)                # {HF parameter name: GGUF tensor name}
    arch.gguf_tensors(model)              # [(GGUF name, fp32 tensor as llama.cpp stores it)]

An `Arch` says how a Hugging Face model family maps onto llama.cpp (src/llama-arch.cpp and the family's
class in convert_hf_to_gguf.py): its GGUF architecture, whether the output projection is tied to token_embd,
the norm offset Gemma stores, the rotary row permutation Llama needs, the sliding-window layer pattern,
the run-time embedding scale, the decoder layers to shard, and the GGUF keys its config adds. Tensor names come
from gguf-py's own name map (`gguf.get_tensor_name_map`), so they are never written by hand here. Every stage
(loading, fake quant, export, PTQ simulation, memory, distributed sharding, the KD loss) reads this registry;
adding a family means adding one file like gemma3.py and listing it in FAMILIES below.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from gguf import MODEL_ARCH, get_tensor_name_map


@dataclass(frozen=True)
class Arch:
    name: str  # GGUF general.architecture, e.g. "gemma3"
    model_types: tuple[str, ...]  # Hugging Face config.model_type values of the family
    hf_class: str  # the config.json "architectures" entry llama.cpp's converter detects
    gguf_arch: MODEL_ARCH  # gguf-py's enum: selects the tensor name map
    tied_output: bool = False  # the output projection is always token_embd (no output.weight in GGUF)
    norm_offset: float = 0.0  # GGUF stores every *norm.weight as HF weight + norm_offset
    permute_qk: bool = False  # q/k_proj rows permuted from HF's rotate-half to llama.cpp's interleaved layout
    swa_pattern: int | None = None  # every swa_pattern-th layer attends globally, the others in a window
    embed_scale: Callable[[object], float | None] = lambda config: None  # run-time factor on embeddings
    gguf_keys: Callable[[object, object], None] = lambda writer, config: None  # family-specific GGUF keys

    def text_config(self, config):
        return getattr(config, "text_config", config)

    def layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        """The decoder layers (FSDP2 groups under torchrun)."""
        layers = getattr(getattr(model, "model", None), "layers", None)
        if layers is None:
            raise ValueError(f"{type(model).__name__}: no .model.layers; not a {self.name} causal LM")
        return layers

    def to_gguf(self, name: str, w: torch.Tensor, config) -> torch.Tensor:
        """An HF weight (fp32, torch order) as llama.cpp stores it."""
        if self.norm_offset and name.endswith("norm.weight"):
            w = w + self.norm_offset
        if self.permute_qk and name.endswith(("q_proj.weight", "k_proj.weight")):
            c = self.text_config(config)
            heads = c.num_attention_heads if name.endswith("q_proj.weight") else c.num_key_value_heads
            # convert_hf_to_gguf.py LlamaModel.permute: rotate-half rows -> interleaved pairs
            w = w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        return w


_REGISTRY: dict[str, Arch] = {}  # GGUF name and every model_type -> Arch


def register(a: Arch) -> Arch:
    for key in (a.name, *a.model_types):
        _REGISTRY[key] = a
    return a


def names() -> list[str]:
    """Supported Hugging Face model_type values."""
    return sorted(k for k, a in _REGISTRY.items() if k in a.model_types)


def get(name: str) -> Arch:
    """The Arch for a Hugging Face model_type or a GGUF architecture name."""
    a = _REGISTRY.get(name) if isinstance(name, str) else None
    if a is None:
        raise ValueError(f"architecture {name!r} is not supported; supported model_type values: "
                         f"{', '.join(names())}")
    return a


def of(model: torch.nn.Module) -> Arch:
    return get(getattr(model.config, "model_type", None))


def gguf_names(model: torch.nn.Module) -> dict[str, str]:
    """HF parameter name -> GGUF tensor name (gguf-py's map); a tied lm_head appears once, as token_embd."""
    a = of(model)
    tmap = get_tensor_name_map(a.gguf_arch, a.text_config(model.config).num_hidden_layers)
    out = {}
    for name, _ in model.named_parameters(remove_duplicate=True):
        if name.endswith(".qat_block_scale"):  # a student's learned block scales live in the blocks' d, not a tensor
            continue
        g = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if g is None:
            raise ValueError(f"parameter {name!r} has no GGUF name for architecture {a.name}; qatlm cannot map it")
        out[name] = g
    return out


def is_tied(model: torch.nn.Module) -> bool:
    return of(model).tied_output or bool(getattr(model.config, "tie_word_embeddings", False))


def gguf_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The model's weights as (GGUF name, fp32 tensor in torch order), with llama.cpp's fix-ups applied."""
    a = of(model)
    names_ = gguf_names(model)
    tied = is_tied(model)
    out = []
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue  # the output reuses token_embd
        if name not in names_:
            raise ValueError(f"state_dict entry {name!r} has no GGUF name for architecture {a.name}")
        out.append((names_[name], a.to_gguf(name, t.detach().to(torch.float32), model.config)))
    return out


def check_softcap(model: torch.nn.Module) -> None:
    """The fused KD loss computes plain logits; refuse families that softcap them (Gemma 2)."""
    c = of(model).text_config(model.config)
    if getattr(c, "final_logit_softcapping", None):
        raise ValueError(f"{c.model_type}: final logit softcapping is not supported by the fused KD loss yet")


from . import gemma3, llama, qwen  # noqa: E402  (each registers its family)

FAMILIES = (gemma3, llama, qwen)
