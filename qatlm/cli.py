"""The qatlm command line. Each command's parser lives beside its function (mlx-lm style); this file only
dispatches, holds the few argument groups several commands share, and turns user errors into one line.

    qatlm COMMAND --help
"""
from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

# the pipeline, in order: inspect and quantize -> calibrate -> train -> export -> measure -> the whole job
MODULES = ["qatlm.gguf.ptq", "qatlm.memory", "qatlm.imatrix.compute", "qatlm.train.teacher_cache",
           "qatlm.train.loop", "qatlm.gguf.export", "qatlm.eval.perplexity",
           "qatlm.eval.compare", "qatlm.pipeline"]

EPILOG = """the pipeline: teacher -> fake-quant student -> KD training -> export -> evaluation
examples:
  qatlm run                                        # the whole default job (resumable)
  qatlm plan model.gguf --plan q4_0
  qatlm quantize model.gguf model-q4_0.gguf --plan q4_0
  qatlm imatrix model.gguf --data text.txt -o imatrix.gguf
  qatlm train --teacher bundled --data texts/ --plan q4_0 --steps 200 --out runs/q4
  qatlm export runs/q4 runs/q4/qat-q4_0.gguf --hf runs/q4/qat-hf
  qatlm eval runs/q4/qat-q4_0.gguf --data text.txt
  qatlm memory gemma-3-27b --plan q4_0 --ctx 32768
"""

PLANS = ("q4_0 | q4_1 | q5_0 | q5_1 | q8_0 | q2_k | q3_k_s | q3_k_m | q3_k_l | q4_k_s | q4_k_m | q5_k_s | q5_k_m | "
         "q6_k | iq4_nl | iq4_xs | f16 | f32 | pure:<type>")


def command(sub, name: str, help_: str, example: str, fn) -> argparse.ArgumentParser:
    """A subcommand whose parsed arguments are passed to fn(args)."""
    p = sub.add_parser(name, help=help_, description=f"{help_}\n\nexample:\n  {example}",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(fn=fn)
    return p


def plan_args(p: argparse.ArgumentParser, default: str | None = "q4_0") -> None:
    p.add_argument("--plan", default=default, help=f"{PLANS}" + (f" (default {default})" if default else ""))
    p.add_argument("--override", action="append", default=[], metavar="PATTERN=TYPE",
                   help="give tensors whose GGUF name matches the regex PATTERN this type; repeatable")


def eval_args(p: argparse.ArgumentParser) -> None:
    """What every perplexity measurement takes (eval, compare)."""
    p.add_argument("--data", required=True, help="a UTF-8 text file, read verbatim (one trailing newline dropped)")
    p.add_argument("--ctx", type=int, default=512, help="context per chunk (default 512, like llama-perplexity)")
    p.add_argument("--chunks", type=int, help="evaluate at most this many chunks")
    p.add_argument("--engine", default="llama.cpp", choices=["llama.cpp", "torch"],
                   help="llama.cpp (default: the GGUF through llama.cpp itself) or torch (any model; simulates "
                        "--plan with fake quant)")
    p.add_argument("--threads", type=int, help="CPU threads (default: all)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qatlm", description="Quantization-aware training that lands exactly on "
                                 "llama.cpp's GGUF formats.", epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"qatlm {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in MODULES:
        importlib.import_module(name).add_parsers(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rc = a.fn(a)
        return 0 if rc is None else rc
    except (ValueError, OSError, FloatingPointError) as e:  # user-facing errors: one clear line, no traceback
        print(f"qatlm {a.command}: error: {e}", file=sys.stderr)
        return 2

