"""Training checkpoints: torch.distributed.checkpoint (DCP) directories that resume on any number of processes.

A run directory's `checkpoint/` holds the student's weights and the optimizer state (each process writes its
shards; loading reshards, so 2 -> 1 processes works: tested) plus state.pt (step, RNG state) from rank 0. The
same format serves single-process runs. It is written to `checkpoint.partial/` and swapped in whole by rank 0
(qatlm.atomic.swap_in), so an interrupted save leaves the previous checkpoint usable.
"""
from __future__ import annotations

import logging
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..atomic import old_name, swap_in
from ..sources import regular_file
from .dist import Context, barrier

CKPT = "checkpoint"


@contextmanager
def _quiet():
    """DCP warns that it runs single-process when no process group exists: that is intended here. Its logged
    tracebacks (a damaged .metadata: "falling back to rank local metadata") are silenced too: load_checkpoint
    reports the failure as one line."""
    log = logging.getLogger()  # DCP logs to the root logger
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            warnings.filterwarnings("ignore", message=".*assuming the intent is to.*")
            yield
    finally:
        log.setLevel(level)


def checkpoint_dir(run: Path) -> Path | None:
    """The complete checkpoint of a run directory, if any (a swap interrupted mid-way leaves the old one)."""
    for d in (Path(run) / CKPT, old_name(Path(run) / CKPT)):
        if (d / "state.pt").is_file():
            return d
    return None


def _state(ck: Path) -> dict:
    """state.pt of a checkpoint, checked: a damaged file is a ValueError naming it."""
    f = ck / "state.pt"
    regular_file(f, "a checkpoint's state.pt")
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors of a damaged file
        raise ValueError(f"{f}: cannot read the checkpoint state ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
                         "; the checkpoint is damaged: train again (or restore it)") from None
    if not isinstance(state, dict) or type(state.get("step")) is not int or state["step"] < 0 \
            or not isinstance(state.get("torch_rng"), torch.Tensor) or state["torch_rng"].dtype != torch.uint8:
        raise ValueError(f"{f}: not a qatlm checkpoint state (step, torch_rng); the checkpoint is damaged: train "
                         "again (or restore it)")
    return state


def checkpoint_step(run: Path) -> int:
    ck = checkpoint_dir(run)
    return _state(ck)["step"] if ck else 0


def save_checkpoint(run: Path, ctx: Context, student: nn.Module, opt, step: int) -> None:
    """DCP save of student + optimizer (each process its shards), plus state.pt (step, RNG) from rank 0."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp = run / (CKPT + ".partial")
    if ctx.main and tmp.exists():
        shutil.rmtree(tmp)
    barrier(ctx)
    msd, osd = get_state_dict(student, opt)
    try:
        with _quiet():
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
        barrier(ctx)
        if ctx.main:
            torch.save({"step": step, "torch_rng": torch.get_rng_state(), "world": ctx.world}, tmp / "state.pt")
            swap_in(tmp, run / CKPT)
    except Exception as e:  # a full disk surfaces from DCP / torch.save as RuntimeError("unexpected pos ...")
        if ctx.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(e, run, step) from None
    barrier(ctx)


def write_error(e: BaseException, run: Path, step: int) -> OSError:
    """The error for a checkpoint that could not be written: what happened, that the previous checkpoint is
    intact, and how to continue. A full disk is recognised by its errno or message, or by < 256 MB left."""
    import errno

    from ..teacher import one_line

    try:
        free = shutil.disk_usage(run).free
    except OSError:
        free = None
    full = ((isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left" in str(e)
            or (free is not None and free < 256 << 20))
    prev = checkpoint_dir(run)
    kept = (f"the step-{_state(prev)['step']} checkpoint in {prev} is untouched" if prev is not None
            else "no earlier checkpoint exists")
    what = (f"no space left ({free >> 20} MB free)" if full and free is not None else "no space left" if full
            else f"cannot write ({one_line(e)})")
    return OSError(errno.ENOSPC if full else errno.EIO,
                   f"{what} while saving the step-{step} checkpoint to {run / CKPT}; {kept}. "
                   + ("Free disk space" if full else "Check the disk")
                   + f", then run the same command again (or `qatlm train --resume {run}`) to continue from it")


def load_checkpoint(run: Path, student: nn.Module, opt=None) -> int:
    """Load the run's checkpoint into student (and opt), resharding to this job's processes. Returns the step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                         set_model_state_dict, set_state_dict)

    ck = checkpoint_dir(run)
    if ck is None:
        raise ValueError(f"{run}: no complete checkpoint ({CKPT}/ with state.pt); train first or check the path")
    for f in ck.iterdir():  # DCP opens every shard: a FIFO among them would block
        if not f.is_dir():
            regular_file(f, "a checkpoint file")
    state = _state(ck)
    try:
        with _quiet():
            if opt is not None:
                msd, osd = get_state_dict(student, opt)
                sd = {"model": msd, "optim": osd}
                dcp.load(sd, checkpoint_id=str(ck))
                set_state_dict(student, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
            else:
                sd = {"model": get_model_state_dict(student)}
                dcp.load(sd, checkpoint_id=str(ck))
                set_model_state_dict(student, sd["model"], options=StateDictOptions(strict=True))
    except (Exception, CheckpointException) as e:  # DCP's own types (CheckpointException is a BaseException)
        if isinstance(e, CheckpointException) and e.failures:  # its str() is a traceback: report the cause
            e = next(iter(e.failures.values()))[0]
        raise ValueError(f"{ck}: cannot load the checkpoint ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
                         "it is damaged or from another model/config: train again (or restore it)") from None
    try:
        torch.set_rng_state(state["torch_rng"])
    except RuntimeError as e:
        raise ValueError(f"{ck / 'state.pt'}: damaged RNG state ({e}); train again (or restore it)") from None
    return state["step"]
