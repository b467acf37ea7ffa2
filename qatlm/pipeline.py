"""`qatlm run`: the whole pipeline in one command, on the embedded default or your own model and text.

    qatlm run                                   # Gemma 3 270M, Shakespeare, Q4_0, ~13 min on a 2-core CPU
    qatlm run --budget-minutes 30 --out runs/long

Training settings come from a recipe (qatlm/recipes/default.yaml unless --config) under the one rule of
qatlm.train.config: defaults < recipe < the saved run < flags. Stages, each skipped when its output already
exists (outputs are written atomically, training resumes from its checkpoint), so an interrupted `qatlm run`
picks up where it stopped; flags that would change a finished or started run are refused with a message:
  1. teacher: loaded once for the whole job (the bundled Gemma 3 270M GGUF, or --teacher);
  2. data: the Shakespeare texts minus the held-out play (both editions), the held-out play as in-domain
     evaluation text, and four texts of other kinds shipped with qatlm as out-of-domain (qatlm/corpora);
  3. PTQ: `qatlm quantize` with the plan (byte-identical to llama-quantize), and the baseline QAT must beat:
     an imatrix (`qatlm imatrix` on the training text, llama-imatrix's statistics) and the imatrix PTQ file
     (= llama-quantize --imatrix);
  4. QAT: `qatlm train` within the time budget, then export: the QAT GGUF, its unquantized HF checkpoint, and
     an Ollama Modelfile beside it, each with a model card (README.md; qatlm.card);
  5. report: teacher / RTN PTQ / imatrix PTQ / QAT measured by llama.cpp on the written files, in- and
     out-of-domain, with the share of the RTN drop each removed and whether QAT beats imatrix PTQ on
     perplexity and mean KLD; Markdown + JSON + plots (training curves included); the model cards are
     rewritten with the measured table.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

from .atomic import atomic_write_text, save_figure
from .card import card_info, write_card
from .cli import command
from .corpora import default_split, ood_texts
from .eval.compare import compare
from .gguf.export import export_gguf, export_run
from .gguf.ptq import quantize_gguf
from .imatrix.compute import compute_imatrix
from .sources import resolve
from .teacher import load_teacher
from .train import config as C
from .train.checkpoint import checkpoint_dir
from .train.loop import add_train_flags, flags_of, train


def plot_training(metrics: Path, out: Path) -> None:
    """training.png: the training batches' KL with the held-out KL beside it (its steps: eval_every), and the
    learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot([r["step"] for r in rows], [r["kl"] for r in rows], lw=1, label="training batches")
    held = [r for r in rows if r.get("heldout_kl") is not None]
    if held:
        ax[0].plot([r["step"] for r in held], [r["heldout_kl"] for r in held], "o-", ms=3, lw=1.2, color="#c44e52",
                   label="held-out blocks")
        ax[0].legend()
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("KL(teacher || student)")
    ax[0].set_title("distillation loss")
    ax[1].plot([r["step"] for r in rows], [r["lr"] for r in rows], lw=1, color="#dd8452")
    ax[1].set_xlabel("step")
    ax[1].set_title("learning rate")
    fig.tight_layout()
    save_figure(fig, out)
    plt.close(fig)


def steps_done(run_dir: Path) -> int:
    m = run_dir / "metrics.jsonl"
    return sum(1 for line in m.read_text().splitlines() if line.strip()) if m.is_file() else 0


def job_config(out: Path, recipe: str | Path | None, flags: dict) -> tuple[C.TrainConfig, bool, list[str]]:
    """(training config, whether a run was started before, what the flags change in it): the recipe's settings
    for a new job; the saved ones (plus the flags that are safe to change) for a job that was started."""
    run_dir = out / "train"
    flags = {**flags, "out": str(run_dir)}
    started = (run_dir / "config.yaml").is_file()
    if not started and not flags.get("data") and not flags.get("data_free"):
        flags["data"] = default_split()[0]
    auto = str(out / "imatrix.gguf")  # imatrix "auto": the job's own (stage 3), so QAT starts at imatrix PTQ
    if flags.get("imatrix") == "auto":
        flags["imatrix"] = auto
    notes: list[str] = []
    cfg = C.resolve(recipe or "default", saved=run_dir if started else None, flags=flags, notes=notes)
    if cfg.imatrix == "auto":
        cfg = C.TrainConfig(**{**cfg.__dict__, "imatrix": auto})
    return cfg, started, notes


def run_job(out: str | Path = "runs/default", flags: dict | None = None, recipe: str | Path | None = None,
            eval_text: str | None = None, ood: list[str] | None = None, eval_ctx: int = 512,
            eval_chunks: int | None = 6,
            stop_after: int | None = None, imatrix_chunks: int = 128, imatrix_ctx: int = 512,
            command: str | None = None) -> dict:
    """Run (or resume) the whole job; returns the summary (also written to OUT/summary.json).
    `flags`: TrainConfig settings given explicitly (e.g. {"steps": 200, "lora_rank": 16}). `command`: the command
    line shown in the model cards (default: the `qatlm run` command equivalent to these arguments)."""
    out = Path(out)
    command = command or run_command(out, flags or {}, recipe, eval_text, ood)
    out.mkdir(parents=True, exist_ok=True)
    cfg, started, notes = job_config(out, recipe, flags or {})
    plan = cfg.plan
    qat, qat_hf, ptq = out / f"qat-{plan}.gguf", out / f"qat-{plan}-hf", out / f"ptq-{plan}.gguf"
    run_dir = Path(cfg.out)
    if notes and qat.exists():
        raise ValueError(f"{out} is a finished job ({qat.name} exists); these flags would change its training: "
                         f"{'; '.join(notes)}. Use another --out, or delete {qat} to continue training with them")
    if not eval_text:
        if (flags or {}).get("data"):
            raise ValueError("--eval-text is required with --data (text held out from training, same domain)")
        eval_text = str(default_split()[1])
    ood = [str(p) for p in (ood or ood_texts())]
    src = resolve(cfg.teacher)

    print(f"[1/5] teacher {src.path}")
    t = None  # loaded at most once, when a stage needs the torch model
    imatrix, imatrix_ptq = out / "imatrix.gguf", out / f"imatrix-ptq-{plan}.gguf"
    if not (qat.exists() and (src.kind == "gguf" or (out / "teacher-f32.gguf").exists()) and ptq.exists()
            and imatrix_ptq.exists()):
        t = load_teacher(cfg.teacher)
    sampled = f"{cfg.data_free} sequences sampled from the teacher"
    print("[2/5] " + (f"{len(cfg.data)} training files" + (f" mixed with {sampled} ({cfg.sampled_fraction:g} of "
                                                             "every batch)" if cfg.data_free else "")
                      if cfg.data else f"data-free: {sampled}")
          + f"; in-domain eval {eval_text}; out-of-domain eval {', '.join(Path(o).name for o in ood)}")

    if ptq.exists():
        print(f"[3/5] PTQ: {ptq} exists")
    else:
        print(f"[3/5] PTQ -> {ptq}")
        if src.kind == "gguf":
            quantize_gguf(src.path, ptq, plan, tuple(cfg.overrides))
        else:
            export_gguf(t.model, ptq, plan, tuple(cfg.overrides), hf_dir=t.hf_dir)
    teacher_gguf = src.path if src.kind == "gguf" else out / "teacher-f32.gguf"
    if not teacher_gguf.exists():
        export_gguf(t.model, teacher_gguf, "f32", hf_dir=t.hf_dir)
    if not imatrix_ptq.exists():  # calibrated on the training text (with --data-free: and the teacher's samples)
        # (the samples first: llama-imatrix's chunks are the first --chunks of the concatenated text)
        calibration = ([str(sampled_text(t, cfg, run_dir, out / "synthetic.txt"))] if cfg.data_free else []) + cfg.data
        imatrix_baseline(t, teacher_gguf, calibration, imatrix, imatrix_ptq, plan, cfg.overrides, imatrix_chunks,
                         imatrix_ctx)

    if qat.exists():
        print(f"[4/5] QAT: {qat} exists")
    else:
        resume = started and checkpoint_dir(run_dir) is not None
        print("[4/5] QAT: " + (f"resuming {run_dir}" + (f" ({'; '.join(notes)})" if notes else "") if resume else
                                f"training for up to {cfg.budget_minutes:g} min -> {run_dir}"))
        train(cfg, resume=resume, stop_after=stop_after, teacher=t)
        if steps_done(run_dir) < C.resolve(saved=run_dir).steps:
            return {"interrupted": True}
        export_run(run_dir, qat, qat_hf, teacher=t, command=command)
        atomic_write_text(out / "Modelfile", f"# Ollama: ollama create qatlm-{plan} -f Modelfile\nFROM ./{qat.name}\n")
    plot_training(run_dir / "metrics.jsonl", out / "training.png")
    print("[5/5] report (llama.cpp on the written files)")
    results, engines = {}, {}  # the four models load once for all the texts
    texts = [("in_domain", eval_text)] + [(f"ood_{Path(o).stem}", o) for o in ood]
    for label, text in texts:
        results[label] = compare(str(teacher_gguf), [], text, out / f"report_{label}", eval_ctx, eval_chunks,
                                 "llama.cpp", ptq=str(ptq), qat=str(qat), imatrix_ptq=str(imatrix_ptq),
                                 engines=engines)
    engines.clear()
    summary = {"teacher": str(teacher_gguf), "ptq": str(ptq), "imatrix_ptq": str(imatrix_ptq),
               "imatrix": str(imatrix), "qat": str(qat), "plan": plan,
               "qat_hf": str(qat_hf), "modelfile": str(out / "Modelfile"),
               "qat_size_mb": qat.stat().st_size / 1e6, "steps": steps_done(run_dir), "results": {}}
    md = ["# qatlm run", "", f"Plan `{plan}`, {summary['steps']} training steps. Training curves: training.png", ""]
    for label, r in results.items():
        rows = {row["role"]: row for row in r["rows"]}
        summary["results"][label] = {"data": r["data"], "ppl_teacher": rows["teacher"]["ppl"],
                                     "ppl_ptq": rows["ptq"]["ppl"], "ppl_imatrix": rows["imatrix_ptq"]["ppl"],
                                     "ppl_qat": rows["qat"]["ppl"],
                                     "share_removed": r.get("share_of_ptq_drop_removed"),
                                     "share_removed_imatrix": rows["imatrix_ptq"].get("share_removed"),
                                     "kld_ptq": rows["ptq"]["kld"], "kld_imatrix": rows["imatrix_ptq"]["kld"],
                                     "kld_qat": rows["qat"]["kld"], "qat_beats_imatrix": r.get("qat_beats_imatrix")}
        md += [f"## {label.replace('_', '-')}", "", r["markdown"], f"![report](report_{label}/report.png)", ""]
    atomic_write_text(out / "report.md", "\n".join(md))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    info = card_info(run_dir, command, summary=summary, gguf=qat, hf=qat_hf)  # the cards, now with the numbers
    write_card(out, "gguf", info)
    if qat_hf.is_dir():
        write_card(qat_hf, "hf", info)
    print(f"\nOutputs in {out}: {qat.name} ({summary['qat_size_mb']:.1f} MB), {qat_hf.name}/, Modelfile, "
          f"{ptq.name}, report.md, summary.json, training.png")
    for label, r in summary["results"].items():
        share, shi = r["share_removed"], r["share_removed_imatrix"]
        tail = (f"removed {100 * shi:.1f}% (imatrix) / {100 * share:.1f}% (QAT) of the RTN drop"
                if share is not None else "RTN PTQ shows no drop here")
        print(f"{label:>13}: PPL teacher {r['ppl_teacher']:.2f} / RTN {r['ppl_ptq']:.2f} / imatrix "
              f"{r['ppl_imatrix']:.2f} / QAT {r['ppl_qat']:.2f} -> {tail}; QAT beats imatrix PTQ: "
              f"{r['qat_beats_imatrix']}")
    return summary


def run_command(out: Path, flags: dict, recipe, eval_text, ood) -> str:
    """The `qatlm run` command line equivalent to run_job's arguments (for the model cards)."""
    from .train.loop import TRAIN_FLAGS

    flag_of = {key: flag for flag, (key, _, _) in TRAIN_FLAGS.items()}
    args = ["qatlm", "run", "--out", str(out)] + (["--config", str(recipe)] if recipe else [])
    for key, value in flags.items():
        if key == "overrides":
            args += [a for o in value for a in ("--override", str(o))]
        elif key in flag_of:
            args += [flag_of[key], *(map(str, value) if isinstance(value, list) else [str(value)])]
        else:
            args += ["--set", f"{key}={value}"]
    args += (["--eval-text", str(eval_text)] if eval_text else []) + (["--ood", *map(str, ood)] if ood else [])
    return shlex.join(args)


def sampled_text(t, cfg: C.TrainConfig, run_dir: Path, path: Path) -> Path:
    """--data-free: the teacher's samples (sampled once, saved in the run directory, where training finds
    them) as a text file to calibrate the imatrix on."""
    from .train.synthetic import synthetic_stream

    if not path.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        import torch

        from .train.loop import dtypes

        stream = synthetic_stream(run_dir, t.model, t.tokenizer, cfg.data_free, cfg.seq_len, cfg.seed,
                                  dtype=dtypes(cfg, torch.device("cpu"))[1])
        atomic_write_text(path, t.tokenizer.decode(stream.tolist(), skip_special_tokens=True))
    return path


def imatrix_baseline(t, teacher_gguf: Path, text: list[str], imatrix: Path, imatrix_ptq: Path, plan: str,
                     overrides, chunks: int, ctx: int) -> None:
    """The quant a user would download instead: an imatrix of the calibration text, and the teacher quantized
    with it (= llama-imatrix + llama-quantize --imatrix)."""
    if not imatrix.exists():
        print(f"[3/5] imatrix ({chunks} chunks x {ctx} of the training text) -> {imatrix}")
        # bf16 where native (1.7x faster; statistics within ~1% of fp32's, both within 2% of llama-imatrix's)
        compute_imatrix(None, text, imatrix, ctx, chunks, teacher=t, precision="auto")
    print(f"[3/5] imatrix PTQ -> {imatrix_ptq}")
    quantize_gguf(teacher_gguf, imatrix_ptq, plan, tuple(overrides), imatrix=imatrix)


def add_parsers(sub) -> None:
    def main(a) -> None:
        run_job(a.out, flags_of(a), a.config, a.eval_text, a.ood, eval_chunks=a.eval_chunks,
                imatrix_chunks=a.imatrix_chunks, command="qatlm " + shlex.join(a.argv))

    p = command(sub, "run", "The whole job: teacher, PTQ, QAT, export (GGUF, HF, Modelfile) and the report. "
                "Run it again to resume.", "qatlm run --budget-minutes 7.5 --out runs/default", main)
    add_train_flags(p, C.resolve("default"))
    p.add_argument("--out", default="runs/default", help="output directory (default runs/default)")
    p.add_argument("--eval-text", help="in-domain evaluation text, held out from training (default: The Tempest)")
    p.add_argument("--ood", nargs="+", help="out-of-domain evaluation texts (default: the four shipped with qatlm: "
                   "GPL-3, OpenSSL docs, Python source, French prose)")
    p.add_argument("--eval-chunks", type=int, default=6, help="chunks of 512 tokens per evaluation (default 6)")
    p.add_argument("--imatrix-chunks", type=int, default=128, help="chunks of 512 tokens of training text for the "
                   "imatrix baseline (default 128, like the imatrix quants people publish)")
