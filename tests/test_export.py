"""Teachers in (HF directories, GGUF), GGUF and HF checkpoints out, checked against llama.cpp."""
import json

import numpy as np
import pytest
import torch
from gguf import GGUFReader

import qatlm.formats as F
from qatlm.arch import gguf_tensors
from qatlm.gguf.export import export_gguf, export_hf
from qatlm.teacher import load_hf, load_teacher
from qatlm.gguf.ptq import quantize_gguf
from ggml_ref import tensors_by_name
from tiny_models import tiny_llama


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def llama_cpp_logits(path, tokens):
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=64, n_batch=64, logits_all=True, n_threads=2, verbose=False)
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32), llm


def test_tiny_llama_f32_export_runs_in_llamacpp_with_same_logits(llama_dir, tmp_path):
    t = load_teacher(llama_dir)
    assert t.arch == "llama" and t.gguf_path is None
    out = export_gguf(t.model, tmp_path / "tiny-f32.gguf", "f32", hf_dir=llama_dir, progress=False)
    tokens = t.tokenizer("It was the best of times, to be or not to be").input_ids
    ours, llm = llama_cpp_logits(out, tokens)
    assert llm.tokenize(b"It was the best of times, to be or not to be", add_bos=False, special=False) == tokens
    with torch.no_grad():
        ref = t.model(torch.tensor([tokens])).logits[0].numpy()
    # fp32 both sides, different summation order: agreement to ~1e-5 of the logit scale; a wrong name or
    # rotary permutation gives errors of order 1
    np.testing.assert_allclose(ours, ref, atol=1e-3 * np.abs(ref).max(), rtol=0)


@pytest.mark.parametrize("plan", ["q4_0", "q8_0", "pure:q5_1"])
def test_tiny_llama_quantized_export_equals_fake_quant(llama_dir, tmp_path, plan):
    t = load_teacher(llama_dir)
    out = export_gguf(t.model, tmp_path / f"tiny-{plan}.gguf", plan, hf_dir=llama_dir, progress=False)
    want = dict(gguf_tensors(t.model))
    for rt in GGUFReader(out).tensors:
        name, typ = rt.name, rt.tensor_type.name.lower()
        w = want[rt.name]
        if typ == "f32":
            assert np.array_equal(np.asarray(rt.data).reshape(w.shape), w.numpy())
        else:  # the file dequantizes to exactly the fake-quantized weights
            deq = F.dequantize(np.asarray(rt.data).reshape(-1), typ, w.shape)
            assert torch.equal(deq, F.fake_quant(w.reshape(-1, w.shape[-1]), typ).reshape(w.shape)), name
    _, llm = llama_cpp_logits(out, [1, 5, 9, 12])
    assert llm.n_vocab() == t.model.config.vocab_size


def test_bundled_gemma_export_from_memory_equals_quantize(gemma_gguf, session_tmp):
    """Export of the teacher as transformers holds it == GGUF-to-GGUF PTQ, byte for byte (f32 and q4_0)."""
    t = load_teacher(gemma_gguf)
    for plan in ("q4_0", "f32"):
        ours = export_gguf(t.model, session_tmp / f"mem-{plan}.gguf", plan, source_gguf=gemma_gguf, progress=False)
        ref = session_tmp / f"ptq-{plan}.gguf"
        quantize_gguf(gemma_gguf, ref, plan, progress=False)
        a, b = tensors_by_name(ours), tensors_by_name(ref)
        assert [n for n in b if a[n][0] != b[n][0] or not np.array_equal(a[n][1], b[n][1])] == []


def test_export_hf_round_trip(llama_dir, tmp_path):
    t = load_teacher(llama_dir)
    out = export_hf(t.model, t.tokenizer, tmp_path / "ckpt")
    model, tok, cfg = load_hf(out)
    a, b = t.model.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    export_hf(t.model, t.tokenizer, out)  # replacing an existing directory works and leaves no temporaries
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# ---- bad inputs -----------------------------------------------------------------------------------

def copy_dir(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_config(llama_dir, tmp_path):
    d = copy_dir(llama_dir, tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(ValueError, match=f"{d}: no config.json"):
        load_teacher(d)


def test_unsupported_architecture(llama_dir, tmp_path):
    d = copy_dir(llama_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported; supported: gemma3.*llama.*qwen3"):
        load_teacher(d)


def _rewrite_safetensors(d, change):
    from safetensors.torch import load_file, save_file

    f = d / "model.safetensors"
    sd = load_file(str(f))
    change(sd)
    save_file(sd, str(f), metadata={"format": "pt"})
    return f


def test_missing_tensor(llama_dir, tmp_path):
    d = copy_dir(llama_dir, tmp_path / "m")
    _rewrite_safetensors(d, lambda sd: sd.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(ValueError, match="'model.layers.1.mlp.down_proj.weight'.* is missing"):
        load_teacher(d)


def test_shape_mismatch(llama_dir, tmp_path):
    d = copy_dir(llama_dir, tmp_path / "m")

    def shrink(sd):
        sd["model.layers.0.self_attn.q_proj.weight"] = sd["model.layers.0.self_attn.q_proj.weight"][:32].clone()

    f = _rewrite_safetensors(d, shrink)
    with pytest.raises(ValueError, match=f"{f}: tensor 'model.layers.0.self_attn.q_proj.weight' has shape"):
        load_teacher(d)


def test_truncated_safetensors(llama_dir, tmp_path):
    d = copy_dir(llama_dir, tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ValueError, match="damaged or truncated"):
        load_teacher(d)


def test_pickle_only_checkpoint_is_refused(llama_dir, tmp_path):
    d = copy_dir(llama_dir, tmp_path / "m")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle files are not loaded"):
        load_teacher(d)
