"""llama-imatrix's statistics from a PyTorch model: per weight, the sum over tokens of each input column's
squared activation, and the token count.

    chunks = imatrix_chunks(token_ids, n_ctx=512, max_chunks=128, bos=tok.bos_token_id)
    names = {"model.layers.0.self_attn.q_proj": "blk.0.attn_q.weight", ...}   # nn.Linear -> GGUF name
    im = collect(model, names, chunks)          # an Imatrix; write_imatrix(im, "imatrix.gguf")

What llama-imatrix does (tools/imatrix/imatrix.cpp, `collect_imatrix` / `compute_imatrix`), and so what this does:
- one tokenization of the text (BOS first when the model adds one), cut into consecutive n_ctx windows whose
  first token is REPLACED by BOS (as llama-perplexity); every position of a chunk is evaluated, the KV cache is
  cleared per chunk;
- at every matrix multiplication whose weight is named `blk.*` (the output head only with --process-output,
  token_embd is a lookup), for each input column j: in_sum2[j] += x_j^2 over the tokens, count += n_tokens;
  batches of fewer than 16 tokens are skipped. The activations are what enters each matmul: the RMS-normed
  hidden state for q/k/v_proj and gate/up_proj, the attention output for o_proj, act(gate) * up for down_proj.
  Here those are the inputs of the nn.Linear modules, caught with forward pre-hooks.

Precision: fp32 by default (llama-imatrix on an F32 model); `precision="bf16"` runs the body under bf16 autocast
(the squares still summed in fp32, accumulated in fp64): 1.6-1.8x faster on a CPU with native bf16 (Gemma 3
270M, 12 chunks: 6.2 s against 9.8-11.3 s), each tensor's statistics within ~1% (relative L2) of the fp32 ones
(tests/test_imatrix.py holds both to llama-imatrix's within 2%). `qatlm run` uses it where bf16 is native.

Why it is fast: only the transformer body runs (`model.model`), never the output head, whose
[n_tokens, n_vocab] logits dominate the cost for a large vocabulary (Gemma 3: 262k); llama-imatrix computes them
for its perplexity printout. The per-column sums are x.pow(2).sum(0) per call (fp32, pairwise), accumulated in
fp64 across calls.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .file import Imatrix

MIN_TOKENS = 16  # imatrix.cpp: "why are small batches ignored (<16 tokens)?" -- it skips them, and so do we


def imatrix_chunks(tokens: Sequence[int], n_ctx: int = 512, max_chunks: int | None = None,
                   bos: int | None = None, data: str = "the text") -> list[list[int]]:
    """llama-imatrix's chunks of one tokenization: floor(N / n_ctx) windows (capped by max_chunks), each with
    its first token replaced by `bos` (None: the model adds no BOS), as llama-perplexity cuts them. Needs
    N >= 2 * n_ctx, as llama-imatrix."""
    from ..eval.perplexity import chunks

    if n_ctx < MIN_TOKENS:
        raise ValueError(f"n_ctx {n_ctx}: llama-imatrix collects nothing from batches under {MIN_TOKENS} tokens; "
                         "use a context of at least 16 (512 is llama-imatrix's default)")
    return chunks(list(tokens), n_ctx, max_chunks, bos, data, tool="imatrix")


def _linear(model: torch.nn.Module, name: str) -> torch.nn.Linear:
    try:
        m = model.get_submodule(name)
    except AttributeError:
        m = None
        if name.endswith(".weight"):  # a parameter name given for its module
            return _linear(model, name[: -len(".weight")])
    if not isinstance(m, torch.nn.Linear):
        what = "no such module" if m is None else f"a {type(m).__name__}, not an nn.Linear"
        raise ValueError(f"{name!r}: {what} in {type(model).__name__}; pass the module names of its "
                         "nn.Linear layers (e.g. 'model.layers.0.self_attn.q_proj')")
    return m


def collect(model: torch.nn.Module, names: dict[str, str], chunks: list[list[int]], progress: bool = True,
            datasets: Sequence[str] = (), process_output: bool = False, precision: str = "fp32") -> Imatrix:
    """Run `model` (a transformers causal LM) on each chunk and return llama-imatrix's statistics for the
    nn.Linear layers in `names` (module name -> GGUF tensor name). Only `blk.*` tensors are collected, as
    llama-imatrix does by default (`output.weight` too with process_output=True: then the full model runs).
    precision: "fp32" or "bf16" (the forward under bf16 autocast; see the module docstring).

        im = collect(model, {"model.layers.0.mlp.down_proj": "blk.0.ffn_down.weight"}, chunks)
        im.weights("blk.0.ffn_down.weight")   # float32 [intermediate_size]
    """
    if not chunks:
        raise ValueError("no chunks to collect on; see imatrix_chunks()")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision {precision!r}: use fp32 or bf16")
    n_ctx = len(chunks[0])
    if any(len(c) != n_ctx for c in chunks):
        raise ValueError(f"chunks of different lengths ({sorted({len(c) for c in chunks})}); llama-imatrix's chunks "
                         "are all n_ctx tokens (imatrix_chunks)")
    wanted = {k: v for k, v in names.items() if v.startswith("blk.") or (process_output and v == "output.weight")}
    if not wanted:
        raise ValueError("none of the names maps to a blk.* tensor; nothing to collect")
    layers = {gguf: _linear(model, mod) for mod, gguf in wanted.items()}
    if len(set(layers)) != len(wanted):
        raise ValueError("two modules map to the same GGUF name")

    device = next(model.parameters()).device
    sums = {g: torch.zeros(m.in_features, dtype=torch.float64, device=device) for g, m in layers.items()}
    counts: dict[str, int] = dict.fromkeys(layers, 0)

    def hook_for(gguf: str):
        def hook(module, args):
            x = args[0]
            x = x.reshape(-1, x.shape[-1])  # (tokens, in_features)
            if x.shape[0] < MIN_TOKENS:
                return
            sums[gguf] += x.float().pow(2).sum(0).to(torch.float64)  # (in_features,)
            counts[gguf] += x.shape[0]
        return hook

    handles = [m.register_forward_pre_hook(hook_for(g)) for g, m in layers.items()]
    # the body alone when the head is not collected: no [n_ctx, n_vocab] logits
    run = model if process_output or not isinstance(getattr(model, "model", None), torch.nn.Module) else model.model
    was_training = model.training
    model.eval()
    try:
        it = chunks
        if progress:
            from tqdm import tqdm
            it = tqdm(chunks, desc="imatrix", unit="chunk")
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        with torch.inference_mode(), autocast:
            for c in it:
                run(input_ids=torch.tensor([c], device=device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    never = [g for g, n in counts.items() if n == 0]
    if never:
        raise ValueError(f"no activations reached {len(never)} layer(s) ({', '.join(never[:5])}"
                         f"{' ...' if len(never) > 5 else ''}): are these modules used by the model's forward?")
    im = Imatrix(datasets=list(datasets), chunk_count=len(chunks), chunk_size=n_ctx)
    for g in sorted(layers):
        if not torch.isfinite(sums[g]).all():
            raise ValueError(f"non-finite activations in {g} (overflow?); llama-imatrix stops on these too. "
                             "Run the model in float32.")
        im.add(g, sums[g].to(torch.float32).cpu().numpy(), float(counts[g]))
    return im
