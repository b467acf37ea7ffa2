"""Stage 4, export for Apple's MLX: a trained student as an mlx-lm model directory that runs the very values the
student trained with.

    export_mlx(student, "qat-mlx", plan="q4_0", tokenizer=teacher.tokenizer, source_dir=teacher.hf_dir)
    qatlm export runs/q4 --mlx runs/q4/qat-mlx       # then: mlx_lm.generate --model runs/q4/qat-mlx -p "..."

The directory, as mlx-lm's own converter lays it out:
- config.json: the model's Hugging Face config plus mlx-lm's `quantization` entry (`group_size`, `bits`, `mode`
  "affine": the most common setting, and one entry per layer whose setting differs, keyed by the layer's path,
  e.g. "lm_head": {"group_size": 32, "bits": 8}), copied to `quantization_config` as mlx-lm writes it;
- model.safetensors: per quantized layer `<path>.weight` (uint32: the codes, LSB first), `<path>.scales` and
  `<path>.biases` (fp16); every other tensor as the student holds it (fp32; f16-planned weights in fp16). Names
  and layouts are Hugging Face's (no GGUF fix-ups: mlx-lm applies Gemma's 1 + w itself, and its rotary
  embedding uses HF's layout); a tied output projection is the quantized embedding (mlx-lm ties it);
- the tokenizer files (with the teacher's tokenizer.model and generation_config.json) and README.md.

Each quantized tensor is quantized by qatlm.formats with the plan and imatrix of the run (the codes of the GGUF,
row for row: Llama's q/k row permutation only reorders rows) and the codes re-expressed as MLX affine groups
(value = scale * q + bias), exactly:

    GGUF type   group  bits  MLX code   scale   bias     value (llama.cpp)
    q4_0        32     4     q          d       -8 d     (q - 8) d
    q5_0        32     5     q          d       -16 d    (q - 16) d
    q4_1        32     4     q          d       m        q d + m
    q5_1        32     5     q          d       m        q d + m
    q8_0        32     8     q + 128    d       -128 d   q d          (q: int8)
    mlx:<b>g<G> G      b     mx.quantize's own codes, scales and biases

d and m are the GGUF's fp16 fields; -8d, -16d and -128d are exact in fp16 (power-of-two multiples). In fp32,
scale * q is exact and the sum rounds once to llama.cpp's value, which is representable: the values are equal
(tests/test_mlx.py compares every layer with the GGUF, bit for bit but for the sign of zero: llama.cpp's
(8 - 8) * d is -0.0 where d < 0, MLX's d * 8 - 8d is +0.0). MLX itself computes in the activations' dtype; with
the fp32 tensors here that is fp32 (fp16 scales are widened exactly).
K-quants and IQ4 types have no such form (sub-blocks of 16 weights, or 6-bit sub-scales times an fp16 scale,
or a non-uniform codebook): a plan using them is refused, naming the tensors and the override that fixes it.

Why hand-written: mlx_lm.convert would re-quantize the unquantized weights with mx.quantize's own min/max
groups, a different grid from the one the student was trained on, losing what QAT learned; and it needs mlx,
whose wheels cover macOS and Linux only. Here the codes are carried over, not recomputed, and only numpy and
safetensors are needed; mlx is used by the tests, to load and run the result.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from . import arch, formats
from .atomic import atomic_dir
from .formats.mlx_affine import pack_bits
from .student.plan import imatrix_weights, plan_types

# GGUF block format -> (bits, code offset added to the stored code, bias as a function of the fp16 d and m)
AFFINE = {
    "q4_0": (4, 0, lambda d, m: -8 * d),
    "q5_0": (5, 0, lambda d, m: -16 * d),
    "q4_1": (4, 0, lambda d, m: m),
    "q5_1": (5, 0, lambda d, m: m),
    "q8_0": (8, 128, lambda d, m: -128 * d),
}


def mlx_type_ok(t: str) -> bool:
    """Whether a planned type can be written to MLX exactly: the affine ones above, MLX's own, f16 and f32."""
    return t in AFFINE or formats.is_mlx(t) or t in ("f32", "f16")


def affine_groups(w: torch.Tensor, t: str, imatrix=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """A 2-D weight [rows, cols] quantized to type `t` (with `imatrix`, as llama-quantize --imatrix) as MLX
    affine groups: (codes uint32 [rows, cols * bits / 32], scales fp16 [rows, cols / group], biases fp16 [same],
    group, bits)."""
    f = formats.get(t)
    rows, cols = w.shape
    raw = torch.from_numpy(formats.quantize(w, t, imatrix)).reshape(-1, f.type_size)
    c = f.unpack(raw)  # the quantizer's codes: q [n, B], d (and m) fp16 [n, 1]
    if formats.is_mlx(t):
        q, scale, bias, bits = c.q, c.d, c.m, f.bits
    else:
        bits, offset, bias_of = AFFINE[t]
        q = (c.q.to(torch.int16) + offset).to(torch.uint8)  # Q8_0's int8 codes -> 0..255
        d32 = c.d.to(torch.float32)
        m32 = c.m.to(torch.float32) if c.m is not None else None
        scale, bias = c.d, bias_of(d32, m32).to(torch.float16)
        if not torch.isfinite(bias).all():
            raise ValueError(f"{t}: a block scale of {float(d32.abs().max()):g} makes its MLX bias overflow fp16; "
                             "this weight cannot be written for MLX exactly")
    codes = pack_bits(q.reshape(rows, cols), bits).view(torch.int32).numpy().view(np.uint32)
    return (codes, scale.reshape(rows, -1).numpy(), bias.reshape(rows, -1).numpy(), f.block_size, bits)


def mlx_tensors(model: torch.nn.Module, plan: str, overrides: tuple[str, ...] = (),
                imatrix=None) -> tuple[dict[str, np.ndarray], dict]:
    """({safetensors name: array}, mlx-lm's quantization entry) of `model` under `plan`; see module docstring."""
    types = plan_types(model, plan, overrides, imatrix)
    bad = {n: t for n, t in types.items() if not mlx_type_ok(t)}
    if bad:
        names = arch.gguf_names(model)
        first = next(iter(bad))
        raise ValueError(f"plan {plan!r}: {len(bad)} tensors have types MLX's affine groups cannot hold exactly "
                         f"({', '.join(sorted(set(bad.values())))}; e.g. {names[first]}); MLX export takes "
                         f"q4_0, q4_1, q5_0, q5_1, q8_0, mlx:<bits>g<group>, f16 and f32: train with such a "
                         f"plan, or override those tensors (e.g. --override '{names[first]}=q8_0')")
    qw = imatrix_weights(model, imatrix)
    tied = arch.is_tied(model)
    out: dict[str, np.ndarray] = {}
    layers: dict[str, tuple[int, int]] = {}  # module path -> (group_size, bits)
    for name, w in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # mlx-lm ties the output to the (quantized) embedding
        if name not in types:
            raise ValueError(f"state_dict entry {name!r} has no planned type; qatlm cannot export it for MLX")
        t, w = types[name], w.detach().to(torch.float32).cpu()
        if formats.is_format(t):
            path = name[: -len(".weight")]
            codes, scales, biases, group, bits = affine_groups(w.reshape(-1, w.shape[-1]), t, qw.get(name))
            out[f"{path}.weight"] = codes.reshape(*w.shape[:-1], -1)
            out[f"{path}.scales"] = scales.reshape(*w.shape[:-1], -1)
            out[f"{path}.biases"] = biases.reshape(*w.shape[:-1], -1)
            layers[path] = (group, bits)
        else:
            out[name] = w.to(torch.float16 if t == "f16" else torch.float32).numpy()
    return out, quantization_entry(layers)


def quantization_entry(layers: dict[str, tuple[int, int]]) -> dict:
    """mlx-lm's config "quantization": the most common (group_size, bits), plus the layers that differ."""
    if not layers:
        raise ValueError("no quantized tensor: the plan leaves every weight in f16/f32; MLX export is for "
                         "quantized plans (use --hf for the unquantized checkpoint)")
    (group, bits), _ = Counter(layers.values()).most_common(1)[0]
    entry: dict = {"group_size": group, "bits": bits, "mode": "affine"}
    for path, (g, b) in layers.items():
        if (g, b) != (group, bits):
            entry[path] = {"group_size": g, "bits": b}
    return entry


def mlx_config(model: torch.nn.Module) -> dict:
    """The model's Hugging Face config as a dict, plus what mlx-lm reads under names transformers 5 no longer
    writes (its defaults would silently differ, e.g. Qwen2's rope_theta 1e6 for a model trained with 1e4):
    `rope_theta` / `rope_scaling` from `rope_parameters` (Gemma 3: the global layers' theta, and the local ones'
    as `rope_local_base_freq`), and Gemma 3's `sliding_window_pattern` (every pattern-th layer is global) from
    `layer_types`, which must then be periodic."""
    config = model.config.to_dict()
    config["architectures"] = config.get("architectures") or [arch.of(model).hf_class]
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and isinstance(rope.get("full_attention"), dict):  # per layer type (Gemma 3)
        if isinstance(rope.get("sliding_attention"), dict) and "rope_local_base_freq" not in config:
            config["rope_local_base_freq"] = rope["sliding_attention"].get("rope_theta")
        rope = rope["full_attention"]
    if isinstance(rope, dict):
        if config.get("rope_theta") is None and rope.get("rope_theta") is not None:
            config["rope_theta"] = rope["rope_theta"]
        if config.get("rope_scaling") is None and rope.get("rope_type", "default") != "default":
            config["rope_scaling"] = rope
    types = config.get("layer_types")
    if config.get("model_type") in ("gemma3_text", "gemma3") and "sliding_window_pattern" not in config and types:
        n = types.index("full_attention") + 1 if "full_attention" in types else len(types) + 1
        want = ["full_attention" if (i + 1) % n == 0 else "sliding_attention" for i in range(len(types))]
        if types != want:
            raise ValueError(f"layer_types {types} is not a repeating pattern of sliding layers closed by one "
                             "global layer, which is all mlx-lm's Gemma 3 can express (sliding_window_pattern)")
        config["sliding_window_pattern"] = n
    return config


def export_mlx(model: torch.nn.Module, out_dir: str | os.PathLike, plan: str = "q4_0", overrides: tuple[str, ...] = (),
               tokenizer=None, source_dir: str | os.PathLike | None = None, imatrix=None) -> Path:
    """Write `model` under `plan` (quantized with `imatrix`, an Imatrix, if given) as an mlx-lm model directory,
    atomically. `source_dir`: the teacher's Hugging Face directory (tokenizer.model, generation_config.json)."""
    from safetensors.numpy import save_file

    from .gguf.export import save_tokenizer

    tensors, quantization = mlx_tensors(model, plan, overrides, imatrix)
    config = mlx_config(model)
    config["quantization"] = quantization
    config["quantization_config"] = quantization  # what mlx_lm.convert writes beside it
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_tokenizer(tokenizer, tmp, source_dir)
    return Path(out_dir)
