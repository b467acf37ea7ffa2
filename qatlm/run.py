"""`qatlm run`: the whole job in one command, on the embedded default or your own model and text.

    qatlm run                                   # Gemma 3 270M, Shakespeare, Q4_0, ~15 min on a 2-core CPU
    qatlm run --budget-minutes 30 --out runs/long

Stages, each skipped when its output already exists (outputs are written atomically, training resumes from
its checkpoint), so an interrupted `qatlm run` picks up where it stopped:
  1. teacher: the bundled Gemma 3 270M GGUF (or --teacher);
  2. data: the Shakespeare texts minus the held-out plays (both editions), the held-out play as in-domain
     evaluation text, and a text from another domain (the GPL-3 licence, shipped with qatlm) as out-of-domain;
  3. PTQ: `qatlm quantize` with the plan (byte-identical to llama-quantize);
  4. QAT: `qatlm train` for --budget-minutes, then export: the QAT GGUF, its unquantized HF checkpoint, and an
     Ollama Modelfile beside it;
  5. report: teacher / PTQ / QAT measured by llama.cpp on the written files, in- and out-of-domain, with the
     share of the PTQ drop removed; Markdown + JSON + plots (training curves included).
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from .dist import checkpoint_dir
from .gguf_io import atomic_write_text

OOD_TEXT = "gpl-3.0.txt"


def ood_text() -> Path:
    return Path(str(resources.files("qatlm.evaldata").joinpath(OOD_TEXT)))


def default_split(heldout: tuple[str, ...] = ("tempest",)) -> tuple[list[str], Path]:
    """Training files (every Shakespeare text but the held-out plays) and the in-domain evaluation file."""
    from .data import play_of, shakespeare_dir

    d = shakespeare_dir()
    train = [str(p) for p in sorted(d.glob("*.txt")) if play_of(p) not in heldout and p.name != "metadata.txt"]
    return train, d / f"{heldout[0]}_gut.txt"


def plot_training(metrics: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot([r["step"] for r in rows], [r["kl"] for r in rows], lw=1)
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("KL(teacher || student)")
    ax[0].set_title("distillation loss")
    ax[1].plot([r["step"] for r in rows], [r["lr"] for r in rows], lw=1, color="#dd8452")
    ax[1].set_xlabel("step")
    ax[1].set_title("learning rate")
    fig.tight_layout()
    tmp = out.with_name(".training.png.partial")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(out)


# the default job's training settings: 2 x 256 tokens per step, lr 1e-5, embeddings frozen, 9 minutes
RUN_DEFAULTS = dict(steps=400, lr=1e-5, seq_len=256, batch_size=2, budget_minutes=9.0, train_embeddings=False,
                    save_every=10)


def _yaml_keys(config: str) -> list[str]:
    import yaml

    return list(yaml.safe_load(Path(config).read_text()) or {})


def run_job(out: str | Path = "runs/default", teacher: str = "bundled", data: list[str] | None = None,
            eval_text: str | None = None, ood: str | None = None, plan: str = "q4_0",
            budget_minutes: float | None = None, steps: int | None = None, lr: float | None = None,
            seq_len: int | None = None, batch_size: int | None = None, eval_ctx: int = 512,
            eval_chunks: int | None = 6, train_embeddings: bool | None = None, lora_rank: int | None = None,
            data_free: int | None = None, config: str | None = None, stop_after: int | None = None) -> dict:
    """Run (or resume) the whole job; returns the summary (also written to OUT/summary.json).

    Training settings: RUN_DEFAULTS < the YAML `config` (TrainConfig fields) < the explicit arguments."""
    from .export import export_gguf, export_hf
    from .models import bundled_gguf, load_teacher
    from .quantize import quantize_gguf
    from .report import compare
    from .train import TrainConfig, load_run, train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    teacher_path = str(bundled_gguf()) if teacher == "bundled" else teacher
    if data is None:
        data, default_eval = default_split()
        eval_text = eval_text or str(default_eval)
        if data_free:  # no corpus: the teacher samples the training text; evaluation texts stay the same
            data = []
    if not eval_text:
        raise ValueError("--eval-text is required with --data (text held out from training, same domain)")
    ood = ood or str(ood_text())
    print(f"[1/5] teacher {teacher_path}\n[2/5] " + (f"{len(data)} training files" if data else
          f"data-free: {data_free} sequences sampled from the teacher") + f"; in-domain eval {eval_text}; "
          f"out-of-domain eval {ood}")

    is_gguf = teacher_path.endswith(".gguf")
    ptq = out / f"ptq-{plan}.gguf"
    if not ptq.exists():
        print(f"[3/5] PTQ -> {ptq}")
        if is_gguf:
            quantize_gguf(teacher_path, ptq, plan)
        else:
            t = load_teacher(teacher_path)
            export_gguf(t.model, ptq, plan, hf_dir=t.hf_dir)
    else:
        print(f"[3/5] PTQ: {ptq} exists")
    teacher_gguf = Path(teacher_path) if is_gguf else out / "teacher-f32.gguf"
    if not is_gguf and not teacher_gguf.exists():
        t = load_teacher(teacher_path)
        export_gguf(t.model, teacher_gguf, "f32", hf_dir=t.hf_dir)

    run_dir = out / "train"
    qat = out / f"qat-{plan}.gguf"
    if not qat.exists():
        from_file = {k: getattr(TrainConfig.from_sources(config), k) for k in _yaml_keys(config)} if config else {}
        explicit = {k: v for k, v in dict(steps=steps, lr=lr, seq_len=seq_len, batch_size=batch_size,
                                          budget_minutes=budget_minutes, train_embeddings=train_embeddings,
                                          lora_rank=lora_rank, data_free=data_free).items() if v is not None}
        cfg = TrainConfig.from_sources(None, **{**RUN_DEFAULTS, **from_file, **explicit, "teacher": teacher_path,
                                                "data": data, "out": str(run_dir), "plan": plan})
        resume = checkpoint_dir(run_dir) is not None
        if resume:
            import yaml

            saved = yaml.safe_load((run_dir / "config.yaml").read_text())
            cfg = TrainConfig(**saved)
            print(f"[4/5] QAT: resuming {run_dir}")
        else:
            print(f"[4/5] QAT: training for up to {cfg.budget_minutes:g} min -> {run_dir}")
        train(cfg, resume=resume, stop_after=stop_after)
        if stop_after is not None and _steps_done(run_dir) < cfg.steps:
            return {"interrupted": True}
        c, t, student = load_run(run_dir)
        export_hf(student, t.tokenizer, out / f"qat-{plan}-hf")
        export_gguf(student, qat, c.plan, tuple(c.overrides), source_gguf=t.gguf_path,
                    hf_dir=None if t.gguf_path else t.hf_dir)
        atomic_write_text(out / "Modelfile", f"# Ollama: ollama create qatlm-{plan} -f Modelfile\nFROM ./{qat.name}\n")
    else:
        print(f"[4/5] QAT: {qat} exists")
    plot_training(run_dir / "metrics.jsonl", out / "training.png")

    print("[5/5] report (llama.cpp on the written files)")
    results = {}
    for label, text in (("in_domain", eval_text), ("out_of_domain", ood)):
        results[label] = compare(str(teacher_gguf), [], text, out / f"report_{label}", eval_ctx, eval_chunks,
                                 "llama.cpp", ptq=str(ptq), qat=str(qat))
    summary = {"teacher": str(teacher_gguf), "ptq": str(ptq), "qat": str(qat), "plan": plan,
               "qat_hf": str(out / f"qat-{plan}-hf"), "modelfile": str(out / "Modelfile"),
               "qat_size_mb": qat.stat().st_size / 1e6, "steps": _steps_done(run_dir), "results": {}}
    md = ["# qatlm run", "", f"Plan `{plan}`, {summary['steps']} training steps. Training curves: training.png", ""]
    for label, r in results.items():
        rows = {row["role"]: row for row in r["rows"]}
        summary["results"][label] = {"data": r["data"], "ppl_teacher": rows["teacher"]["ppl"],
                                     "ppl_ptq": rows["ptq"]["ppl"], "ppl_qat": rows["qat"]["ppl"],
                                     "share_removed": r.get("share_of_ptq_drop_removed"),
                                     "kld_ptq": rows["ptq"]["kld"], "kld_qat": rows["qat"]["kld"]}
        md += [f"## {label.replace('_', '-')}", "", r["markdown"], f"![report](report_{label}/report.png)", ""]
    atomic_write_text(out / "report.md", "\n".join(md))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    print(f"\nOutputs in {out}: {qat.name} ({summary['qat_size_mb']:.1f} MB), qat-{plan}-hf/, Modelfile, "
          f"{ptq.name}, report.md, summary.json, training.png")
    for label, r in summary["results"].items():
        share = r["share_removed"]
        tail = f"{100 * share:.1f}% of the PTQ drop removed" if share is not None else "PTQ shows no drop here"
        print(f"{label:>13}: PPL teacher {r['ppl_teacher']:.2f} / PTQ {r['ppl_ptq']:.2f} / QAT {r['ppl_qat']:.2f}"
              f" -> {tail}")
    return summary


def _steps_done(run_dir: Path) -> int:
    m = run_dir / "metrics.jsonl"
    return sum(1 for line in m.read_text().splitlines() if line.strip()) if m.is_file() else 0
