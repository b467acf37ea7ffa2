"""The QAT loop: distill a fake-quantized student from its teacher, with checkpoints and exact resume.

    qatlm train --teacher bundled --data texts/ --plan q4_0 --steps 200 --out runs/q4
    qatlm train --resume runs/q4
    qatlm export runs/q4 runs/q4/qat-q4_0.gguf --hf runs/q4/qat-hf

A run directory holds config.yaml (the merged config), metrics.jsonl (one line per step), checkpoint/
(student weights, optimizer, step, RNG state, as a torch.distributed.checkpoint directory; written atomically
every --save-every steps and at the end) and heldout.pt (the held-out token blocks). The data order is a pure
function of (seed, epoch), so a resumed run continues exactly where the checkpoint was taken: on CPU the
result is bit-identical to an uninterrupted run (tested). A NaN/inf loss stops the run with a message; the
last good checkpoint is kept. Under torchrun the same loop runs data-parallel with FSDP2 (see qatlm.dist).
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from . import dist as qdist
from .data_text import load_blocks
from .distill import kd_loss
from .fakequant import add_lora, prepare, set_fake_quant, snap_toward_grid_
from .gguf_io import atomic_write_text
from .models import load_teacher


@dataclass
class TrainConfig:
    teacher: str = "bundled"  # a .gguf, a Hugging Face directory, or "bundled" (Gemma 3 270M)
    data: list[str] = field(default_factory=list)  # text/jsonl/parquet files or directories of them
    data_free: int = 0  # with no data: train on this many seq_len sequences sampled from the teacher
    out: str = "runs/qat"  # the run directory
    plan: str = "q4_0"  # the GGUF type plan the student is trained for (and exported with)
    overrides: list[str] = field(default_factory=list)  # PATTERN=TYPE plan overrides
    steps: int = 100  # optimizer steps
    seq_len: int = 256  # tokens per training sequence
    batch_size: int = 2  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-5  # peak AdamW learning rate
    min_lr_ratio: float = 0.1  # cosine decay floor, as a fraction of lr
    warmup: int = 5  # linear warm-up steps
    weight_decay: float = 0.0
    clip: float = 1.0  # gradient-norm clipping (0: off)
    temperature: float = 1.0  # KD temperature
    ce_weight: float = 0.0  # weight of next-token cross-entropy mixed into the KD loss
    kd_chunk: int = 128  # positions per chunk of the vocabulary-sized KD computation
    fake_quant_after: int = 0  # steps of plain KD before fake quant is switched on
    snap: float = 0.05  # move weights this fraction toward their PTQ value before training (0: off)
    train_embeddings: bool = True  # also train the (tied) embedding
    heldout_fraction: float = 0.05  # token blocks kept out of training, for validation
    save_every: int = 50  # checkpoint every N steps (and at the end)
    seed: int = 0
    threads: int | None = None  # CPU threads (default: torch's)
    budget_minutes: float | None = None  # if set: after step 2, cap `steps` to what fits (step 2's time)
    lora_rank: int = 0  # > 0: train LoRA adapters inside the fake quantizer instead of every weight
    lora_alpha: float | None = None  # LoRA scale alpha / rank (default alpha = rank)
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda; bf16 autocast on CUDA
    shard_teacher: bool = False  # under torchrun: FSDP2-shard the teacher's layers too (default: replicate it)

    def validate(self) -> None:
        if self.steps < 1 or self.seq_len < 8 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("steps, batch_size and grad_accum must be >= 1 and seq_len >= 8")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.snap < 1:
            raise ValueError(f"snap must be in [0, 1), got {self.snap}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {self.lora_rank}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")

    @classmethod
    def from_sources(cls, yaml_file: str | None = None, **overrides) -> "TrainConfig":
        """Defaults < YAML file < explicit overrides (None values are ignored)."""
        values: dict = {}
        if yaml_file:
            import yaml

            loaded = yaml.safe_load(Path(yaml_file).read_text()) or {}
            unknown = set(loaded) - {f.name for f in fields(cls)}
            if unknown:
                raise ValueError(f"{yaml_file}: unknown keys {sorted(unknown)}; known: {[f.name for f in fields(cls)]}")
            values.update(loaded)
        values.update({k: v for k, v in overrides.items() if v is not None})
        cfg = cls(**values)
        cfg.validate()
        return cfg


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio (step counts from 0)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def batch_indices(n_blocks: int, step: int, micro: int, batch_size: int, accum: int, seed: int) -> list[int]:
    """The block indices of micro-batch `micro` of `step`: a seeded permutation per epoch (pure function)."""
    start = (step * accum + micro) * batch_size
    out = []
    for k in range(start, start + batch_size):
        epoch, pos = divmod(k, n_blocks)
        perm = np.random.default_rng([seed, epoch]).permutation(n_blocks)
        out.append(int(perm[pos]))
    return out


def build_student(cfg: TrainConfig, teacher_model: torch.nn.Module) -> torch.nn.Module:
    student = copy.deepcopy(teacher_model)
    if cfg.snap:
        snap_toward_grid_(student, cfg.plan, cfg.snap, tuple(cfg.overrides))
    prepare(student, cfg.plan, tuple(cfg.overrides))
    if cfg.lora_rank:
        add_lora(student, cfg.lora_rank, cfg.lora_alpha)  # freezes everything else
    else:
        for name, p in student.named_parameters():
            p.requires_grad_(cfg.train_embeddings or "embed" not in name)
    return student


def _blocks(cfg: TrainConfig, run: Path, teacher, tokenizer, ctx):
    if cfg.data:
        return load_blocks(cfg.data, tokenizer, cfg.seq_len, cfg.heldout_fraction, cfg.seed, cache=run / "tokens")
    if cfg.data_free < 2:
        raise ValueError("no training data: give --data FILES_OR_DIRS, or --data-free N to train on N sequences "
                         "the teacher samples itself (N >= 2)")
    from .data_text import blocks_from_stream
    from .generate import synthetic_stream

    stream = synthetic_stream(run, teacher, tokenizer, cfg.data_free, cfg.seq_len, cfg.seed, ctx.device,
                              progress=ctx.main)
    return blocks_from_stream(stream, tokenizer, cfg.seq_len, cfg.heldout_fraction, cfg.seed, "sampled")


def _one_by_one(ctx: qdist.Context, fn):
    """Rank 0 first (it may fill a cache: the converted teacher, the token cache), then the others."""
    out = fn() if ctx.main else None
    qdist.barrier(ctx)
    return fn() if not ctx.main else out


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, stop_after: int | None = None) -> Path:
    """Run (or resume) training; returns the run directory. `stop_after` ends early after that step (tests)."""
    run = Path(cfg.out)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is not a multiple of the {world} processes: each step's "
                         "micro-batch is split evenly across them (use --batch-size or --grad-accum)")
    ctx = qdist.setup(cfg.device)
    run.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    import yaml

    if ctx.main:
        atomic_write_text(run / "config.yaml", yaml.safe_dump(asdict(cfg), sort_keys=False))

    t = _one_by_one(ctx, lambda: load_teacher(cfg.teacher))
    teacher = t.model.eval().to(ctx.device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    train_blocks, held = _one_by_one(ctx, lambda: _blocks(cfg, run, teacher, t.tokenizer, ctx))
    if ctx.main:
        torch.save(held, run / "heldout.pt")
    student = build_student(cfg, teacher).to(ctx.device)

    def loss_fn(s, tch, ids):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=ctx.device.type == "cuda"):
            return kd_loss(s, tch, ids, cfg.temperature, cfg.ce_weight, cfg.kd_chunk)

    kd_step = (qdist.shard(qdist.KDStep(student, teacher, loss_fn, cfg.shard_teacher), ctx)
               if ctx.distributed else None)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    step = 0
    if resume and qdist.checkpoint_dir(run):
        step = qdist.load_checkpoint(run, student, opt)
    if ctx.main:
        _truncate_metrics(run / "metrics.jsonl", step)
    student.train()
    set_fake_quant(student, step >= cfg.fake_quant_after)

    bar = None
    if progress and ctx.main:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=step, desc="QAT" + (f" x{ctx.world}" if ctx.distributed else ""),
                   unit="step")
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    with open(run / "metrics.jsonl", "a") if ctx.main else open(os.devnull, "w") as metrics:
        while step < cfg.steps:
            t0 = time.perf_counter()
            if step == cfg.fake_quant_after:
                set_fake_quant(student, True)
            lr = lr_at(cfg, step)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            kl = ce = 0.0
            for micro in range(cfg.grad_accum):
                idx = batch_indices(len(train_blocks), step, micro, cfg.batch_size, cfg.grad_accum, cfg.seed)
                ids = train_blocks[idx[ctx.rank::ctx.world]].to(ctx.device)  # this process's share
                loss, parts = kd_step(ids) if kd_step is not None else loss_fn(student, teacher, ids)
                bad = qdist.mean_over_ranks(ctx, [float(not torch.isfinite(loss))])[0]
                if bad:
                    raise FloatingPointError(
                        f"loss is {float(loss.detach())} at step {step + 1}; the run stopped and {run}/checkpoint "
                        f"(step {qdist.checkpoint_step(run)}) is kept. Lower --lr or raise --warmup, then "
                        f"`qatlm train --resume {run}`")
                (loss / cfg.grad_accum).backward()
                kl += parts["kl"] / cfg.grad_accum
                ce += parts["ce"] / cfg.grad_accum
            gnorm = qdist.clip_grad_norm(params, cfg.clip)
            opt.step()
            step += 1
            dt = time.perf_counter() - t0
            kl, ce, dt = qdist.mean_over_ranks(ctx, [kl, ce, dt])
            rec = {"step": step, "loss": kl + cfg.ce_weight * ce, "kl": kl, "ce": ce, "lr": lr, "grad_norm": gnorm,
                   "fake_quant": step > cfg.fake_quant_after, "seconds": dt, "tokens_per_s": tokens_per_step / dt}
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
            if bar is not None:
                bar.update()
                bar.set_postfix(kl=f"{kl:.4f}", ce=f"{ce:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            if cfg.budget_minutes and step == 2 and not resume:  # step 1 includes one-time compile costs
                fit = max(2, int(cfg.budget_minutes * 60 / dt))  # dt: the same mean on every process
                if fit < cfg.steps:
                    cfg.steps = fit  # the schedule's length; saved so that a resumed run keeps it
                    if ctx.main:
                        atomic_write_text(run / "config.yaml", yaml.safe_dump(asdict(cfg), sort_keys=False))
                    if bar is not None:
                        bar.total = fit
            if step % cfg.save_every == 0 or step == cfg.steps:
                qdist.save_checkpoint(run, ctx, student, opt, step)
            if stop_after is not None and step >= stop_after:
                break
    if bar is not None:
        bar.close()
    if ctx.distributed:
        qdist.barrier(ctx)
        torch.distributed.destroy_process_group()
    return run


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past the checkpoint being resumed from (they will be recomputed)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def load_run(run_dir: str | Path):
    """(config, teacher, student with the checkpoint's latent weights as plain modules) of a run directory."""
    import yaml

    from .fakequant import convert

    run = Path(run_dir)
    if not (run / "config.yaml").is_file() or qdist.checkpoint_dir(run) is None:
        raise ValueError(f"{run}: not a qatlm run directory with a checkpoint (config.yaml + checkpoint/)")
    cfg = TrainConfig(**yaml.safe_load((run / "config.yaml").read_text()))
    t = load_teacher(cfg.teacher)
    student = copy.deepcopy(t.model)
    prepare(student, cfg.plan, tuple(cfg.overrides))
    if cfg.lora_rank:
        add_lora(student, cfg.lora_rank, cfg.lora_alpha)
    qdist.load_checkpoint(run, student)
    convert(student)
    return cfg, t, student
