"""Stage 4, export: a model qatlm holds in memory as a GGUF that llama.cpp loads as-is (quantized through
qatlm.formats), and as the unquantized Hugging Face checkpoint (which llama.cpp's convert_hf_to_gguf.py and
llama-quantize turn into the same GGUF, byte for byte); `export_run` also writes the mlx-lm directory
(qatlm.mlx_export) and a model card beside each export (qatlm.card).

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
import shutil
from pathlib import Path
from typing import Iterator, NamedTuple

import torch

from .. import arch, formats
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
    llama-quantize --imatrix would, if given; a student trained with learned block scales gets them written into
    its blocks' d (qatlm.student.fakequant). Returns the path."""
    from ..student import learned_block_scales

    a = arch.of(model)
    scales = learned_block_scales(model)
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
    mlx = sorted({t for t in types.values() if formats.is_mlx(t)})
    if mlx:
        raise ValueError(f"plan {plan!r} puts tensors in MLX's {', '.join(mlx)}, which a GGUF cannot hold: export "
                         "for MLX instead (`qatlm export RUN --mlx DIR`, qatlm.mlx_export)")

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
            t = encode_tensor(n, w, types[n], imatrix.weights(n) if imatrix is not None and n in imatrix else None)
            if n in scales:  # the d each block of the student had: fp16(d * learned factor)
                t = OutTensor(n, formats.scale_blocks(t.data, types[n], scales[n]), t.ggml_type)
            yield t

    return write_gguf(out, a.name, lambda w: write_metadata(w, p.file_type, source=reader,
                                                            build=None if reader is not None else build), tensors())


# files of the teacher's directory that a loaded tokenizer does not write back: the SentencePiece model, which
# llama.cpp's converter reads for Llama / Gemma / Qwen vocabularies (without it, it needs a BPE pre-tokenizer it
# knows by hash), and the generation defaults (eos ids) that transformers and mlx-lm read
_COPIED_FROM_TEACHER = ("tokenizer.model", "generation_config.json")


def save_tokenizer(tokenizer, out_dir: Path, source_dir: str | os.PathLike | None = None) -> None:
    """The tokenizer's files in out_dir, plus the teacher directory's files it does not write (see above)."""
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    for name in _COPIED_FROM_TEACHER if source_dir is not None else ():
        src = Path(source_dir) / name
        if src.is_file() and not (out_dir / name).exists():
            shutil.copyfile(src, out_dir / name)


def export_hf(model: torch.nn.Module, tokenizer, out_dir: str | os.PathLike,
              source_dir: str | os.PathLike | None = None) -> Path:
    """The unquantized checkpoint as a Hugging Face directory (config + safetensors + tokenizer), atomically:
    an existing directory is replaced only by a complete one. `source_dir`: the teacher's Hugging Face
    directory, whose tokenizer.model and generation_config.json are copied along (when it has them), so that
    llama.cpp's convert_hf_to_gguf.py converts the checkpoint as it converts the teacher (tests/test_converter.py).
    A student trained with learned block scales also gets qat_block_scales.safetensors: the factors its GGUF's
    block scales hold, which llama-quantize of the weights alone does not reproduce."""
    if not getattr(model.config, "architectures", None):  # llama.cpp's converter detects the family by it
        model.config.architectures = [arch.of(model).hf_class]
    from safetensors.torch import save_file

    from ..student import learned_block_scales

    scales = learned_block_scales(model)
    with atomic_dir(out_dir) as tmp:
        model.config.save_pretrained(tmp)
        save_state_dict(model, tmp / "model.safetensors")
        if scales:  # the factors the GGUF's d hold (GGUF names, llama.cpp's row order): the weights alone re-quantize
            #         to the GGUF without them
            save_file({n: s.contiguous() for n, s in scales.items()}, str(tmp / "qat_block_scales.safetensors"))
        save_tokenizer(tokenizer, tmp, source_dir)
    return Path(out_dir)


class Exports(NamedTuple):
    gguf: Path | None  # the QAT GGUF
    hf: Path | None  # the unquantized checkpoint
    mlx: Path | None  # the mlx-lm directory
    cards: list[Path]  # the README.md model cards written beside them


def export_run(run_dir, out: str | os.PathLike | None = None, hf: str | os.PathLike | None = None, teacher=None,
               mlx: str | os.PathLike | None = None, command: str | None = None,
               base_model: str | None = None) -> Exports:
    """A training run's exports: the QAT GGUF (`out`), the unquantized checkpoint (`hf`) and the mlx-lm directory
    (`mlx`), each optional, from the student at its last checkpoint quantized with the run's plan (and imatrix);
    then a model card (README.md) beside each (qatlm.card; `command`: the command line to show in it,
    `base_model`: overrides the teacher's). `teacher`: an already loaded Teacher of the run (saves loading it)."""
    from collections import Counter

    from ..card import card_info, write_card
    from ..student.plan import plan_types
    from ..train import config as C
    from ..teacher import check_finite_weights
    from ..train.checkpoint import checkpoint_dir
    from ..train.loop import load_imatrix, load_run

    if out is None and hf is None and mlx is None:
        raise ValueError("nothing to export: give the GGUF to write (OUT), --hf DIR and/or --mlx DIR")
    plan = C.resolve(saved=Path(run_dir)).plan if (Path(run_dir) / "config.yaml").is_file() else None
    if out is not None and plan is not None and formats.is_mlx(plan):
        raise ValueError(f"{run_dir} was trained for the MLX plan {plan!r}, which a GGUF cannot hold: export it "
                         f"with --mlx DIR (and --hf DIR for the unquantized checkpoint), without {out}")
    cfg, t, student = load_run(run_dir, teacher)
    if mlx is not None and cfg.learn_scales:
        raise ValueError(f"{run_dir} was trained with learned block scales, which the MLX export does not write yet: "
                         "export the GGUF (and --hf) only")
    check_finite_weights(student, lambda n: f"{checkpoint_dir(Path(run_dir))}: student tensor {n!r}",
                         "nothing was exported. The run diverged before this checkpoint: train again with a lower "
                         "--lr or a longer --warmup (or export an earlier run)")
    im = load_imatrix(cfg, student)
    gguf = export_gguf(student, out, cfg.plan, tuple(cfg.overrides), source_gguf=t.gguf_path,
                       hf_dir=None if t.gguf_path else t.hf_dir, imatrix=im) if out is not None else None
    hf_dir = export_hf(student, t.tokenizer, hf, t.hf_dir) if hf is not None else None
    mlx_dir = None
    if mlx is not None:
        from ..mlx_export import export_mlx

        mlx_dir = export_mlx(student, mlx, cfg.plan, tuple(cfg.overrides), t.tokenizer, t.hf_dir, im)
    types = Counter(ty.upper() for ty in plan_types(student, cfg.plan, tuple(cfg.overrides), im).values())
    info = card_info(run_dir, command, base_model, types=dict(types), gguf=gguf, hf=hf_dir, mlx=mlx_dir)
    cards = [write_card(d, kind, info) for kind, d in (("gguf", gguf and gguf.parent), ("hf", hf_dir),
                                                        ("mlx", mlx_dir)) if d is not None]
    return Exports(gguf, hf_dir, mlx_dir, cards)


def add_parsers(sub) -> None:
    def run(a) -> None:
        import shlex

        e = export_run(a.run, a.out, a.hf, mlx=a.mlx, command="qatlm " + shlex.join(a.argv), base_model=a.base_model)
        if e.gguf:
            print(f"wrote {e.gguf} ({e.gguf.stat().st_size / 1e6:.1f} MB)")
        if e.hf:
            print(f"wrote {e.hf} (unquantized QAT checkpoint)")
        if e.mlx:
            print(f"wrote {e.mlx} (mlx-lm model directory)")
        for c in e.cards:
            note = " (a README.md qatlm did not write is there: kept)" if c.name != "README.md" else ""
            print(f"wrote {c} (model card){note}")

    p = command(sub, "export", "Export a training run: the QAT GGUF, the unquantized checkpoint (--hf) and an "
                "mlx-lm model (--mlx), each with a model card (README.md).",
                "qatlm export runs/q4 runs/q4/qat-q4_0.gguf --hf runs/q4/qat-hf --mlx runs/q4/qat-mlx", run)
    p.add_argument("run", help="a run directory of `qatlm train`")
    p.add_argument("out", type=Path, nargs="?", help="the GGUF to write (optional with --hf / --mlx)")
    p.add_argument("--hf", type=Path, help="also write the unquantized QAT checkpoint (HF safetensors) here: "
                   "llama.cpp's convert_hf_to_gguf.py + llama-quantize turn it into the same GGUF")
    p.add_argument("--mlx", type=Path, help="also write an mlx-lm model directory here (plans q4_0, q4_1, q5_0, "
                   "q5_1, q8_0 and mlx:<bits>g<group>, e.g. mlx:4g64): MLX runs the values the student trained with")
    p.add_argument("--base-model", help="the Hugging Face repo id to name as base_model in the model cards "
                   "(default: from the teacher's metadata)")
