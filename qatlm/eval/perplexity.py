"""Perplexity and KL-divergence measured the way llama.cpp's llama-perplexity measures them.

    qatlm eval model.gguf --data tempest.txt --chunks 6                   # llama.cpp engine (default)
    qatlm eval bundled --data tempest.txt --engine torch --plan q4_0      # torch engine, simulating Q4_0
    qatlm eval q4.gguf --data tempest.txt --kld-base teacher.gguf

The algorithm (tools/perplexity/perplexity.cpp): read the file verbatim, strip one trailing newline,
tokenize once (BOS first when the model adds one); n_chunk = floor(N / n_ctx), capped by --chunks; chunk i
is tokens[i*n_ctx : (i+1)*n_ctx] with its FIRST token replaced by BOS; each chunk is evaluated from an
empty cache; positions j = n_ctx/2 .. n_ctx-2 predict token j+1, so 255 tokens per chunk at n_ctx 512;
nll = logsumexp(logits) - logit[target], summed in double; PPL = exp(mean nll), and
error = PPL * sqrt((mean(nll^2) - mean(nll)^2) / (count - 1)).

KLD per token, as llama-perplexity --kl-divergence: sum over the vocabulary of p_base * (log p_base - log p),
with the base's log-probabilities below -16 left out (llama.cpp stores base logits compactly and drops
those). Both models are evaluated on the same tokens chunk by chunk, so no logits file is needed.

Engines: `torch` runs any model qatlm loads (optionally with a type plan simulated by fake quant, bit-exact
with the exported weights); `llama.cpp` runs a GGUF through llama-cpp-python. llama.cpp on CPU also
quantizes activations inside its matmuls and uses an fp16 GELU table, so the two engines agree on the
tokens and the scoring but not bit for bit on logits: expect PPL within ~1%.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

PERCENTILES = [("max", 100.0), ("99.9%", 99.9), ("99%", 99.0), ("95%", 95.0), ("90%", 90.0), ("median", 50.0),
               ("10%", 10.0), ("5%", 5.0), ("1%", 1.0), ("0.1%", 0.1), ("min", 0.0)]


def read_text(path: str | Path) -> str:
    """The file verbatim as UTF-8, one trailing newline stripped (as llama-perplexity does)."""
    from ..sources import regular_file

    path = Path(path)
    regular_file(path, "a UTF-8 text file")  # a FIFO would block the read forever
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 4]!r}); "
                         "convert it, e.g. iconv -f latin1 -t utf-8") from None
    if text.endswith("\n"):
        text = text[:-1]
    if not text.strip():
        raise ValueError(f"{path}: the file is empty; perplexity needs text")
    return text


def chunks(tokens: list[int], n_ctx: int, max_chunks: int | None, bos: int | None, data: str = "",
           tool: str = "perplexity") -> list[list[int]]:
    """llama-perplexity's chunks (llama-imatrix cuts the same way): consecutive n_ctx windows, the first token
    of each replaced by BOS."""
    if n_ctx < 4 or n_ctx % 2:
        raise ValueError(f"--ctx must be an even number >= 4, got {n_ctx}")
    if len(tokens) < 2 * n_ctx:
        raise ValueError(f"{data}: {len(tokens)} tokens, but {tool} at --ctx {n_ctx} needs at least "
                         f"{2 * n_ctx} (2 x ctx, like llama-{tool}); use more text or a smaller --ctx")
    n = len(tokens) // n_ctx
    if max_chunks:
        n = min(n, max_chunks)
    out = []
    for i in range(n):
        c = list(tokens[i * n_ctx:(i + 1) * n_ctx])
        if bos is not None:
            c[0] = bos
        out.append(c)
    return out


# ---- engines: each yields, per chunk, log-softmax rows for the scored positions [n_ctx/2 - 1, vocab] ----


def adds_bos(teacher) -> bool:
    """Whether llama.cpp puts BOS first: the GGUF's tokenizer.ggml.add_bos_token when the model came from one,
    else whether the Hugging Face tokenizer puts BOS first by itself."""
    tok = teacher.tokenizer
    if tok.bos_token_id is None:
        return False
    if teacher.gguf_path is not None:
        from ..gguf.io import field_value, open_gguf

        return bool(field_value(open_gguf(teacher.gguf_path)[1], "tokenizer.ggml.add_bos_token", False))
    ids = tok("a").input_ids
    return bool(ids) and ids[0] == tok.bos_token_id


def tokenize(teacher, text: str) -> tuple[list[int], int | None]:
    """One tokenization of a whole text as llama.cpp's tools do it: (token ids, BOS id or None)."""
    tok = teacher.tokenizer
    ids = tok(text, add_special_tokens=False).input_ids
    bos = tok.bos_token_id if adds_bos(teacher) else None
    return ([bos] + ids if bos is not None else ids), bos


class TorchEngine:
    """Any model qatlm loads; `plan` simulates a type plan with fake quant (in place on a copy)."""

    name = "torch"

    def __init__(self, model: str, plan: str | None = None, threads: int | None = None,
                 overrides: tuple[str, ...] = ()):
        from ..student.plan import apply_plan_
        from ..teacher import load_teacher

        if threads:
            torch.set_num_threads(threads)
        self.teacher = load_teacher(model)
        self.model = self.teacher.model.eval()
        if plan:
            apply_plan_(self.model, plan, overrides)
        self.tokenizer = self.teacher.tokenizer
        self.label = f"{model}" + (f" (torch, plan {plan})" if plan else " (torch)")

    def tokenize(self, text: str) -> tuple[list[int], int | None]:
        return tokenize(self.teacher, text)

    @torch.no_grad()
    def logprobs(self, chunk: list[int]) -> torch.Tensor:
        n = len(chunk)
        first = n // 2
        # only the scored positions get logits: never [n_ctx, vocab] for the whole chunk
        out = self.model(torch.tensor([chunk]), logits_to_keep=n - first, use_cache=False)
        logits = out.logits[0, :-1].to(torch.float32)  # positions first .. n-2
        return torch.log_softmax(logits, dim=-1)


class LlamaCppEngine:
    """A GGUF through llama-cpp-python (llama.cpp itself)."""

    name = "llama.cpp"

    def __init__(self, model: str, n_ctx: int, threads: int | None = None):
        import os

        try:
            import llama_cpp
        except ImportError:
            raise ValueError("the llama.cpp engine needs llama-cpp-python (pip install 'qatlm[llama]')") from None
        from ..gguf.io import validate
        from ..sources import gguf_path

        try:
            model = str(gguf_path(model))
        except ValueError as e:
            raise ValueError(f"{e} (the llama.cpp engine evaluates GGUF files; use --engine torch otherwise)") from None
        validate(model)
        try:
            # flash attention off: llama-perplexity's default (auto) turns it on for CPU, whose fp16 attention
            # moves PPL by ~0.5% (Gemma 3 270M Q4_0); `llama-perplexity -fa off` gives this engine's numbers
            self.llm = llama_cpp.Llama(model, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=False,
                                       flash_attn=False, n_threads=threads or os.cpu_count(), verbose=False)
        except Exception as e:  # llama.cpp reports load failures as a generic ValueError/RuntimeError
            raise ValueError(f"{model}: llama.cpp could not load this GGUF ({e})") from None
        self.label = f"{model} (llama.cpp)"
        self._lib = llama_cpp
        self._batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)

    def __del__(self):
        if getattr(self, "_batch", None) is not None:
            self._lib.llama_batch_free(self._batch)
            self._batch = None

    def tokenize(self, text: str) -> tuple[list[int], int | None]:
        add_bos = bool(self.llm.metadata.get("tokenizer.ggml.add_bos_token", "true") == "true")
        ids = self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)
        return ids, (self.llm.token_bos() if add_bos else None)

    def logprobs(self, chunk: list[int]) -> torch.Tensor:
        """Log-probabilities at positions n/2 .. n-2. As llama-perplexity does, one batch asks for the logits of
        positions >= n/2 only (llama-cpp-python's eval would compute and copy all n rows of the 262k-vocabulary
        head: 2x the head's work); the KV cache is cleared first, so each chunk starts empty."""
        lib, ctx, b, n = self._lib, self.llm.ctx, self._batch, len(chunk)
        first = n // 2
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        b.n_tokens = n
        for i, tok in enumerate(chunk):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, i, 1, i >= first
            b.seq_id[i][0] = 0
        if lib.llama_decode(ctx, b) != 0:
            raise RuntimeError(f"{self.label}: llama_decode failed on a chunk of {n} tokens")
        rows = np.ctypeslib.as_array(lib.llama_get_logits(ctx), shape=((n - first) * self.llm.n_vocab(),))
        logits = torch.from_numpy(rows).view(n - first, -1)[:-1]  # positions first .. n-2 (read before any decode)
        return torch.log_softmax(logits, dim=-1)


def make_engine(model: str, engine: str, n_ctx: int, plan: str | None = None, threads: int | None = None,
                overrides: tuple[str, ...] = ()):
    if engine == "torch":
        return TorchEngine(model, plan, threads, overrides)
    if engine == "llama.cpp":
        if plan:
            raise ValueError("--plan simulates quantization in the torch engine; for llama.cpp, quantize the GGUF "
                             "first (qatlm quantize) and evaluate that file")
        return LlamaCppEngine(model, n_ctx, threads)
    raise ValueError(f"unknown engine {engine!r}; use torch or llama.cpp")


# ---- statistics -----------------------------------------------------------------------------------


def _percentiles(v: np.ndarray) -> dict[str, float]:
    s = np.sort(v)
    return {name: float(s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]) for name, q in PERCENTILES}


@dataclass
class EvalResult:
    model: str
    data: str
    engine: str
    ctx: int
    n_chunks: int
    n_scored: int
    ppl: float
    ppl_err: float
    nll_mean: float
    seconds: float
    tokens_per_second: float
    chunk_ppl: list[float] = field(default_factory=list)
    kld: dict | None = None

    def line(self) -> str:
        s = f"PPL = {self.ppl:.4f} +/- {self.ppl_err:.4f}  ({self.n_chunks} chunks x {self.ctx}, {self.n_scored} scored " \
            f"tokens, {self.engine}, {self.tokens_per_second:.1f} tok/s)"
        if self.kld:
            k = self.kld
            s += (f"\nKLD = {k['kld_mean']:.6f} +/- {k['kld_err']:.6f}  same top p = {100 * k['same_top_p']:.3f}%  "
                  f"RMS dp = {100 * k['rms_dp']:.3f}%  PPL(base) = {k['ppl_base']:.4f}  ratio = {k['ppl_ratio']:.4f}")
        return s


def _ppl(nll: np.ndarray) -> tuple[float, float]:
    mean = float(nll.mean())
    ppl = math.exp(mean)
    var = float((nll.astype(np.float64) ** 2).mean()) - mean * mean
    return ppl, ppl * math.sqrt(max(var, 0.0) / max(1, len(nll) - 1))


def kld_stats(nll_q: np.ndarray, nll_b: np.ndarray, kld: np.ndarray, p_q: np.ndarray, p_b: np.ndarray,
              top_same: np.ndarray) -> dict:
    ppl_q, _ = _ppl(nll_q)
    ppl_b, _ = _ppl(nll_b)
    dp = p_q - p_b
    n = len(kld)
    k_mean = float(kld.mean())
    k_err = math.sqrt(max(float((kld ** 2).mean()) - k_mean ** 2, 0.0) / max(1, n - 1))
    d = nll_q - nll_b
    return {
        "ppl": ppl_q, "ppl_base": ppl_b, "ppl_ratio": ppl_q / ppl_b,
        "ln_ppl_ratio": float(d.mean()), "ln_ppl_ratio_err": math.sqrt(max(float((d ** 2).mean() - d.mean() ** 2), 0) / max(1, n - 1)),
        "nll_correlation": float(np.corrcoef(nll_q, nll_b)[0, 1]) if n > 1 else 1.0,
        "kld_mean": k_mean, "kld_err": k_err, "kld_percentiles": _percentiles(kld),
        "dp_mean": float(dp.mean()), "dp_err": math.sqrt(max(float((dp ** 2).mean() - dp.mean() ** 2), 0) / max(1, n - 1)),
        "dp_percentiles": _percentiles(dp), "rms_dp": math.sqrt(float((dp ** 2).mean())),
        "same_top_p": float(top_same.mean()), "n": n,
    }


def evaluate(model: str, data: str | Path, ctx: int = 512, chunks_cap: int | None = None,
             engine: str = "llama.cpp", plan: str | None = None, kld_base: str | None = None,
             threads: int | None = None, progress: bool = True, keep_kld_values: bool = False,
             overrides: tuple[str, ...] = ()) -> EvalResult:
    """Perplexity (and KLD against `kld_base`) of `model` on `data`, llama-perplexity style."""
    eng = make_engine(model, engine, ctx, plan, threads, overrides)
    base = make_engine(kld_base, engine, ctx, None, threads) if kld_base else None
    return evaluate_engines([eng], data, ctx, chunks_cap, base, progress, keep_kld_values)[0]


KLD_ROWS = 8  # rows of [rows, vocab] float64 temporaries at a time: 16 MB each at Gemma's 262k vocabulary


def kld_rows(lb: torch.Tensor, lp: torch.Tensor) -> np.ndarray:
    """KL(base || model) per row of fp32 log-probabilities [rows, vocab], in float64 and, like llama-perplexity's
    stored base logits, over the entries whose base log-probability is above -16. A few rows at a time: whole
    [255, 262144] float64 temporaries (~0.5 GB each, four per model and chunk) cost more time in fresh memory than
    in arithmetic."""
    out = np.empty(lb.shape[0])
    for a in range(0, lb.shape[0], KLD_ROWS):
        b64, p64 = lb[a:a + KLD_ROWS].double(), lp[a:a + KLD_ROWS].double()
        terms = b64.exp().mul_(b64 - p64).masked_fill_(b64 <= -16, 0.0)
        out[a:a + KLD_ROWS] = terms.sum(1).numpy()
    return out


def evaluate_engines(engines: list, data: str | Path, ctx: int, chunks_cap: int | None, base=None,
                     progress: bool = True, keep_kld_values: bool = False) -> list[EvalResult]:
    """Several models on the same chunks, side by side: the base (if any) is evaluated once per chunk and
    every model's KLD computed against it. Returns one EvalResult per engine (then the base's own, if any)."""
    text = read_text(data)
    tokens, bos = engines[0].tokenize(text)
    for e in engines[1:] + ([base] if base is not None else []):
        if e.tokenize(text)[0] != tokens:
            raise ValueError(f"{engines[0].label} and {e.label} tokenize {data} differently; comparing them needs "
                             "the same vocabulary")
    cs = chunks(tokens, ctx, chunks_cap, bos, str(data))
    n = len(engines)
    nll = [[] for _ in range(n + 1)]  # the last one: the base's
    kld, p_q, p_b, same = ([[] for _ in range(n)] for _ in range(4))
    secs = [0.0] * (n + 1)
    it: Iterator = iter(cs)
    if progress:
        from tqdm import tqdm
        it = tqdm(cs, desc=f"perplexity ({engines[0].name}, {n + (base is not None)} models)", unit="chunk")
    for c in it:
        targets = torch.tensor(c[ctx // 2 + 1:], dtype=torch.long)[:, None]  # tokens j+1 (never the BOS slot)
        if base is not None:
            t0 = time.perf_counter()
            lb = base.logprobs(c)  # fp32 [n/2 - 1, vocab]
            secs[n] += time.perf_counter() - t0
            lb_t = lb.gather(1, targets)[:, 0].double()
            nll[n].append((-lb_t).numpy())
            top_b = lb.argmax(1)
        for i, eng in enumerate(engines):
            t0 = time.perf_counter()
            lp = eng.logprobs(c)  # fp32 [n/2 - 1, vocab]
            secs[i] += time.perf_counter() - t0
            lp_t = lp.gather(1, targets)[:, 0].double()
            nll[i].append((-lp_t).numpy())
            if base is not None:
                kld[i].append(kld_rows(lb, lp))
                p_q[i].append(lp_t.exp().numpy())
                p_b[i].append(lb_t.exp().numpy())
                same[i].append((lp.argmax(1) == top_b).numpy())
        if progress:
            it.set_postfix(ppl=f"{math.exp(np.concatenate(nll[0]).mean()):.3f}")

    def result(eng, i: int, kd: dict | None) -> EvalResult:
        all_nll = np.concatenate(nll[i])
        ppl, err = _ppl(all_nll)
        chunk_ppl = [math.exp(float(r.mean())) for r in nll[i]]
        return EvalResult(eng.label, str(data), eng.name, len(cs[0]), len(cs), len(all_nll), ppl, err,
                          float(all_nll.mean()), secs[i], len(cs) * ctx / max(secs[i], 1e-9), chunk_ppl, kd)

    out = []
    for i, eng in enumerate(engines):
        kd = None
        if base is not None:
            kd = kld_stats(np.concatenate(nll[i]), np.concatenate(nll[n]), np.concatenate(kld[i]),
                           np.concatenate(p_q[i]), np.concatenate(p_b[i]), np.concatenate(same[i]))
            if keep_kld_values:
                kd["values"] = np.concatenate(kld[i]).tolist()
        out.append(result(eng, i, kd))
    if base is not None:
        out.append(result(base, n, None))
    return out


def to_dict(r: EvalResult) -> dict:
    return asdict(r)


def add_parsers(sub) -> None:
    from ..atomic import atomic_write_text
    from ..cli import command, eval_args, plan_args

    def run(a) -> None:
        r = evaluate(a.model, a.data, a.ctx, a.chunks, a.engine, a.plan, a.kld_base, a.threads,
                     overrides=tuple(a.override))
        print(r.line())
        if r.kld:
            k = r.kld
            print("KLD percentiles: " + ", ".join(f"{n} {v:.5f}" for n, v in k["kld_percentiles"].items()))
            print("dp percentiles:  " + ", ".join(f"{n} {100 * v:+.3f}%" for n, v in k["dp_percentiles"].items()))
        if a.json:
            import json

            atomic_write_text(a.json, json.dumps(to_dict(r), indent=1))

    p = command(sub, "eval", "Perplexity (and KL-divergence) exactly as llama-perplexity computes it.",
                "qatlm eval model.gguf --data tempest.txt --chunks 6 --kld-base teacher.gguf", run)
    p.add_argument("model", help="a GGUF file, a Hugging Face directory (--engine torch), or 'bundled'")
    eval_args(p)
    plan_args(p, default=None)
    p.add_argument("--kld-base", help="also report KL-divergence statistics against this model")
    p.add_argument("--json", type=Path, help="also write the result as JSON here")
