"""MLX: qatlm's GGUFs read by mx.load, the MLX-native format `mlx:<bits>g<group>` against mx.quantize, and
`qatlm export RUN --mlx DIR` loaded and run by mlx-lm.

"Bit for bit" below compares fp32 bit patterns after adding +0.0 (which turns -0.0 into +0.0): llama.cpp's Q4_0
value (8 - 8) * d is -0.0 for a negative d, MLX's d * 8 + (-8 d) is +0.0; every other value is identical.
"""
import copy
import json

import numpy as np
import pytest
import torch
import yaml

import qatlm.formats as F
from qatlm import arch
from qatlm.cli import main
from qatlm.formats import _kernels
from qatlm.formats.mlx_affine import unpack_bits
from qatlm.gguf.export import export_gguf
from qatlm.gguf.io import write_gguf, write_metadata
from qatlm.gguf.ptq import encode_tensor
from qatlm.imatrix.compute import compute_imatrix
from qatlm.mlx_export import export_mlx
from qatlm.student import apply_plan_
from qatlm.train.config import TrainConfig
from qatlm.train.loop import load_imatrix, load_run, train
from tiny_models import TEXT, tiny_gemma3, tiny_llama, tiny_qwen

mx = pytest.importorskip("mlx.core", reason="mlx has wheels for macOS and Linux only")


def bits_of(a: np.ndarray) -> np.ndarray:
    """fp32 bit patterns, -0.0 counted as +0.0."""
    return (np.asarray(a, dtype=np.float32) + np.float32(0.0)).view(np.uint32)


def mlx_dequant_fp32(q, scales, biases, group: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """MLX affine groups dequantized in fp32 two ways: by hand (codes * scale + bias, numpy) and by
    mx.dequantize on scales and biases widened to fp32 (exact)."""
    q, s, b = np.array(q), np.array(scales).astype(np.float32), np.array(biases).astype(np.float32)
    rows, cols = s.shape[0], s.shape[1] * group
    codes = unpack_bits(torch.from_numpy(q.view(np.uint8).copy()), bits, cols).numpy().astype(np.float32)
    by_hand = (codes.reshape(rows, -1, group) * s[:, :, None] + b[:, :, None]).reshape(rows, cols)
    by_mlx = np.array(mx.dequantize(mx.array(q), mx.array(s), mx.array(b), group_size=group, bits=bits))
    return by_hand, by_mlx


def hard_weights(rows: int, cols: int, seed: int) -> np.ndarray:
    """Random rows at scales from 1e-6 (subnormal fp16 scales) to 1e3, plus corner rows: zeros, a constant,
    +a/-a ties, one-signed rows, values on the quantizers' rounding ties."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w *= (10.0 ** rng.uniform(-6, 3, size=(rows, 1))).astype(np.float32)
    w[0] = 0
    w[1] = 0.75
    w[2, ::2], w[2, 1::2] = 1.5, -1.5
    w[3] = np.abs(w[3])
    w[4] = -np.abs(w[4])
    w[5] = np.round(w[5] * 8) / 8  # many exact halves after scaling
    w[6, :] = rng.integers(-8, 8, size=cols) / 4
    return w


# ---- mx.load reads qatlm's GGUFs ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,bits", [("q4_0", 4), ("q4_1", 4), ("q8_0", 8)])
def test_mx_load_reads_qatlm_gguf_as_llamacpp_values(fmt, bits, tmp_path):
    tensors = {f"blk.{i}.ffn_up.weight": hard_weights(256, 512, seed=i) for i in range(3)}
    path = write_gguf(tmp_path / f"{fmt}.gguf", "llama", lambda w: write_metadata(w, None),
                      (encode_tensor(n, w, fmt) for n, w in tensors.items()))
    loaded = mx.load(str(path))
    for name, w in tensors.items():
        base = name[: -len(".weight")]
        raw = F.quantize(torch.from_numpy(w), fmt)
        llama_cpp = F.dequantize(raw, fmt, w.shape).numpy()  # ggml's values (tests/test_formats.py)
        assert loaded[f"{base}.scales"].dtype == mx.float16
        by_hand, by_mlx = mlx_dequant_fp32(loaded[name], loaded[f"{base}.scales"], loaded[f"{base}.biases"], 32, bits)
        assert np.array_equal(bits_of(by_hand), bits_of(llama_cpp)), name
        assert np.array_equal(bits_of(by_mlx), bits_of(llama_cpp)), name


# ---- the MLX-native format against mx.quantize -------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_mlx_format_is_mx_quantize_bit_for_bit(bits, group):
    name = f"mlx:{bits}g{group}"
    f = F.get(name)
    for seed in range(3):
        w = hard_weights(96, 512, seed)
        q, s, b = mx.quantize(mx.array(w).astype(mx.float16), group_size=group, bits=bits)
        raw = F.quantize(torch.from_numpy(w), name).reshape(-1, f.type_size)  # [groups, 4 + group*bits/8]
        assert np.array_equal(raw[:, 0:2].copy().view(np.uint16).reshape(96, -1), np.array(s).view(np.uint16))
        assert np.array_equal(raw[:, 2:4].copy().view(np.uint16).reshape(96, -1), np.array(b).view(np.uint16))
        assert np.array_equal(raw[:, 4:].reshape(96, -1).copy().view(np.uint32), np.array(q))
        ref = np.array(mx.dequantize(q, s.astype(mx.float32), b.astype(mx.float32), group_size=group, bits=bits))
        fq = F.fake_quant(torch.from_numpy(w), name)
        assert np.array_equal(fq.numpy().view(np.uint32), ref.view(np.uint32))  # no tolerance, not even on zeros
        assert torch.equal(F.dequantize(raw.reshape(96, -1), name, w.shape), fq)
        _kernels.FORCE_EXACT = True  # the path CUDA takes
        try:
            assert torch.equal(F.fake_quant(torch.from_numpy(w), name), fq)
        finally:
            _kernels.FORCE_EXACT = False


def test_mlx_format_has_a_straight_through_gradient():
    w = torch.randn(8, 64, requires_grad=True)
    (F.fake_quant(w, "mlx:4g64") * torch.arange(64.0)).sum().backward()
    assert torch.equal(w.grad, torch.arange(64.0).expand(8, 64))


def test_mlx_names():
    assert F.is_format("mlx:4g64") and F.is_mlx("MLX:8g32") and not F.is_mlx("mlx:4g48") and not F.is_mlx("q4_0")
    assert "mlx:4g64" not in F.names()  # names() stays the GGUF block formats
    with pytest.raises(ValueError, match="mlx:<bits>g<group> with bits in 2, 3, 4, 5, 6, 8"):
        F.get("mlx:7g64")


# ---- qatlm export --mlx --------------------------------------------------------------------------------

# arch -> (builder, plan, whether the run trains with an imatrix)
CASES = {
    "llama": (tiny_llama, "q4_0", False),  # untied head: lm_head Q8_0 (a per-layer entry), q/k row permutation
    "gemma3": (tiny_gemma3, "q4_0", False),  # tied: the embedding (Q8_0, a per-layer entry) is the output
    "gemma3-mlx": (tiny_gemma3, "mlx:4g64", False),  # the MLX-native plan; norms stored as HF's w
    "qwen2": (lambda d: tiny_qwen(d, 2), "q4_1", False),  # q/k/v biases
    "qwen3": (lambda d: tiny_qwen(d, 3), "pure:q5_0", True),  # 5-bit codes, imatrix-weighted search
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """arch -> (run directory, export root): each tiny model trained 3 steps and exported with the CLI."""
    root = tmp_path_factory.mktemp("mlx")
    data = root / "train.txt"
    data.write_text(TEXT * 3)
    out = {}
    for name, (build, plan, use_imatrix) in CASES.items():
        teacher = build(root / f"teacher-{name}")
        im = compute_imatrix(teacher, [str(data)], root / f"imatrix-{name}.gguf", ctx=64, chunks=4,
                             progress=False) if use_imatrix else None
        run = root / f"run-{name}"
        train(TrainConfig(teacher=str(teacher), data=[str(data)], out=str(run), plan=plan, steps=3, seq_len=32,
                          batch_size=2, lr=3e-4, warmup=1, imatrix=str(im) if im else None), progress=False)
        exp = root / f"export-{name}"
        gguf = [] if F.is_mlx(plan) else [str(exp / "qat.gguf")]
        assert main(["export", str(run), *gguf, "--hf", str(exp / "hf"), "--mlx", str(exp / "mlx")]) == 0
        out[name] = (run, exp)
    return out


def mlx_layers(mlx_dir):
    """{HF module path: (codes, scales, biases, group, bits)} of an mlx-lm directory, read by mx.load."""
    cfg = json.loads((mlx_dir / "config.json").read_text())["quantization"]
    tensors = mx.load(str(mlx_dir / "model.safetensors"))
    out = {}
    for key in tensors:
        if key.endswith(".scales"):
            path = key[: -len(".scales")]
            g, b = (cfg[path]["group_size"], cfg[path]["bits"]) if path in cfg else (cfg["group_size"], cfg["bits"])
            out[path] = (tensors[f"{path}.weight"], tensors[key], tensors[f"{path}.biases"], g, b)
    return out, tensors


@pytest.mark.parametrize("name", list(CASES))
def test_every_mlx_layer_holds_the_gguf_values(runs, name):
    run, exp = runs[name]
    cfg, t, student = load_run(run)
    layers, tensors = mlx_layers(exp / "mlx")
    a = arch.of(student)
    gguf_name = arch.gguf_names(student)
    params = dict(student.named_parameters())
    if F.is_mlx(cfg.plan):  # no GGUF: the values are the student's fake quant (what it trained with)
        expected = {p: F.fake_quant(params[f"{p}.weight"].detach(), cfg.plan).numpy() for p in layers}
        layout = lambda p, w: w  # noqa: E731
    else:  # the GGUF's tensors; MLX's (Hugging Face layout) brought to llama.cpp's (Llama: q/k rows permuted)
        from gguf import GGUFReader

        gg = {t_.name: t_ for t_ in GGUFReader(exp / "qat.gguf").tensors}
        assert {n for n, t_ in gg.items() if t_.tensor_type.name not in ("F32", "F16")} == \
            {gguf_name[f"{p}.weight"] for p in layers}  # every quantized GGUF tensor is an MLX layer
        expected = {}
        for p in layers:
            rt = gg[gguf_name[f"{p}.weight"]]
            expected[p] = F.dequantize(np.asarray(rt.data).reshape(-1), rt.tensor_type.name.lower(),
                                       params[f"{p}.weight"].shape).numpy()
        layout = lambda p, w: a.to_gguf(f"{p}.weight", torch.from_numpy(w), student.config).numpy()  # noqa: E731
        if a.permute_qk:  # the permutation is really exercised
            w = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
            assert not np.array_equal(layout("model.layers.0.self_attn.q_proj", w), w)
    assert len(layers) == 2 * 7 + 1 + (not arch.is_tied(student))
    for p, (q, s, b, group, nbits) in layers.items():
        by_hand, by_mlx = mlx_dequant_fp32(q, s, b, group, nbits)
        assert np.array_equal(bits_of(layout(p, by_hand)), bits_of(expected[p])), p
        assert np.array_equal(bits_of(layout(p, by_mlx)), bits_of(expected[p])), p
    # and MLX's own GGUF reader reads the very same arrays (it reads Q4_0 / Q4_1 / Q8_0 natively; mlx 0.32 refuses
    # a file holding Q5_0 tensors: "[load_gguf] gguf_tensor_to_f16 failed")
    if not F.is_mlx(cfg.plan) and {t_.tensor_type.name for t_ in gg.values()} <= {"F32", "F16", "Q4_0", "Q4_1", "Q8_0"}:
        from_gguf, same = mx.load(str(exp / "qat.gguf")), 0
        for p, arrays in layers.items():
            g = gguf_name[f"{p}.weight"][: -len(".weight")]
            if f"{g}.scales" not in from_gguf or (a.permute_qk and p.endswith(("q_proj", "k_proj"))):
                continue  # Q5_0 / Q5_1 (mx.load dequantizes them), or rows in llama.cpp's order
            for suffix, ours in zip(("weight", "scales", "biases"), arrays[:3]):
                theirs = from_gguf[f"{g}.{suffix}"]
                assert ours.dtype == theirs.dtype and np.array_equal(np.array(ours).view(np.uint8),
                                                                     np.array(theirs).view(np.uint8)), f"{p}.{suffix}"
            same += 1
        assert same >= len(layers) - 4  # all but Llama's q/k projections
    for k, v in tensors.items():  # everything else: the student's fp32 values, untouched
        if not k.endswith((".scales", ".biases")) and k[: -len(".weight")] not in layers:
            assert np.array_equal(np.array(v), params[k].detach().numpy()), k


def test_mlx_config_names_the_layers_that_differ(runs):
    q = json.loads((runs["llama"][1] / "mlx" / "config.json").read_text())["quantization"]
    assert q == {"group_size": 32, "bits": 4, "mode": "affine", "lm_head": {"group_size": 32, "bits": 8}}
    q = json.loads((runs["gemma3"][1] / "mlx" / "config.json").read_text())["quantization"]
    assert q == {"group_size": 32, "bits": 4, "mode": "affine", "model.embed_tokens": {"group_size": 32, "bits": 8}}
    q = json.loads((runs["gemma3-mlx"][1] / "mlx" / "config.json").read_text())["quantization"]
    assert q == {"group_size": 64, "bits": 4, "mode": "affine"}


def test_mlx_plan_export_equals_mlx_lm_convert(runs, tmp_path):
    """mlx_lm.convert of the unquantized checkpoint to fp16, 4 bits, groups of 64 writes the very codes, scales and
    biases of the mlx:4g64 export: QAT trained against mx.quantize itself."""
    from mlx_lm import convert

    exp = runs["gemma3-mlx"][1]
    convert(str(exp / "hf"), str(tmp_path / "converted"), quantize=True, q_group_size=64, q_bits=4, dtype="float16")
    ref = mx.load(str(tmp_path / "converted" / "model.safetensors"))
    layers, _ = mlx_layers(exp / "mlx")
    compared = 0
    for p, arrays in layers.items():
        for suffix, ours in zip(("weight", "scales", "biases"), arrays[:3]):
            theirs = ref[f"{p}.{suffix}"]
            assert ours.dtype == theirs.dtype and np.array_equal(np.array(ours).view(np.uint8),
                                                                 np.array(theirs).view(np.uint8)), f"{p}.{suffix}"
            compared += 1
    assert compared == 3 * len(layers) == 45


@pytest.mark.parametrize("name", list(CASES))
def test_mlx_lm_loads_runs_and_generates(runs, name):
    import mlx_lm

    run, exp = runs[name]
    cfg, t, student = load_run(run)
    reference = copy.deepcopy(student)
    apply_plan_(reference, cfg.plan, tuple(cfg.overrides), load_imatrix(cfg, reference))  # the export's values
    model, tok = mlx_lm.load(str(exp / "mlx"))
    ids = t.tokenizer("It was the best of times, it was the worst").input_ids
    ours = np.array(model(mx.array([ids]))[0])
    with torch.no_grad():
        ref = reference(torch.tensor([ids])).logits[0].numpy()
    # MLX computes in fp32 here except the quantized embedding rows, which it dequantizes in fp16: agreement to
    # ~1e-3 of the logit scale; a wrong name, layout, norm convention or rope setting gives errors of order 0.1-1
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    print(f"{name}: max |MLX - torch| / max |logit| = {err:.1e}")
    assert err < 1e-2
    text = mlx_lm.generate(model, tok, prompt="It was the", max_tokens=6)
    assert isinstance(text, str) and text


def test_model_cards_beside_every_export(runs):
    run, exp = runs["llama"]
    for d, lib in ((exp, "gguf"), (exp / "hf", "transformers"), (exp / "mlx", "mlx")):
        text = (d / "README.md").read_text()
        front = yaml.safe_load(text.split("---\n")[1])
        assert front["pipeline_tag"] == "text-generation" and front["library_name"] == lib
        assert "qat" in front["tags"] and ("gguf" in front["tags"]) == (lib != "mlx")
        assert f"qatlm export {run} {exp / 'qat.gguf'} --hf {exp / 'hf'} --mlx {exp / 'mlx'}" in text
        assert "`q4_0`" in text and "Q4_0 x" in text


# ---- refusals ------------------------------------------------------------------------------------------

def test_mlx_export_refuses_types_it_cannot_hold_exactly(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=256, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=4))
    with pytest.raises(ValueError, match=r"plan 'q4_k_m': \d+ tensors have types MLX's affine groups cannot hold "
                                         r"exactly \(q4_k, q6_k; .*--override"):
        export_mlx(model, tmp_path / "out", "q4_k_m")
    assert not (tmp_path / "out").exists()


def test_gguf_export_refuses_mlx_plans(runs, tmp_path):
    run, _ = runs["gemma3-mlx"]
    cfg, t, student = load_run(run)
    with pytest.raises(ValueError, match="MLX's mlx:4g64, which a GGUF cannot hold"):
        export_gguf(student, tmp_path / "x.gguf", "mlx:4g64", hf_dir=t.hf_dir, progress=False)
    assert main(["export", str(run), str(tmp_path / "x.gguf")]) == 2  # one line naming --mlx, no traceback
    assert not (tmp_path / "x.gguf").exists()
