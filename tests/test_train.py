"""Distillation QAT on tiny models built here, and the PTQ-exact start on the real Gemma 3 270M."""
import json

import numpy as np
import pytest
import torch

from qatlm.cli import main
from qatlm.arch import gguf_tensors
from qatlm.gguf.export import export_gguf
from qatlm.train.config import TrainConfig
from qatlm.train.loop import load_run, train
from ggml_ref import assert_export_is_fake_quant, tensors_by_name
from tiny_models import TEXT, tiny_gemma3, tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = root / "train.txt"
    data.write_text(TEXT * 3)
    return {"llama": tiny_llama(root / "llama"), "gemma3": tiny_gemma3(root / "gemma3"), "data": data, "root": root}


def cfg_for(tiny, arch, out, **kw):
    base = dict(teacher=str(tiny[arch]), data=[str(tiny["data"])], out=str(out), steps=30, seq_len=32, batch_size=4,
                lr=3e-4, warmup=2, save_every=100, plan="q4_0")
    base.update(kw)
    return TrainConfig(**base)


def kls(run):
    return [json.loads(line)["kl"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_loss_falls(tiny, tmp_path, arch):
    run = train(cfg_for(tiny, arch, tmp_path / "run"), progress=False)
    k = kls(run)
    assert len(k) == 30 and np.mean(k[-5:]) < 0.6 * k[0], k


@pytest.mark.parametrize("variant", [{}, {"learn_scales": True, "scale_lr": 1e-2}, {"block_lr": True}])
def test_resume_is_bit_identical(tiny, tmp_path, variant):
    """Killed after a checkpoint and resumed == uninterrupted: the exported GGUFs are byte-identical (with learned
    block scales too: their values and AdamW state are in the checkpoint, and their lr follows scale_lr; with
    block-relative learning rates: the resumed run recomputes the factors from the starting weights)."""
    kw = dict(steps=12, save_every=4, **variant)
    straight = train(cfg_for(tiny, "llama", tmp_path / "a", **kw), progress=False)
    cut = cfg_for(tiny, "llama", tmp_path / "b", **kw)
    train(cut, progress=False, stop_after=6)  # stops after step 6; the last checkpoint is step 4
    assert main(["train", "--resume", str(tmp_path / "b")]) == 0
    assert kls(straight) == kls(tmp_path / "b")
    outs = []
    for run in (tmp_path / "a", tmp_path / "b"):
        assert main(["export", str(run), str(run / "qat.gguf")]) == 0
        outs.append(tensors_by_name(run / "qat.gguf"))
    a, b = outs
    assert a.keys() == b.keys() and all(a[n][0] == b[n][0] and np.array_equal(a[n][1], b[n][1]) for n in a)


def test_export_equals_students_fake_quant(tiny, tmp_path):
    run = train(cfg_for(tiny, "llama", tmp_path / "run", steps=5), progress=False)
    cfg, t, student = load_run(run)
    out = export_gguf(student, tmp_path / "qat.gguf", cfg.plan, hf_dir=t.hf_dir, progress=False)
    n_quant = assert_export_is_fake_quant(out, dict(gguf_tensors(student)))
    assert n_quant == 2 * 7 + 2  # 7 linear weights per layer, embedding and output


def test_nan_loss_stops_and_keeps_checkpoint(tiny, tmp_path, monkeypatch):
    import qatlm.train.loop as T

    real = T.kd_loss
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        loss, parts = real(*a, **k)
        return (loss * float("nan") if calls["n"] == 5 else loss), parts

    monkeypatch.setattr(T, "kd_loss", poisoned)
    cfg = cfg_for(tiny, "llama", tmp_path / "run", steps=10, save_every=2)
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 5.*\(step 4\) is kept.*--resume"):
        train(cfg, progress=False)
    from qatlm.train.checkpoint import checkpoint_step

    assert checkpoint_step(tmp_path / "run") == 4


def test_full_disk_at_a_checkpoint_is_one_clear_error(tiny, tmp_path, monkeypatch):
    """A checkpoint that cannot be written (a full disk: torch reports it as "unexpected pos") ends training with
    one error naming the checkpoint, the space left and how to continue; the previous checkpoint stays, no
    partial one is left, and the run resumes from it."""
    import shutil
    from collections import namedtuple

    import torch.distributed.checkpoint as dcp

    from qatlm.train.checkpoint import checkpoint_step

    cfg = cfg_for(tiny, "llama", tmp_path / "run", steps=6, save_every=2)
    train(cfg, progress=False, stop_after=3)  # checkpoint at step 2
    real_save, real_usage = dcp.save, shutil.disk_usage
    monkeypatch.setattr(dcp, "save", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 40, 1 << 40, 3 << 20))
    with pytest.raises(OSError, match=r"no space left \(3 MB free\) while saving the step-4 checkpoint to .*run/"
                                      r"checkpoint; the step-2 checkpoint .* is untouched\. Free disk space, then "
                                      r"run the same command again \(or `qatlm train --resume"):
        train(cfg, resume=True, progress=False)
    assert checkpoint_step(tmp_path / "run") == 2 and not list((tmp_path / "run").glob("*partial*"))
    monkeypatch.setattr(dcp, "save", real_save)
    monkeypatch.setattr(shutil, "disk_usage", real_usage)
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0
    assert checkpoint_step(tmp_path / "run") == 6


def test_export_refuses_a_diverged_student(tiny, tmp_path, monkeypatch):
    """A checkpoint whose weights hold NaN is not exported: the error names the tensor and the fix, and no
    output file is written (an earlier export at that path is kept)."""
    import qatlm.train.loop as T
    from qatlm.gguf.export import export_run

    run = train(cfg_for(tiny, "llama", tmp_path / "run", steps=2), progress=False)
    real = T.load_run

    def diverged(*a, **k):
        cfg, t, student = real(*a, **k)
        with torch.no_grad():
            student.model.layers[1].mlp.down_proj.weight[0, 3] = float("nan")
        return cfg, t, student

    monkeypatch.setattr(T, "load_run", diverged)
    out = tmp_path / "qat.gguf"
    out.write_bytes(b"earlier export")
    with pytest.raises(ValueError, match=r"checkpoint: student tensor .*layers\.1\.mlp\.down_proj.*1 NaN/inf.*--lr"):
        export_run(run, out)
    assert out.read_bytes() == b"earlier export"


def test_plan_that_does_not_fit_names_the_model(tiny, tmp_path):
    """A plan whose block size does not divide the model's rows: train and quantize name the model file."""
    from qatlm.gguf.ptq import quantize_gguf

    with pytest.raises(ValueError, match=rf"^{tiny['llama']}: plan 'pure:q4_k': tensor .* rows of 64"):
        train(cfg_for(tiny, "llama", tmp_path / "run", plan="pure:q4_k"), progress=False)
    _, t, _ = load_run(train(cfg_for(tiny, "llama", tmp_path / "ok", steps=1), progress=False))
    f32 = export_gguf(t.model, tmp_path / "f32.gguf", "f32", hf_dir=t.hf_dir, progress=False)
    with pytest.raises(ValueError, match=rf"^{f32}: plan 'pure:q4_k': tensor"):
        quantize_gguf(f32, tmp_path / "q.gguf", "pure:q4_k", progress=False)
    assert not (tmp_path / "q.gguf").exists()


def test_empty_data_is_refused(tiny, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no training files"):
        train(cfg_for(tiny, "llama", tmp_path / "run", data=[str(empty)]), progress=False)


def test_data_free_distillation(tiny, tmp_path):
    """No corpus: the teacher samples the training text itself (seeded, saved once, reused on resume)."""
    import numpy as np

    from qatlm.train.synthetic import sample_stream
    from qatlm.teacher import load_teacher

    cfg = cfg_for(tiny, "gemma3", tmp_path / "run", data=[], data_free=12, steps=20)
    run = train(cfg, progress=False)
    stream = np.load(run / "synthetic.npy")
    assert stream.shape == (12 * 32,)
    k = kls(run)
    assert len(k) == 20 and np.mean(k[-5:]) < 0.6 * k[0], k
    t = load_teacher(str(tiny["gemma3"]))
    bos = t.tokenizer.bos_token_id
    assert (stream.reshape(12, 32)[:, 0] == bos).all()  # every sampled sequence starts at BOS
    from qatlm.train.loop import dtypes

    again = sample_stream(t.model, t.tokenizer, 12, 32, seed=0, progress=False,
                          dtype=dtypes(cfg, torch.device("cpu"))[1])  # the training precision's (bf16 here if native)
    assert np.array_equal(again, stream)  # seeded: the same text again
    assert len(set(stream.tolist())) > 20  # sampled, not a collapsed repetition
    with pytest.raises(ValueError, match="--data-free N"):
        train(cfg_for(tiny, "llama", tmp_path / "none", data=[]), progress=False)


def test_decode_attention_matches_a_full_forward(tiny):
    """Sampling's decode attention (query heads that share a key/value head stacked as rows, no repeat_kv) gives,
    token by token with the KV cache, the logits of one full forward with transformers' own attention: grouped
    heads (2:1), Gemma 3's sliding-window layers (40 tokens past its window of 16) and Llama's full attention."""
    from qatlm.teacher import load_teacher
    from qatlm.train.synthetic import _decode_attention_for, decode_step

    for kind in ("gemma3", "llama"):
        t = load_teacher(str(tiny[kind]))
        m = t.model.eval()
        before = m.config._attn_implementation
        ids = t.tokenizer([TEXT[:400], TEXT[500:900]], return_tensors="pt").input_ids[:, :40]
        assert ids.shape == (2, 40)
        with torch.no_grad():
            full = m(input_ids=ids).logits
            with _decode_attention_for(m):
                assert m.config._attn_implementation == "qatlm_decode"
                past, steps = None, []
                for i in range(ids.shape[1]):
                    logits, past = decode_step(m, ids[:, i:i + 1], past)
                    steps.append(logits)
        assert m.config._attn_implementation == before
        # fp32 both ways: only the order of additions differs (and the prefill's kernel)
        torch.testing.assert_close(torch.stack(steps, 1), full, atol=2e-5, rtol=1e-5)


def test_two_level_draw_samples_the_softmax():
    """The sampler's draw (block sums, then one block's cumulative sum) has softmax(logits)'s distribution: 200k
    draws over a 1000-entry vocabulary (not a multiple of the 512-entry block: padded) with -inf entries, which are
    never drawn, and a peak; every frequency within 5 standard errors of its probability (a seeded sampling
    test: the tolerance is the sampling error, the seed makes it deterministic)."""
    from qatlm.train.synthetic import _draw

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1000, generator=g) * 2
    logits[[3, 700, 999]] = float("-inf")
    logits[512] = 6.0  # first entry of the second block
    p = torch.softmax(logits.double(), 0)
    counts = torch.zeros(1000, dtype=torch.float64)
    n = 0
    for _ in range(100):
        tok = _draw(logits.expand(2000, -1).contiguous(), g)
        assert tok.shape == (2000, 1) and int(tok.min()) >= 0 and int(tok.max()) < 1000
        counts += torch.bincount(tok.view(-1), minlength=1000).double()
        n += 2000
    assert counts[[3, 700, 999]].sum() == 0
    se = (p * (1 - p) / n).sqrt().clamp(min=1e-12)
    z = ((counts / n - p) / se)[p > 0]
    assert float(z.abs().max()) < 5, float(z.abs().max())


def test_mixed_batches_take_the_sampled_fraction():
    """A corpus mixed with teacher samples: exactly `fraction` of the batch elements come from the sampled
    blocks (the first ones), each group is drawn without repeats within its epoch, and the draw is a pure
    function of the step (what makes resume exact)."""
    from qatlm.train.loop import batch_indices

    n, first, steps = 50, 8, 40
    for fraction in (0.25, 0.5):
        drawn = [i for s in range(steps) for i in batch_indices(n, s, 0, 4, 1, seed=3, first=first, fraction=fraction)]
        sampled = [i for i in drawn if i < first]
        assert len(sampled) == steps * 4 * fraction
        corpus = [i for i in drawn if i >= first]
        assert sorted(sampled[:first]) == list(range(first))  # a permutation per epoch of the sampled group
        assert sorted(corpus[: n - first]) == list(range(first, n))
        assert drawn[8:12] == batch_indices(n, 2, 0, 4, 1, seed=3, first=first, fraction=fraction)
    assert batch_indices(n, 5, 0, 4, 1, seed=3) == batch_indices(n, 5, 0, 4, 1, seed=3, first=0, fraction=0.5)


def test_corpus_mixed_with_teacher_samples(tiny, tmp_path):
    """--data with --data-free N: the N sampled sequences join the corpus (held-out blocks from both), half of
    every batch is sampled text, and the run trains."""
    from qatlm.train.data import load_blocks
    from qatlm.train.loop import sampled_first, training_blocks
    from qatlm.teacher import load_teacher
    from qatlm.train import dist

    cfg = cfg_for(tiny, "gemma3", tmp_path / "run", data_free=12, steps=6)
    run = train(cfg, progress=False)
    assert len(kls(run)) == 6
    t = load_teacher(str(tiny["gemma3"]))
    train_b, held = training_blocks(cfg, run, t, dist.setup("cpu"))
    corpus, corpus_held = load_blocks(cfg.data, t.tokenizer, cfg.seq_len, cfg.heldout_fraction, cfg.seed)
    sampled = np.load(run / "synthetic.npy").reshape(12, 32)
    first = sampled_first(cfg)
    assert first == 11 and len(train_b) == first + len(corpus) and len(held) == 1 + len(corpus_held)
    assert torch.equal(train_b[first:], corpus)
    rows = {tuple(r) for r in sampled.tolist()}
    assert all(tuple(r) in rows for r in train_b[:first].tolist())
    with pytest.raises(ValueError, match="sampled_fraction"):
        train(cfg_for(tiny, "gemma3", tmp_path / "bad", data_free=12, sampled_fraction=1.0), progress=False)


def test_imatrix_qat_exports_what_quantize_imatrix_writes(tiny, tmp_path):
    """--imatrix: the student starts at imatrix PTQ and trains against llama-quantize --imatrix's rule; the
    exported GGUF is byte for byte `qatlm quantize --imatrix` of the unquantized QAT checkpoint (which is
    llama-quantize --imatrix: tests/test_ptq.py), incl. the Q4_1 guard of the first ffn_down layers."""
    from qatlm.gguf.ptq import quantize_gguf
    from qatlm.imatrix.compute import compute_imatrix

    im = compute_imatrix(tiny["llama"], [str(tiny["data"])], tmp_path / "imatrix.gguf", ctx=64, chunks=4,
                         progress=False)
    cfg = cfg_for(tiny, "llama", tmp_path / "run", steps=4, imatrix=str(im))
    run = train(cfg, progress=False)
    assert kls(run)[-1] < kls(run)[0]
    qat = tmp_path / "qat.gguf"
    assert main(["export", str(run), str(qat), "--hf", str(tmp_path / "hf")]) == 0
    _, t, student = load_run(run)
    f32 = export_gguf(student, tmp_path / "f32.gguf", "f32", hf_dir=t.hf_dir, progress=False)
    again = quantize_gguf(f32, tmp_path / "again.gguf", "q4_0", imatrix=im, progress=False)
    a, b = tensors_by_name(qat), tensors_by_name(again)
    assert a.keys() == b.keys() and all(a[n][0] == b[n][0] and np.array_equal(a[n][1], b[n][1]) for n in a)
    assert a["blk.0.ffn_down.weight"][0] == "Q4_1" or len([n for n in a if "ffn_down" in n]) < 8
    rtn = quantize_gguf(f32, tmp_path / "rtn.gguf", "q4_0", progress=False)
    assert any(not np.array_equal(a[n][1], v[1]) for n, v in tensors_by_name(rtn).items())  # the rule mattered
