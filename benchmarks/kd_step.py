"""One KD training step of Gemma 3 270M on CPU, measured side by side in one run:
fused chunked loss vs plain autograd (full [seq, vocab] logits of both models), and fake-quant student vs
plain student. Prints step time, peak RSS growth, and the ratios.

    python benchmarks/kd_step.py [--seq 1024] [--repeats 2]
"""
import argparse
import copy
import resource
import time

import torch

from qatlm.train.kd_loss import kd_loss
from qatlm.teacher import load_teacher
from qatlm.train.config import TrainConfig
from qatlm.train.loop import build_student


def plain_kd(student, teacher, x):
    """The unchunked reference: both models' full logits, log_softmax, KL through autograd."""
    with torch.no_grad():
        lt = torch.log_softmax(teacher(x).logits.float(), -1)
    ls = torch.log_softmax(student(x).logits.float(), -1)
    return (lt.exp() * (lt - ls)).sum(-1).mean()


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(fn, repeats):
    best, start_peak = float("inf"), peak_mb()
    for _ in range(repeats):
        t = time.perf_counter()
        fn().backward()
        best = min(best, time.perf_counter() - t)
    return best, peak_mb() - start_peak


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    t = load_teacher("bundled")
    teacher = t.model.eval().requires_grad_(False)
    x = torch.randint(3, 200000, (1, a.seq), generator=torch.Generator().manual_seed(0))
    x[0, 0] = 2
    fq = build_student(TrainConfig(plan="q4_0", train_embeddings=False), teacher).train()
    plain = copy.deepcopy(teacher).train()
    for n, p in plain.named_parameters():
        p.requires_grad_("embed" not in n)
    # fused first: ru_maxrss only grows, so the smaller-footprint variant must run before the larger one
    rows = [("fake-quant student, fused chunked loss", lambda: kd_loss(fq, teacher, x)[0]),
            ("plain student, fused chunked loss", lambda: kd_loss(plain, teacher, x)[0]),
            ("fake-quant student, unchunked autograd loss", lambda: plain_kd(fq, teacher, x))]
    res = {}
    for name, fn in rows:
        res[name] = measure(fn, a.repeats)
        print(f"{name:45s} step {res[name][0]:7.2f} s   peak RSS growth {res[name][1]:8.0f} MB")
    f, p, u = (res[n] for n, _ in rows)
    print(f"fake-quant step / plain step (fused loss): {f[0] / p[0]:.2f}")
    print(f"unchunked / fused loss step time: {u[0] / f[0]:.2f};  peak RSS growth {u[1]:.0f} MB vs {f[1]:.0f} MB")


if __name__ == "__main__":
    main()
