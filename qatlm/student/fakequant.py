"""Fake-quant modules: prepare(model, plan) -> train -> convert(model), as torchao's QAT does it.

prepare() replaces each Linear (and the embedding, whose weight Gemma's tied output shares) whose planned GGUF
type is a block format by a module that computes with fake_quant(weight): the student always sees exactly the
values the GGUF will hold, and the straight-through gradient updates the latent float weight. The new modules
share the original Parameter objects, so state_dict names, tying and optimizer state are unchanged. convert()
puts plain modules back, holding the latent weights, which `export_gguf` quantizes to the very bytes the
student trained with (tested), and which are the "unquantized QAT checkpoint".

With learned block scales (`prepare(..., learn_scales=True)`, the recipe key `learn_scales`), each FakeQuantLinear of a
32-weight format (formats.SCALED_FORMATS) also holds `qat_block_scale` [out, in // 32], a factor on every block's
fp16 d, starting at 1 (so the student still starts exactly at PTQ). The codes stay the quantizer's decisions on the
latent weight; the factors get the exact gradient. convert() keeps them beside the plain Linear
(`learned_block_scales`), and the GGUF export writes fp16(d * factor) into each block (formats.scale_blocks):
again exactly what the student computed with. The unquantized checkpoint then no longer re-quantizes to that GGUF
by itself: the factors are a second output (export writes them beside it).

Teachers that were themselves quantized (every GGUF teacher) put many weights exactly on decision boundaries
of the target format: a Q5_0 lattice has 47.5% of its values on Q4_0 boundaries, so a 1e-6 update flips 24% of
the codes at the first step and perplexity explodes. `snap_toward_grid_` moves every trainable weight a small
fraction of the way toward its PTQ value first: it stays in the bin PTQ picked (same codes, same scales, so the
student starts exactly at PTQ), but no longer on the edge of it.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import arch, formats
from .plan import imatrix_weights, plan_types


class FakeQuantLinear(nn.Linear):
    """nn.Linear whose forward uses fake_quant(weight, fmt); `enabled` switches fake quant on and off.

    With LoRA adapters (student.lora), the weight it quantizes is the merged W + scale * B @ A."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, fmt: str = "q4_0", device=None):
        super().__init__(in_features, out_features, bias, device=device)
        self.fmt = fmt
        self.enabled = True
        self.lora_A: nn.Parameter | None = None  # [rank, in]
        self.lora_B: nn.Parameter | None = None  # [out, rank]
        self.lora_scale = 1.0
        self.qat_block_scale: nn.Parameter | None = None  # [out, in // 32]: learned factors on the blocks' d
        # [in]: per-column importance (llama-quantize --imatrix's weighted rule), not part of the checkpoint
        self.register_buffer("imatrix", None, persistent=False)

    @classmethod
    def from_linear(cls, m: nn.Linear, fmt: str, imatrix: torch.Tensor | None = None,
                    learn_scales: bool = False) -> "FakeQuantLinear":
        new = cls(m.in_features, m.out_features, m.bias is not None, fmt, device="meta")
        new.weight, new.bias = m.weight, m.bias  # the same Parameters: tying and state_dict names kept
        new.imatrix = imatrix.to(m.weight.device) if imatrix is not None else None
        if learn_scales:
            nb = m.in_features // formats.get(fmt).block_size
            new.qat_block_scale = nn.Parameter(torch.ones(m.out_features, nb, device=m.weight.device))
        return new

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding the weight the forward computed with before quantization (LoRA merged)."""
        m = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta")
        if self.lora_A is not None:
            with torch.no_grad():
                m.weight = nn.Parameter(self.merged_weight().detach().to(self.weight.dtype), requires_grad=False)
        else:
            m.weight = self.weight
        m.bias = self.bias
        if self.qat_block_scale is not None:  # a plain attribute: not a tensor of the checkpoint's state_dict
            object.__setattr__(m, "qat_block_scale", self.qat_block_scale.detach())
        return m

    def merged_weight(self) -> torch.Tensor:
        if self.lora_A is None:
            return self.weight
        return self.weight + (self.lora_B @ self.lora_A) * self.lora_scale

    def effective_weight(self) -> torch.Tensor:
        """The weight the forward computes with: fake_quant(merged weight) when enabled (fp32)."""
        w = self.merged_weight()
        if not self.enabled:
            return w
        if self.qat_block_scale is not None:
            return formats.fake_quant_scaled(w, self.fmt, self.qat_block_scale, self.imatrix)
        return formats.fake_quant(w, self.fmt, self.imatrix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.effective_weight().to(x.dtype), self.bias)


class FakeQuantEmbedding(nn.Embedding):
    """nn.Embedding whose lookups use fake_quant(weight). Only the looked-up rows are quantized: a row is whole
    blocks, so this equals quantizing the table. `scale` is the family's run-time embedding factor (Gemma's
    sqrt(hidden), arch.Arch.embed_scale), applied after quantization as llama.cpp applies it."""

    def __init__(self, num: int, dim: int, fmt: str = "q8_0", scale: float | None = None, device=None):
        super().__init__(num, dim, device=device)
        self.fmt = fmt
        self.enabled = True
        self.scale = scale
        self._original: nn.Embedding | None = None  # what convert() puts back (a plain attribute, not a child)

    @classmethod
    def from_embedding(cls, m: nn.Embedding, fmt: str, scale: float | None) -> "FakeQuantEmbedding":
        new = cls(m.num_embeddings, m.embedding_dim, fmt, scale, device="meta")
        new.weight, new.padding_idx = m.weight, m.padding_idx
        object.__setattr__(new, "_original", m)
        return new

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = nn.functional.embedding(ids.reshape(-1), self.weight)  # [n, dim]: gradient flows to these rows
        if self.enabled:
            rows = formats.fake_quant(rows, self.fmt).to(rows.dtype)
        out = rows.view(*ids.shape, -1)
        # the same fp32 scalar tensor transformers' scaled embedding multiplies by
        return out * torch.tensor(self.scale).to(out.dtype) if self.scale is not None else out


class FakeQuantTiedHead(nn.Module):
    """The output projection of a model with tied embeddings: logits = h @ fake_quant(embedding)^T."""

    def __init__(self, embedding: nn.Embedding, fmt: str):
        super().__init__()
        self.embedding = embedding
        self.fmt = fmt
        self.enabled = True
        self._frozen: tuple | None = None  # (key, fake_quant(weight)) of a frozen embedding

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight

    def effective_weight(self) -> torch.Tensor:
        """The output weight the forward computes with: fake_quant(embedding) when enabled (fp32). A frozen
        embedding's (train_embeddings=false) is computed once and reused until the weight changes: it is the
        largest matrix of a small-vocabulary-heavy model (Gemma 3 270M: 168M of 268M weights)."""
        w = self.embedding.weight
        if not self.enabled:
            return w
        if w.requires_grad:
            return formats.fake_quant(w, self.fmt)
        key = (w._version, w.data_ptr(), w.device, self.fmt)
        if self._frozen is None or self._frozen[0] != key:
            self._frozen = (key, formats.fake_quant(w, self.fmt))
        return self._frozen[1]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(h, self.effective_weight().to(h.dtype))


FAKE_QUANT_MODULES = (FakeQuantLinear, FakeQuantEmbedding, FakeQuantTiedHead)


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def prepare(model: nn.Module, plan: str = "q4_0", overrides: tuple[str, ...] = (), imatrix=None,
            learn_scales: bool = False) -> dict[str, str]:
    """Swap modules for fake-quant ones following `plan` (in place). Returns {param name: type}. With an
    `imatrix` (qatlm.imatrix.Imatrix), weights it has entries for use llama-quantize --imatrix's weighted rule,
    and the types follow its imatrix rules: the student computes with what `quantize --imatrix` would write.
    learn_scales: the Linear weights of formats.SCALED_FORMATS get learned block scales (module docstring)."""
    types = plan_types(model, plan, overrides, imatrix)
    qw = imatrix_weights(model, imatrix)
    scale = arch.of(model).embed_scale(arch.of(model).text_config(model.config))
    modules = dict(model.named_modules())
    for pname, t in types.items():
        if not formats.is_format(t) or not pname.endswith(".weight"):
            continue
        mname = pname[: -len(".weight")]
        m = modules[mname]
        if type(m) is nn.Linear:
            _swap(model, mname, FakeQuantLinear.from_linear(m, t, qw.get(pname),
                                                            learn_scales and t in formats.SCALED_FORMATS))
        elif isinstance(m, nn.Embedding):  # includes transformers' scaled embedding subclasses
            _swap(model, mname, FakeQuantEmbedding.from_embedding(m, t, scale))
    head = getattr(model, "lm_head", None)
    emb = model.get_input_embeddings()
    if head is not None and head.weight is emb.weight and isinstance(emb, FakeQuantEmbedding):
        model.lm_head = FakeQuantTiedHead(emb, emb.fmt)
    return types


def set_fake_quant(model: nn.Module, enabled: bool) -> None:
    """Switch fake quant on/off everywhere (e.g. on only after N warm-up steps)."""
    for m in model.modules():
        if isinstance(m, FAKE_QUANT_MODULES):
            m.enabled = enabled


def convert(model: nn.Module) -> nn.Module:
    """Plain modules again, holding the latent weights (export quantizes them to what the student saw).
    LoRA adapters are merged into their weights first, with the very computation the forward used."""
    if isinstance(getattr(model, "lm_head", None), FakeQuantTiedHead):
        emb = model.lm_head.embedding
        head = nn.Linear(emb.weight.shape[1], emb.weight.shape[0], bias=False, device="meta")
        head.weight = emb.weight
        model.lm_head = head
    for name, m in list(model.named_modules()):
        if isinstance(m, FakeQuantLinear):
            _swap(model, name, m.to_linear())
        elif isinstance(m, FakeQuantEmbedding):
            orig = m._original
            orig.weight = m.weight
            _swap(model, name, orig)
    return model


def learned_block_scales(model: nn.Module) -> dict[str, torch.Tensor]:
    """{GGUF tensor name: fp32 [rows, blocks] factors} of a converted student trained with learned block scales,
    in the row order llama.cpp stores the tensor (arch.Arch.to_gguf permutes Llama's q/k rows: the factors
    follow their rows); {} without them."""
    a = arch.of(model)
    names = arch.gguf_names(model)
    out = {}
    for mname, m in model.named_modules():
        s = m.__dict__.get("qat_block_scale")
        if s is None or isinstance(m, FakeQuantLinear):
            continue
        pname = f"{mname}.weight"
        out[names[pname]] = a.to_gguf(pname, s.to(torch.float32), model.config)
    return out


@torch.no_grad()
def snap_toward_grid_(model: nn.Module, plan: str, alpha: float = 0.05, overrides: tuple[str, ...] = (),
                      imatrix=None) -> int:
    """w <- w + alpha * (fake_quant(w) - w) for every weight the plan quantizes. Returns how many weights
    changed. Codes and scales stay those of PTQ (checked by tests); weights leave the decision boundaries."""
    types = plan_types(model, plan, overrides, imatrix)
    qw = imatrix_weights(model, imatrix)
    changed = 0
    for name, p in model.named_parameters(remove_duplicate=True):
        t = types.get(name)
        if not formats.is_format(t):
            continue
        flat = p.detach().reshape(-1, p.shape[-1])
        q = formats.fake_quant(flat.float(), t, qw.get(name))
        new = flat.float() + alpha * (q - flat.float())
        changed += int((new != flat.float()).sum())
        p.copy_(new.reshape(p.shape).to(p.dtype))
    return changed
