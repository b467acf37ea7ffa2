"""What a model costs in memory: weight bytes by GGUF tensor type for a plan, plus the KV cache.

    qatlm memory gemma-3-27b --plan q4_0 --ctx 32768
    qatlm memory model.gguf --plan f16 --ctx 4096 --json mem.json
    qatlm memory gemma-3-4b --train --seq-len 4096 --batch-size 1 --devices 4 --teacher sharded   # QAT training

With --train it plans the peak memory of a QAT run instead (qatlm.train.memory_plan: weights, teacher,
gradients, AdamW states, activations, the KD head, FSDP2 sharding), the fewest devices of --gpu-gb that hold it
and an estimated tokens/s.

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

from . import arch
from .atomic import atomic_write_text
from .cli import command, plan_args
from .gguf.io import architecture, check_model_keys, field_value, open_gguf
from .gguf.plans import is_quantizable, parse_plan, type_bytes
from .sources import resolve

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
    layer_types: tuple[str, ...] = ()  # config.layer_types where the config has them (else swa_pattern's rule)


def _siglip_params(text_width: int) -> int:
    """SigLIP So400m/14 at 896 px (Gemma 3 4B-27B) plus the projector into the text width."""
    width, mlp, layers, patches = 1152, 4304, 27, (896 // 14) ** 2
    per_layer = 4 * width * width + 4 * width + 2 * width * mlp + width + mlp + 4 * width
    return layers * per_layer + patches * width + 14 * 14 * 3 * width + width + width * text_width


def _config_tensors(config) -> list[tuple[str, tuple[int, ...], str]]:
    """The text model's tensors in llama.cpp's names and ne order, from a transformers config: the model is
    built on the meta device (no memory, any size) and named by the architecture registry, like an export."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = dict(model.named_parameters(remove_duplicate=True))
    out = []
    for name, g in arch.gguf_names(model).items():
        if name == "lm_head.weight" and arch.is_tied(model):
            continue
        out.append((g, tuple(reversed(params[name].shape)), "f32"))
    return out


def shapes_from_config(name: str, c: dict) -> ModelShapes:
    """ModelShapes of a config.json dict (qatlm's shipped Gemma 3 configs are such dicts)."""
    from transformers import AutoConfig

    mt = c.get("model_type", "")
    try:
        a = arch.get(mt)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    if mt == "gemma3":  # the multimodal config: its text part
        c = {**c.get("text_config", {}), "model_type": "gemma3_text"}
        mt = "gemma3_text"
    extra = {k: c[k] for k in ("vision",) if k in c}
    config = AutoConfig.for_model(mt, **{k: v for k, v in c.items() if k not in ("model_type", "vision")})
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return ModelShapes(name, a.name, _config_tensors(config), config.num_hidden_layers,
                       config.num_key_value_heads, head_dim, getattr(config, "sliding_window", None)
                       if a.swa_pattern else None, a.swa_pattern,
                       _siglip_params(config.hidden_size) if extra.get("vision") else 0,
                       tuple(getattr(config, "layer_types", None) or ()))


def load_shapes(model: str) -> ModelShapes:
    """A shipped name, a GGUF file or a Hugging Face directory -> ModelShapes."""
    if model in SHIPPED:
        c = json.loads(resources.files("qatlm.configs").joinpath(f"{model}.json").read_text())
        return shapes_from_config(model, c)
    src = resolve(model) if model == "bundled" or Path(model).exists() else None
    if src is None:
        raise ValueError(f"{model!r} is neither a file, a directory nor a shipped model name ({', '.join(SHIPPED)})")
    if src.kind == "gguf":
        info, reader = open_gguf(src.path)
        name = architecture(reader, src.path)
        try:
            a = arch.get(name)
        except ValueError as e:
            raise ValueError(f"{src.path}: {e}") from None
        k = check_model_keys(info, reader, name)  # hyperparameters checked against the tensors
        return ModelShapes(src.path.name, name, [(t.name, t.ne, t.ggml_type.name.lower()) for t in info.tensors],
                           k["block_count"], k["head_count_kv"], k["key_length"],
                           field_value(reader, f"{name}.attention.sliding_window") if a.swa_pattern else None,
                           a.swa_pattern)
    from .teacher import _json_file, _refuse_special_files, check_hf_config

    _refuse_special_files(src.path)
    cfg = src.path / "config.json"
    if not cfg.is_file():
        raise ValueError(f"{src.path}: no config.json; pass a Hugging Face model directory, a GGUF file, or one of "
                         f"{', '.join(SHIPPED)}")
    c = check_hf_config(_json_file(cfg, "a model's config.json"), cfg)
    try:
        return shapes_from_config(str(src.path), c)
    except Exception as e:  # transformers' own config validation, in its own exception types
        from .teacher import one_line

        raise ValueError(f"{cfg}: transformers cannot build a model from it ({one_line(e)}); fix config.json") \
            from None


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
        try:
            types = parse_plan(plan, overrides).types([(n, ne, src if src in ("f32", "f16") else "f32")
                                                       for n, ne, src in s.tensors])
        except ValueError as e:
            raise ValueError(f"{model}: {e}") from None
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


# `qatlm memory --train` flags: flag -> (TrainSetup field, type, help); qatlm.train.memory_plan does the work
TRAIN_FLAGS = {
    "--lora": ("lora", int, "LoRA rank (default 0: full QAT)"),
    "--devices": ("devices", int, "FSDP2 devices (default 1)"),
    "--seq-len": ("seq_len", int, "tokens per sequence (default 256)"),
    "--batch-size": ("batch_size", int, "sequences per device per micro-batch (default 2; TrainConfig's batch_size is "
                     "this x devices)"),
    "--precision": ("precision", str, "bf16 | fp32: the matmuls' dtype (default bf16)"),
    "--teacher": ("teacher", str, "resident (default) | sharded (FSDP2, shard_teacher) | cache (a top-k teacher cache)"),
    "--teacher-cache-k": ("cache_k", int, "top-k entries per position of the teacher cache (default 128)"),
    "--kd-chunk": ("kd_chunk", int, "positions per KD-head chunk (default 128)"),
    "--device-type": ("device_type", str, "cuda (default) | cpu: which AdamW step runs (foreach or per tensor)"),
}


def _train_plan(a) -> None:
    from .train.memory_plan import TrainSetup, train_memory

    given = {f: v for f, (k, _, _) in TRAIN_FLAGS.items() if (v := getattr(a, k)) is not None}
    if not a.train:
        if given or a.checkpointing or a.freeze_embeddings or a.gpu_gb is not None or a.tflops is not None:
            raise ValueError(f"{', '.join(given) or 'those flags'}: training-memory flags need --train")
        return None
    kw = {k: getattr(a, k) for k, _, _ in TRAIN_FLAGS.values() if getattr(a, k) is not None}
    setup = TrainSetup(**kw, checkpointing=a.checkpointing, train_embeddings=not a.freeze_embeddings, plan=a.plan)
    if a.override:
        raise ValueError("--override is not used by --train (the plan only decides which weights are fake-quantized)")
    return train_memory(a.model, setup, 80.0 if a.gpu_gb is None else a.gpu_gb, 400.0 if a.tflops is None else a.tflops)


def add_parsers(sub) -> None:
    def run(a) -> None:
        t = _train_plan(a)
        if t is not None:
            print(t.table())
            if a.json:
                atomic_write_text(a.json, json.dumps(asdict(t), indent=1))
            return
        r = memory(a.model, a.plan, a.ctx, a.kv_type, tuple(a.override))
        print(r.table())
        if a.json:
            atomic_write_text(a.json, to_json(r))

    p = command(sub, "memory", "Weight and KV-cache memory of a model under a plan, or (--train) of QAT training.",
                "qatlm memory gemma-3-27b --plan q4_0 --ctx 32768 --json mem.json\n"
                "  qatlm memory gemma-3-4b --train --seq-len 4096 --batch-size 1 --devices 4 --teacher sharded", run)
    p.add_argument("model", help=f"a GGUF file, a Hugging Face directory, 'bundled', or {'|'.join(SHIPPED)}")
    plan_args(p)
    p.add_argument("--ctx", type=int, default=4096, help="context length for the KV cache (default 4096)")
    p.add_argument("--kv-type", default="f16", choices=["f16", "bf16", "f32", "q8_0", "q4_0"])
    p.add_argument("--json", type=Path, help="also write the report as JSON here")
    t = p.add_argument_group("training memory (--train): peak bytes per device of a QAT run, itemized "
                             "(qatlm.train.memory_plan)")
    t.add_argument("--train", action="store_true", help="plan the memory of QAT training instead of inference")
    for flag, (key, typ, help_) in TRAIN_FLAGS.items():
        t.add_argument(flag, dest=key, type=typ, help=help_)
    t.add_argument("--checkpointing", action="store_true", help="plan with activation checkpointing per decoder "
                   "layer (a plan only: `qatlm train` does not checkpoint activations)")
    t.add_argument("--freeze-embeddings", action="store_true", help="train_embeddings=false")
    t.add_argument("--gpu-gb", type=float, help="device memory in GB (1e9 bytes) for the fewest-devices answer "
                   "(default 80)")
    t.add_argument("--tflops", type=float, help="assumed sustained TFLOP/s per device for the tokens/s estimate "
                   "(default 400: an assumption for bf16 on an H100-class GPU, not a measurement)")
