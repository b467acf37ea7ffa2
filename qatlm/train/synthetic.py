"""Data-free distillation: training text sampled from the teacher itself.

    qatlm train --teacher bundled --data-free 64 --plan q4_0 --steps 100 --out runs/df

When no corpus is at hand, the teacher writes one: `n` sequences sampled from BOS with plain ancestral
sampling (temperature 1, no top-k/top-p: the teacher's own distribution, which is what KD matches), each
continued to seq_len tokens (an EOS ends the document and a new one starts from BOS). The stream is packed
into BOS-first blocks like any corpus. Sampling is seeded (and batched, so on CPU it is reproducible for
the same batch size, dtype and threads), and the tokens are saved once in the run directory (synthetic.npy,
written atomically) so a resumed run trains on the same text.

Speed: one decode step of a small model costs little beyond its output projection (Gemma 3 270M: 262k x 640,
62% of a token's FLOPs) and per-step overhead, so sequences are decoded 64 at a time with a KV cache, and the
matmuls run in the training precision (bf16 where the CPU has native bf16: the distribution sampled is the one
the student is trained against). `benchmarks/sample_speed.py` measures it against the former 8-at-a-time fp32
loop. This trades the cost of generation for independence from any dataset, and trains on the teacher's
general distribution rather than one domain.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from .data import save_npy


@torch.no_grad()
def sample_stream(model, tokenizer, n: int, seq_len: int, seed: int = 0, batch: int = 64,
                  device: torch.device | str = "cpu", progress: bool = True,
                  dtype: torch.dtype = torch.float32) -> np.ndarray:
    """n * seq_len token ids sampled from the teacher: BOS, then tokens until EOS or seq_len, repeated.
    dtype: the matmuls' dtype (bf16 under autocast); the softmax and sampling are fp32."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None:
        raise ValueError("data-free distillation needs a tokenizer with a BOS token to start sampling from")
    gen = torch.Generator(device=device).manual_seed(seed)
    out: list[np.ndarray] = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n * seq_len, desc="sample from teacher", unit="tok", unit_scale=True)
    model.eval()
    with _cached_casts(model, device, dtype):
        for a in range(0, n, batch):
            out.append(_sample_batch(model, min(batch, n - a), seq_len, bos, eos, gen, device, bar))
    if bar is not None:
        bar.close()
    return np.concatenate(out).reshape(-1)


@contextlib.contextmanager
def _cached_casts(model, device, dtype):
    """One autocast region around all decode steps, with the (frozen) weights marked as requiring grad so that
    autocast's cast cache keeps their bf16 copies (it caches leaf tensors that require grad only): otherwise every
    decode step converts all weights again, the 262k x 640 vocabulary matrix included. No autograd graph is
    built (torch.no_grad); the flags are restored."""
    if dtype == torch.float32:
        yield
        return
    params = [p for p in model.parameters() if not p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.autocast(torch.device(device).type, dtype=dtype):
            yield
    finally:
        for p in params:
            p.requires_grad_(False)


def _draw(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One token per row of probs [b, V] by inverse-CDF sampling (one uniform per row against the fp64 cumulative
    sum): the same distribution as torch.multinomial, whose exponential-race method draws V random numbers per
    row (most of a decode step's time at a 262k vocabulary)."""
    cdf = probs.double().cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=gen, dtype=torch.float64, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[1] - 1)


def _sample_batch(model, b: int, seq_len: int, bos: int, eos, gen, device, bar) -> np.ndarray:
    """b sequences of seq_len tokens, decoded together with a KV cache: [b, seq_len] int64."""
    ids = torch.full((b, 1), bos, dtype=torch.long, device=device)
    past, cur = None, ids
    if bar is not None:
        bar.update(b)  # the BOS of each sequence
    for _ in range(seq_len - 1):
        o = model(input_ids=cur, past_key_values=past, use_cache=True)
        past = o.past_key_values
        probs = torch.softmax(o.logits[:, -1].float(), dim=-1)
        nxt = _draw(probs, gen)
        if eos is not None:  # an ended document restarts from BOS (the stream stays one packed text)
            nxt = torch.where(cur[:, -1:] == eos, torch.full_like(nxt, bos), nxt)
        ids = torch.cat([ids, nxt], dim=1)
        cur = nxt
        if bar is not None:
            bar.update(b)
    return ids.cpu().numpy()


def synthetic_stream(run: Path, model, tokenizer, n: int, seq_len: int, seed: int, device="cpu",
                     progress: bool = True, dtype: torch.dtype = torch.float32) -> np.ndarray:
    """The run's teacher-generated token stream: sampled once, then read from run/synthetic.npy."""
    path = run / "synthetic.npy"
    if path.is_file():
        arr = np.load(path)
        if arr.size == n * seq_len:
            return arr
    arr = sample_stream(model, tokenizer, n, seq_len, seed, device=device, progress=progress, dtype=dtype)
    save_npy(path, arr)
    return arr
