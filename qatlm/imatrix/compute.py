"""`qatlm imatrix`: an importance matrix like llama-imatrix's, from the torch model, in llama-imatrix's file.

    qatlm imatrix bundled --data text.txt --chunks 128 --ctx 512 -o imatrix.gguf
    qatlm quantize bundled q4_0-imatrix.gguf --plan q4_0 --imatrix imatrix.gguf

The text files are read verbatim (as llama-perplexity reads its file; several files are joined with a blank
line), tokenized once as llama.cpp does (BOS first where the model adds it), cut into llama-imatrix's chunks and
run through the model's body (qatlm.imatrix.collect). Written atomically.
"""
from __future__ import annotations

import os
from pathlib import Path

from .. import arch
from ..eval.perplexity import read_text, tokenize
from .collect import collect, imatrix_chunks
from .file import write_imatrix


def linear_names(model) -> dict[str, str]:
    """nn.Linear module name -> GGUF weight name for every blk.* matrix (what llama-imatrix collects)."""
    params = dict(model.named_parameters())
    return {n[: -len(".weight")]: g for n, g in arch.gguf_names(model).items()
            if g.startswith("blk.") and n.endswith(".weight") and params[n].dim() == 2}


def compute_imatrix(model: str | os.PathLike, data: list[str], out: str | os.PathLike, ctx: int = 512,
                    chunks: int | None = None, teacher=None, progress: bool = True, precision: str = "fp32") -> Path:
    """Compute and write the imatrix of `model` (or an already loaded `teacher`) on the text files `data`.
    precision: fp32 (llama-imatrix on an F32 model), bf16, or auto (bf16 where the device multiplies it natively:
    qatlm.imatrix.collect's docstring has the speed and the difference)."""
    from ..teacher import load_teacher

    if not data:
        raise ValueError("no calibration text: give --data FILE [FILE ...]")
    t = teacher if teacher is not None else load_teacher(model)
    if precision == "auto":
        from ..train.dist import native_bf16

        precision = "bf16" if native_bf16(next(t.model.parameters()).device) else "fp32"
    text = "\n\n".join(read_text(f) for f in data)
    ids, bos = tokenize(t, text)
    cs = imatrix_chunks(ids, ctx, chunks, bos, data=", ".join(map(str, data)))
    im = collect(t.model, linear_names(t.model), cs, progress=progress, datasets=[str(f) for f in data],
                 precision=precision)
    return write_imatrix(im, out)


def add_parsers(sub) -> None:
    from ..cli import command

    def run(a) -> None:
        out = compute_imatrix(a.model, a.data, a.out, a.ctx, a.chunks, precision=a.precision)
        print(f"wrote {out}; use it with: qatlm quantize {a.model} OUT.gguf --plan q4_0 --imatrix {out}")

    p = command(sub, "imatrix", "Importance matrix like llama-imatrix (same statistics, chunking and file format).",
                "qatlm imatrix bundled --data text.txt --chunks 128 -o imatrix.gguf", run)
    p.add_argument("model", help="a .gguf, a Hugging Face directory, or 'bundled'")
    p.add_argument("--data", nargs="+", required=True, help="calibration text file(s), read verbatim")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512, like llama-imatrix)")
    p.add_argument("--chunks", type=int, help="use at most this many chunks (default: all)")
    p.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32",
                   help="the forward's precision: fp32 (default, as llama-imatrix on an F32 model), bf16 (1.6-1.8x "
                   "faster on CPUs with native bf16, statistics within ~1%% of fp32's), auto (bf16 where native)")
    p.add_argument("-o", "--out", type=Path, default=Path("imatrix.gguf"),
                   help="the file to write (default imatrix.gguf; a .dat name writes the legacy format)")
