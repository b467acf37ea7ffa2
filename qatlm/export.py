"""GGUF out: a model qatlm holds in memory, quantized through qatlm.formats, that llama.cpp loads as-is.

    export_gguf(model, "out.gguf", plan="q4_0", source_gguf=teacher.gguf_path)   # reuse the source metadata
    export_gguf(model, "out.gguf", plan="q4_0", hf_dir=teacher.hf_dir)            # build it from config+tokenizer
    export_hf(model, tokenizer, "out-dir")                                          # the unquantized checkpoint

Tensor names come from gguf-py's own HF -> GGUF name map (`gguf.get_tensor_name_map`). Fix-ups as llama.cpp's
convert_hf_to_gguf.py does them: Gemma 3 stores every norm weight as HF weight + 1 (its RMSNorm multiplies by
1 + w) and ties the output to token_embd; Llama permutes the rows of q_proj/k_proj for its rotary layout
(Qwen2/3 do not). When the teacher came from a GGUF, its metadata (tokenizer included) is copied and its tensor
order kept; otherwise the architecture keys come from config.json and the vocabulary from gguf-py's vocab
readers. Every file is written atomically.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from gguf import MODEL_ARCH, GGUFValueType, get_tensor_name_map

from .gguf_io import OutTensor, copy_fields, open_gguf, write_gguf
from .models import SUPPORTED, save_state_dict
from .plans import parse_plan
from .quantize import encode_tensor

_ARCH = {"gemma3": MODEL_ARCH.GEMMA3, "llama": MODEL_ARCH.LLAMA, "qwen2": MODEL_ARCH.QWEN2, "qwen3": MODEL_ARCH.QWEN3}


def _permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py LlamaModel.permute: HF's rotate-half rows -> llama.cpp's interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model: torch.nn.Module, arch: str) -> list[tuple[str, torch.Tensor]]:
    """The model's weights as (GGUF name, fp32 tensor in torch order), with llama.cpp's fix-ups."""
    cfg = model.config
    cfg = getattr(cfg, "text_config", cfg)
    tmap = get_tensor_name_map(_ARCH[arch], cfg.num_hidden_layers)
    tied = getattr(model.config, "tie_word_embeddings", False) or arch == "gemma3"
    out = []
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue  # the output reuses token_embd
        gname = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ValueError(f"tensor {name!r} has no GGUF name for architecture {arch}; qatlm cannot export it")
        w = t.detach().to(torch.float32)
        if arch == "gemma3" and name.endswith("norm.weight"):
            w = w + 1.0  # Gemma RMSNorm multiplies by (1 + w); GGUF stores 1 + w
        if arch == "llama" and name.endswith("q_proj.weight"):
            w = _permute_rope(w, cfg.num_attention_heads)
        if arch == "llama" and name.endswith("k_proj.weight"):
            w = _permute_rope(w, cfg.num_key_value_heads)
        out.append((gname, w))
    return out


def _config_metadata(writer, model: torch.nn.Module, arch: str) -> None:
    c = model.config
    c = getattr(c, "text_config", c)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    rope = getattr(c, "rope_theta", None) or (getattr(c, "rope_parameters", None) or {}).get("rope_theta")
    if isinstance(getattr(c, "rope_parameters", None), dict) and "full_attention" in c.rope_parameters:
        rope = c.rope_parameters["full_attention"].get("rope_theta", rope)
    if rope:
        writer.add_rope_freq_base(float(rope))
    if arch == "gemma3":
        writer.add_sliding_window(c.sliding_window)
    else:
        writer.add_rope_dimension_count(head_dim)
        writer.add_vocab_size(c.vocab_size)


def _vocab_metadata(writer, hf_dir: Path, n_vocab: int) -> None:
    """Tokenizer metadata from a Hugging Face tokenizer.json, through gguf-py's vocab readers."""
    from gguf.vocab import BpeVocab, LlamaHfVocab, SpecialVocab

    tj = hf_dir / "tokenizer.json"
    if not tj.is_file():
        raise ValueError(f"{hf_dir}: no tokenizer.json; GGUF export of a Hugging Face model needs its fast tokenizer")
    model = json.loads(tj.read_text()).get("model", {})
    spm_like = model.get("type") == "BPE" and model.get("byte_fallback")
    vocab = LlamaHfVocab(hf_dir) if spm_like else BpeVocab(hf_dir)
    tokens, scores, types = [], [], []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(ttype)
    while len(tokens) < n_vocab:  # embedding rows beyond the tokenizer: padding tokens, as convert does
        tokens.append(f"[PAD{len(tokens)}]".encode())
        scores.append(-1000.0)
        types.append(5)  # UNUSED
    writer.add_tokenizer_model("llama" if spm_like else "gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    SpecialVocab(hf_dir, load_merges=not spm_like, n_vocab=len(tokens)).add_to_gguf(writer)


def export_gguf(model: torch.nn.Module, out: str | os.PathLike, plan: str = "q4_0", overrides: tuple[str, ...] = (),
                source_gguf: str | os.PathLike | None = None, hf_dir: str | os.PathLike | None = None,
                progress: bool = True) -> Path:
    """Write `model` as a GGUF of `plan` (see module docstring). Returns the path."""
    mt = getattr(model.config, "model_type", None)
    if mt not in SUPPORTED:
        raise ValueError(f"model_type {mt!r} cannot be exported; supported: {', '.join(sorted(SUPPORTED))}")
    arch = SUPPORTED[mt]
    named = gguf_tensors(model, arch)
    if source_gguf is not None:
        info, reader = open_gguf(source_gguf)
        order = [t.name for t in info.tensors]
        have = dict(named)
        if set(order) != set(have):
            raise ValueError(f"{source_gguf}: its tensors {sorted(set(order) ^ set(have))[:5]} do not match the model's; "
                             "export with hf_dir instead of the source GGUF's metadata")
        named = [(n, have[n]) for n in order]
    elif hf_dir is None:
        raise ValueError("export_gguf needs source_gguf (copy its metadata) or hf_dir (build it from config + tokenizer)")
    p = parse_plan(plan, overrides)
    types = p.types([(n, tuple(reversed(w.shape)), "f32") for n, w in named])

    def metadata(writer) -> None:
        if source_gguf is not None:
            copy_fields(reader, writer, skip={"general.file_type", "general.quantization_version"})
        else:
            writer.add_name(Path(hf_dir).name)
            _config_metadata(writer, model, arch)
            emb = model.get_input_embeddings().weight.shape[0]
            _vocab_metadata(writer, Path(hf_dir), emb)
        if p.file_type is not None:
            writer.add_key_value("general.file_type", p.file_type, GGUFValueType.UINT32)
        writer.add_key_value("general.quantization_version", 2, GGUFValueType.UINT32)

    def tensors() -> Iterator[OutTensor]:
        it = named
        if progress:
            from tqdm import tqdm
            it = tqdm(named, desc=f"export {Path(out).name} ({plan})", unit="tensor")
        for n, w in it:
            yield encode_tensor(n, w, types[n])

    return write_gguf(out, arch, metadata, tensors())


def export_hf(model: torch.nn.Module, tokenizer, out_dir: str | os.PathLike) -> Path:
    """The unquantized checkpoint as a Hugging Face directory (config + safetensors + tokenizer), atomically:
    written beside the target, then renamed; an existing directory is replaced only by a complete one."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.config.save_pretrained(tmp)
        save_state_dict(model, tmp / "model.safetensors")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
