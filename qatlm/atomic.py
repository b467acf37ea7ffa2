"""Outputs that never end half-written: every file and directory qatlm writes goes through here.

    with atomic_file("out.gguf") as tmp:        # write to tmp (a path beside the target) ...
        write_something(tmp)                    # ... renamed to out.gguf only if the block completes
    atomic_write_text("config.yaml", text)
    with atomic_dir("qat-hf") as tmp:           # a directory, swapped in whole (the old one kept until then)
        save_files(tmp)

The temporary name starts with "." and ends with ".partial" in the target's own directory (so the rename is
atomic: same file system), data is fsync'ed before the rename, and on any error (a full disk, Ctrl-C) the
temporary is removed and an existing target is left untouched. A full disk is reported naming the target.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _fsync(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _explain(e: BaseException, target: Path) -> BaseException:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return OSError(e.errno, f"no space left while writing {target}; free disk space and retry "
                                "(any earlier file at that path is untouched)")
    return e


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` when the block completes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file ordinary permissions
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        err = _explain(e, path)
        if err is e:
            raise
        raise err from e


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


@contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; it becomes `path` when the block completes.

    An existing `path` is moved aside (`.NAME.old`) and removed only after the new one is in place. With
    replace=False an existing complete `path` (e.g. written meanwhile by another process) is kept instead."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield tmp
        if path.exists() and not replace:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        swap_in(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        err = _explain(e, path)
        if err is e:
            raise
        raise err from e


def old_name(path: Path) -> Path:
    """Where swap_in keeps the previous `path` until the new one is in place."""
    return path.with_name(f".{path.name}.old")


def swap_in(tmp: Path, path: Path) -> None:
    """Make the complete directory `tmp` be `path` (fsync'ed first); an existing `path` is moved to
    old_name(path) and removed only once the new one is in place (a crash in between leaves one of them)."""
    for f in tmp.rglob("*"):
        if f.is_file():
            _fsync(f)
    old = old_name(path)
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """A matplotlib figure as PNG, atomically."""
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return Path(path)
