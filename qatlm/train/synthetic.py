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
the student is trained against). The attention of a decode step stacks the query heads that share a key/value
head instead of repeating the cache per head (_decode_attention), and the draw sums the probabilities in two
levels (_draw). `python benchmarks/train_speed.py --only-sampling` measures it against the former 8-at-a-time
fp32 loop. This trades the cost of generation for independence from any dataset, and trains on the teacher's
general distribution rather than one domain.
"""
from __future__ import annotations

import contextlib
import inspect
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
    with _cached_casts(model, device, dtype), _decode_attention_for(model):
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


DRAW_BLOCK = 512  # vocabulary entries per block of the two-level draw


def _draw(logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One token per row of fp32 logits [b, V], drawn from softmax(logits) by inverse-CDF sampling: one uniform per
    row against fp64 cumulative sums (torch.multinomial's exponential race draws V random numbers per row, most of
    a decode step's time at a 262k vocabulary). Two levels, so no [b, V] fp64 array is built: the unnormalized
    exp(logits - max) summed per block of DRAW_BLOCK entries, the block found on their cumulative sum, then the
    token on the chosen block's own cumulative sum. The distribution of one cumulative sum over softmax (up to the
    fp32 rounding of the probabilities, as softmax's own), without softmax's division pass or a [b, V] fp64 copy;
    tests/test_train.py checks the frequencies against softmax."""
    b, v = logits.shape
    e = torch.exp(logits - logits.amax(-1, keepdim=True))
    nb = -(-v // DRAW_BLOCK)
    if nb * DRAW_BLOCK != v:  # zero-probability padding at the end
        e = torch.nn.functional.pad(e, (0, nb * DRAW_BLOCK - v))
    e = e.view(b, nb, DRAW_BLOCK)
    cdf = e.sum(-1).double().cumsum_(-1)  # [b, nb]: fp32 sums of 512 terms, then fp64 across blocks
    u = torch.rand(b, 1, generator=gen, dtype=torch.float64, device=logits.device) * cdf[:, -1:]
    k = torch.searchsorted(cdf, u, right=True).clamp_(max=nb - 1)  # [b, 1]
    below = torch.where(k > 0, cdf.gather(1, (k - 1).clamp(min=0)), torch.zeros_like(u))
    inner = e[torch.arange(b, device=e.device), k[:, 0]].double().cumsum_(-1)  # [b, DRAW_BLOCK]
    j = torch.searchsorted(inner, u - below, right=True).clamp_(max=DRAW_BLOCK - 1)
    return (k * DRAW_BLOCK + j).clamp_(max=v - 1)


def _decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **_):
    """transformers' eager attention (same math: scores, softcap, mask, fp32 softmax, weighted values) for
    decoding, without repeat_kv: the query heads that share a key/value head are stacked as extra query rows
    ([b, kv heads, group * q_len, d]), so a 4:1 grouped-query model no longer copies its whole cache 4 times
    per layer and step (half of a decode step's time with a 256-token cache)."""
    b, hq, s, d = query.shape
    hkv = key.shape[1]
    g = hq // hkv
    scores = torch.matmul(query.reshape(b, hkv, g * s, d), key.transpose(2, 3))
    scores = scores * (module.head_dim ** -0.5 if scaling is None else scaling)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:  # [b, 1, s, L] -> the stacked rows
        m = attention_mask[:, :, :, : key.shape[-2]]
        scores = (scores.view(b, hkv, g, s, -1) + m.unsqueeze(2)).view(b, hkv, g * s, -1)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, value).view(b, hq, s, -1)
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def _decode_attention_for(model):
    """Decode with _decode_attention (registered with transformers' attention interface), restored afterwards.
    PyTorch's CPU flash-attention kernel (sdpa) took ~7 ms per layer call with one query per sequence."""
    before = getattr(model.config, "_attn_implementation", None)
    if before is None or not hasattr(model, "set_attn_implementation"):
        yield
        return
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    AttentionInterface.register("qatlm_decode", _decode_attention)
    AttentionMaskInterface.register("qatlm_decode", eager_mask)
    model.set_attn_implementation("qatlm_decode")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def decode_step(model, tokens: torch.Tensor, cache):
    """One step of decoding with a KV cache: (the last position's logits [b, V], the cache to pass next; None
    to start). The cache is `cache` in the forward and output from transformers 5.24 on (which deprecates
    `past_key_values`, to be removed in 5.40), `past_key_values` before."""
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    o = model(input_ids=tokens, use_cache=True, **{key: cache})
    return o.logits[:, -1], o[key]


def _sample_batch(model, b: int, seq_len: int, bos: int, eos, gen, device, bar) -> np.ndarray:
    """b sequences of seq_len tokens, decoded together with a KV cache: [b, seq_len] int64."""
    ids = torch.full((b, 1), bos, dtype=torch.long, device=device)
    past, cur = None, ids
    if bar is not None:
        bar.update(b)  # the BOS of each sequence
    for _ in range(seq_len - 1):
        logits, past = decode_step(model, cur, past)
        nxt = _draw(logits.float(), gen)
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
