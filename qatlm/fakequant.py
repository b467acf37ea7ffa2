"""Fake-quant modules: prepare(model, plan) -> train -> convert(model), as torchao's QAT does it.

prepare() swaps each Linear (and the embedding, whose weight Gemma's tied output shares) whose planned GGUF
type is a block format for a module that uses fake_quant(weight) in its forward: the student always computes
with exactly the values the GGUF will hold, and the straight-through gradient updates the latent float weight.
convert() swaps them back to plain modules holding the latent weights, which `export_gguf` quantizes to the
very bytes the student trained with (tested), and which are the "unquantized QAT checkpoint".

Teachers that were themselves quantized (every GGUF teacher) put many weights exactly on decision boundaries
of the target format: a Q5_0 lattice has 47.5% of its values on Q4_0 boundaries, so a 1e-6 update flips 24% of
the codes at the first step and perplexity explodes. `snap_toward_grid_` moves every trainable weight a small
fraction of the way toward its PTQ value first: it stays in the bin PTQ picked (same codes, same scales, so the
student starts exactly at PTQ), but no longer on the edge of it.
"""
from __future__ import annotations

import torch
from torch import nn

from . import formats
from .simulate import plan_types


class FakeQuantLinear(nn.Linear):
    """nn.Linear whose forward uses fake_quant(weight, fmt); `enabled` switches fake quant on and off.

    With LoRA adapters (add_lora), the weight it quantizes is the merged W + scale * B @ A (see add_lora)."""

    fmt: str = "q4_0"
    enabled: bool = True

    def merged_weight(self) -> torch.Tensor:
        if getattr(self, "lora_A", None) is None:
            return self.weight
        return self.weight + (self.lora_B @ self.lora_A) * self.lora_scale

    def effective_weight(self) -> torch.Tensor:
        """The weight the forward computes with: fake_quant(merged weight) when enabled (fp32)."""
        w = self.merged_weight()
        return formats.fake_quant(w, self.fmt) if self.enabled else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.effective_weight().to(x.dtype), self.bias)


class FakeQuantEmbedding(nn.Embedding):
    """nn.Embedding whose lookups use fake_quant(weight). Only the looked-up rows are quantized: a row is whole
    blocks, so this equals quantizing the table. Gemma's embedding scale (sqrt(hidden), transformers'
    `embed_scale`) is applied after, as llama.cpp applies it at run time."""

    fmt: str = "q8_0"
    enabled: bool = True

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = nn.functional.embedding(ids.reshape(-1), self.weight)  # [n, dim]: gradient flows to these rows
        if self.enabled:
            rows = formats.fake_quant(rows, self.fmt).to(rows.dtype)
        out = rows.view(*ids.shape, -1)
        scale = getattr(self, "embed_scale", None)
        return out * scale.to(out.dtype) if scale is not None else out


class FakeQuantTiedHead(nn.Module):
    """The output projection of a model with tied embeddings: logits = h @ fake_quant(embedding)^T."""

    def __init__(self, embedding: nn.Embedding, fmt: str):
        super().__init__()
        self.embedding = embedding
        self.fmt = fmt
        self.enabled = True

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight

    def effective_weight(self) -> torch.Tensor:
        """The output weight the forward computes with: fake_quant(embedding) when enabled (fp32)."""
        return formats.fake_quant(self.embedding.weight, self.fmt) if self.enabled else self.embedding.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(h, self.effective_weight().to(h.dtype))


def prepare(model: nn.Module, plan: str = "q4_0", overrides: tuple[str, ...] = ()) -> dict[str, str]:
    """Swap modules for fake-quant ones following `plan` (in place). Returns {param name: type}."""
    types = plan_types(model, plan, overrides)
    modules = dict(model.named_modules())
    for pname, t in types.items():
        if t not in formats.names() or not pname.endswith(".weight"):
            continue
        mname = pname[: -len(".weight")]
        m = modules[mname]
        if type(m) is nn.Linear:
            m.__class__ = FakeQuantLinear  # keeps the parameters (and any tying) as they are
            m.fmt, m.enabled = t, True
        elif isinstance(m, nn.Embedding):  # includes transformers' scaled embedding subclasses
            m._qatlm_original_class = type(m)
            m.__class__ = FakeQuantEmbedding
            m.fmt, m.enabled = t, True
    head = getattr(model, "lm_head", None)
    emb = model.get_input_embeddings()
    if head is not None and head.weight is emb.weight and isinstance(emb, FakeQuantEmbedding):
        model.lm_head = FakeQuantTiedHead(emb, emb.fmt)
    return types


def set_fake_quant(model: nn.Module, enabled: bool) -> None:
    """Switch fake quant on/off everywhere (e.g. on only after N warm-up steps)."""
    for m in model.modules():
        if isinstance(m, (FakeQuantLinear, FakeQuantEmbedding, FakeQuantTiedHead)):
            m.enabled = enabled


def add_lora(model: nn.Module, rank: int, alpha: float | None = None) -> int:
    """LoRA on every fake-quant Linear: W frozen, trainable A [rank, in] and B [out, rank] (B = 0, so training
    starts at exactly the same model), forward fake_quant(W + alpha/rank * B @ A). Returns the trainable count.

    The adapters are inside the quantizer, so the student always sees the weights the GGUF will hold:
    convert() merges them and export quantizes the merged weight, the same bits (tested). What it gives up
    against full QAT: each update of a layer lies in a rank-`rank` subspace, and embeddings are frozen. What it
    saves: optimizer state (2 x the adapters instead of 2 x every weight) and weight gradients; the step still
    forms the full merged weight, so its compute is about that of full QAT."""
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


def convert(model: nn.Module) -> nn.Module:
    """Plain modules again, holding the latent weights (export quantizes them to what the student saw).
    LoRA adapters are merged into their weights first, with the very computation the forward used."""
    if isinstance(getattr(model, "lm_head", None), FakeQuantTiedHead):
        emb = model.lm_head.embedding
        head = nn.Linear(emb.weight.shape[1], emb.weight.shape[0], bias=False)
        head.weight = emb.weight
        model.lm_head = head
    for m in model.modules():
        if isinstance(m, FakeQuantLinear):
            if getattr(m, "lora_A", None) is not None:
                with torch.no_grad():
                    merged = m.merged_weight().detach().to(m.weight.dtype)
                del m.lora_A, m.lora_B
                m.weight = nn.Parameter(merged, requires_grad=False)
            m.__class__ = nn.Linear
        elif isinstance(m, FakeQuantEmbedding):
            m.__class__ = m.__dict__.pop("_qatlm_original_class")
    return model


@torch.no_grad()
def snap_toward_grid_(model: nn.Module, plan: str, alpha: float = 0.05, overrides: tuple[str, ...] = ()) -> int:
    """w <- w + alpha * (fake_quant(w) - w) for every weight the plan quantizes. Returns how many weights
    changed. Codes and scales stay those of PTQ (checked by tests); weights leave the decision boundaries."""
    types = plan_types(model, plan, overrides)
    changed = 0
    for name, p in model.named_parameters(remove_duplicate=True):
        t = types.get(name)
        if t not in formats.names():
            continue
        flat = p.detach().reshape(-1, p.shape[-1])
        q = formats.fake_quant(flat.float(), t)
        new = flat.float() + alpha * (q - flat.float())
        changed += int((new != flat.float()).sum())
        p.copy_(new.reshape(p.shape).to(p.dtype))
    return changed
