"""Stage 1, the teacher: a Hugging Face directory (config.json + safetensors) or a GGUF file, as a
`transformers` model plus tokenizer.

    teacher = load_teacher("gemma-3-270m-q4_k_m.gguf")      # or a directory, or "bundled"
    teacher.model, teacher.tokenizer, teacher.gguf_path

GGUF teachers are dequantized by transformers (gguf-py's dequantizers, which agree with llama.cpp's byte
for byte: tests/test_ptq.py), then saved once as a Hugging Face directory in the cache
(~/.cache/qatlm/teachers/<sha256 of the file>, written atomically): converting Gemma's 262k-token vocabulary
takes 15-30 s, and every later load of the same file reads the cached directory in a few seconds.

Hugging Face directories are checked before transformers sees them, so that a broken checkpoint gets an
error naming the file instead of a model with silently re-initialized weights: config.json present,
architecture supported, every tensor the model expects present in the safetensors with the right shape.
Only safetensors are read (no pickle), and remote code is never run.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import arch
from .atomic import atomic_dir
from .sources import CACHE, resolve


@dataclass
class Teacher:
    model: torch.nn.Module
    tokenizer: object
    source: Path  # what the user gave
    hf_dir: Path  # the Hugging Face directory the model was loaded from (the cache for GGUF teachers)
    gguf_path: Path | None  # the source GGUF, when there is one (its metadata is reused on export)
    arch: str  # GGUF architecture name


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def check_hf_dir(path: Path) -> dict:
    """Validate a Hugging Face model directory; returns its config. Raises ValueError naming the file."""
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"{path}: no config.json; a teacher is a Hugging Face model directory (config.json + "
                         "*.safetensors) or a .gguf file")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    mt = cfg.get("model_type")
    if mt not in arch.names():
        raise ValueError(f"{cfg_path}: model_type {mt!r} is not supported; supported: {', '.join(arch.names())}")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        extra = f" (found {', '.join(bins)}: pickle files are not loaded; convert them to safetensors)" if bins else ""
        raise ValueError(f"{path}: no *.safetensors weights{extra}")
    return cfg


def _check_tensors(path: Path, model: torch.nn.Module) -> None:
    """Every parameter the model expects must be in the safetensors files, with the same shape."""
    from safetensors import safe_open

    found: dict[str, tuple[tuple[int, ...], Path]] = {}
    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    found[k] = (tuple(st.get_slice(k).get_shape()), f)
        except Exception as e:  # safetensors raises its own error types for damaged headers
            raise ValueError(f"{f}: cannot read safetensors header ({e}); the file is damaged or truncated") from None
    expected = model.state_dict()
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, t in expected.items():
        if name not in found:
            if tied and name == "lm_head.weight":
                continue
            raise ValueError(f"{path}: tensor {name!r} {tuple(t.shape)} is missing from the safetensors files; "
                             "the checkpoint is incomplete (re-download or re-export it)")
        shape, f = found[name]
        if shape != tuple(t.shape):
            raise ValueError(f"{f}: tensor {name!r} has shape {shape} but config.json implies {tuple(t.shape)}; "
                             "the weights do not belong to this config")


def load_hf(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, object, dict]:
    """Load and check a Hugging Face directory (safetensors only, no remote code)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    cfg = check_hf_dir(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    _check_tensors(path, skeleton)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, trust_remote_code=False)
    model.eval()
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    return model, tok, cfg


def gguf_to_hf_cache(gguf_path: Path) -> Path:
    """Convert a GGUF teacher to a cached Hugging Face directory once; returns the directory."""
    from .gguf.io import field_value, open_gguf

    _, reader = open_gguf(gguf_path)  # validate before transformers parses it
    name = field_value(reader, "general.architecture")
    try:
        arch.get(name)
    except ValueError as e:
        raise ValueError(f"{gguf_path}: {e}") from None
    target = CACHE / "teachers" / _sha256(gguf_path)
    if (target / "config.json").is_file():
        return target
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with atomic_dir(target, replace=False) as tmp:  # another process may finish first: keep its copy
        with tqdm(total=2, desc=f"converting {gguf_path.name} (once; cached)", unit="step") as bar:
            tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            tok.save_pretrained(tmp)
            bar.update()
            model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                         dtype=torch.float32)
            # transformers marks GGUF-loaded models as "quantized" and refuses save_pretrained; the weights
            # are plain fp32 by now, so write them (and a config without that marker) directly
            config = model.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            config.save_pretrained(tmp)
            save_state_dict(model, tmp / "model.safetensors")
            bar.update()
        (tmp / "qatlm_source.json").write_text(json.dumps({"gguf": str(gguf_path), "arch": name}))
    return target


def save_state_dict(model: torch.nn.Module, path: Path) -> None:
    """Weights as one safetensors file, the tied lm_head left out (as Hugging Face checkpoints do)."""
    from safetensors.torch import save_file

    tied = arch.is_tied(model)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(sd, str(path), metadata={"format": "pt"})


def load_teacher(source: str | os.PathLike = "bundled", dtype: torch.dtype = torch.float32) -> Teacher:
    """A GGUF file, a Hugging Face directory, or "bundled" (Gemma 3 270M) -> Teacher (model in eval mode)."""
    src = resolve(source)
    hf_dir = gguf_to_hf_cache(src.path) if src.kind == "gguf" else src.path
    model, tok, cfg = load_hf(hf_dir, dtype)
    return Teacher(model, tok, src.path, hf_dir, src.path if src.kind == "gguf" else None,
                   arch.get(cfg["model_type"]).name)
