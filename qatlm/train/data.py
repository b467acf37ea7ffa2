"""Training text -> packed token blocks [N, seq_len], with a deterministic held-out split.

Sources: .txt files (one document each), .jsonl (a "text" field, or chat "messages" rendered with the
tokenizer's chat template), .parquet (a "text" column); a directory means every such file in it, sorted.
Each document is tokenized once (BOS first when the tokenizer has one, EOS last), the stream is cut into
blocks of seq_len whose first token is replaced by BOS, and a seeded permutation sets heldout_fraction of the blocks aside. Token ids are cached
per file (keyed by the file's content and the tokenizer) so a resumed or repeated run does not re-tokenize.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_file

SUFFIXES = (".txt", ".jsonl", ".parquet")


def expand(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix in SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"{p}: no such file or directory (training data: {', '.join(SUFFIXES)} files or folders)")
    if not files:
        raise ValueError(f"no training files ({', '.join(SUFFIXES)}) in {paths}; give --data FILES_OR_DIRS")
    return files


def documents(path: Path, tokenizer) -> list[str]:
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not JSON ({e})") from None
            if "text" in row:
                docs.append(row["text"])
            elif "messages" in row:
                docs.append(tokenizer.apply_chat_template(row["messages"], tokenize=False))
            else:
                raise ValueError(f"{path}:{i}: a JSONL row needs 'text' or 'messages'")
        return docs
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise ValueError(f"{path}: no 'text' column (columns: {table.column_names})")
        return [t for t in table.column("text").to_pylist() if t]
    try:
        return [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None


def tokenize_file(path: Path, tokenizer, cache: Path | None) -> np.ndarray:
    key = hashlib.sha256(path.read_bytes() + str(getattr(tokenizer, "name_or_path", "")).encode()
                         + str(len(tokenizer)).encode()).hexdigest()[:32]
    cached = cache / f"{key}.npy" if cache else None
    if cached is not None and cached.is_file():
        return np.load(cached)
    ids: list[int] = []
    for doc in documents(path, tokenizer):
        if tokenizer.bos_token_id is not None:
            ids.append(tokenizer.bos_token_id)
        ids += tokenizer(doc, add_special_tokens=False).input_ids
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    arr = np.asarray(ids, dtype=np.int64)
    if cached is not None:
        save_npy(cached, arr)
    return arr


def save_npy(path: Path, arr: np.ndarray) -> None:
    """np.save, atomically."""
    with atomic_file(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, arr)


def load_blocks(paths: list[str], tokenizer, seq_len: int, heldout_fraction: float = 0.05, seed: int = 0,
                cache: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train blocks, held-out blocks), LongTensors [n, seq_len]."""
    from tqdm import tqdm

    files = expand(paths)
    stream = np.concatenate([tokenize_file(f, tokenizer, cache) for f in tqdm(files, desc="tokenize", unit="file",
                                                                             disable=len(files) < 4)])
    return blocks_from_stream(stream, tokenizer, seq_len, heldout_fraction, seed, f"in {len(files)} files")


def blocks_from_stream(stream: np.ndarray, tokenizer, seq_len: int, heldout_fraction: float = 0.05, seed: int = 0,
                       where: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """A token stream -> (train blocks, held-out blocks) [n, seq_len], BOS-first, seeded split."""
    n = len(stream) // seq_len
    if n < 2:
        raise ValueError(f"{len(stream)} tokens {where}: fewer than 2 blocks of seq_len {seq_len}; "
                         "give more text or a smaller seq_len")
    blocks = torch.from_numpy(stream[: n * seq_len].reshape(n, seq_len).copy())
    if tokenizer.bos_token_id is not None:  # every block starts like a document (llama-perplexity does the same
        blocks[:, 0] = tokenizer.bos_token_id  # to its chunks); Gemma in particular degrades badly without BOS
    perm = np.random.default_rng(seed).permutation(n)
    n_held = max(1, int(round(n * heldout_fraction))) if heldout_fraction > 0 else 0
    held, train = perm[:n_held], np.sort(perm[n_held:])
    return blocks[torch.from_numpy(train)], blocks[torch.from_numpy(np.sort(held))]
