"""Training on more than one process, on PyTorch's own engine: torchrun, FSDP2 and torch.distributed.checkpoint.

    torchrun --nproc-per-node 4 -m qatlm train --teacher T --data D --plan q4_0 --out runs/q4
    qatlm train --nproc 4 ...            # the same, launched for you

- Data parallel: every optimizer step draws the same global micro-batches as a single process would
  (train.batch_indices), and rank r takes sequences r, r + N, r + 2N, ... of each: batch_size must be a
  multiple of the number of processes. FSDP2's reduce-scatter averages the gradients, so N processes follow
  one process with the same global batch (up to the order of float additions; tested on CPU with gloo).
- The student: each decoder layer is its own FSDP2 group (`fully_shard`), and the root group is a small
  module that runs the whole KD step (`KDStep`), so that the embedding, the final norm and Gemma's tied
  output projection (used by the fused KD head outside the body's forward) are gathered for the whole step.
- The teacher is replicated on every process by default (a frozen copy: no gradients, no optimizer state).
  `shard_teacher=true` makes its decoder layers FSDP2 groups too (gathered layer by layer during its forward,
  resharded after), for teachers that do not fit one device beside the student; its embedding and final norm
  join the root group. (Each process still loads the whole teacher once before sharding it.)
- Checkpoints (qatlm.train.checkpoint) are torch.distributed.checkpoint directories, so a run resumes on any
  number of processes.
- Rank 0 alone writes config, metrics, reports and exports; the others wait at barriers.

Backends: gloo on CPU, nccl on CUDA (one device per process, LOCAL_RANK).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .. import arch


@dataclass
class Context:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup(device: str = "auto") -> Context:
    """Join the torchrun job if there is one (WORLD_SIZE > 1), else a single-process context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no CUDA device; use --set device=cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    if world <= 1:
        return Context(0, 1, dev)
    if cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Context(dist.get_rank(), dist.get_world_size(), dev)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively here: CUDA with bf16, or a CPU with AVX512-BF16 / AMX (where oneDNN
    multiplies bf16 3-4x faster than fp32; without them bf16 is emulated and slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The training matmuls' dtype for TrainConfig.precision (auto | bf16 | fp32) on `device`."""
    if precision == "fp32" or (precision == "auto" and not native_bf16(device)):
        return torch.float32
    if precision == "bf16" and device.type == "cpu" and not native_bf16(device):
        raise ValueError("precision bf16 asked for, but this CPU has no native bf16 (AVX512-BF16 or AMX): it would "
                         "run slower than fp32; use --set precision=fp32 (or auto)")
    return torch.bfloat16


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()


def mean_over_ranks(ctx: Context, values: list[float]) -> list[float]:
    """Average floats across processes (for logging)."""
    if not ctx.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return (t / ctx.world).tolist()


class KDStep(nn.Module):
    """The FSDP2 root: forward(ids) = the KD loss of the student against the (unregistered) teacher."""

    def __init__(self, student: nn.Module, teacher: nn.Module, loss_fn, shard_teacher: bool = False):
        super().__init__()
        self.student = student
        if shard_teacher:
            self.teacher = teacher  # a submodule: sharded with the rest
        else:
            object.__setattr__(self, "teacher", teacher)  # not a submodule: replicated, never sharded
        object.__setattr__(self, "_loss_fn", loss_fn)

    def forward(self, input_ids: torch.Tensor):
        return self._loss_fn(self.student, self.teacher, input_ids)


def shard(step: KDStep, ctx: Context) -> KDStep:
    """fully_shard each decoder layer of the student (and of the teacher if it is a submodule), then the
    KDStep root (in place)."""
    from torch.distributed.fsdp import fully_shard

    models = [step.student] + [m for n, m in step.named_children() if n == "teacher"]
    for model in models:
        for layer in arch.of(model).layers(model):
            fully_shard(layer)
    fully_shard(step)
    return step


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_, returning a float (DTensor norms are gathered)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)
