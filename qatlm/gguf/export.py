"""Stage 4, export: a model qatlm holds in memory as a GGUF that llama.cpp loads as-is (quantized through
qatlm.formats), and as the unquantized Hugging Face checkpoint.

    export_gguf(model, "out.gguf", plan="q4_0", source_gguf=teacher.gguf_path)   # reuse the source metadata
    export_gguf(model, "out.gguf", plan="q4_0", hf_dir=teacher.hf_dir)            # build it from config+tokenizer
    export_hf(model, tokenizer, "out-dir")                                          # the unquantized checkpoint

Tensor names and llama.cpp's fix-ups (Gemma's norm + 1 and tied output, Llama's rotary permutation) come from
the architecture registry (qatlm.arch). When the teacher came from a GGUF, its metadata (tokenizer included) is copied and its tensor
order kept; otherwise the architecture keys come from config.json and the vocabulary from gguf-py's vocab
readers. Every file is written atomically.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import torch

from .. import arch
from ..atomic import atomic_dir
from ..cli import command
from ..teacher import save_state_dict
from .io import OutTensor, open_gguf, write_gguf, write_metadata
from .plans import parse_plan
from .ptq import encode_tensor


def _config_metadata(writer, model: torch.nn.Module) -> None:
    a = arch.of(model)
    c = a.text_config(model.config)
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
    a.gguf_keys(writer, c)


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
                progress: bool = True, imatrix=None) -> Path:
    """Write `model` as a GGUF of `plan` (see module docstring), quantized with `imatrix` (an Imatrix) as
    llama-quantize --imatrix would, if given. Returns the path."""
    a = arch.of(model)
    named = arch.gguf_tensors(model)
    reader = None
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
    types = p.types([(n, tuple(reversed(w.shape)), "f32") for n, w in named], imatrix=imatrix is not None)

    def build(writer) -> None:  # keys of a model that has no source GGUF
        writer.add_name(Path(hf_dir).name)
        _config_metadata(writer, model)
        _vocab_metadata(writer, Path(hf_dir), model.get_input_embeddings().weight.shape[0])

    def tensors() -> Iterator[OutTensor]:
        it = named
        if progress:
            from tqdm import tqdm
            it = tqdm(named, desc=f"export {Path(out).name} ({plan})", unit="tensor")
        for n, w in it:
            yield encode_tensor(n, w, types[n], imatrix.weights(n) if imatrix is not None and n in imatrix else None)

    return write_gguf(out, a.name, lambda w: write_metadata(w, p.file_type, source=reader,
                                                            build=None if reader is not None else build), tensors())


def export_hf(model: torch.nn.Module, tokenizer, out_dir: str | os.PathLike) -> Path:
    """The unquantized checkpoint as a Hugging Face directory (config + safetensors + tokenizer), atomically:
    an existing directory is replaced only by a complete one."""
    if not getattr(model.config, "architectures", None):  # llama.cpp's converter detects the family by it
        model.config.architectures = [arch.of(model).hf_class]
    with atomic_dir(out_dir) as tmp:
        model.config.save_pretrained(tmp)
        save_state_dict(model, tmp / "model.safetensors")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def export_run(run_dir, out, hf: str | os.PathLike | None = None, teacher=None) -> tuple[Path, Path | None]:
    """A training run's QAT GGUF (and unquantized checkpoint): the student at its last checkpoint, quantized
    with the run's plan. `teacher`: an already loaded Teacher of the run (saves loading it again)."""
    from ..train.loop import load_run

    cfg, t, student = load_run(run_dir, teacher)
    from ..train.loop import load_imatrix

    gguf = export_gguf(student, out, cfg.plan, tuple(cfg.overrides), source_gguf=t.gguf_path,
                       hf_dir=None if t.gguf_path else t.hf_dir, imatrix=load_imatrix(cfg, student))
    return gguf, (export_hf(student, t.tokenizer, hf) if hf else None)


def add_parsers(sub) -> None:
    def run(a) -> None:
        gguf, hf = export_run(a.run, a.out, a.hf)
        print(f"wrote {gguf} ({gguf.stat().st_size / 1e6:.1f} MB)")
        if hf:
            print(f"wrote {hf} (unquantized QAT checkpoint)")

    p = command(sub, "export", "Export a training run: the QAT GGUF, and optionally the unquantized checkpoint.",
                "qatlm export runs/q4 runs/q4/qat-q4_0.gguf --hf runs/q4/qat-hf", run)
    p.add_argument("run", help="a run directory of `qatlm train`")
    p.add_argument("out", type=Path, help="the GGUF to write")
    p.add_argument("--hf", type=Path, help="also write the unquantized QAT checkpoint (HF safetensors) here")
