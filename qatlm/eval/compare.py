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
from .perplexity import evaluate_engines, make_engine, to_dict


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
            threads: int | None = None, imatrix_ptq: str | None = None, engines: dict | None = None) -> dict:
    """Evaluate the teacher and each model (KLD against the teacher); write report.md/json/png to `out`.
    Roles: `ptq` (round to nearest), `imatrix_ptq` (llama-quantize --imatrix, the quant people download) and
    `qat`; with ptq, each of the others gets the share of the RTN perplexity drop it removed. `engines`: a dict
    that keeps the loaded models between calls (one load per model for several texts, as `qatlm run` does)."""
    roles = {m: r for r, m in (("ptq", ptq), ("imatrix_ptq", imatrix_ptq), ("qat", qat)) if m}
    models = list(models) + [m for m in roles if m not in models]
    if not models:
        raise ValueError("nothing to compare: give models, --ptq, --qat or --imatrix-ptq")
    # all models side by side, chunk by chunk: the teacher runs once per chunk as every model's KLD base
    engines = {} if engines is None else engines

    def load(m: str):
        key = (m, engine, ctx, threads)
        if key not in engines:
            engines[key] = make_engine(m, engine, ctx, threads=threads)
        return engines[key]

    *evals, t = evaluate_engines([load(m) for m in models], data, ctx, chunks, load(teacher), keep_kld_values=True)
    rows = [("teacher", teacher, to_dict(t))]
    rows += [(roles.get(m, "model"), m, to_dict(r)) for m, r in zip(models, evals)]
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
    if "ptq" in by_role:
        drop = by_role["ptq"]["ppl"] > ppl_t
        for row in result["rows"]:
            if row["role"] not in ("teacher", "ptq"):
                row["share_removed"] = share_removed(ppl_t, by_role["ptq"]["ppl"], row["ppl"]) if drop else None
        if "qat" in by_role:
            result["share_of_ptq_drop_removed"] = by_role["qat"]["share_removed"]
    if "qat" in by_role and "imatrix_ptq" in by_role:
        q, i = by_role["qat"], by_role["imatrix_ptq"]
        result["qat_beats_imatrix"] = {"ppl": q["ppl"] < i["ppl"], "kld": q["kld"] < i["kld"]}
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
    for r in result["rows"]:
        if r.get("share_removed") is not None:
            lines += ["", f"Share of the RTN PTQ perplexity drop removed by {r['role']}: "
                          f"**{100 * r['share_removed']:.1f}%**"]
    beats = result.get("qat_beats_imatrix")
    if beats:
        verdict = lambda b: "yes" if b else "no"  # noqa: E731
        lines += ["", f"QAT beats imatrix PTQ: perplexity {verdict(beats['ppl'])}, mean KLD {verdict(beats['kld'])}"]
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
        imatrix_ptq = a.imatrix_ptq
        if a.imatrix:  # quantize the teacher with it: the imatrix quant a user would download
            from ..gguf.ptq import quantize_gguf

            where = Path(a.out) if a.out else Path(".")
            imatrix_ptq = str(quantize_gguf(a.teacher, where / f"imatrix-{a.plan}.gguf", a.plan, imatrix=a.imatrix))
        r = compare(a.teacher, a.models, a.data, a.out, a.ctx, a.chunks, a.engine, a.ptq, a.qat, a.threads,
                    imatrix_ptq)
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
    p.add_argument("--imatrix-ptq", help="the imatrix PTQ model (llama-quantize --imatrix), compared with QAT")
    p.add_argument("--imatrix", help="an imatrix file: quantize the teacher (a GGUF) with it to --plan and compare "
                   "that file as the imatrix PTQ (written to --out)")
    p.add_argument("--plan", default="q4_0", help="plan for --imatrix (default q4_0)")
    p.add_argument("--out", type=Path, help="write report.md, report.json and report.png here")
    eval_args(p)
