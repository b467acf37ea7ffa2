"""The offline teacher (qatlm teacher-cache + train --teacher-cache) on tiny models built here: the cached top-k
loss against full KD (k = V) and against the formula in fp64 (k < V), training with the cache against training
with the resident teacher, resumable byte-identical builds, and the errors of a cache that does not fit."""
import json

import pytest
import torch

from qatlm.cli import main
from qatlm.teacher import load_teacher
from qatlm.train.config import TrainConfig
from qatlm.train.kd_loss import kd_loss
from qatlm.train.loop import train
from qatlm.train.teacher_cache import MANIFEST, TeacherCache, build_cache, teacher_topk
from qatlm.train.topk_kd import _FusedHeadTopK, topk_kd_loss
from tiny_models import TEXT, tiny_gemma3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tcache")
    data = root / "train.txt"
    data.write_text(TEXT * 3)
    return {"teacher": tiny_gemma3(root / "gemma3"), "other": tiny_gemma3(root / "gemma3-seed1", seed=1),
            "data": data, "root": root}


def cfg_for(tiny, out, **kw):
    # fp32: the comparisons below are about the loss, not bf16 rounding (bf16 runs the same code paths)
    base = dict(teacher=str(tiny["teacher"]), data=[str(tiny["data"])], out=str(out), steps=4, seq_len=32,
                batch_size=4, lr=3e-4, warmup=2, save_every=100, plan="q4_0", precision="fp32", eval_every=2)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def cache(tiny):
    """A k = V cache with fp32 log-probs (exact), and the default fp16 one, of the blocks 4 steps draw."""
    t = load_teacher(str(tiny["teacher"]))
    V = t.model.get_output_embeddings().weight.shape[0]
    cfg = cfg_for(tiny, tiny["root"] / "unused")
    return {"V": V, "t": t,
            "fp32": build_cache(cfg, tiny["root"] / "c32", k=V, for_steps=4, chunk_blocks=8, progress=False, teacher=t,
                                logprobs="fp32"),
            "fp16": build_cache(cfg, tiny["root"] / "c16", k=V, for_steps=4, chunk_blocks=8, progress=False,
                                teacher=t)}


def grads(loss, model):
    return torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("ce_weight,masked", [(0.0, False), (0.5, False), (0.3, True)])
def test_full_vocab_cache_equals_kd_loss(tiny, cache, ce_weight, masked):
    """k = V, log-probs stored in fp32: the cached loss is full KD, so it equals kd_loss. Tolerance: fp32 rounding
    (rel 1e-5 on the loss, 1e-4 on gradients): kd_loss sums -p_t log p_s over a log_softmax, this one sums
    p (log p - log q) from gathered log-probs, so the fp32 additions happen in another order. A student other than
    the teacher (seed 1) keeps KL and gradients O(1), where an error would show."""
    t = cache["t"]
    student = load_teacher(str(tiny["other"])).model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cache["V"], (2, 32), generator=g)
    mask = torch.rand(2, 32, generator=g) > 0.4 if masked else None
    want, wp = kd_loss(student, t.model, ids, 1.0, ce_weight, 16, mask=mask)
    g_want = grads(want, student)
    cached = teacher_topk(t.model, ids, cache["V"], logprob_dtype=torch.float32)
    got, gp = topk_kd_loss(student, cached, ids, ce_weight, 16, mask=mask)
    g_got = grads(got, student)
    assert wp["kl"] > 0.2  # a real distance, not two equal models
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    assert gp["ce"] == pytest.approx(wp["ce"], rel=1e-5)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
    # the default fp16 log-probs: each off by at most 2^-11 |log p| (fp16's half ulp), which moves the KL by at
    # most sum_i p_i d_i (1 + |log p_i - log q_i|); that bound, from the data, is the tolerance
    c16 = teacher_topk(t.model, ids, cache["V"])
    got16, _ = topk_kd_loss(student, c16, ids, ce_weight, 16, mask=mask)
    lp = cached[0].double()
    d = (c16[0].double().gather(-1, c16[1].long().argsort(-1)) - lp.gather(-1, cached[1].long().argsort(-1))).abs()
    with torch.no_grad():
        lq = torch.log_softmax(student(ids).logits.double(), -1)
    lpv = lp.gather(-1, cached[1].long().argsort(-1))  # in vocabulary order
    keep = torch.ones(2, 32, dtype=torch.bool) if mask is None else torch.cat([mask[:, 1:], mask[:, :1] & False], 1)
    bound = float((lpv.exp() * d * (1 + (lpv - lq).abs())).sum(-1)[keep].sum() / max(1, int(keep.sum())))
    assert 0 < abs(float(got16.detach()) - float(got.detach())) <= bound


def naive_topk_kl(hs, ws, lp_k, idx, lp_r, tg, ce_weight):
    """The bucketed KL (+ CE) written out in fp64 the obvious way: log(1 - sum of the top-k q) and all."""
    lq = torch.log_softmax(hs @ ws.T, -1)  # [N, V]
    q_k = lq.exp().gather(1, idx)
    p_k, p_r = lp_k.exp(), lp_r.exp()
    kl = (p_k * (lp_k - q_k.log())).sum(-1) + p_r * (lp_r - torch.log(1 - q_k.sum(-1)))
    n, nt = len(tg), int((tg >= 0).sum())
    ce = -(lq[torch.arange(n), tg.clamp(min=0)] * (tg >= 0)).sum() / nt
    return kl.sum() / n, ce


@pytest.mark.parametrize("k,ce_weight", [(1, 0.0), (7, 0.0), (7, 0.4), (49, 0.0)])
def test_topk_loss_equals_fp64_formula(k, ce_weight):
    """k < V: the fused, chunked loss and its gradients equal the formula in fp64 to fp32 rounding."""
    torch.manual_seed(0)
    N, H, V = 24, 16, 50
    hs = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(N, V, dtype=torch.float64) * 2
    top = torch.topk(zt, k)
    lse = torch.logsumexp(zt, -1)
    lp_k = top.values - lse[:, None]
    lp_r = torch.logsumexp(zt.scatter(1, top.indices, float("-inf")), -1) - lse
    tg = torch.randint(0, V, (N,))
    tg[-1] = -1
    nt = int((tg >= 0).sum())
    s = _FusedHeadTopK.apply(hs.float(), ws.float(), lp_k.float(), top.indices.int(), lp_r.float(), tg,
                             ce_weight * N / nt, 5, torch.float32)
    got = torch.autograd.grad(s[0] / N, [hs, ws])
    kl, ce = naive_topk_kl(hs, ws, lp_k, top.indices, lp_r, tg, ce_weight)
    want = torch.autograd.grad(kl + ce_weight * ce, [hs, ws])
    assert float(s[0].detach() / N) == pytest.approx(float(kl.detach()), rel=1e-5, abs=1e-6)
    assert float(s[1].detach() / nt) == pytest.approx(float(ce.detach()), rel=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))
    lpt = torch.log_softmax(zt, -1)  # the bucketed KL is at most the full KL (coarsening)
    full = float((lpt.exp() * (lpt - torch.log_softmax(hs.detach() @ ws.detach().T, -1))).sum() / N)
    assert float(kl.detach()) <= full + 1e-12


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_with_cache_equals_resident_teacher(tiny, cache, tmp_path):
    """4 steps (with held-out KL) against the exact cache = against the resident teacher, to the tolerance of
    test_full_vocab_cache_equals_kd_loss (Adam's first steps amplify gradient rounding a little: rel 1e-4)."""
    a = train(cfg_for(tiny, tmp_path / "resident"), progress=False)
    b = train(cfg_for(tiny, tmp_path / "cached", teacher_cache=str(cache["fp32"])), progress=False)
    ma, mb = metrics(a), metrics(b)
    assert len(ma) == len(mb) == 4 and ma[0]["kl"] > 0
    for x, y in zip(ma, mb):
        assert y["kl"] == pytest.approx(x["kl"], rel=1e-4)
        assert ("heldout_kl" in x) == ("heldout_kl" in y) == (x["step"] % 2 == 0)
        if "heldout_kl" in x:
            assert y["heldout_kl"] == pytest.approx(x["heldout_kl"], rel=1e-4)
    from qatlm.train.checkpoint import load_checkpoint
    from qatlm.train.loop import build_student

    sa, sb = (build_student(cfg_for(tiny, r), cache["t"].model) for r in (a, b))
    load_checkpoint(a, sa), load_checkpoint(b, sb)
    for (n, p), q in zip(sa.named_parameters(), sb.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=n)


def test_resume_recomputes_only_damaged_chunks(tiny, tmp_path, monkeypatch):
    """A build interrupted mid-way, then a truncated and a deleted chunk: each rerun recomputes only what is not
    there and valid, and the directory ends byte-identical to a fresh build."""
    import qatlm.train.teacher_cache as TC

    cfg = cfg_for(tiny, tmp_path / "unused")
    t = load_teacher(str(tiny["teacher"]))
    fresh = build_cache(cfg, tmp_path / "fresh", k=16, for_steps=3, chunk_blocks=3, progress=False, teacher=t)
    real, calls = TC.teacher_topk, {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # in the middle of the third chunk (batch_size 4 < 3 blocks per chunk: 1 call each)
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(TC, "teacher_topk", interrupted)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        build_cache(cfg, out, k=16, for_steps=3, chunk_blocks=3, progress=False, teacher=t)
    assert sorted(p.name for p in out.glob("chunk-*")) == ["chunk-00000.safetensors", "chunk-00001.safetensors",
                                                           "chunk-00002.safetensors", "chunk-00003.safetensors"]
    assert not list(out.glob(".*partial"))  # no half chunk left behind
    assert len(json.loads((out / MANIFEST).read_text())["chunks"]) == 4
    calls["n"] = -10 ** 9
    build_cache(cfg, out, k=16, for_steps=3, chunk_blocks=3, progress=False, teacher=t)
    n_chunks = len(list(fresh.glob("chunk-*")))
    assert calls["n"] == -10 ** 9 + n_chunks - 4  # one teacher call per chunk not yet written
    # damage two chunks; the rerun rewrites exactly those
    c1, c3 = out / "chunk-00001.safetensors", out / "chunk-00003.safetensors"
    c1.write_bytes(c1.read_bytes()[:-100])
    c3.unlink()
    inodes = {p.name: p.stat().st_ino for p in out.glob("chunk-*")}
    monkeypatch.setattr(TC, "teacher_topk", real)
    build_cache(cfg, out, k=16, for_steps=3, chunk_blocks=3, progress=False, teacher=t)
    changed = sorted(p.name for p in out.glob("chunk-*") if inodes.get(p.name) != p.stat().st_ino)
    assert changed == [c1.name, c3.name]
    names = sorted(p.name for p in fresh.iterdir() if p.is_file())
    assert names == sorted(p.name for p in out.iterdir() if p.is_file())
    for n in names:
        assert (fresh / n).read_bytes() == (out / n).read_bytes(), n


def test_for_steps_covers_exactly_the_blocks_training_draws(tiny, tmp_path):
    from qatlm.train.loop import batch_indices

    t = load_teacher(str(tiny["teacher"]))
    cfg = cfg_for(tiny, tmp_path / "unused", eval_every=0)
    out = build_cache(cfg, tmp_path / "c", k=8, for_steps=3, progress=False, teacher=t)
    m = json.loads((out / MANIFEST).read_text())
    want = sorted({i for s in range(3) for i in batch_indices(m["n_blocks"], s, 0, 4, 1, 0)})
    assert m["blocks"] == want and len(want) < m["n_blocks"]
    train(cfg_for(tiny, tmp_path / "ok", steps=3, eval_every=0, teacher_cache=str(out)), progress=False)
    with pytest.raises(ValueError, match=r"manifest.json: covers .* this run's 5 steps also draw .*--for-steps"):
        train(cfg_for(tiny, tmp_path / "long", steps=5, eval_every=0, teacher_cache=str(out)), progress=False)
    with pytest.raises(ValueError, match=r"lacks the 2 held-out blocks .*holds 0.*--eval-every 0"):
        train(cfg_for(tiny, tmp_path / "ev", steps=3, eval_every=2, eval_blocks=2, teacher_cache=str(out)),
              progress=False)


def test_cli_builds_and_trains(tiny, tmp_path, capsys):
    out, run = tmp_path / "cache", tmp_path / "run"
    common = ["--teacher", str(tiny["teacher"]), "--data", str(tiny["data"]), "--seq-len", "32",
              "--batch-size", "4", "--set", "precision=fp32"]
    assert main(["teacher-cache", *common, "--k", "32", "--out", str(out)]) == 0
    assert main(["train", *common, "--steps", "2", "--teacher-cache", str(out), "--out", str(run)]) == 0
    assert len(metrics(run)) == 2
    assert main(["train", *common, "--steps", "2", "--teacher-cache", str(out), "--out", str(tmp_path / "r2"),
                 "--set", "temperature=2"]) == 2
    assert "temperature 2.0 with teacher_cache" in capsys.readouterr().err
    # a run's teacher_cache is fixed on resume
    assert main(["train", "--resume", str(run), "--teacher-cache", str(tmp_path / "elsewhere")]) == 2
    assert "teacher_cache was" in capsys.readouterr().err


def bad(cfg, cache_dir, match):
    with pytest.raises(ValueError, match=match):
        train(TrainConfig(**{**cfg.__dict__, "teacher_cache": str(cache_dir)}), progress=False)


def test_cache_that_does_not_fit_is_refused(tiny, cache, tmp_path):
    c = cache["fp16"]
    cfg = cfg_for(tiny, tmp_path / "run")
    rebuild = r"rebuild the cache for this run \(`qatlm teacher-cache`"
    # another tokenizer (a SentencePiece vocabulary of the same size) and another teacher (same tokenizer)
    spm = tiny_gemma3(tmp_path / "spm", tokenizer="spm")
    bad(cfg_for(tiny, tmp_path / "r1", teacher=str(spm)), c, rf"{MANIFEST}: built with another tokenizer.*{rebuild}")
    bad(cfg_for(tiny, tmp_path / "r2", teacher=str(tiny["other"])), c,
        rf"chunk-00000.safetensors: the teacher .*gemma3-seed1 gives other probabilities .*{rebuild}")
    # other blocks: another seq_len, other text, another seed
    bad(cfg_for(tiny, tmp_path / "r3", seq_len=16), c, rf"{MANIFEST}: built over other token blocks.*seq_len 32")
    other = tmp_path / "other.txt"
    other.write_text(TEXT * 2 + "and more")
    bad(cfg_for(tiny, tmp_path / "r4", data=[str(other)]), c, "built over other token blocks")
    bad(cfg_for(tiny, tmp_path / "r5", seed=1), c, "built over other token blocks")
    # a truncated chunk, a corrupt one (same size), a missing one, a missing or damaged manifest
    import shutil

    for damage, match in [("truncate", r"chunk-00001.safetensors: \d+ bytes, the manifest says \d+ \(truncated"),
                          ("flip", r"chunk-00001.safetensors: its contents differ .*\(corrupt\)"),
                          ("delete", r"chunk-00001.safetensors: missing"),
                          ("manifest", rf"{MANIFEST}: no such file.*Build one with `qatlm teacher-cache"),
                          ("json", rf"{MANIFEST}: not valid JSON"),
                          ("k", rf"{MANIFEST}: k = 999 for a vocabulary of {cache['V']}")]:
        d = tmp_path / f"damaged-{damage}"
        shutil.copytree(c, d)
        f = d / "chunk-00001.safetensors"
        if damage == "truncate":
            f.write_bytes(f.read_bytes()[:-1])
        elif damage == "flip":
            b = bytearray(f.read_bytes())
            b[len(b) // 2] ^= 1
            f.write_bytes(bytes(b))
        elif damage == "delete":
            f.unlink()
        elif damage == "manifest":
            (d / MANIFEST).unlink()
        elif damage == "json":
            (d / MANIFEST).write_text("{")
        else:
            m = json.loads((d / MANIFEST).read_text())
            (d / MANIFEST).write_text(json.dumps({**m, "k": 999}))
        fix = "rerun `qatlm teacher-cache` with the flags it was built with" if damage in ("truncate", "flip",
                                                                                          "delete") else ""
        bad(cfg, d, match + (f".*{fix}" if fix else ""))
    # k larger than the vocabulary, when building
    with pytest.raises(ValueError, match=rf"--k {cache['V'] + 1}: the teacher .* vocabulary of {cache['V']} tokens"):
        build_cache(cfg, tmp_path / "big", k=cache["V"] + 1, progress=False, teacher=cache["t"])
    # a rerun into a cache of other settings
    with pytest.raises(ValueError, match=r"holds a teacher cache of other settings \(differs in: k\)"):
        build_cache(cfg, c, k=8, for_steps=4, chunk_blocks=8, progress=False, teacher=cache["t"])


def test_rows_are_checked_against_their_tokens(tiny, cache):
    """A block the cache does not hold (e.g. the loop drawing other blocks than at build time) is an error."""
    t = cache["t"]
    from qatlm.train.loop import training_blocks
    from qatlm.train import dist

    cfg = cfg_for(tiny, tiny["root"] / "unused")
    blocks, held = training_blocks(cfg, tiny["root"] / "unused", t, dist.Context())
    from qatlm.train.heldout import eval_subset

    tc = TeacherCache.open(cache["fp16"], cfg, t, blocks, eval_subset(held, cfg.eval_blocks))
    some = blocks[tc.manifest["blocks"][:2]]
    lp, ix, rest = tc.rows(some)
    assert lp.dtype == torch.float16 and ix.dtype == torch.int32 and rest.dtype == torch.float32
    assert lp.shape == (2, 32, cache["V"]) and bool(torch.isneginf(rest).all())  # k = V: no rest
    want = teacher_topk(t.model, some, cache["V"])  # (other batch shapes: equal up to matmul rounding)
    torch.testing.assert_close(lp.float(), want[0].float(), rtol=0, atol=4e-3)
    assert torch.equal(ix[..., 0], want[1][..., 0])
    with pytest.raises(ValueError, match="a training block is not in the teacher cache"):
        tc.rows(torch.zeros(1, 32, dtype=torch.long))
