"""Training text -> packed token blocks [N, seq_len], with a deterministic held-out split.

Sources: .txt files (one document each), .jsonl (a "text" field, or chat "messages" rendered with the
teacher's chat template: qatlm.train.chat), .parquet (a "text" column); a directory means every such file in it,
sorted. Each document is tokenized once (BOS first when the tokenizer has one, EOS last), the stream is cut into
blocks of seq_len whose first token is replaced by BOS, and a seeded permutation sets heldout_fraction of the blocks
aside. Token ids are cached per file (keyed by the file's content, how it is read (.txt / .jsonl / .parquet), the
tokenizer, its chat template and kd_on) so a resumed or repeated run does not re-tokenize. Every file is checked
to be a regular file before it is opened (a FIFO would block), and a bad row is an error naming the file and the
line.

kd_on="assistant" (chat JSONL only): which tokens an assistant turn produced travels with the tokens, in their
sign: such a token is stored as its id, every other one as -1 - id (a position is distilled when its next token
is an assistant token). Streams, blocks and heldout.pt keep that encoding, so packing, the held-out split and
batching need nothing else; `split_mask` turns blocks into (ids, mask) for the loss.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_file
from ..sources import regular_file
from .chat import chat_tokens, text_value

SUFFIXES = (".txt", ".jsonl", ".parquet")


def expand(paths: list[str]) -> list[Path]:
    """The training files: each path a file, or a directory meaning its .txt/.jsonl/.parquet files, sorted.
    Anything that is not a regular file (a FIFO, a socket, a device) is refused before it is opened."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix in SUFFIXES)
            for f in found:
                regular_file(f, f"training data ({', '.join(SUFFIXES)})")
            files += found
        else:
            if not os.path.lexists(p):
                raise ValueError(f"{p}: no such file or directory (training data: {', '.join(SUFFIXES)} files or "
                                 "folders)")
            regular_file(p, f"training data ({', '.join(SUFFIXES)} files or folders)")
            files.append(p)
    if not files:
        raise ValueError(f"no training files ({', '.join(SUFFIXES)}) in {paths}; give --data FILES_OR_DIRS")
    return files


def _jsonl(path: Path, tokenizer, kd_on: str = "all") -> list:
    raw = path.read_bytes()
    docs = []
    for i, bline in enumerate(raw.splitlines(), 1):
        where = f"{path}:{i}"
        try:
            line = bline.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: not UTF-8 (byte {e.start} of the line); convert the file to UTF-8") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e}); fix that row") from None
        except RecursionError:
            raise ValueError(f"{where}: JSON nested too deeply; fix that row") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: a JSONL row must be an object with 'text' or 'messages', got a "
                             f"{type(row).__name__}; fix that row")
        if "text" in row:
            if kd_on == "assistant":
                raise ValueError(f"{where}: a 'text' row has no assistant turns for --kd-on assistant; give chat "
                                 "rows ({\"messages\": [...]}) or use --kd-on all")
            docs.append(text_value(row["text"], where + ":"))
        elif "messages" in row:  # (token ids, assistant mask or None)
            docs.append(chat_tokens(tokenizer, row["messages"], where, kd_on == "assistant"))
        else:
            raise ValueError(f"{where}: a JSONL row needs 'text' or 'messages'")
    return docs


def documents(path: Path, tokenizer, kd_on: str = "all") -> list:
    """The file's documents: text (str), or for chat rows (token ids, per token: in an assistant turn)."""
    if path.suffix == ".jsonl":
        return _jsonl(path, tokenizer, kd_on)
    if kd_on == "assistant":
        raise ValueError(f"{path}: --kd-on assistant distills the assistant turns of chat JSONL ({{\"messages\": "
                         "[...]} rows); this text file has none. Give chat .jsonl files, or use --kd-on all")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow's ArrowInvalid and friends
            raise ValueError(f"{path}: not a readable parquet file ({type(e).__name__}: {e}); re-export it") from None
        if "text" not in table.column_names:
            raise ValueError(f"{path}: no 'text' column (columns: {table.column_names})")
        return [text_value(t, f"{path}: row {i}:") for i, t in enumerate(table.column("text").to_pylist()) if t]
    try:
        return [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); convert the file to UTF-8") from None


# bump when the way a file becomes tokens changes: cached ids from older rules are not reused
TOKENIZE_VERSION = 3  # 3: a chat template's own BOS is not doubled; kd_on


def reader_kind(path: Path) -> str:
    """How a file is read (documents()): part of the token cache key, so a .jsonl never reuses the ids of a
    .txt with the same bytes."""
    return {".jsonl": "jsonl", ".parquet": "parquet"}.get(path.suffix, "text")


def tokenize_file(path: Path, tokenizer, cache: Path | None, kd_on: str = "all") -> np.ndarray:
    """The file's token stream (assistant mode: sign-encoded, module docstring), from the cache when there."""
    kind = reader_kind(path)
    template = str(getattr(tokenizer, "chat_template", "")) if kind == "jsonl" else ""
    key = hashlib.sha256(f"qatlm-tokens v{TOKENIZE_VERSION} {kind} {kd_on}\n".encode() + path.read_bytes()
                         + str(getattr(tokenizer, "name_or_path", "")).encode()
                         + str(len(tokenizer)).encode() + template.encode()).hexdigest()[:32]
    cached = cache / f"{key}.npy" if cache else None
    if cached is not None and cached.is_file():
        return np.load(cached)
    ids: list[int] = []
    counted: list[bool] = []  # per token: in an assistant turn (kd_on="assistant")
    for doc in documents(path, tokenizer, kd_on):
        toks, mask = (tokenizer(doc, add_special_tokens=False).input_ids, None) if isinstance(doc, str) else doc
        if tokenizer.bos_token_id is not None:
            ids.append(tokenizer.bos_token_id)
            counted.append(False)
        ids += toks
        counted += mask if mask is not None else [False] * len(toks)
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
            counted.append(False)
    arr = np.asarray(ids, dtype=np.int64)
    if kd_on == "assistant":
        arr = np.where(np.asarray(counted, dtype=bool), arr, -1 - arr)
    if cached is not None:
        save_npy(cached, arr)
    return arr


def save_npy(path: Path, arr: np.ndarray) -> None:
    """np.save, atomically."""
    with atomic_file(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, arr)


def load_blocks(paths: list[str], tokenizer, seq_len: int, heldout_fraction: float = 0.05, seed: int = 0,
                cache: Path | None = None, kd_on: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """(train blocks, held-out blocks), LongTensors [n, seq_len] (kd_on="assistant": sign-encoded, see
    split_mask)."""
    from tqdm import tqdm

    files = expand(paths)
    stream = np.concatenate([tokenize_file(f, tokenizer, cache, kd_on)
                             for f in tqdm(files, desc="tokenize", unit="file", disable=len(files) < 4)])
    where = f"in {', '.join(map(str, files))}" if len(files) <= 3 else f"in {len(files)} files ({files[0]}, ...)"
    if kd_on == "assistant" and not (stream >= 0).any():
        raise ValueError(f"no assistant turns {where}: --kd-on assistant distills only the tokens of "
                         "'assistant' messages; add some, or use --kd-on all")
    return blocks_from_stream(stream, tokenizer, seq_len, heldout_fraction, seed, where)


def split_mask(blocks: torch.Tensor, kd_on: str = "all") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Blocks [B, T] -> (token ids [B, T], mask [B, T] bool: the token is an assistant turn's, or None when
    kd_on is "all"). Ids are stored as -1 - id where the mask is off (module docstring)."""
    if kd_on == "all":
        return blocks, None
    mask = blocks >= 0
    return torch.where(mask, blocks, -1 - blocks), mask


def held_out_count(n: int, heldout_fraction: float) -> int:
    """How many of n blocks are held out."""
    return max(1, int(round(n * heldout_fraction))) if heldout_fraction > 0 else 0


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
    n_held = held_out_count(n, heldout_fraction)
    held, train = perm[:n_held], np.sort(perm[n_held:])
    return blocks[torch.from_numpy(train)], blocks[torch.from_numpy(np.sort(held))]
