"""An offline teacher: the teacher's top-k log-probabilities over the training blocks, computed once, so that
training runs no teacher forward and holds no teacher in memory (issue 17; the loss: qatlm.train.topk_kd).

    qatlm teacher-cache --teacher bundled --data texts/ --k 128 --out cache/       # once (resumable)
    qatlm train --teacher bundled --data texts/ --teacher-cache cache/ --out runs/q4

Which blocks: exactly those `qatlm train` uses with the same --teacher/--data/--seq-len/--seed/--config/--set
(training_blocks()), plus the held-out blocks its held-out KL is measured on (eval_blocks, unless eval_every is
0); with `--for-steps S` only the training blocks the first S steps draw (batch_indices() of this --batch-size,
--grad-accum and --seed). Per position: the teacher's k most likely tokens at temperature 1 with their
log-probabilities in fp16 (11 significant bits: each log p off by at most 2^-11 |log p|, i.e. p by 1.2e-4
relative at p = 0.78; `--logprobs fp32` stores them exactly, 8 instead of 6 bytes per entry), their token ids
(int32) and the log of the rest's mass in fp32 (4 bytes beside 6k: no reason to round the one number that
carries the whole tail; it is a log-sum-exp over the other logits, so no 1 - sum cancellation either). In DIR:

    manifest.json            format version, k, vocabulary size, seq_len, which blocks, sha256 of the tokenizer's
                             vocabulary, of the training blocks and of the held-out ones, the teacher (path, sha256
                             of config.json, size of its weights) and its precision, and every chunk's size + sha256
    chunk-00000.safetensors  `chunk_blocks` rows: tokens [n, T] int32 (the block as stored), logprobs [n, T, k]
                             fp16, indices [n, T, k] int32, rest [n, T] fp32, blocks [n] int64 (the training block
                             index; -1 - j for held-out block j)
    tokens/                  the tokenized --data (data.py's cache)

Every file is written atomically (qatlm.atomic) and the manifest again after each chunk, so an interrupted build
leaves whole chunks only, and a rerun skips each chunk whose size and sha256 match the manifest and recomputes the
rest: the directory ends byte-identical to an uninterrupted build (the teacher's forward is deterministic for
the same blocks in the same batches). No pickle: safetensors and JSON.

Before the first step, training checks the manifest against its own tokenizer, teacher, blocks, schedule and
held-out blocks, every chunk's size and sha256, and the teacher's output on the first cached blocks against the
cache (a fine-tune of the same size and config would pass every other check); each mismatch is one error naming
the file and the fix. Rows are then found by the tokens of the batch's blocks (TeacherCache.rows), so the loop
passes batches as before.
"""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save
from tqdm import tqdm

from .. import arch
from ..atomic import atomic_file, atomic_write_text
from ..cli import command
from ..teacher import Teacher, load_teacher, sha256_file, weight_files
from . import config as C
from . import dist
from .config import TrainConfig
from .kd_loss import frozen_cast
from .topk_kd import topk_kd_loss

FORMAT, VERSION = "qatlm-teacher-cache", 1
MANIFEST = "manifest.json"
# what a cache is of: a rerun with any of these changed is refused instead of mixing two caches in one directory
IDENTITY = ("format", "version", "k", "vocab_size", "seq_len", "n_blocks", "blocks", "n_heldout", "chunk_blocks",
            "tokenizer_sha256", "blocks_sha256", "heldout_sha256", "teacher", "teacher_precision", "head_precision",
            "logprobs")
LOGPROB_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}  # fp32: exact KD at k = V (tests), 1/3 larger


# ---- what the cache is of ---------------------------------------------------------------------------------

def tokenizer_sha256(tokenizer) -> str:
    """A hash of the vocabulary (every token string and its id) and the BOS/EOS ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    text = json.dumps([vocab, tokenizer.bos_token_id, tokenizer.eos_token_id], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def blocks_sha256(blocks: torch.Tensor) -> str:
    """A hash of the training token blocks [n, seq_len] (their values, order and shape)."""
    a = np.ascontiguousarray(blocks.numpy().astype("<i8"))
    return hashlib.sha256(f"{tuple(a.shape)}\n".encode() + a.tobytes()).hexdigest()


def teacher_identity(t: Teacher) -> dict:
    """Path (for people) and what identifies the weights without reading them: the sha256 of config.json and the
    size of the weight files (plus the GGUF's size for a GGUF teacher, whose converted directory is named by the
    GGUF's sha256)."""
    files = sorted(set(weight_files(t.hf_dir).values()))
    out = {"source": str(t.source), "hf_dir": str(t.hf_dir),
           "config_sha256": hashlib.sha256((t.hf_dir / "config.json").read_bytes()).hexdigest(),
           "weights_bytes": sum(f.stat().st_size for f in files)}
    if t.gguf_path is not None:
        out["gguf_bytes"] = t.gguf_path.stat().st_size
    return out


def _same_teacher(a: dict, b: dict) -> bool:
    keys = ("config_sha256", "weights_bytes", "gguf_bytes")  # not the paths: a moved file is the same teacher
    return all(a.get(k) == b.get(k) for k in keys)


def blocks_for_steps(cfg: TrainConfig, n_blocks: int, steps: int) -> list[int]:
    """The block indices the first `steps` optimizer steps of a run of cfg draw (loop.batch_indices), sorted."""
    from .loop import batch_indices, sampled_first

    return sorted({i for s in range(steps) for m in range(cfg.grad_accum)
                   for i in batch_indices(n_blocks, s, m, cfg.batch_size, cfg.grad_accum, cfg.seed, sampled_first(cfg),
                                          cfg.sampled_fraction)})


def _dtype_name(d: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[d]


# ---- the teacher's top k ----------------------------------------------------------------------------------

def _teacher_logits(teacher: torch.nn.Module, ids: torch.Tensor, chunk: int, dtype: torch.dtype,
                    teacher_dtype: torch.dtype | None):
    """(first position, fp32 logits [c, V]) of ids [B, T] flattened, `chunk` positions at a time, as kd_loss computes
    the teacher's logits: the body under autocast in teacher_dtype, the head's matmul in dtype."""
    arch.check_softcap(teacher)
    td = dtype if teacher_dtype is None else teacher_dtype
    with torch.no_grad():
        with torch.autocast(ids.device.type, dtype=td, enabled=td != torch.float32):
            h = teacher.model(ids, use_cache=False).last_hidden_state
        w = frozen_cast(teacher.get_output_embeddings().weight, dtype)
        h = h.reshape(-1, h.shape[-1])
        with torch.autocast(ids.device.type, enabled=False):
            for a in range(0, h.shape[0], chunk):
                yield a, (h[a:a + chunk].to(dtype) @ w.T).float()


def teacher_topk(teacher: torch.nn.Module, ids: torch.Tensor, k: int, chunk: int = 128,
                 dtype: torch.dtype = torch.float32, teacher_dtype: torch.dtype | None = None,
                 logprob_dtype: torch.dtype = torch.float16):
    """(log-probs [B, T, k] in logprob_dtype, token ids [B, T, k] int32, log of the rest's mass [B, T] fp32) of
    the teacher at temperature 1 on ids [B, T] (softmax in fp32)."""
    lp, ix, rest = [], [], []
    for _, z in _teacher_logits(teacher, ids, chunk, dtype, teacher_dtype):
        lse = torch.logsumexp(z, dim=-1)
        top = torch.topk(z, k, dim=-1)  # sorted, most likely first
        lp.append((top.values - lse[:, None]).to(logprob_dtype))
        ix.append(top.indices.int())
        rest.append(torch.logsumexp(z.scatter_(1, top.indices, float("-inf")), dim=-1) - lse)  # -inf if k = V
    B, T = ids.shape
    return (torch.cat(lp).reshape(B, T, k).cpu(), torch.cat(ix).reshape(B, T, k).cpu(),
            torch.cat(rest).reshape(B, T).cpu())


# the teacher's log-probs on the cache's first rows may differ from the cached ones by this much (mean over
# positions of sum_i p_i |d log p_i|, nats) and still be the same teacher: fp16 storage (<= 2^-11 |log p|) and a
# device's or thread count's other rounding of a bf16 forward (~1e-2); another model or a fine-tune is O(0.1-1)
PROBE_TOLERANCE = 0.05


def probe_distance(teacher: torch.nn.Module, ids: torch.Tensor, cached, chunk: int, dtype: torch.dtype,
                   teacher_dtype: torch.dtype | None) -> float:
    """Mean over positions of sum_i p_i |log p_i(teacher now) - log p_i(cached)| over the cached top k."""
    lp_c, idx = cached[0].reshape(-1, cached[0].shape[-1]).float(), cached[1].reshape(-1, cached[1].shape[-1]).long()
    total = 0.0
    for a, z in _teacher_logits(teacher, ids, chunk, dtype, teacher_dtype):
        lp_c_part, c = lp_c[a:a + len(z)].to(z.device), len(z)
        now = torch.log_softmax(z, dim=-1).gather(1, idx[a:a + c].to(z.device))
        total += float((lp_c_part.exp() * (now - lp_c_part).abs()).sum())
    return total / len(lp_c)


# ---- building -------------------------------------------------------------------------------------------

def chunk_name(c: int) -> str:
    return f"chunk-{c:05d}.safetensors"


def _chunk_ok(path: Path, entry: dict | None) -> bool:
    """Whether `path` is the complete chunk the manifest entry describes (size and sha256)."""
    return (entry is not None and path.is_file() and path.stat().st_size == entry["bytes"]
            and sha256_file(path) == entry["sha256"])


def _write_manifest(out: Path, manifest: dict) -> None:
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def read_manifest(d: Path) -> dict:
    """DIR/manifest.json, checked to be a teacher cache of this format (ValueError naming the file and the fix)."""
    f = d / MANIFEST
    if not f.is_file():
        raise ValueError(f"{f}: no such file; {d} is not a teacher cache. Build one with `qatlm teacher-cache "
                         f"--teacher T --data FILES --out {d}` (the same --data/--seq-len/--seed as the training run)")
    try:
        m = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f}: not valid JSON ({e}); rerun `qatlm teacher-cache ... --out {d}` to rebuild it") \
            from None
    if not isinstance(m, dict) or m.get("format") != FORMAT or not all(k in m for k in IDENTITY + ("chunks",)):
        raise ValueError(f"{f}: not a qatlm teacher-cache manifest; rebuild the cache with `qatlm teacher-cache`")
    if m["version"] != VERSION:
        raise ValueError(f"{f}: teacher-cache format version {m['version']}, this qatlm reads {VERSION}; rebuild the "
                         "cache with this version's `qatlm teacher-cache`")
    if not (isinstance(m["k"], int) and isinstance(m["vocab_size"], int) and 1 <= m["k"] <= m["vocab_size"]):
        raise ValueError(f"{f}: k = {m['k']!r} for a vocabulary of {m['vocab_size']!r}; k must be 1..vocab size. "
                         "The manifest is damaged: rebuild the cache")
    return m


def build_cache(cfg: TrainConfig, out: str | Path, k: int = 128, for_steps: int | None = None,
                chunk_blocks: int = 64, progress: bool = True, teacher: Teacher | None = None,
                logprobs: str = "fp16") -> Path:
    """Run the teacher over cfg's training blocks (and the held-out blocks its held-out KL is measured on) and
    write the cache to `out` (resumable); returns `out`.

        build_cache(TrainConfig(teacher="bundled", data=["texts/"]), "cache/", k=128)
    """
    from .data import split_mask
    from .heldout import eval_subset
    from .loop import dtypes, training_blocks

    out = Path(out)
    if logprobs not in LOGPROB_DTYPES:
        raise ValueError(f"--logprobs {logprobs!r}: give fp16 (default) or fp32")
    if chunk_blocks < 1 or (for_steps is not None and for_steps < 1):
        raise ValueError(f"--chunk-blocks ({chunk_blocks}) and --for-steps ({for_steps}) must be >= 1")
    ctx = dist.setup(cfg.device)
    if ctx.distributed:
        raise ValueError("teacher-cache runs in one process; start it without torchrun")
    t = teacher if teacher is not None else load_teacher(cfg.teacher)
    t.model.eval().to(ctx.device).requires_grad_(False)
    V = t.model.get_output_embeddings().weight.shape[0]
    if not 1 <= k <= V:
        raise ValueError(f"--k {k}: the teacher {cfg.teacher} has a vocabulary of {V} tokens; give 1 <= k <= {V} "
                         "(k = vocabulary size caches the full distribution)")
    out.mkdir(parents=True, exist_ok=True)
    blocks, held = training_blocks(cfg, out, t, ctx)  # the token cache (and --data-free text) go to out/
    held = eval_subset(held, cfg.eval_blocks) if cfg.eval_every else held[:0]
    dtype, t_dtype = dtypes(cfg, ctx.device)
    covered = blocks_for_steps(cfg, len(blocks), for_steps) if for_steps \
        else list(range(len(blocks)))
    # the rows: the covered training blocks (by block index), then the held-out ones (labelled -1 - j)
    stored = torch.cat([blocks[covered], held])
    labels = covered + [-1 - j for j in range(len(held))]
    manifest = {"format": FORMAT, "version": VERSION, "k": k, "vocab_size": V, "seq_len": cfg.seq_len,
                "n_blocks": len(blocks), "blocks": covered if for_steps else None, "n_heldout": len(held),
                "chunk_blocks": chunk_blocks, "tokenizer_sha256": tokenizer_sha256(t.tokenizer),
                "blocks_sha256": blocks_sha256(blocks), "heldout_sha256": blocks_sha256(held),
                "teacher": teacher_identity(t), "teacher_precision": _dtype_name(t_dtype),
                "head_precision": _dtype_name(dtype), "logprobs": logprobs, "temperature": 1.0,
                "settings": {"data": cfg.data, "data_free": cfg.data_free,
                             "sampled_fraction": cfg.sampled_fraction, "seq_len": cfg.seq_len, "seed": cfg.seed,
                             "heldout_fraction": cfg.heldout_fraction, "kd_on": cfg.kd_on, "for_steps": for_steps,
                             "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
                             "eval_blocks": cfg.eval_blocks if cfg.eval_every else 0},
                "chunks": {}}
    if (out / MANIFEST).is_file():
        old = read_manifest(out)
        diff = [key for key in IDENTITY if key != "teacher" and old[key] != manifest[key]]
        diff += [] if _same_teacher(old["teacher"], manifest["teacher"]) else ["teacher"]
        if diff:
            raise ValueError(f"{out / MANIFEST}: {out} holds a teacher cache of other settings (differs in: "
                             f"{', '.join(diff)}); give another --out, or delete {out} to rebuild it")
        manifest["chunks"] = old["chunks"]
    n_chunks = -(-len(stored) // chunk_blocks)
    bar = tqdm(total=len(stored), desc=f"teacher top-{k}", unit="block", disable=not progress)
    for c in range(n_chunks):
        name, part = chunk_name(c), slice(c * chunk_blocks, (c + 1) * chunk_blocks)
        rows = stored[part]
        if _chunk_ok(out / name, manifest["chunks"].get(name)):
            bar.update(len(rows))
            continue
        ids = split_mask(rows, cfg.kd_on)[0]  # the token ids (assistant mode stores a mask in their sign)
        lp, ix, rest = [], [], []
        for a in range(0, len(rows), cfg.batch_size):  # the teacher runs batch_size blocks at a time
            got = teacher_topk(t.model, ids[a:a + cfg.batch_size].to(ctx.device), k, cfg.kd_chunk, dtype, t_dtype,
                               LOGPROB_DTYPES[logprobs])
            lp.append(got[0]), ix.append(got[1]), rest.append(got[2])
            bar.update(len(ids[a:a + cfg.batch_size]))
        # one metadata key: safetensors writes a metadata map in no fixed order, which would make bytes differ
        data = st_save({"tokens": rows.int().contiguous(), "logprobs": torch.cat(lp), "indices": torch.cat(ix),
                     "rest": torch.cat(rest), "blocks": torch.tensor(labels[part], dtype=torch.int64)},
                    metadata={"qatlm": json.dumps({"format": FORMAT, "version": VERSION, "chunk": c})})
        with atomic_file(out / name) as tmp:
            tmp.write_bytes(data)
        manifest["chunks"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                                    "rows": len(rows)}
        _write_manifest(out, manifest)
    bar.close()
    manifest["chunks"] = {chunk_name(c): manifest["chunks"][chunk_name(c)] for c in range(n_chunks)}
    _write_manifest(out, manifest)
    return out


# ---- reading (training) -----------------------------------------------------------------------------------

class TeacherCache:
    """A verified cache, looked up by the tokens of a training block (`rows(ids)`).

    Rows are stored by block index; a batch [B, T] is mapped to them through a hash of each block's tokens: the
    teacher's outputs are a function of the tokens alone, so this is exact (identical blocks share their outputs)
    and needs no change to how the loop passes batches. Every row read is checked against the tokens it stores."""

    def __init__(self, path: Path, manifest: dict, row_of: dict[bytes, tuple[str, int]]):
        self.path, self.manifest, self._row_of = path, manifest, row_of

    @classmethod
    def open(cls, path: str | Path, cfg: TrainConfig, t: Teacher, blocks: torch.Tensor, held: torch.Tensor,
             device: torch.device | None = None) -> "TeacherCache":
        """Check the cache at `path` against the run (cfg, its teacher t, its training blocks and the held-out
        blocks its held-out KL is measured on) and every chunk's sha256, and the teacher's output on the first
        rows against the cached one; ValueError naming the file and the fix. `device`: the training device (its
        precision is the run's); the teacher runs where it is."""
        from .loop import dtypes

        device = device or torch.device("cpu")
        dtype, t_dtype = dtypes(cfg, device)
        d = Path(path)
        m = read_manifest(d)
        f = d / MANIFEST
        rebuild = (f"rebuild the cache for this run (`qatlm teacher-cache` with the run's --teacher, --data, "
                   f"--seq-len, --seed and --config/--set, and a new --out), or train with the settings the cache was "
                   f"built with ({json.dumps(m.get('settings'))})")
        if cfg.temperature != 1.0:
            raise ValueError(f"temperature {cfg.temperature}: a top-k cache holds the teacher at temperature 1 only "
                             "(softmax(z / T) over the top k needs every other logit); use --set temperature=1 or "
                             "train with the resident teacher (no --teacher-cache)")
        V = t.model.get_output_embeddings().weight.shape[0]
        if m["vocab_size"] != V or m["tokenizer_sha256"] != tokenizer_sha256(t.tokenizer):
            raise ValueError(f"{f}: built with another tokenizer (vocabulary of {m['vocab_size']} tokens, this "
                             f"teacher's: {V}, or the same size with other tokens); {rebuild}")
        if not _same_teacher(m["teacher"], teacher_identity(t)):
            raise ValueError(f"{f}: built from another teacher ({m['teacher']['source']}: its config.json or weights "
                             f"differ from {t.source}'s); {rebuild}")
        if m["seq_len"] != cfg.seq_len or m["n_blocks"] != len(blocks) or m["blocks_sha256"] != blocks_sha256(blocks):
            raise ValueError(f"{f}: built over other token blocks (seq_len {m['seq_len']}, {m['n_blocks']} blocks; "
                             f"this run: seq_len {cfg.seq_len}, {len(blocks)} blocks): the --data, --seq-len, --seed "
                             f"or heldout_fraction differ; {rebuild}")
        if m["teacher_precision"] != _dtype_name(t_dtype):
            raise ValueError(f"{f}: the teacher ran in {m['teacher_precision']}, this run's teacher precision is "
                             f"{_dtype_name(t_dtype)}; use --set teacher_precision={m['teacher_precision']}, or "
                             f"{rebuild}")
        fix = (f"rerun `qatlm teacher-cache` with the flags it was built with and --out {d}: it recomputes only the "
               "damaged or missing chunks")
        covered = list(range(m["n_blocks"])) if m["blocks"] is None else m["blocks"]
        n_rows = len(covered) + m["n_heldout"]
        n_chunks = -(-n_rows // m["chunk_blocks"])
        row_of: dict[bytes, tuple[str, int]] = {}
        for c in tqdm(range(n_chunks), desc="checking teacher cache", unit="chunk", disable=n_chunks < 50):
            name, p = chunk_name(c), d / chunk_name(c)
            entry = m["chunks"].get(name)
            if entry is None or not p.is_file():
                raise ValueError(f"{p}: missing (the cache is incomplete); {fix}")
            if p.stat().st_size != entry["bytes"]:
                raise ValueError(f"{p}: {p.stat().st_size} bytes, the manifest says {entry['bytes']} (truncated or "
                                 f"overwritten); {fix}")
            if sha256_file(p) != entry["sha256"]:
                raise ValueError(f"{p}: its contents differ from the manifest's sha256 (corrupt); {fix}")
            with safe_open(str(p), framework="pt") as fh:
                for r, block in enumerate(fh.get_tensor("tokens").long()):
                    row_of.setdefault(_key(block), (name, r))
        need = [] if m["blocks"] is None else blocks_for_steps(cfg, len(blocks), cfg.steps)  # None: all are there
        missing = [b for b in need if _key(blocks[b]) not in row_of]
        if missing:
            s = m["settings"]
            raise ValueError(f"{f}: covers {len(covered)} of the {len(blocks)} training blocks (built --for-steps "
                             f"{s.get('for_steps')} with batch size {s.get('batch_size')} x {s.get('grad_accum')}); "
                             f"this run's {cfg.steps} steps also draw {len(missing)} others (block {missing[0]}, ...). "
                             "Rerun `qatlm teacher-cache` with --for-steps >= the run's --steps and its --batch-size/"
                             "--grad-accum (or without --for-steps: every block), and a new --out")
        if cfg.eval_every and any(_key(b) not in row_of for b in held):
            raise ValueError(f"{f}: lacks the {len(held)} held-out blocks this run measures its held-out KL on (it "
                             f"holds {m['n_heldout']}: built for eval_blocks {m['settings'].get('eval_blocks')}, 0 = "
                             f"eval_every 0); train with --eval-every 0 (no held-out KL) or that eval_blocks, or "
                             f"{rebuild}")
        tc = cls(d, m, row_of)
        # the teacher itself on the first cached block: a cache of another teacher with the same config and size
        # (a fine-tune, another seed) differs here
        from .data import split_mask

        with safe_open(str(d / chunk_name(0)), framework="pt") as fh:
            first = fh.get_slice("tokens")[:1].long()  # one block, where the teacher is (the CPU when on a GPU)
        where = next(t.model.parameters()).device
        dist_ = probe_distance(t.model, split_mask(first, cfg.kd_on)[0].to(where), tc.rows(first), cfg.kd_chunk,
                               dtype, t_dtype)
        if not dist_ <= PROBE_TOLERANCE:
            raise ValueError(f"{d / chunk_name(0)}: the teacher {t.source} gives other probabilities on the cache's "
                             f"first blocks (mean sum p |d log p| = {dist_:.3f} nats, same teacher: < "
                             f"{PROBE_TOLERANCE}): the cache was built from another teacher (or precision); {rebuild}")
        return tc

    @functools.lru_cache(maxsize=64)  # noqa: B019  (one cache object per run)
    def _file(self, name: str):
        return safe_open(str(self.path / name), framework="pt")

    def rows(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log-probs [B, T, k] fp16, token ids [B, T, k] int32, rest log-prob [B, T] fp32) of blocks [B, T] (as
        stored: sign-encoded with kd_on=assistant)."""
        out = ([], [], [])
        for block in blocks.cpu():
            hit = self._row_of.get(_key(block))
            if hit is None:
                raise ValueError(f"{self.path}: a training block is not in the teacher cache; rebuild the cache for "
                                 "this run (`qatlm teacher-cache`, without --for-steps)")
            name, r = hit
            fh = self._file(name)
            if not torch.equal(fh.get_slice("tokens")[r:r + 1][0].long(), block):
                raise ValueError(f"{self.path / name}: row {r} holds other tokens than the manifest's blocks; the "
                                 "cache is damaged: rebuild it with `qatlm teacher-cache`")
            for o, key in zip(out, ("logprobs", "indices", "rest")):
                o.append(fh.get_slice(key)[r:r + 1])
        return tuple(torch.cat(o) for o in out)

    def kd_loss(self, student: torch.nn.Module, blocks: torch.Tensor, ids: torch.Tensor, ce_weight: float, chunk: int,
                dtype: torch.dtype, mask: torch.Tensor | None = None):
        """topk_kd_loss of the student against this cache on `blocks` as stored (ids, mask: split_mask's)."""
        return topk_kd_loss(student, self.rows(blocks), ids, ce_weight, chunk, dtype, mask)


def _key(block: torch.Tensor) -> bytes:
    return hashlib.blake2b(block.numpy().astype("<i8").tobytes(), digest_size=16).digest()


# ---- the command ------------------------------------------------------------------------------------------

# the `qatlm train` flags that decide which blocks are cached (their definitions are loop.TRAIN_FLAGS')
CACHE_FLAGS = ("--teacher", "--data", "--data-free", "--sampled-fraction", "--kd-on", "--seq-len", "--seed",
               "--batch-size", "--grad-accum")


def main(a) -> int:
    from .loop import flags_of

    cfg = C.resolve(a.config, flags=flags_of(a))
    build_cache(cfg, a.out, k=a.k, for_steps=a.for_steps, chunk_blocks=a.chunk_blocks, logprobs=a.logprobs)
    print(f"teacher cache: {a.out} ({MANIFEST} + chunk-*.safetensors); train with: qatlm train --teacher-cache {a.out} "
          "and the same --teacher/--data/--seq-len/--seed")
    return 0


def add_parsers(sub) -> None:
    from .loop import TRAIN_FLAGS

    p = command(sub, "teacher-cache", "Run the teacher once over the training blocks and store its top-k "
                "log-probabilities, for `qatlm train --teacher-cache` (no teacher in memory while training).",
                "qatlm teacher-cache --teacher bundled --data texts/ --k 128 --out cache/", main)
    defaults = TrainConfig()
    for flag in CACHE_FLAGS:
        key, typ, help_ = TRAIN_FLAGS[flag]
        d = getattr(defaults, key)
        shown = f" (default: {d})" if d not in (None, [], 0, "") else ""
        kw = {"nargs": "+"} if key == "data" else {"type": typ}
        p.add_argument(flag, dest=key, metavar=key.upper() if typ is not None else None, help=help_ + shown, **kw)
    p.add_argument("--config", help="a recipe YAML of TrainConfig fields (or a shipped recipe name): the same one "
                   "as the training run's, so that the blocks are the same")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other TrainConfig field (heldout_fraction, precision, teacher_precision, kd_chunk, ...)")
    p.add_argument("--out", required=True, help="the cache directory (a rerun resumes it)")
    p.add_argument("--k", type=int, default=128, help="log-probabilities kept per position (default 128)")
    p.add_argument("--for-steps", type=int, metavar="STEPS", help="cache only the blocks the first STEPS training "
                   "steps draw (with this --batch-size, --grad-accum and --seed); default: every training block")
    p.add_argument("--chunk-blocks", type=int, default=64, help="blocks per chunk file (default 64)")
    p.add_argument("--logprobs", default="fp16", choices=list(LOGPROB_DTYPES), help="how the top-k log-probabilities "
                   "are stored: fp16 (default; 6 bytes per entry with its token id) or fp32 (8 bytes, exact)")
