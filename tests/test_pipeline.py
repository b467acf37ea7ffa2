"""`qatlm run` end to end on a tiny model: the report's numbers are llama.cpp's on the written files, and an
interrupted run resumes instead of starting over."""
import json

import pytest

from qatlm.eval.perplexity import evaluate
from qatlm.pipeline import run_job
from tiny_models import TEXT, tiny_llama


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    (root / "train.txt").write_text(TEXT * 2)
    (root / "heldout.txt").write_text(TEXT[::-1] * 2)
    (root / "ood.txt").write_text(("Licensed under the terms of the licence, without warranty of any kind. " * 60))
    flags = dict(teacher=str(tiny_llama(root / "teacher")), data=[str(root / "train.txt")], plan="q4_0",
                 budget_minutes=60, steps=8, lr=3e-4, seq_len=32, batch_size=4)
    kw = dict(flags=flags, eval_text=str(root / "heldout.txt"), ood=[str(root / "ood.txt")], eval_ctx=64,
              eval_chunks=2, imatrix_chunks=4, imatrix_ctx=64)
    return root, kw


def test_run_resumes_and_reports_llamacpp_numbers(job):
    root, kw = job
    out = root / "out"
    first = run_job(out=out, stop_after=3, **kw)  # "interrupted" after 3 steps (checkpoints every 10)
    assert first == {"interrupted": True}
    summary = run_job(out=out, **kw)  # started again: resumes from the run directory
    steps = [json.loads(line)["step"] for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    for f in ("qat-q4_0.gguf", "ptq-q4_0.gguf", "imatrix.gguf", "imatrix-ptq-q4_0.gguf", "Modelfile", "report.md",
              "summary.json", "training.png", "qat-q4_0-hf/config.json", "report_in_domain/report.png",
              "report_ood_ood/report.json"):
        assert (out / f).exists(), f
    for label, text in (("in_domain", kw["eval_text"]), ("ood_ood", kw["ood"][0])):
        r = summary["results"][label]
        assert evaluate(str(out / "qat-q4_0.gguf"), text, 64, 2, "llama.cpp", progress=False).ppl == r["ppl_qat"]
        assert evaluate(str(out / "ptq-q4_0.gguf"), text, 64, 2, "llama.cpp", progress=False).ppl == r["ppl_ptq"]
        imx = evaluate(str(out / "imatrix-ptq-q4_0.gguf"), text, 64, 2, "llama.cpp", kld_base=str(kw["flags"]["teacher"]
                       and out / "teacher-f32.gguf"), progress=False)
        assert (imx.ppl, imx.kld["kld_mean"]) == (r["ppl_imatrix"], r["kld_imatrix"])
        assert r["qat_beats_imatrix"] == {"ppl": r["ppl_qat"] < r["ppl_imatrix"], "kld": r["kld_qat"] < r["kld_imatrix"]}
        if r["ppl_ptq"] > r["ppl_teacher"]:  # a tiny random model may show no PTQ drop at all
            assert r["share_removed"] == pytest.approx(
                1 - (r["ppl_qat"] - r["ppl_teacher"]) / (r["ppl_ptq"] - r["ppl_teacher"]))
        else:
            assert r["share_removed"] is None
    # model cards beside the GGUF and in the checkpoint: the measured table and the command that made them
    for card in (out / "README.md", out / "qat-q4_0-hf" / "README.md"):
        text = card.read_text()
        assert text.startswith("---\n") and "pipeline_tag: text-generation" in text and "- qat\n" in text
        r = summary["results"]["in_domain"]
        assert f"| **{r['ppl_qat']:.2f}** |" in text and f"| {r['ppl_imatrix']:.2f} |" in text
        assert f"qatlm run --out {out} --teacher {kw['flags']['teacher']}" in text
        assert "`q4_0`, quantized with the importance matrix `imatrix.gguf`" in text
    # a third start finds everything done and only re-reports
    again = run_job(out=out, **kw)
    assert again["results"] == summary["results"]
    # new flags on a finished job are refused, never silently ignored
    with pytest.raises(ValueError, match="finished job .* lr: 0.0003 -> 0.001"):
        run_job(out=out, **{**kw, "flags": {**kw["flags"], "lr": 1e-3}})
    with pytest.raises(ValueError, match="would train a different model"):
        run_job(out=out, **{**kw, "flags": {**kw["flags"], "lora_rank": 4}})
