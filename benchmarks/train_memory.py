"""Planned vs measured peak memory of QAT steps on CPU (`qatlm memory --train` against qatlm.train.peak_memory).

    python benchmarks/train_memory.py                          # the bundled Gemma 3 270M, 2 x 256 tokens
    python benchmarks/train_memory.py --runs fp32:0,bf16:16 --seq-len 512 --steps 2

Each configuration runs in a fresh process (`python -m qatlm.train.peak_memory`), so that its RSS column is its
own. "measured" is the peak of live torch tensors (exact; see qatlm.train.peak_memory for what it leaves out);
"RSS delta" is the process's peak RSS minus its RSS after loading, for reference only (glibc's free lists and the
libraries make it differ either way). The plan is for --device-type cpu (AdamW's per-tensor step). Slow: every op
of the 270M model's steps runs through a Python dispatch hook and the KD head eagerly (a few minutes per run on
an idle 2-core machine; 15 minutes per run measured on a loaded one).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from qatlm.train.memory_plan import TrainSetup, train_memory

PHASES = {"forward": ["activations + KD head"], "backward": ["head backward", "body backward", "end of backward"],
          "optimizer": ["optimizer step"]}


def planned_phases(plan) -> dict[str, int]:
    base = sum(plan.items.values())
    return {k: base + max(plan.phases[p] for p in ps) for k, ps in PHASES.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="bundled")
    ap.add_argument("--runs", default="fp32:0,bf16:0,fp32:16,bf16:16,bf16:0:ckpt",
                    help="PRECISION:LORA[:ckpt][:cache], comma-separated")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="steps per run (AdamW's states exist from step 2 on)")
    a = ap.parse_args()
    print(f"{a.teacher}: {a.batch_size} x {a.seq_len} tokens, {a.steps} steps per run (MB = 1e6 bytes)")
    print(f"{'run':<22} {'planned':>9} {'measured':>9} {'plan/meas':>9} {'RSS delta':>10}   "
          f"phases planned/measured: forward, backward, optimizer")
    for run in a.runs.split(","):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "qatlm.train.peak_memory", "--teacher", a.teacher, "--runs", run,
                              "--steps", str(a.steps), "--seq-len", str(a.seq_len), "--batch-size",
                              str(a.batch_size)], capture_output=True, text=True, env={**os.environ})
        lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
        if out.returncode or not lines:
            raise SystemExit(f"{run}: measurement failed:\n{out.stderr[-2000:]}")
        r = json.loads(lines[-1])
        plan = train_memory(a.teacher, TrainSetup(lora=r["lora"], seq_len=a.seq_len, batch_size=a.batch_size,
                                                  precision=r["precision"], checkpointing=r["checkpointing"],
                                                  teacher=r["teacher_mode"], device_type="cpu"))
        pp, mp = planned_phases(plan), r["phase_peaks"]
        phases = ", ".join(f"{pp[k] / 1e6:.0f}/{mp[k] / 1e6:.0f}" for k in PHASES)
        print(f"{run:<22} {plan.peak_bytes / 1e6:>9.1f} {r['peak_bytes'] / 1e6:>9.1f} "
              f"{plan.peak_bytes / r['peak_bytes']:>9.3f} {r['rss_delta_bytes'] / 1e6:>10.1f}   {phases}   "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
