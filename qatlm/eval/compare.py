"""`qatlm compare`: several models against a teacher on the same text, as Markdown, JSON and PNG plots.

Columns: PPL +/- err, delta PPL vs the teacher, KLD (mean +/- SE), same-top-p, file size and bits per weight.
When a PTQ model and a QAT model are both given, the share of the PTQ perplexity drop that QAT removed:
1 - (ppl_qat - ppl_teacher) / (ppl_ptq - ppl_teacher), Google's "54%" figure for Gemma 3.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..atomic import atomic_write_text, save_figure
from .perplexity import evaluate, to_dict


def share_removed(ppl_teacher: float, ppl_ptq: float, ppl_qat: float) -> float:
    """Fraction of the PTQ perplexity increase that QAT removed (1 = QAT as good as the teacher)."""
    drop = ppl_ptq - ppl_teacher
    if drop <= 0:
        raise ValueError(f"PTQ perplexity {ppl_ptq:.4f} is not above the teacher's {ppl_teacher:.4f}: no drop to remove")
    return 1.0 - (ppl_qat - ppl_teacher) / drop


def _bits_per_weight(path: str) -> tuple[float | None, float | None]:
    p = Path(path)
    if not p.is_file():
        return None, None
    from ..gguf.io import validate

    info = validate(p)
    n = sum(math.prod(t.ne) for t in info.tensors)
    data = sum(t.nbytes for t in info.tensors)
    return p.stat().st_size / 1e6, 8 * data / n


def compare(teacher: str, models: list[str], data: str, out: str | Path | None = None, ctx: int = 512,
            chunks: int | None = None, engine: str = "llama.cpp", ptq: str | None = None, qat: str | None = None,
            threads: int | None = None) -> dict:
    """Evaluate the teacher and each model (KLD against the teacher); write report.md/json/png to `out`."""
    models = list(models) + [m for m in (ptq, qat) if m and m not in models]
    rows = []
    t = evaluate(teacher, data, ctx, chunks, engine, threads=threads)
    rows.append(("teacher", teacher, to_dict(t)))
    for m in models:
        r = evaluate(m, data, ctx, chunks, engine, kld_base=teacher, threads=threads, keep_kld_values=True)
        role = "ptq" if m == ptq else "qat" if m == qat else "model"
        rows.append((role, m, to_dict(r)))
    result = {"teacher": teacher, "data": str(data), "ctx": ctx, "engine": engine, "rows": []}
    ppl_t = t.ppl
    for role, m, r in rows:
        size, bpw = _bits_per_weight(m)
        k = r.get("kld") or {}
        result["rows"].append({"role": role, "model": m, "ppl": r["ppl"], "ppl_err": r["ppl_err"],
                               "delta_ppl": r["ppl"] - ppl_t, "kld": k.get("kld_mean"), "kld_err": k.get("kld_err"),
                               "same_top_p": k.get("same_top_p"), "size_mb": size, "bits_per_weight": bpw,
                               "n_scored": r["n_scored"], "eval": {kk: v for kk, v in r.items() if kk != "kld"},
                               "kld_stats": {kk: v for kk, v in k.items() if kk != "values"}})
    by_role = {row["role"]: row for row in result["rows"]}
    if "ptq" in by_role and "qat" in by_role:
        drop = by_role["ptq"]["ppl"] > ppl_t
        result["share_of_ptq_drop_removed"] = (share_removed(ppl_t, by_role["ptq"]["ppl"], by_role["qat"]["ppl"])
                                               if drop else None)
    result["markdown"] = markdown(result)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "report.md", result["markdown"])
        atomic_write_text(out / "report.json", json.dumps(result, indent=1))
        plot(result, [r for _, _, r in rows], out)
    return result


def markdown(result: dict) -> str:
    lines = [f"Data: `{result['data']}`, ctx {result['ctx']}, engine {result['engine']}", "",
             "| role | model | PPL | ΔPPL | KLD | same top p | MB | bits/w |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        kld = f"{r['kld']:.5f} ± {r['kld_err']:.5f}" if r["kld"] is not None else "-"
        top = f"{100 * r['same_top_p']:.2f}%" if r["same_top_p"] is not None else "-"
        size = f"{r['size_mb']:.1f}" if r["size_mb"] else "-"
        bpw = f"{r['bits_per_weight']:.3f}" if r["bits_per_weight"] else "-"
        lines.append(f"| {r['role']} | `{Path(r['model']).name}` | {r['ppl']:.4f} ± {r['ppl_err']:.4f} | "
                     f"{r['delta_ppl']:+.4f} | {kld} | {top} | {size} | {bpw} |")
    share = result.get("share_of_ptq_drop_removed", "absent")
    if share is None:
        lines += ["", "PTQ is not worse than the teacher on this text: there is no perplexity drop to remove."]
    elif share != "absent":
        lines += ["", f"Share of the PTQ perplexity drop removed by QAT: **{100 * share:.1f}%**"]
    return "\n".join(lines) + "\n"


def plot(result: dict, evals: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = [f"{r['role']}\n{Path(r['model']).name[:28]}" for r in result["rows"]]
    a.bar(range(len(names)), [r["ppl"] for r in result["rows"]], yerr=[r["ppl_err"] for r in result["rows"]],
          capsize=4, color="#4c72b0")
    a.set_xticks(range(len(names)), names, fontsize=7)
    a.set_ylabel("perplexity")
    a.set_title("PPL ± error (llama-perplexity style)")
    for r, e in zip(result["rows"][1:], evals[1:]):
        vals = (e.get("kld") or {}).get("values")
        if vals:
            b.hist(vals, bins=60, histtype="step", log=True, label=f"{r['role']}: {Path(r['model']).name[:24]}")
    b.set_xlabel("KLD per token vs teacher (nats)")
    b.set_title("KLD distribution")
    if len(evals) > 1:
        b.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "report.png")
    plt.close(fig)


def add_parsers(sub) -> None:
    from ..cli import command, eval_args

    def run(a) -> None:
        r = compare(a.teacher, a.models, a.data, a.out, a.ctx, a.chunks, a.engine, a.ptq, a.qat, a.threads)
        print(r["markdown"])
        if a.out:
            print(f"report: {a.out}/report.md, report.json, report.png")

    p = command(sub, "compare", "Compare models against a teacher: PPL, KLD, size, share of the PTQ drop removed.",
                "qatlm compare --teacher teacher.gguf --ptq ptq.gguf --qat qat.gguf --data text.txt --out report/",
                run)
    p.add_argument("models", nargs="*", help="models to compare (GGUF files for the llama.cpp engine)")
    p.add_argument("--teacher", required=True)
    p.add_argument("--ptq", help="the plain-PTQ model (with --qat: report the share of the PTQ drop removed)")
    p.add_argument("--qat", help="the QAT model")
    p.add_argument("--out", type=Path, help="write report.md, report.json and report.png here")
    eval_args(p)
