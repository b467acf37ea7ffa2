"""Measured peak memory of a few QAT steps on CPU: what `qatlm memory --train` (qatlm.train.memory_plan) is
checked against.

    python -m qatlm.train.peak_memory --teacher bundled --precision bf16 --lora 16 --steps 3

Method: `TensorMemory`, a TorchDispatchMode, sees every ATen op that runs inside it (forward, the autograd
engine's backward ops, the optimizer) and registers the storage of each tensor an op returns; a weak reference on
the storage takes its bytes off again when it is freed. The peak of the live bytes plus the storages that existed
before (teacher and student weights, counted once each) is the peak of what torch held. This counts tensors
exactly, to the byte, and is deterministic (unlike RSS, which also holds the allocator's free lists, Python objects,
the tokenizer and the libraries).

Its limits, which are also what the planner does not model:
- Scratch memory that a kernel allocates and frees inside one op (oneDNN / MKL workspaces, SDPA's per-thread
  buffers) never reaches the dispatcher and is not counted; neither is memory outside torch.
- torch.compile'd code allocates its buffers below the dispatcher, so the measurement turns qatlm's compiled
  kernels off (QATLM_COMPILE=0): the eager KD head it then measures is the one CUDA runs (kd_loss compiles only
  on CPU) and the larger of the two.
- Allocator rounding (CUDA's caching allocator rounds to 512 bytes / 2 MiB segments and keeps freed blocks
  reserved) is not in it: on a GPU, `torch.cuda.max_memory_reserved` is the number to compare with.

`measure()` runs the steps of qatlm.train.loop.train with its own building blocks (build_student, kd_loss or the
top-k head, AdamW, clip_grad_norm, in the loop's order), on random token ids, so that activation checkpointing
(which `qatlm train` does not offer) and a teacher cache can be measured as well. The peak RSS of the process
minus its RSS before the first step is reported beside it for reference (`rss_delta_bytes`; it runs high where
glibc keeps freed memory, and low where pages are reserved but never touched).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorMemory(TorchDispatchMode):
    """Live and peak bytes of the tensor storages that ops return inside the mode.

        with TensorMemory(baseline=[*model.parameters()]) as m:
            loss.backward()
        m.peak  # bytes: the baseline's storages + the most that was alive at once
    """

    def __init__(self, baseline=()):
        super().__init__()
        self._refs: dict[int, tuple[weakref.ref, int]] = {}
        self.live = 0
        for t in baseline:
            self._add(t.untyped_storage())
        self.base = self.live
        self.peak = self.live
        self.phase = ""  # a label: the peak of each is kept in .peaks
        self.peaks: dict[str, int] = {}

    def _add(self, st) -> None:
        key, n = st._cdata, st.nbytes()  # _cdata: the StorageImpl's address, unique while it is alive
        old = self._refs.get(key)
        if old is not None and old[0]() is st:
            if n > old[1]:  # resized by an out= op
                self.live += n - old[1]
                self._refs[key] = (old[0], n)
            return

        def gone(_, key=key):
            ref = self._refs.pop(key, None)
            if ref is not None:
                self.live -= ref[1]
        self._refs[key] = (weakref.ref(st, gone), n)
        self.live += n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                st = t.untyped_storage()
                if st._cdata not in inputs or st._cdata in self._refs:  # in place on an untracked tensor: not new
                    self._add(st)
        self.peak = max(self.peak, self.live)
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), self.live)
        return out


def _rss_bytes() -> int:
    """The process's peak resident set size (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(teacher: str, precision: str = "fp32", lora: int = 0, steps: int = 3, seq_len: int = 256,
            batch_size: int = 2, checkpointing: bool = False, teacher_mode: str = "resident", cache_k: int = 128,
            plan: str = "q4_0", kd_chunk: int = 128, loaded=None) -> dict:
    """Peak tensor bytes of `steps` QAT steps (CPU). teacher_mode: resident (the teacher runs every step) or
    cache (a top-k teacher cache: only the cached rows of the batch, fp16 log-probs + int32 ids, are resident).
    `loaded`: an already loaded Teacher of `teacher` (reused across calls in one process)."""
    from ..student import set_fake_quant
    from ..teacher import load_teacher
    from . import dist
    from .config import TrainConfig
    from .kd_loss import kd_loss
    from .loop import build_student

    os.environ["QATLM_COMPILE"] = "0"  # see the module docstring
    cfg = TrainConfig(teacher=teacher, precision=precision, teacher_precision="auto", lora_rank=lora,
                      seq_len=seq_len, batch_size=batch_size, plan=plan, kd_chunk=kd_chunk, device="cpu")
    dtype = dist.compute_dtype(precision, torch.device("cpu"))
    t = loaded if loaded is not None else load_teacher(teacher)
    t.model.eval().requires_grad_(False)
    student = build_student(cfg, t.model)
    student.train()
    set_fake_quant(student, True)
    if checkpointing:  # Hugging Face's own per-decoder-layer checkpointing (torch.utils.checkpoint, non-reentrant)
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(0)
    vocab = student.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
    cached = None
    if teacher_mode == "cache":
        n = batch_size * seq_len
        cached = (torch.randn(batch_size, seq_len, cache_k, generator=g).to(torch.float16) - 5,  # log-probs
                  torch.randint(0, vocab, (n, cache_k), generator=g, dtype=torch.int32)
                  .reshape(batch_size, seq_len, cache_k),
                  torch.full((batch_size, seq_len), -3.0))
    elif teacher_mode != "resident":
        raise ValueError(f"teacher_mode must be resident or cache, got {teacher_mode!r}")
    keep = [student] + ([t.model] if teacher_mode == "resident" else [])
    baseline = [x for m in keep for x in [*m.parameters(), *m.buffers()]] + list(cached or ())
    if teacher_mode == "cache" and loaded is None:
        del t  # only its shapes were needed (the student is a copy)
    rss0 = _rss_bytes()
    with TensorMemory(baseline) as mem:
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            mem.phase = "forward"
            if cached is None:
                loss, _ = kd_loss(student, t.model, ids, cfg.temperature, cfg.ce_weight, cfg.kd_chunk, dtype, dtype)
            else:
                from .topk_kd import topk_kd_loss
                loss, _ = topk_kd_loss(student, cached, ids, cfg.ce_weight, cfg.kd_chunk, dtype)
            mem.phase = "backward"
            loss.backward()
            mem.phase = "optimizer"
            dist.clip_grad_norm(params, cfg.clip)
            opt.step()
    return {"teacher": teacher, "precision": precision, "lora": lora, "checkpointing": checkpointing,
            "teacher_mode": teacher_mode, "seq_len": seq_len, "batch_size": batch_size, "steps": steps,
            "peak_bytes": mem.peak, "baseline_bytes": mem.base, "phase_peaks": mem.peaks, "rss_delta_bytes": _rss_bytes() - rss0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qatlm.train.peak_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--runs", default="fp32:0", help="comma-separated PRECISION:LORA[:ckpt][:cache] runs, one "
                   "process (e.g. fp32:0,bf16:16:ckpt); the RSS column is only meaningful for the first")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--cache-k", type=int, default=128)
    a = p.parse_args(argv)
    from ..teacher import load_teacher

    t = load_teacher(a.teacher)
    for run in a.runs.split(","):
        prec, lora, *flags = run.split(":")
        r = measure(a.teacher, prec, int(lora), a.steps, a.seq_len, a.batch_size, "ckpt" in flags,
                    "cache" if "cache" in flags else "resident", a.cache_k, loaded=t)
        print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
