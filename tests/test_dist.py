"""Beyond one process: torchrun + FSDP2 on CPU (gloo), DCP checkpoints across process counts."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from qatlm.cli import main
from qatlm.train.config import TrainConfig
from qatlm.train.loop import load_run, train
from tiny_models import TEXT, tiny_gemma3, tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    data = root / "train.txt"
    data.write_text(TEXT * 3)
    return {"gemma3": tiny_gemma3(root / "gemma3"), "llama": tiny_llama(root / "llama"), "data": data}


def args(tiny, arch, out, steps):
    return ["train", "--teacher", str(tiny[arch]), "--data", str(tiny["data"]), "--out", str(out), "--steps",
            str(steps), "--seq-len", "32", "--batch-size", "4", "--lr", "3e-4", "--save-every", "3",
            "--set", "warmup=2", "--set", "device=cpu",
            # fp32: the comparisons below are to the order of float additions, which bf16 rounding would swamp
            "--set", "precision=fp32"]


def kls(run):
    return [json.loads(line)["kl"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def max_weight_diff(run_a, run_b):
    _, t, a = load_run(run_a)
    _, _, b = load_run(run_b)
    pa, pb, p0 = dict(a.named_parameters()), dict(b.named_parameters()), dict(t.model.named_parameters())
    diff = max(float((pa[n] - pb[n]).abs().max()) for n in pa)
    moved = max(float((pa[n] - p0[n]).abs().max()) for n in pa)
    return diff, moved


def test_two_processes_train_like_one_and_resume_on_one(tiny, tmp_path):
    """`qatlm train --nproc 2` (torchrun, FSDP2 over gloo) on tiny Gemma 3 (tied embedding/output, the tricky case
    for sharding) vs one process with the same global batch of 4; then both resumed on ONE process to step 8."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(args(tiny, "gemma3", one, 6)) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-m", "qatlm", *args(tiny, "gemma3", two, 6), "--nproc", "2"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {"__0_0.distcp", "__1_0.distcp", "state.pt"} <= {p.name for p in (two / "checkpoint").iterdir()}
    # Same data, same math; only the order of float additions differs (each process reduces half the batch,
    # then gloo averages): losses agree to ~1e-6 relative and weights to ~1e-7, while training moved them ~2e-3.
    np.testing.assert_allclose(kls(two), kls(one), rtol=1e-4)
    diff, moved = max_weight_diff(one, two)
    assert moved > 1e-3 and diff < 1e-5, (diff, moved)
    held = [[(r["step"], r["heldout_kl"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "heldout_kl" in r] for run in (one, two)]  # measured at the last step, under FSDP too
    assert [s for s, _ in held[1]] == [s for s, _ in held[0]] == [6]
    np.testing.assert_allclose([v for _, v in held[1]], [v for _, v in held[0]], rtol=1e-4)
    # resume the 2-process checkpoint (two DCP shards) on one process, and the 1-process run the same way
    for run in (one, two):
        assert main(["train", "--resume", str(run), "--set", "steps=8"]) == 0
    assert [json.loads(x)["step"] for x in (two / "metrics.jsonl").read_text().splitlines()] == list(range(1, 9))
    np.testing.assert_allclose(kls(two), kls(one), rtol=1e-4)
    diff, moved = max_weight_diff(one, two)
    assert diff < 1e-5, (diff, moved)


def test_sharded_teacher_trains_like_replicated(tiny, tmp_path):
    """shard_teacher=true (the teacher's layers are FSDP2 groups too) gives the same training as one process."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(args(tiny, "llama", one, 4)) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-m", "qatlm", *args(tiny, "llama", two, 4), "--set", "shard_teacher=true",
                        "--nproc", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    np.testing.assert_allclose(kls(two), kls(one), rtol=1e-4)  # same reason and bound as above
    diff, moved = max_weight_diff(one, two)
    assert moved > 1e-3 and diff < 1e-5, (diff, moved)


def test_batch_must_split_evenly(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")  # checked before any process group is joined
    cfg = TrainConfig(teacher=str(tiny["llama"]), data=[str(tiny["data"])], out=str(tmp_path / "r"), batch_size=4,
                      device="cpu")
    with pytest.raises(ValueError, match="batch_size 4 is not a multiple of the 3 processes"):
        train(cfg, progress=False)
