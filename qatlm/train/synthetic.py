"""Data-free distillation: training text sampled from the teacher itself.

    qatlm train --teacher bundled --data-free 64 --plan q4_0 --steps 100 --out runs/df

When no corpus is at hand, the teacher writes one: `n` sequences sampled from BOS with plain ancestral
sampling (temperature 1, no top-k/top-p: the teacher's own distribution, which is what KD matches), each
continued to seq_len tokens (an EOS ends the document and a new one starts from BOS). The stream is packed
into BOS-first blocks like any corpus. Sampling is seeded (and batched, so on CPU it is reproducible for
the same batch size and threads), and the tokens are saved once in the run directory (synthetic.npy,
written atomically) so a resumed run trains on the same text.

This trades the cost of generation (the teacher's decode speed; ~1-2 minutes for 64 x 256 tokens of Gemma 3
270M on 2 CPU cores) for independence from any dataset, and trains on the teacher's general distribution
rather than one domain.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data import save_npy


@torch.no_grad()
def sample_stream(model, tokenizer, n: int, seq_len: int, seed: int = 0, batch: int = 8,
                  device: torch.device | str = "cpu", progress: bool = True) -> np.ndarray:
    """n * seq_len token ids sampled from the teacher: BOS, then tokens until EOS or seq_len, repeated."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None:
        raise ValueError("data-free distillation needs a tokenizer with a BOS token to start sampling from")
    gen = torch.Generator(device=device).manual_seed(seed)
    out: list[np.ndarray] = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n, desc="sample from teacher", unit="seq")
    model.eval()
    for a in range(0, n, batch):
        b = min(batch, n - a)
        ids = torch.full((b, 1), bos, dtype=torch.long, device=device)
        past, cur = None, ids
        for _ in range(seq_len - 1):
            o = model(input_ids=cur, past_key_values=past, use_cache=True)
            past = o.past_key_values
            probs = torch.softmax(o.logits[:, -1].float(), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=gen)
            if eos is not None:  # an ended document restarts from BOS (the stream stays one packed text)
                nxt = torch.where(cur[:, -1:] == eos, torch.full_like(nxt, bos), nxt)
            ids = torch.cat([ids, nxt], dim=1)
            cur = nxt
        out.append(ids.cpu().numpy())
        if bar is not None:
            bar.update(b)
    if bar is not None:
        bar.close()
    return np.concatenate(out).reshape(-1)


def synthetic_stream(run: Path, model, tokenizer, n: int, seq_len: int, seed: int, device="cpu",
                     progress: bool = True) -> np.ndarray:
    """The run's teacher-generated token stream: sampled once, then read from run/synthetic.npy."""
    path = run / "synthetic.npy"
    if path.is_file():
        arr = np.load(path)
        if arr.size == n * seq_len:
            return arr
    arr = sample_stream(model, tokenizer, n, seq_len, seed, device=device, progress=progress)
    save_npy(path, arr)
    return arr
