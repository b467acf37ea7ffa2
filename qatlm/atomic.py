"""Outputs that never end half-written: every file and directory qatlm writes goes through here.

    with atomic_file("out.gguf") as tmp:        # write to tmp (a path beside the target) ...
        write_something(tmp)                    # ... renamed to out.gguf only if the block completes
    atomic_write_text("config.yaml", text)
    with atomic_dir("qat-hf") as tmp:           # a directory, swapped in whole (the old one kept until then)
        save_files(tmp)

The temporary name starts with "." and ends with ".partial" in the target's own directory (so the rename is
atomic: same file system), data is fsync'ed before the rename, and on any error (a full disk, Ctrl-C) the
temporary is removed and an existing target is left untouched. A full disk is reported naming the target.
A process killed outright (kill -9, power loss) cannot remove its temporary, so the name carries the host and
process id (`.out.gguf.HOST-PID.x1y2.partial`) and the next write to the same target removes those of processes
that are gone (and, from older versions, nameless ones over an hour old).

A target that is a symbolic link is written through: the file (or directory) it points to is replaced and the
link is kept. A target that exists as the wrong kind (a directory where a file is written, a FIFO or device)
is refused with a message naming it.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import stat
import tempfile
import time
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


def _owner() -> str:
    """HOST-PID of this process, as it appears in its temporary names."""
    return f"{re.sub(r'[^A-Za-z0-9_-]', '_', socket.gethostname())}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def clean_stale(path: Path) -> None:
    """Remove the temporaries of earlier writes of `path` whose process is gone (killed before cleaning up)."""
    host = _owner().rsplit("-", 1)[0]
    pattern = re.compile(r"^\." + re.escape(path.name) + r"\.(?:(.+)-(\d+)\.)?[A-Za-z0-9_]+\.partial$")
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return
    for f in entries:
        m = pattern.match(f.name)
        if m is None:
            continue
        if m.group(2) is not None:
            stale = m.group(1) == host and int(m.group(2)) != os.getpid() and not _alive(int(m.group(2)))
        else:  # a name without the owner: written by an older qatlm
            try:
                stale = time.time() - f.lstat().st_mtime > 3600
            except OSError:
                continue
        if stale:
            if f.is_dir() and not f.is_symlink():
                shutil.rmtree(f, ignore_errors=True)
            else:
                f.unlink(missing_ok=True)


def _target(path: str | os.PathLike, want_dir: bool) -> Path:
    """The path to replace: a symbolic link is followed (written through); the wrong kind of entry is refused."""
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return path
    if want_dir and not stat.S_ISDIR(mode):
        raise ValueError(f"{path}: exists and is not a directory; give a directory path for this output (or remove "
                         "the file)")
    if not want_dir and not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO, socket or device"
        raise ValueError(f"{path}: is {kind}; give a file path for this output")
    return path


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` when the block completes."""
    path = _target(path, want_dir=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.{_owner()}.", suffix=".partial", dir=path.parent)
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
    path = _target(path, want_dir=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{_owner()}.", suffix=".partial", dir=path.parent))
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
