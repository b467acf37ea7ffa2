"""What a model costs in memory: weight bytes by GGUF tensor type for a plan, plus the KV cache.

    qatlm memory gemma-3-27b --plan q4_0 --ctx 32768
    qatlm memory model.gguf --plan f16 --ctx 4096 --json mem.json

MODEL is a GGUF file (its real tensor shapes), a Hugging Face directory (shapes from config.json), or a
shipped name (`gemma-3-270m`, `gemma-3-1b`, `gemma-3-4b`, `gemma-3-12b`, `gemma-3-27b`: configs only,
no weights). What is counted: every text-model tensor as llama.cpp stores it (token embeddings, tied
to the output for Gemma; norms in F32), at the plan's types. The vision tower of Gemma 3 4B-27B (SigLIP,
~0.42B parameters, a separate mmproj file in llama.cpp) is reported on its own line, in bf16, and not in
weights_bytes. KV cache: K and V for every layer at `--kv-type` (f16 like llama.cpp's default); Gemma 3's
sliding-window layers (5 of every 6) hold at most the window, the global ones the whole context.

Plans are those of qatlm.plans, plus two for comparison with published figures: `bf16` (2 bytes/weight)
and `int4` (4 bits/weight: the per-channel int4 of the Gemma 3 report, not a llama.cpp block type).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .plans import is_quantizable, parse_plan

SHIPPED = sorted(p.name[:-5] for p in resources.files("qatlm.configs").iterdir() if p.name.endswith(".json"))


@dataclass
class ModelShapes:
    name: str
    arch: str
    tensors: list[tuple[str, tuple[int, ...], str]]  # (GGUF name, ne, source type)
    n_layer: int
    n_kv_heads: int
    head_dim: int
    sliding_window: int | None = None  # Gemma 3 local layers
    swa_pattern: int | None = None  # every swa_pattern-th layer is global
    vision_params: int = 0


def _gemma3_tensors(c: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """Gemma 3 text tensors in llama.cpp's names and ne order (convert_hf_to_gguf.py, Gemma3Model)."""
    h, i, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    t = [("token_embd.weight", (h, c["vocab_size"]), "f32"), ("output_norm.weight", (h,), "f32")]
    for b in range(c["num_hidden_layers"]):
        p = f"blk.{b}."
        t += [(p + "attn_norm.weight", (h,), "f32"), (p + "attn_q.weight", (h, q), "f32"),
              (p + "attn_k.weight", (h, kv), "f32"), (p + "attn_v.weight", (h, kv), "f32"),
              (p + "attn_output.weight", (q, h), "f32"), (p + "attn_q_norm.weight", (hd,), "f32"),
              (p + "attn_k_norm.weight", (hd,), "f32"), (p + "post_attention_norm.weight", (h,), "f32"),
              (p + "ffn_norm.weight", (h,), "f32"), (p + "ffn_gate.weight", (h, i), "f32"),
              (p + "ffn_up.weight", (h, i), "f32"), (p + "ffn_down.weight", (i, h), "f32"),
              (p + "post_ffw_norm.weight", (h,), "f32")]
    return t


def _siglip_params(text_width: int) -> int:
    """SigLIP So400m/14 at 896 px (Gemma 3 4B-27B) plus the projector into the text width."""
    width, mlp, layers, patches = 1152, 4304, 27, (896 // 14) ** 2
    per_layer = 4 * width * width + 4 * width + 2 * width * mlp + width + mlp + 4 * width
    return layers * per_layer + patches * width + 14 * 14 * 3 * width + width + width * text_width


def shapes_from_config(name: str, c: dict) -> ModelShapes:
    mt = c.get("model_type", "")
    if mt in ("gemma3", "gemma3_text"):
        c = c.get("text_config", c)
        return ModelShapes(name, "gemma3", _gemma3_tensors(c), c["num_hidden_layers"], c["num_key_value_heads"],
                           c["head_dim"], c.get("sliding_window"), c.get("sliding_window_pattern", 6),
                           _siglip_params(c["hidden_size"]) if c.get("vision") else 0)
    raise ValueError(f"{name}: model_type {mt!r} is not supported by `qatlm memory` from a config; supported: "
                     "gemma3, gemma3_text (or pass a GGUF file, whose real shapes are read)")


def load_shapes(model: str) -> ModelShapes:
    """A shipped name, a GGUF file or a Hugging Face directory -> ModelShapes."""
    if model in SHIPPED:
        c = json.loads(resources.files("qatlm.configs").joinpath(f"{model}.json").read_text())
        return shapes_from_config(model, c)
    if model == "bundled":
        from .models import bundled_gguf

        model = str(bundled_gguf())
    p = Path(model)
    if p.is_file():
        from .gguf_io import field_value, open_gguf

        info, reader = open_gguf(p)
        arch = field_value(reader, "general.architecture")
        key = lambda k, d=None: field_value(reader, f"{arch}.{k}", d)  # noqa: E731
        n_head = key("attention.head_count")
        return ModelShapes(p.name, arch, [(t.name, t.ne, t.ggml_type.name.lower()) for t in info.tensors],
                           key("block_count"), key("attention.head_count_kv", n_head),
                           key("attention.key_length", key("embedding_length") // n_head),
                           key("attention.sliding_window") if arch == "gemma3" else None,
                           6 if arch == "gemma3" else None)
    if p.is_dir():
        cfg = p / "config.json"
        if not cfg.is_file():
            raise ValueError(f"{p}: no config.json; pass a Hugging Face model directory, a GGUF file, or one of "
                             f"{', '.join(SHIPPED)}")
        return shapes_from_config(str(p), json.loads(cfg.read_text()))
    raise ValueError(f"{model!r} is neither a file, a directory nor a shipped model name ({', '.join(SHIPPED)})")


def type_bytes(t: str, n: int) -> float:
    if t == "bf16":
        return 2 * n
    if t == "int4":
        return n / 2
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[t.upper()]]
    return n // block * size


@dataclass
class MemoryReport:
    model: str
    plan: str
    ctx: int
    weights_bytes: int
    by_type: dict[str, dict[str, float]] = field(default_factory=dict)  # type -> {tensors, params, bytes}
    kv_bytes: int = 0
    kv_type: str = "f16"
    vision_params: int = 0
    vision_bytes_bf16: int = 0
    params: int = 0

    def table(self) -> str:
        gb = 1e9
        rows = [f"{self.model}  plan {self.plan}  (GB = 1e9 bytes)",
                f"{'type':>6} {'tensors':>8} {'params':>14} {'GB':>9} {'bits/w':>7}"]
        for t, r in sorted(self.by_type.items(), key=lambda kv: -kv[1]["bytes"]):
            rows.append(f"{t:>6} {int(r['tensors']):>8} {int(r['params']):>14,} {r['bytes'] / gb:>9.3f} "
                        f"{8 * r['bytes'] / r['params']:>7.3f}")
        rows.append(f"{'weights':>6} {'':>8} {self.params:>14,} {self.weights_bytes / gb:>9.3f} "
                    f"{8 * self.weights_bytes / self.params:>7.3f}")
        rows.append(f"KV cache at ctx {self.ctx} ({self.kv_type}): {self.kv_bytes / gb:.3f} GB; "
                    f"weights + KV: {(self.weights_bytes + self.kv_bytes) / gb:.3f} GB")
        if self.vision_params:
            rows.append(f"vision tower (not included above): {self.vision_params:,} params, "
                        f"{self.vision_bytes_bf16 / gb:.3f} GB in bf16")
        return "\n".join(rows)


def memory(model: str, plan: str = "q4_0", ctx: int = 4096, kv_type: str = "f16",
           overrides: tuple[str, ...] = ()) -> MemoryReport:
    """Weight and KV-cache bytes of `model` under `plan` at context `ctx`."""
    if ctx < 1:
        raise ValueError(f"--ctx must be >= 1, got {ctx}")
    s = load_shapes(model)
    by_type: dict[str, dict[str, float]] = {}
    if plan in ("bf16", "int4"):
        types = {n: (plan if is_quantizable(n, ne) else "f32") for n, ne, _ in s.tensors}
    else:
        types = parse_plan(plan, overrides).types([(n, ne, src if src in ("f32", "f16") else "f32")
                                                   for n, ne, src in s.tensors])
    total = params = 0
    for n, ne, _ in s.tensors:
        count = math.prod(ne)
        b = type_bytes(types[n], count)
        r = by_type.setdefault(types[n], {"tensors": 0, "params": 0, "bytes": 0})
        r["tensors"] += 1
        r["params"] += count
        r["bytes"] += b
        total += b
        params += count
    kv_elem = {"f16": 2, "bf16": 2, "f32": 4, "q8_0": 34 / 32, "q4_0": 18 / 32}[kv_type]
    kv = 0.0
    for layer in range(s.n_layer):
        local = s.swa_pattern and s.sliding_window and (layer + 1) % s.swa_pattern != 0
        tokens = min(ctx, s.sliding_window) if local else ctx
        kv += 2 * s.n_kv_heads * s.head_dim * tokens * kv_elem
    return MemoryReport(s.name, plan, ctx, int(total), by_type, int(kv), kv_type, s.vision_params,
                        2 * s.vision_params, params)


def to_json(r: MemoryReport) -> str:
    return json.dumps(asdict(r), indent=1)
