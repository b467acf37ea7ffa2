"""Stage 3, training: distill a fake-quantized student from its teacher, with checkpoints and exact resume.

    qatlm train --teacher bundled --data texts/ --plan q4_0 --steps 200 --out runs/q4
    qatlm train --resume runs/q4 [--steps 400]
    qatlm export runs/q4 runs/q4/qat-q4_0.gguf --hf runs/q4/qat-hf

`train()` reads top to bottom in named stages: setup, teacher, data, student, optimizer, (resume), loop,
checkpoint. A run directory holds config.yaml (the merged config: qatlm.train.config), metrics.jsonl (one line
per step; every eval_every steps it also holds heldout_kl, qatlm.train.heldout), checkpoint/
(qatlm.train.checkpoint) and heldout.pt (the held-out token blocks). The data order is a
pure function of (seed, epoch) (`batch_indices`) and the learning rate of the step (`lr_at`), so a resumed run
continues exactly where the checkpoint was taken: on CPU bit-identical to an uninterrupted run (tested). A
NaN/inf loss stops the run with a message; the last good checkpoint is kept. Under torchrun the same loop runs
data-parallel with FSDP2 (qatlm.train.dist).
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..atomic import atomic_write_text
from ..cli import command
from ..student import add_lora, convert, plan_types, prepare, set_fake_quant, snap_toward_grid_
from ..teacher import Teacher, load_teacher
from . import config as C
from . import dist
from .block_lr import BlockLR
from .checkpoint import checkpoint_dir, checkpoint_step, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import blocks_from_stream, held_out_count, load_blocks, split_mask
from .heldout import eval_subset, heldout_kl, is_eval_step
from .kd_loss import kd_loss
from .synthetic import synthetic_stream


# ---- pure functions of the step: what makes resume exact -------------------------------------------------

def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio (step counts from 0)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def batch_indices(n_blocks: int, step: int, micro: int, batch_size: int, accum: int, seed: int,
                  first: int = 0, fraction: float = 0.0) -> list[int]:
    """The block indices of micro-batch `micro` of `step`: a seeded permutation per epoch (pure function).
    With `first` > 0 (a mix whose first `first` blocks are teacher-sampled text), the run's k-th batch element
    comes from those blocks when floor((k + 1) * fraction) > floor(k * fraction), i.e. exactly `fraction` of
    every stretch of elements, and from the others otherwise; each group has its own permutation per epoch."""
    start = (step * accum + micro) * batch_size
    out = []
    for k in range(start, start + batch_size):
        if first:
            a = math.floor(k * fraction)  # sampled elements before k
            sampled = math.floor((k + 1) * fraction) > a
            n, offset, j, group = (first, 0, a, 1) if sampled else (n_blocks - first, first, k - a, 2)
            epoch, pos = divmod(j, n)
            out.append(offset + int(np.random.default_rng([seed, epoch, group]).permutation(n)[pos]))
            continue
        epoch, pos = divmod(k, n_blocks)
        perm = np.random.default_rng([seed, epoch]).permutation(n_blocks)
        out.append(int(perm[pos]))
    return out


def sampled_first(cfg: TrainConfig) -> int:
    """With both a corpus and --data-free: how many training blocks (the first ones) are sampled text; else 0."""
    return cfg.data_free - held_out_count(cfg.data_free, cfg.heldout_fraction) if cfg.data and cfg.data_free else 0


def steps_for_budget(budget_minutes: float, seconds_per_step: float, steps: int) -> int:
    """How many steps fit the budget (at least 2, at most `steps`)."""
    return min(steps, max(2, int(budget_minutes * 60 / seconds_per_step)))


# ---- the pieces -------------------------------------------------------------------------------------------

def build_student(cfg: TrainConfig, teacher_model: torch.nn.Module) -> torch.nn.Module:
    """The teacher's copy, snapped toward the grid, with fake-quant modules (and LoRA) as the config says.
    Used by training and by load_run (whose checkpoint then overwrites every weight)."""
    student = copy.deepcopy(teacher_model)
    im = load_imatrix(cfg, student)
    try:  # a plan that does not fit the model's shapes: say which model
        plan_types(student, cfg.plan, tuple(cfg.overrides), im)
    except ValueError as e:
        raise ValueError(f"{cfg.teacher}: {e}") from None
    if cfg.snap:
        snap_toward_grid_(student, cfg.plan, cfg.snap, tuple(cfg.overrides), im)
    prepare(student, cfg.plan, tuple(cfg.overrides), im, learn_scales=cfg.learn_scales)
    if cfg.learn_scales and not any(n.endswith(".qat_block_scale") for n, _ in student.named_parameters()):
        raise ValueError(f"learn_scales: plan {cfg.plan!r} puts no Linear weight in a format with one fp16 scale per "
                         "32 weights (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0); train without learn_scales")
    if cfg.lora_rank:
        add_lora(student, cfg.lora_rank, cfg.lora_alpha)  # freezes everything else
    else:
        for name, p in student.named_parameters():
            p.requires_grad_(cfg.train_embeddings or "embed" not in name)
    for name, p in student.named_parameters():  # learned block scales train with LoRA too
        if name.endswith(".qat_block_scale"):
            p.requires_grad_(True)
    return student


def param_groups(student: torch.nn.Module) -> list[dict]:
    """AdamW's groups: the weights (or adapters), then the learned block scales if any, without weight decay (a
    decay would pull them toward 0, not toward 1); the loop gives each its learning rate (group_lr)."""
    named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    scales = [p for n, p in named if n.endswith(".qat_block_scale")]
    groups = [{"params": [p for n, p in named if not n.endswith(".qat_block_scale")]}]
    if scales:
        groups.append({"params": scales, "weight_decay": 0.0})
    return groups


def group_lr(cfg: TrainConfig, lr: float, group: dict, scale_ids: set[int]) -> float:
    """The learning rate of an optimizer group when the weights' is `lr` (lr_at): scaled to scale_lr for the block
    scales' group (recognized by its parameters, whatever a resumed optimizer state holds)."""
    return lr * cfg.scale_lr / cfg.lr if any(id(p) in scale_ids for p in group["params"]) else lr


def load_imatrix(cfg: TrainConfig, model: torch.nn.Module):
    """The run's Imatrix (None without one), checked against the model's blk.* matrices."""
    if not cfg.imatrix:
        return None
    from .. import arch
    from ..gguf.ptq import imatrix_for

    params = dict(model.named_parameters())
    return imatrix_for(cfg.imatrix, {g: tuple(params[n].shape) for n, g in arch.gguf_names(model).items()
                                     if params[n].dim() == 2})


def training_blocks(cfg: TrainConfig, run: Path, teacher: Teacher, ctx: dist.Context):
    """(train blocks, held-out blocks) [n, seq_len]: the corpus, text the teacher samples (--data-free), or
    both: the sampled blocks first (sampled_first(cfg) of them), then the corpus's."""
    if not cfg.data and cfg.data_free < 2:
        raise ValueError("no training data: give --data FILES_OR_DIRS, or --data-free N to train on N sequences "
                         "the teacher samples itself (N >= 2)")
    parts = []
    if cfg.data_free:
        stream = synthetic_stream(run, teacher.model, teacher.tokenizer, cfg.data_free, cfg.seq_len, cfg.seed,
                                  ctx.device, progress=ctx.main, dtype=dtypes(cfg, ctx.device)[1])
        parts.append(blocks_from_stream(stream, teacher.tokenizer, cfg.seq_len, cfg.heldout_fraction, cfg.seed,
                                        "sampled"))
    if cfg.data:
        parts.append(load_blocks(cfg.data, teacher.tokenizer, cfg.seq_len, cfg.heldout_fraction, cfg.seed,
                                 cache=run / "tokens", kd_on=cfg.kd_on))
    if len(parts) == 1:
        return parts[0]
    assert len(parts[0][0]) == sampled_first(cfg)
    return torch.cat([parts[0][0], parts[1][0]]), torch.cat([parts[0][1], parts[1][1]])


def dtypes(cfg: TrainConfig, device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """(student and head matmuls' dtype, teacher's) for cfg.precision / cfg.teacher_precision on `device`."""
    dtype = dist.compute_dtype(cfg.precision, device)
    t = cfg.teacher_precision
    return dtype, (dtype if t == "auto" else dist.compute_dtype(t, device))


def _main_first(ctx: dist.Context, fn):
    """Rank 0 first (it may fill a cache: the converted teacher, the token cache), then the others."""
    out = fn() if ctx.main else None
    dist.barrier(ctx)
    return fn() if not ctx.main else out


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past the checkpoint being resumed from (they will be recomputed)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


# ---- the loop ---------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, stop_after: int | None = None,
          teacher: Teacher | None = None) -> Path:
    """Run (or resume) training; returns the run directory. `teacher`: an already loaded Teacher of
    cfg.teacher (qatlm run loads it once). `stop_after` ends early after that step (tests)."""
    # setup
    cfg.validate()
    run = Path(cfg.out)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is not a multiple of the {world} processes: each step's "
                         "micro-batch is split evenly across them (use --batch-size or --grad-accum)")
    if cfg.block_lr and world > 1:  # before anything is loaded
        raise ValueError("block_lr runs in a single process (FSDP2 shards the weights' rows, and sharding their "
                         "blocks' factors with them is not done): drop --nproc, or set block_lr false")
    ctx = dist.setup(cfg.device)
    run.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    if ctx.main:
        C.save(cfg, run)

    # teacher
    t = teacher if teacher is not None else _main_first(ctx, lambda: load_teacher(cfg.teacher))
    cpu = cfg.teacher_cache and not cfg.data_free  # a cached teacher only seeds the student: never on the GPU
    t.model.eval().to("cpu" if cpu else ctx.device).requires_grad_(False)

    # data
    train_blocks, held = _main_first(ctx, lambda: training_blocks(cfg, run, t, ctx))
    if ctx.main:
        torch.save(held, run / "heldout.pt")
    held_eval = eval_subset(held, cfg.eval_blocks)  # the fixed blocks of the held-out KL (qatlm.train.heldout)
    dtype, t_dtype = dtypes(cfg, ctx.device)  # bf16 matmuls where the hardware has them
    cache = None
    if cfg.teacher_cache:  # the teacher's outputs come from a top-k cache, checked against this run here
        from .teacher_cache import TeacherCache

        cache = TeacherCache.open(cfg.teacher_cache, cfg, t, train_blocks, held_eval, ctx.device)

    # student
    student = build_student(cfg, t.model).to(ctx.device)
    teacher_model = t.model
    if cache is not None:  # not needed any more: drop it (its memory is freed unless the caller holds it)
        t = teacher_model = None
        gc.collect()

    def loss_fn(s, tch, blocks):  # blocks as stored: with kd_on=assistant the mask travels in them (data.py)
        ids, mask = split_mask(blocks, cfg.kd_on)
        if cache is not None:
            return cache.kd_loss(s, blocks, ids, cfg.ce_weight, cfg.kd_chunk, dtype, mask)
        return kd_loss(s, tch, ids, cfg.temperature, cfg.ce_weight, cfg.kd_chunk, dtype, t_dtype, mask=mask,
                       hidden_weight=cfg.hidden_weight)

    kd_step = (dist.shard(dist.KDStep(student, teacher_model, loss_fn, cfg.shard_teacher), ctx)
               if ctx.distributed else None)

    # optimizer
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(param_groups(student), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scale_ids = {id(p) for n, p in student.named_parameters() if n.endswith(".qat_block_scale")}
    blr = BlockLR.of(student) if cfg.block_lr else None  # from the starting weights, before a checkpoint loads

    # resume
    step = load_checkpoint(run, student, opt) if resume and checkpoint_dir(run) else 0
    if ctx.main:
        _truncate_metrics(run / "metrics.jsonl", step)
    student.train()
    set_fake_quant(student, step >= cfg.fake_quant_after)

    # loop
    bar = tqdm(total=cfg.steps, initial=step, desc="QAT" + (f" x{ctx.world}" if ctx.distributed else ""), unit="step",
               disable=not (progress and ctx.main))
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    metrics = open(run / "metrics.jsonl", "a") if ctx.main else open(os.devnull, "w")
    with metrics:
        while step < cfg.steps:
            t0 = time.perf_counter()
            if step == cfg.fake_quant_after:
                set_fake_quant(student, True)
            lr = lr_at(cfg, step)
            for g in opt.param_groups:
                g["lr"] = group_lr(cfg, lr, g, scale_ids)
            opt.zero_grad(set_to_none=True)
            kl = ce = hid = 0.0
            for micro in range(cfg.grad_accum):
                idx = batch_indices(len(train_blocks), step, micro, cfg.batch_size, cfg.grad_accum, cfg.seed,
                                    sampled_first(cfg), cfg.sampled_fraction)
                ids = train_blocks[idx[ctx.rank::ctx.world]].to(ctx.device)  # this process's share
                loss, parts = kd_step(ids) if kd_step is not None else loss_fn(student, teacher_model, ids)
                if dist.mean_over_ranks(ctx, [float(not torch.isfinite(loss))])[0]:
                    raise FloatingPointError(
                        f"loss is {float(loss.detach())} at step {step + 1}; the run stopped and {run}/checkpoint "
                        f"(step {checkpoint_step(run)}) is kept. Lower --lr or raise --warmup, then "
                        f"`qatlm train --resume {run}`")
                (loss / cfg.grad_accum).backward()
                kl += parts["kl"] / cfg.grad_accum
                ce += parts["ce"] / cfg.grad_accum
                hid += parts.get("hidden", 0.0) / cfg.grad_accum
            gnorm = dist.clip_grad_norm(params, cfg.clip)
            if blr is not None:
                blr.step(opt)
            else:
                opt.step()
            step += 1
            dt = time.perf_counter() - t0
            kl, ce, hid, dt = dist.mean_over_ranks(ctx, [kl, ce, hid, dt])
            rec = {"step": step, "loss": kl + cfg.ce_weight * ce + cfg.hidden_weight * hid, "kl": kl, "ce": ce,
                   "lr": lr, "grad_norm": gnorm, "fake_quant": step > cfg.fake_quant_after, "seconds": dt,
                   "tokens_per_s": tokens_per_step / dt}
            if cfg.hidden_weight:
                rec["hidden"] = hid
            bar.update()
            bar.set_postfix(kl=f"{kl:.4f}", ce=f"{ce:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            sizing = cfg.budget_minutes and step == 2 and not resume  # step 1 includes one-time compile costs
            evals = len(held_eval) > 0 and cfg.eval_every > 0
            eval_s = 0.0
            if evals and (sizing or is_eval_step(step, cfg.steps, cfg.eval_every)):  # sizing: its time is measured
                t1 = time.perf_counter()
                fn = kd_step if kd_step is not None else (lambda b: loss_fn(student, teacher_model, b))
                value = heldout_kl(fn, student, held_eval, max(1, cfg.batch_size // ctx.world), cfg.kd_on,
                                   ctx.device)  # every process: all the blocks (FSDP's collectives stay in step)
                if value is not None:
                    rec["heldout_kl"] = dist.mean_over_ranks(ctx, [value])[0]
                eval_s = time.perf_counter() - t1
            if sizing:  # the held-out evals' share counts against the budget too (dt, eval_s: means over processes)
                per_step = dt + (dist.mean_over_ranks(ctx, [eval_s])[0] / cfg.eval_every if evals else 0.0)
                fit = steps_for_budget(cfg.budget_minutes, per_step, cfg.steps)
                if fit < cfg.steps:  # the schedule's length (lr_at): saved, so that a resumed run keeps it
                    cfg = dataclasses.replace(cfg, steps=fit)
                    bar.total = fit
                    if ctx.main:
                        C.save(cfg, run)
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()

            # checkpoint
            if step % cfg.save_every == 0 or step == cfg.steps:
                save_checkpoint(run, ctx, student, opt, step)
            if stop_after is not None and step >= stop_after:
                break
    bar.close()
    if ctx.distributed:
        dist.barrier(ctx)
        torch.distributed.destroy_process_group()
    return run


def load_run(run_dir: str | Path, teacher: Teacher | None = None):
    """(config, teacher, student with the checkpoint's latent weights as plain modules) of a run directory."""
    run = Path(run_dir)
    if not os.path.lexists(run / "config.yaml") or checkpoint_dir(run) is None:  # a FIFO: refused when read
        raise ValueError(f"{run}: not a qatlm run directory with a checkpoint (config.yaml + checkpoint/)")
    cfg = C.resolve(saved=run)
    t = teacher if teacher is not None else load_teacher(cfg.teacher)
    student = build_student(cfg, t.model)
    load_checkpoint(run, student)
    convert(student)
    return cfg, t, student


# ---- the command ------------------------------------------------------------------------------------------

# flags of `qatlm train` / `qatlm run` that are TrainConfig fields: flag -> (field, type, help)
TRAIN_FLAGS = {
    "--teacher": ("teacher", str, "a .gguf, a Hugging Face directory, or 'bundled'"),
    "--data": ("data", None, "training .txt/.jsonl/.parquet files or folders"),
    "--plan": ("plan", str, "the type plan to train for (q4_0, q4_k_m, ...; see `qatlm plan`)"),
    "--steps": ("steps", int, "optimizer steps"),
    "--lr": ("lr", float, "peak learning rate"),
    "--seq-len": ("seq_len", int, "tokens per training sequence"),
    "--batch-size": ("batch_size", int, "sequences per micro-batch"),
    "--grad-accum": ("grad_accum", int, "micro-batches per step"),
    "--save-every": ("save_every", int, "checkpoint every N steps"),
    "--seed": ("seed", int, "random seed (data order, LoRA init, sampling)"),
    "--budget-minutes": ("budget_minutes", float, "size the schedule to this training time (measured at step 2)"),
    "--data-free": ("data_free", int, "train on N sequences of --seq-len tokens sampled from the teacher (saved in "
                    "the run directory); with --data they are mixed in, --sampled-fraction of every batch"),
    "--sampled-fraction": ("sampled_fraction", float, "with --data and --data-free: the share of every batch that "
                           "is teacher-sampled text"),
    "--kd-on": ("kd_on", str, "positions distilled: all, or assistant (chat JSONL: only where the next token is an "
                "assistant turn's)"),
    "--eval-every": ("eval_every", int, "held-out KD KL every N steps and at the last (heldout_kl in metrics.jsonl; "
                     "0: off)"),
    "--lora": ("lora_rank", int, "train LoRA adapters of this rank inside the fake quantizer instead of every weight"),
    "--imatrix": ("imatrix", str, "an imatrix file: fake quant and export use llama-quantize --imatrix's rule, so the "
                  "student starts at imatrix PTQ and the GGUF is that rule applied to the trained weights"),
    "--teacher-cache": ("teacher_cache", str, "a `qatlm teacher-cache` directory of the teacher's top-k outputs on "
                        "these blocks: no teacher forward, and no teacher in memory, while training"),
}


def add_train_flags(p, defaults: TrainConfig) -> None:
    """The TRAIN_FLAGS on parser p, each help showing the default it falls back to."""
    for flag, (key, typ, help_) in TRAIN_FLAGS.items():
        d = getattr(defaults, key)
        shown = f" (default: {d})" if d not in (None, [], 0, "") else ""
        kw = {"nargs": "+"} if key == "data" else {"type": typ}
        p.add_argument(flag, dest=key, metavar=key.upper() if typ is not None else None, help=help_ + shown, **kw)
    p.add_argument("--override", dest="overrides", action="append", metavar="PATTERN=TYPE",
                   help="plan override: tensors whose GGUF name matches PATTERN get TYPE; repeatable")
    p.add_argument("--config", help="a recipe YAML of TrainConfig fields (or a shipped recipe name, e.g. default); "
                   "flags override it")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other TrainConfig field")


def flags_of(a) -> dict:
    """The TrainConfig settings given on the command line (flags, then --set)."""
    out = {key: getattr(a, key) for key, _, _ in TRAIN_FLAGS.values() if getattr(a, key, None) is not None}
    if getattr(a, "overrides", None):
        out["overrides"] = a.overrides
    return {**out, **C.parse_set(a.set)}


def _relaunch_under_torchrun(nproc: int, argv: list[str]) -> int:
    rest, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x == "--nproc":
            skip = True
        elif not x.startswith("--nproc="):
            rest.append(x)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "qatlm", *rest]
    print("launching: " + " ".join(cmd), file=sys.stderr)
    return subprocess.run(cmd).returncode


def main(a) -> int:
    if a.nproc and a.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _relaunch_under_torchrun(a.nproc, a.argv)
    flags = flags_of(a)
    if a.resume:
        notes: list[str] = []
        cfg = C.resolve(a.config, saved=a.resume, flags=flags, notes=notes)
        if notes and os.environ.get("RANK", "0") == "0":
            print(f"resuming {a.resume} with: " + "; ".join(notes), file=sys.stderr)
        train(cfg, resume=True)
    else:
        train(C.resolve(a.config, flags={"out": a.out, **flags}))
    if os.environ.get("RANK", "0") == "0":
        run = a.resume or a.out or TrainConfig.out
        print(f"run directory: {run} (checkpoint/, metrics.jsonl, config.yaml); "
              f"export with: qatlm export {run} OUT.gguf")
    return 0


def add_parsers(sub) -> None:
    p = command(sub, "train", "Distillation QAT: train a fake-quantized student against its teacher.",
                "qatlm train --teacher bundled --data texts/ --plan q4_0 --steps 200 --out runs/q4", main)
    add_train_flags(p, TrainConfig())
    p.add_argument("--out", help=f"the run directory (default {TrainConfig.out})")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR exactly where it stopped (on any "
                   "number of processes); flags that change only the schedule (e.g. --steps) are applied")
    p.add_argument("--nproc", type=int, help="data-parallel processes: relaunches itself under torchrun (FSDP2; "
                   "or run `torchrun --nproc-per-node N -m qatlm train ...` yourself)")
