"""The qatlm command line: each command parses its flags and calls one plain function."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from . import __version__

EPILOG = """examples:
  qatlm plan model.gguf --plan q4_0
  qatlm quantize model.gguf model-q4_0.gguf --plan q4_0
  qatlm memory gemma-3-27b --plan q4_0 --ctx 32768
  qatlm eval model.gguf --data text.txt --engine llama.cpp
  qatlm train --teacher bundled --data texts/ --plan q4_0 --steps 200 --out runs/q4
  qatlm export runs/q4 runs/q4/qat-q4_0.gguf --hf runs/q4/qat-hf
"""


def cmd_plan(a) -> int:
    from .gguf_io import validate
    from .memory import type_bytes
    from .plans import parse_plan

    if a.model == "bundled":
        from .models import bundled_gguf

        a.model = bundled_gguf()
    info = validate(a.model)
    plan = parse_plan(a.plan, a.override)
    types = plan.types([(t.name, t.ne, t.ggml_type.name.lower()) for t in info.tensors])
    print(f"{'tensor':<34} {'shape (ne)':<16} {'source':>7} {'planned':>8} {'MB':>9}")
    total = 0.0
    for t in info.tensors:
        b = type_bytes(types[t.name], math.prod(t.ne))
        total += b
        print(f"{t.name:<34} {'x'.join(map(str, t.ne)):<16} {t.ggml_type.name:>7} {types[t.name].upper():>8} {b / 1e6:>9.3f}")
    print(f"{len(info.tensors)} tensors, {total / 1e6:.1f} MB of tensor data under plan {a.plan}")
    return 0


def cmd_quantize(a) -> int:
    from .quantize import quantize_gguf

    out = quantize_gguf(a.model, a.out, a.plan, tuple(a.override))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


def cmd_memory(a) -> int:
    from .memory import memory, to_json

    r = memory(a.model, a.plan, a.ctx, a.kv_type, tuple(a.override))
    print(r.table())
    if a.json:
        from .gguf_io import atomic_write_text

        atomic_write_text(a.json, to_json(r))
    return 0


def cmd_eval(a) -> int:
    from .evaluate import evaluate, to_dict

    r = evaluate(a.model, a.data, a.ctx, a.chunks, a.engine, a.plan, a.kld_base, a.threads)
    print(r.line())
    if r.kld:
        k = r.kld
        print("KLD percentiles: " + ", ".join(f"{n} {v:.5f}" for n, v in k["kld_percentiles"].items()))
        print("dp percentiles:  " + ", ".join(f"{n} {100 * v:+.3f}%" for n, v in k["dp_percentiles"].items()))
    if a.json:
        import json

        from .gguf_io import atomic_write_text

        atomic_write_text(a.json, json.dumps(to_dict(r), indent=1))
    return 0


def cmd_compare(a) -> int:
    from .report import compare

    r = compare(a.teacher, a.models, a.data, a.out, a.ctx, a.chunks, a.engine, a.ptq, a.qat, a.threads)
    print(r["markdown"])
    if a.out:
        print(f"report: {a.out}/report.md, report.json, report.png")
    return 0


def _parse_set(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: use KEY=VALUE, e.g. --set lr=2e-5")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = yaml.safe_load(v)
    return out


def cmd_train(a) -> int:
    import os

    if a.nproc and a.nproc > 1 and "WORLD_SIZE" not in os.environ:  # launch ourselves under torchrun
        import subprocess

        argv, skip = [], False
        for x in a.argv:
            if skip:
                skip = False
            elif x == "--nproc":
                skip = True
            elif not x.startswith("--nproc="):
                argv.append(x)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.nproc}",
               "-m", "qatlm", *argv]
        print("launching: " + " ".join(cmd), file=sys.stderr)
        return subprocess.run(cmd).returncode

    from .train import TrainConfig, train

    extra = {k: v for k, v in (("lora_rank", a.lora), ("data_free", a.data_free)) if v is not None}
    if a.resume:
        import yaml

        cfg_file = Path(a.resume) / "config.yaml"
        if not cfg_file.is_file():
            raise ValueError(f"{a.resume}: no config.yaml; --resume takes the run directory of an earlier `qatlm train`")
        cfg = TrainConfig(**{**yaml.safe_load(cfg_file.read_text()), **_parse_set(a.set), **extra})
        cfg.validate()
        run = train(cfg, resume=True)
    else:
        cfg = TrainConfig.from_sources(a.config, teacher=a.teacher, data=a.data or None, out=a.out, plan=a.plan,
                                       steps=a.steps, lr=a.lr, seq_len=a.seq_len, batch_size=a.batch_size,
                                       grad_accum=a.grad_accum, save_every=a.save_every, seed=a.seed,
                                       **extra, **_parse_set(a.set))
        run = train(cfg)
    if os.environ.get("RANK", "0") != "0":
        return 0
    print(f"run directory: {run} (checkpoint/, metrics.jsonl, config.yaml); export with: qatlm export {run} OUT.gguf")
    return 0


def cmd_export(a) -> int:
    from .export import export_gguf, export_hf
    from .train import load_run

    cfg, t, student = load_run(a.run)
    out = export_gguf(student, a.out, cfg.plan, tuple(cfg.overrides), source_gguf=t.gguf_path,
                      hf_dir=None if t.gguf_path else t.hf_dir)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, plan {cfg.plan})")
    if a.hf:
        print(f"wrote {export_hf(student, t.tokenizer, a.hf)} (unquantized QAT checkpoint)")
    return 0


def cmd_run(a) -> int:
    from .run import run_job

    kw = {k: v for k, v in dict(out=a.out, teacher=a.teacher, data=a.data, eval_text=a.eval_text, ood=a.ood,
                                plan=a.plan, budget_minutes=a.budget_minutes, steps=a.steps, lr=a.lr,
                                eval_chunks=a.eval_chunks, config=a.config, lora_rank=a.lora,
                                data_free=a.data_free).items()
          if v is not None}
    run_job(**kw)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qatlm", description="Quantization-aware training that lands exactly on "
                                 "llama.cpp's GGUF formats.", epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"qatlm {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, fn, help_, example):
        p = sub.add_parser(name, help=help_, description=f"{help_}\n\nexample:\n  {example}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(fn=fn)
        return p

    def plan_args(p, default="q4_0"):
        p.add_argument("--plan", default=default, help="q4_0 | q4_1 | q5_0 | q5_1 | q8_0 | q4_k_m | q6_k | f16 | f32 "
                       "| pure:<type> "
                       f"(default {default})")
        p.add_argument("--override", action="append", default=[], metavar="PATTERN=TYPE",
                       help="give tensors whose name matches the regex PATTERN this type; repeatable")

    p = add("plan", cmd_plan, "Show which GGUF type each tensor of a GGUF model gets under a plan.",
            "qatlm plan model.gguf --plan q4_0 --override 'ffn_down=q8_0'")
    p.add_argument("model", help="a GGUF file")
    plan_args(p)

    p = add("quantize", cmd_quantize, "Plain PTQ (round to nearest, llama-quantize without imatrix) of a GGUF model.",
            "qatlm quantize model.gguf model-q4_0.gguf --plan q4_0")
    p.add_argument("model", help="the source GGUF (any types; dequantized first, as llama.cpp does)")
    p.add_argument("out", type=Path, help="the GGUF to write (written atomically)")
    plan_args(p)

    p = add("memory", cmd_memory, "Weight and KV-cache memory of a model under a plan.",
            "qatlm memory gemma-3-27b --plan q4_0 --ctx 32768 --json mem.json")
    p.add_argument("model", help="a GGUF file, a Hugging Face directory, or gemma-3-270m|1b|4b|12b|27b")
    plan_args(p)
    p.add_argument("--ctx", type=int, default=4096, help="context length for the KV cache (default 4096)")
    p.add_argument("--kv-type", default="f16", choices=["f16", "bf16", "f32", "q8_0", "q4_0"])
    p.add_argument("--json", type=Path, help="also write the report as JSON here")

    def eval_args(p):
        p.add_argument("--data", required=True, help="a UTF-8 text file, read verbatim (one trailing newline dropped)")
        p.add_argument("--ctx", type=int, default=512, help="context per chunk (default 512, like llama-perplexity)")
        p.add_argument("--chunks", type=int, help="evaluate at most this many chunks")
        p.add_argument("--engine", default="torch", choices=["torch", "llama.cpp"])
        p.add_argument("--threads", type=int, help="CPU threads (default: all)")

    p = add("eval", cmd_eval, "Perplexity (and KL-divergence) exactly as llama-perplexity computes it.",
            "qatlm eval model.gguf --data tempest.txt --engine llama.cpp --chunks 6 --kld-base teacher.gguf")
    p.add_argument("model", help="a GGUF file, a Hugging Face directory, or 'bundled'")
    eval_args(p)
    p.add_argument("--plan", help="torch engine: simulate this type plan with fake quant (e.g. q4_0)")
    p.add_argument("--kld-base", help="also report KL-divergence statistics against this model")
    p.add_argument("--json", type=Path, help="also write the result as JSON here")

    p = add("compare", cmd_compare, "Compare models against a teacher: PPL, KLD, size, share of the PTQ drop removed.",
            "qatlm compare --teacher teacher.gguf --ptq ptq.gguf --qat qat.gguf --data text.txt --out report/")
    p.add_argument("models", nargs="*", help="models to compare (GGUF files for the llama.cpp engine)")
    p.add_argument("--teacher", required=True)
    p.add_argument("--ptq", help="the plain-PTQ model (with --qat: report the share of the PTQ drop removed)")
    p.add_argument("--qat", help="the QAT model")
    p.add_argument("--out", type=Path, help="write report.md, report.json and report.png here")
    eval_args(p)
    p.set_defaults(engine="llama.cpp")

    p = add("run", cmd_run, "The whole job: teacher, PTQ, QAT, export (GGUF, HF, Modelfile) and the report. "
            "Run it again to resume.", "qatlm run --budget-minutes 9 --out runs/default")
    p.add_argument("--out", help="output directory (default runs/default)")
    p.add_argument("--teacher", help="default: bundled (Gemma 3 270M)")
    p.add_argument("--data", nargs="+", help="training files/folders (default: Shakespeare minus the held-out play)")
    p.add_argument("--eval-text", help="in-domain evaluation text, held out from training")
    p.add_argument("--ood", help="out-of-domain evaluation text (default: the GPL-3 text shipped with qatlm)")
    p.add_argument("--plan", help="default q4_0")
    p.add_argument("--budget-minutes", type=float, help="training time budget (default 9)")
    p.add_argument("--steps", type=int, help="at most this many steps (default 400; the budget usually decides)")
    p.add_argument("--lr", type=float)
    p.add_argument("--eval-chunks", type=int, help="chunks of 512 tokens per evaluation (default 6)")
    p.add_argument("--config", help="a YAML of TrainConfig fields")
    p.add_argument("--lora", type=int, metavar="RANK", help="LoRA QAT of this rank instead of full QAT")
    p.add_argument("--data-free", type=int, metavar="N", help="train on N sequences sampled from the teacher "
                   "instead of Shakespeare (evaluation texts unchanged)")

    p = add("train", cmd_train, "Distillation QAT: train a fake-quantized student against its teacher.",
            "qatlm train --teacher bundled --data texts/ --plan q4_0 --steps 200 --out runs/q4")
    p.add_argument("--teacher", help="a .gguf, a Hugging Face directory, or 'bundled' (default)")
    p.add_argument("--data", nargs="+", help="training .txt/.jsonl/.parquet files or folders")
    p.add_argument("--out", help="the run directory (default runs/qat)")
    p.add_argument("--plan", help="type plan to train for (default q4_0)")
    p.add_argument("--steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--save-every", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--config", help="a YAML file of TrainConfig fields; flags override it")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other TrainConfig field")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR exactly where it stopped "
                   "(on any number of processes)")
    p.add_argument("--data-free", type=int, metavar="N", help="no corpus: train on N sequences of --seq-len tokens "
                   "sampled from the teacher (data-free distillation; saved in the run directory)")
    p.add_argument("--lora", type=int, metavar="RANK", help="train LoRA adapters of this rank inside the fake "
                   "quantizer (frozen base) instead of every weight; merged before export")
    p.add_argument("--nproc", type=int, help="data-parallel processes: relaunches itself under torchrun (FSDP2; "
                   "or run `torchrun --nproc-per-node N -m qatlm train ...` yourself)")

    p = add("export", cmd_export, "Export a training run: the QAT GGUF, and optionally the unquantized checkpoint.",
            "qatlm export runs/q4 runs/q4/qat-q4_0.gguf --hf runs/q4/qat-hf")
    p.add_argument("run", help="a run directory of `qatlm train`")
    p.add_argument("out", type=Path, help="the GGUF to write")
    p.add_argument("--hf", type=Path, help="also write the unquantized QAT checkpoint (HF safetensors) here")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return a.fn(a)
    except (ValueError, OSError, FloatingPointError) as e:  # user-facing errors: one clear line, no traceback
        print(f"qatlm {a.command}: error: {e}", file=sys.stderr)
        return 2
