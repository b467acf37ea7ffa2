"""Training speed of Gemma 3 270M on this CPU, measured side by side in one run (issue: training at the speed
of the hardware). Prints, per configuration, tokens/s of a full KD step (teacher forward, student forward +
backward with fake quant, AdamW), its ratio to a plain fp32 forward of the same model on the same batch, and
the share of this CPU's measured matmul peak it reaches (by the step's matmul FLOPs); then teacher sampling
(--data-free) tokens/s, the former loop against the current one.

    python benchmarks/train_speed.py [--batch 2] [--seq 256] [--repeats 3] [--imatrix IMATRIX.gguf]

With --imatrix (e.g. the one `qatlm run` writes), the default job's fake quant (llama-quantize --imatrix's rule)
is measured too.

FLOPs per token (N_body: the decoder's matmul weights, N_head: the 262k x 640 output projection; attention's
score matmuls are left out, ~2% here): plain forward 2 (N_body + N_head); KD step with a frozen tied head
8 N_body + 6 N_head (two forwards, the body's backward for inputs and weights, the head's for its input).
"""
from __future__ import annotations

import argparse
import time

import torch

import qatlm.corpora as corpora
from qatlm.teacher import load_teacher
from qatlm.train.config import TrainConfig
from qatlm.train.kd_loss import kd_loss
from qatlm.train.loop import build_student
from qatlm.train.synthetic import sample_stream


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up: one-time costs (torch.compile, caches) are not what is compared
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_peak(dtype: torch.dtype, repeats: int) -> float:
    """GFLOP/s of the head's matmul shape ([256, 640] @ [640, 65536]) in dtype: this CPU's practical peak."""
    a, b = torch.randn(256, 640).to(dtype), torch.randn(65536, 640).to(dtype)
    return 2 * 256 * 640 * 65536 / best_of(lambda: a @ b.T, repeats) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sample", type=int, default=32, help="sequences of --seq tokens to sample (0: skip)")
    ap.add_argument("--only-sampling", action="store_true", help="measure teacher sampling only")
    ap.add_argument("--imatrix", help="an imatrix of the bundled model: also measure the imatrix-rule fake quant")
    a = ap.parse_args()
    t = load_teacher("bundled")
    teacher = t.model.eval().requires_grad_(False)
    ids = t.tokenizer(corpora.ood_text().read_text(), return_tensors="pt").input_ids[:, :a.batch * a.seq]
    ids = ids.reshape(a.batch, a.seq)

    if not a.only_sampling:
        step_table(a, t, teacher, ids)
    if a.sample:
        sampling(a, t, teacher)


def step_table(a, t, teacher, ids) -> None:
    n_tok = ids.numel()
    head = teacher.get_output_embeddings().weight.numel()
    body = sum(p.numel() for n, p in teacher.named_parameters() if p.dim() == 2 and "embed" not in n)
    fwd_flops, step_flops = 2 * (body + head) * n_tok, (8 * body + 6 * head) * n_tok
    peak = {torch.float32: matmul_peak(torch.float32, a.repeats), torch.bfloat16: matmul_peak(torch.bfloat16, a.repeats)}
    print(f"matmul peak ({torch.get_num_threads()} threads): fp32 {peak[torch.float32]:.0f} GFLOP/s, "
          f"bf16 {peak[torch.bfloat16]:.0f} GFLOP/s")

    with torch.no_grad():
        plain = best_of(lambda: teacher(ids).logits, a.repeats)
    print(f"{'configuration':52s} {'tok/s':>7s} {'x fwd':>6s} {'% peak':>7s}")
    print(f"{'plain fp32 forward (transformers, logits)':52s} {n_tok / plain:7.0f} {1.0:6.2f} "
          f"{100 * fwd_flops / plain / 1e9 / peak[torch.float32]:6.0f}%")

    def step_fn(student, dtype):
        opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-9)

        def step():
            opt.zero_grad(set_to_none=True)
            loss, _ = kd_loss(student, teacher, ids, dtype=dtype)
            loss.backward()
            opt.step()
        return step

    configs = [("KD step, plain student (no fake quant), fp32", "f32", None, torch.float32),
               ("KD step, Q4_0 fake quant, fp32", "q4_0", None, torch.float32),
               ("KD step, plain student (no fake quant), bf16", "f32", None, torch.bfloat16),
               ("KD step, Q4_0 fake quant, bf16", "q4_0", None, torch.bfloat16)]
    if a.imatrix:
        configs.append(("KD step, Q4_0 imatrix-rule fake quant, bf16 (default job)", "q4_0", a.imatrix, torch.bfloat16))
    times = {}
    for name, plan, imatrix, dtype in configs:
        student = build_student(TrainConfig(plan=plan, train_embeddings=False, imatrix=imatrix), teacher).train()
        times[name] = best_of(step_fn(student, dtype), a.repeats)
        dt = times[name]
        print(f"{name:52s} {n_tok / dt:7.0f} {plain / dt:6.2f} {100 * step_flops / dt / 1e9 / peak[dtype]:6.0f}%")
        del student
    n = [c[0] for c in configs]
    print(f"fake-quant step / plain KD step: fp32 {times[n[1]] / times[n[0]]:.2f}, bf16 {times[n[3]] / times[n[2]]:.2f}")
    print(f"bf16 / fp32 KD step speed-up (fake quant): {times[n[1]] / times[n[3]]:.2f}x")
    if a.imatrix:
        print(f"imatrix-rule fake-quant step / plain KD step (bf16): {times[n[4]] / times[n[2]]:.2f}")



def sampling(a, t, teacher) -> None:
    def once(fn):  # one timed call each: sampling is long enough not to need repeats
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    old = once(lambda: sample_stream(teacher, t.tokenizer, a.sample, a.seq, batch=8, progress=False))
    new = once(lambda: sample_stream(teacher, t.tokenizer, a.sample, a.seq, progress=False, dtype=torch.bfloat16))
    k = a.sample * a.seq
    print(f"teacher sampling ({a.sample} x {a.seq} tokens): 8 at a time fp32 {k / old:.0f} tok/s; "
          f"{min(a.sample, 64)} at a time bf16 {k / new:.0f} tok/s: {old / new:.1f}x")

if __name__ == "__main__":
    main()
