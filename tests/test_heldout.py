"""Held-out validation in the training curves: heldout_kl at the eval steps, equal to the KD loss computed
directly on the fixed held-out blocks (fake quant on, eval mode), without touching the training trajectory or
exact resume; training.png plots it."""
import json

import pytest
import torch

from qatlm.cli import main
from qatlm.pipeline import plot_training, steps_done
from qatlm.student import set_fake_quant
from qatlm.teacher import load_teacher
from qatlm.train.checkpoint import load_checkpoint
from qatlm.train.config import TrainConfig
from qatlm.train.heldout import eval_subset, heldout_kl, is_eval_step
from qatlm.train.kd_loss import kd_loss
from qatlm.train.loop import build_student, dtypes, train
from tiny_models import TEXT, tiny_llama

TIMING = ("seconds", "tokens_per_s")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("heldout")
    data = root / "train.txt"
    data.write_text(TEXT * 3)
    return {"llama": tiny_llama(root / "llama"), "data": data}


def cfg_for(tiny, out, **kw):
    base = dict(teacher=str(tiny["llama"]), data=[str(tiny["data"])], out=str(out), steps=7, seq_len=32, batch_size=2,
                lr=3e-4, warmup=2, save_every=100, plan="q4_0", heldout_fraction=0.2, eval_every=3, eval_blocks=3,
                fake_quant_after=4)
    base.update(kw)
    return TrainConfig(**base)


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def untimed(rows, drop=()):
    return [{k: v for k, v in r.items() if k not in TIMING + drop} for r in rows]


def direct_heldout_kl(cfg, run, fake_quant: bool = True) -> float:
    """The KD KL of the checkpointed student on eval_subset(heldout.pt), computed here in one batch."""
    t = load_teacher(cfg.teacher)
    student = build_student(cfg, t.model)
    load_checkpoint(run, student)
    set_fake_quant(student, fake_quant)
    student.eval()
    blocks = eval_subset(torch.load(run / "heldout.pt"), cfg.eval_blocks)
    dtype, t_dtype = dtypes(cfg, torch.device("cpu"))
    with torch.no_grad():
        return kd_loss(student, t.model, blocks, cfg.temperature, cfg.ce_weight, cfg.kd_chunk, dtype, t_dtype)[1]["kl"]


def test_eval_steps_and_subset():
    assert [s for s in range(1, 8) if is_eval_step(s, 7, 3)] == [3, 6, 7]
    assert [s for s in range(1, 7) if is_eval_step(s, 6, 3)] == [3, 6]
    assert not any(is_eval_step(s, 7, 0) for s in range(1, 8))
    held = torch.arange(10)[:, None].repeat(1, 4)
    assert eval_subset(held, 4)[:, 0].tolist() == [0, 3, 6, 9]  # spread over the held-out blocks, ends included
    assert torch.equal(eval_subset(held[:3], 4), held[:3])


def test_eval_leaves_random_state_and_mode_alone():
    """The eval draws no random numbers from the training's generators (a student with dropout would), and puts
    the student's mode back; its value is the mean over counted positions of the micro-batches' KL."""
    student = torch.nn.Linear(2, 2).train()
    kls = iter([1.0, 4.0])

    def loss_fn(blocks):
        torch.rand(3)  # e.g. dropout
        return torch.zeros(()), {"kl": next(kls)}

    state = torch.get_rng_state()
    blocks = torch.ones(3, 8, dtype=torch.long)
    assert heldout_kl(loss_fn, student, blocks, 2, "all", torch.device("cpu")) == pytest.approx((2 * 1 + 4) / 3)
    assert torch.equal(torch.get_rng_state(), state) and student.training
    masked = torch.tensor([[5, -6, 5, 5], [5, -6, -6, -6]])  # 2 and 0 counted targets: the 2nd block is skipped
    kls = iter([3.0])
    assert heldout_kl(loss_fn, student, masked, 1, "assistant", torch.device("cpu")) == 3.0


def test_heldout_kl_is_the_kd_loss_of_the_fake_quantized_student(tiny, tmp_path):
    """At step 3 (fake quant still off in training: fake_quant_after=4) the held-out KL is the fake-quantized
    student's, and equals a direct computation from the checkpoint; recorded at steps 3, 6 and the last, 7."""
    cfg = cfg_for(tiny, tmp_path / "run", save_every=3)
    run = train(cfg, progress=False, stop_after=3)  # checkpoint at step 3
    rec = records(run)[-1]
    assert rec["step"] == 3 and rec["fake_quant"] is False
    assert len(eval_subset(torch.load(run / "heldout.pt"), cfg.eval_blocks)) == 3
    assert rec["heldout_kl"] == pytest.approx(direct_heldout_kl(cfg, run), rel=1e-5)
    assert rec["heldout_kl"] != pytest.approx(direct_heldout_kl(cfg, run, fake_quant=False), rel=1e-3)
    assert main(["train", "--resume", str(run)]) == 0  # on to step 7 (checkpoint at 6 and at the end)
    rows = records(run)
    assert [r["step"] for r in rows if "heldout_kl" in r] == [3, 6, 7]
    assert rows[-1]["heldout_kl"] == pytest.approx(direct_heldout_kl(cfg, run), rel=1e-5)
    assert rows[-1]["heldout_kl"] < rows[2]["heldout_kl"]  # it learns, measured on text it never trained on


def test_eval_changes_nothing_and_resume_stays_exact(tiny, tmp_path):
    """Training metrics with the eval every 2 steps == without it; a run cut after step 5 (checkpoint at 4) and
    resumed == uninterrupted, held-out KL included, bit for bit."""
    off = train(cfg_for(tiny, tmp_path / "off", steps=8, eval_every=0), progress=False)
    on = train(cfg_for(tiny, tmp_path / "on", steps=8, eval_every=2, save_every=4), progress=False)
    assert not any("heldout_kl" in r for r in records(off))
    assert untimed(records(off)) == untimed(records(on), ("heldout_kl",))
    assert [r["step"] for r in records(on) if "heldout_kl" in r] == [2, 4, 6, 8]
    cut = cfg_for(tiny, tmp_path / "cut", steps=8, eval_every=2, save_every=4)
    train(cut, progress=False, stop_after=5)
    assert main(["train", "--resume", str(tmp_path / "cut")]) == 0
    assert untimed(records(tmp_path / "cut")) == untimed(records(on))
    assert steps_done(tmp_path / "cut") == 8  # (what `qatlm run` and the model card count: one line per step)


def test_budget_counts_the_eval(tiny, tmp_path, monkeypatch):
    """With --budget-minutes, step 2 also measures the held-out KL, and its time per eval_every steps is added to
    step 2's time before the schedule is sized."""
    import qatlm.train.loop as L

    seen = []
    real = L.steps_for_budget
    monkeypatch.setattr(L, "steps_for_budget", lambda b, per_step, steps: seen.append(per_step) or real(b, per_step,
                                                                                                         steps))
    rows = records(train(cfg_for(tiny, tmp_path / "a", steps=6, budget_minutes=60.0), progress=False))
    assert [r["step"] for r in rows if "heldout_kl" in r] == [2, 3, 6]
    assert seen[0] > rows[1]["seconds"]
    rows = records(train(cfg_for(tiny, tmp_path / "b", steps=6, budget_minutes=60.0, eval_every=0), progress=False))
    assert seen[1] == rows[1]["seconds"] and not any("heldout_kl" in r for r in rows)


def test_training_png_plots_heldout(tiny, tmp_path):
    import matplotlib.pyplot as plt

    run = train(cfg_for(tiny, tmp_path / "run", steps=4, eval_every=2), progress=False)
    seen = {}
    real = plt.Axes.plot

    def spy(self, *a, **k):
        seen.setdefault(k.get("label"), list(a[:2]))
        return real(self, *a, **k)

    plt.Axes.plot = spy
    try:
        plot_training(run / "metrics.jsonl", tmp_path / "training.png")
    finally:
        plt.Axes.plot = real
    assert (tmp_path / "training.png").stat().st_size > 0
    rows = records(run)
    assert seen["held-out blocks"] == [[2, 4], [rows[1]["heldout_kl"], rows[3]["heldout_kl"]]]
    assert seen["training batches"][0] == [1, 2, 3, 4]
    old = tmp_path / "old.jsonl"  # a run from before heldout_kl: still plots
    old.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "heldout_kl"}) + "\n" for r in rows))
    plot_training(old, tmp_path / "old.png")
    assert (tmp_path / "old.png").stat().st_size > 0
