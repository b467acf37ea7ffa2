"""The training-memory planner (qatlm.train.memory_plan) against what torch really holds.

Two levels: the activations a decoder layer saves per token are counted exactly (torch's saved-tensor hooks, the
same numbers to the byte); the whole step's peak, planned, is within 15% of the peak of live tensors measured
over two real steps (AdamW's states exist from the second on) (qatlm.train.peak_memory). 15% because the plan models tensors, not every one: small
per-op temporaries, the gradients of activations inside a layer's backward (BWD_ACT_TMP, a measured fraction)
and constant-size tensors (norm weights + 1, rotary tables) are approximated; on these tiny models it lands
within 8%.
"""
import json
import subprocess
import sys

import pytest
import torch

from qatlm.cli import main
from qatlm.memory import load_shapes
from qatlm.train import dist
from qatlm.train.memory_plan import TrainSetup, dims_of, fewest_devices, layer_activations, train_memory
from tiny_models import tiny_gemma3, tiny_llama, tiny_qwen

BF16 = dist.native_bf16(torch.device("cpu"))  # bf16 autocast on CPU only where it is native (dist.compute_dtype)
PRECISIONS = ["fp32", "bf16"] if BF16 else ["fp32"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_train_memory")
    return {"gemma": tiny_gemma3(root / "gemma"), "llama": tiny_llama(root / "llama"),
            "qwen2": tiny_qwen(root / "qwen2", version=2),
            # 2 KV heads: repeat_kv copies them (with one KV head its reshape is a view)
            "gemma_gqa": tiny_gemma3(root / "gemma_gqa", num_attention_heads=4, num_key_value_heads=2)}


def _saved_per_layer(student, batch: int, seq_len: int, dtype) -> list[int]:
    """Bytes of the non-parameter storages each decoder layer saves for backward (each storage counted once)."""
    params = {p.untyped_storage().data_ptr() for p in student.parameters()}
    seen: dict[int, int] = {}
    where = [None]
    per = [0] * len(student.model.layers)

    def pack(x):
        st = x.untyped_storage()
        if where[0] is not None and st.data_ptr() not in params and st.data_ptr() not in seen:
            seen[st.data_ptr()] = st.nbytes()
            per[where[0]] += st.nbytes()
        return x

    hooks = []
    for i, layer in enumerate(student.model.layers):
        hooks.append(layer.register_forward_pre_hook(lambda m, a, i=i: where.__setitem__(0, i)))
        hooks.append(layer.register_forward_hook(lambda m, a, o: where.__setitem__(0, None)))
    ids = torch.randint(0, 300, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            student.model(ids, use_cache=False)  # as kd_loss.student_rows calls it
    for h in hooks:
        h.remove()
    return per


@pytest.mark.parametrize("kind", ["gemma", "gemma_gqa", "llama", "qwen2"])
@pytest.mark.parametrize("lora", [0, 4])
def test_layer_activations_are_what_autograd_saves(tiny, kind, lora):
    """Per token, exactly: the saved bytes of 3 sequences minus those of 1 (what does not grow with the batch,
    the rotary tables and the norms' 1 + w, cancels; the weight copies too) = the planned difference. T = 64 is
    beyond the tiny Gemma's window of 16, so its sliding layer's mask is in it."""
    from qatlm.teacher import load_teacher
    from qatlm.train.config import TrainConfig
    from qatlm.train.loop import build_student

    t = load_teacher(str(tiny[kind]))
    student = build_student(TrainConfig(teacher=str(tiny[kind]), lora_rank=lora), t.model).train()
    d = dims_of(load_shapes(str(tiny[kind])), "q4_0")
    assert not kind.startswith("gemma") or [L.sliding for L in d.layers] == [True, False]  # config.layer_types, not the 6-rule
    T = 64
    for precision in PRECISIONS:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        one, three = _saved_per_layer(student, 1, T, dtype), _saved_per_layer(student, 3, T, dtype)
        for i, L in enumerate(d.layers):
            planned = [layer_activations(d, L, precision == "bf16", b * T, T, lora > 0, i == 0) for b in (1, 3)]
            assert three[i] - one[i] == planned[1] - planned[0], (precision, i)


def _measure(teacher, runs: str) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "qatlm.train.peak_memory", "--teacher", str(teacher), "--runs", runs,
                          "--steps", "2", "--seq-len", "256", "--batch-size", "2"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]


@pytest.mark.parametrize("kind", ["gemma", "llama"])
def test_planned_peak_within_15_percent_of_measured(tiny, kind):
    """Two steps of QAT in a fresh process, peak of live torch tensors (qatlm.train.peak_memory) vs the plan
    (--device-type cpu: AdamW's per-tensor step), full and LoRA, fp32 and bf16, with activation checkpointing
    (Hugging Face's, which the plan models for a feature `qatlm train` lacks) and (Gemma) a top-k teacher cache."""
    runs = [f"{p}:{lora}" for p in PRECISIONS for lora in (0, 4)] + [f"{PRECISIONS[-1]}:0:ckpt"]
    if kind == "gemma":
        runs.append(f"{PRECISIONS[-1]}:0:cache")
    measured = _measure(tiny[kind], ",".join(runs))
    assert len(measured) == len(runs)
    for r in measured:
        plan = train_memory(str(tiny[kind]), TrainSetup(
            lora=r["lora"], seq_len=256, batch_size=2, precision=r["precision"], checkpointing=r["checkpointing"],
            teacher=r["teacher_mode"], device_type="cpu"))
        assert r["baseline_bytes"] > 0 and r["peak_bytes"] > r["baseline_bytes"]
        assert abs(plan.peak_bytes / r["peak_bytes"] - 1) < 0.15, (r, plan.table())


def test_trainable_counts_match_the_student(tiny):
    """Full QAT trains every weight; LoRA the adapters on fake-quant Linears only (the tied head stays frozen)."""
    from qatlm.teacher import load_teacher
    from qatlm.train.config import TrainConfig
    from qatlm.train.loop import build_student

    for kind in ("gemma", "llama"):
        t = load_teacher(str(tiny[kind]))
        for lora in (0, 8):
            s = build_student(TrainConfig(teacher=str(tiny[kind]), lora_rank=lora), t.model)
            real = sum(p.numel() for p in s.parameters() if p.requires_grad)
            assert train_memory(str(tiny[kind]), TrainSetup(lora=lora)).trainable_params == real, (kind, lora)


def test_plan_scales_as_the_setup_says():
    base = TrainSetup(seq_len=4096, batch_size=1)
    one = train_memory("gemma-3-1b", base)
    assert one.peak_bytes == sum(one.items.values()) + max(one.phases.values())
    two = train_memory("gemma-3-1b", TrainSetup(seq_len=4096, batch_size=1, devices=2))
    assert two.items["AdamW states (2 x fp32, 1/N)"] * 2 == pytest.approx(one.items["AdamW states (2 x fp32)"], abs=8)
    sharded = train_memory("gemma-3-1b", TrainSetup(seq_len=4096, batch_size=1, devices=2, teacher="sharded"))
    assert sharded.peak_bytes < two.peak_bytes
    ckpt = train_memory("gemma-3-1b", TrainSetup(seq_len=4096, batch_size=1, checkpointing=True))
    assert ckpt.phases["activations + KD head"] < one.phases["activations + KD head"] / 2
    assert ckpt.flops_per_token > one.flops_per_token  # the recomputed forward
    lora = train_memory("gemma-3-1b", TrainSetup(seq_len=4096, batch_size=1, lora=16))
    assert lora.items["AdamW states (2 x fp32)"] < one.items["AdamW states (2 x fp32)"] / 50
    cache = train_memory("gemma-3-1b", TrainSetup(seq_len=4096, batch_size=1, teacher="cache"))
    assert "teacher weights (fp32)" not in cache.items and cache.flops_per_token < one.flops_per_token
    assert cache.items["teacher cache rows of the batch"] == 4096 * (128 * 6 + 4)


def test_fewest_devices_is_the_threshold():
    shapes = load_shapes("gemma-3-4b")
    u = TrainSetup(seq_len=4096, batch_size=1, teacher="sharded", devices=2)  # --devices does not limit the search
    p = train_memory("gemma-3-4b", u, gpu_gb=80, shapes=shapes)
    n = p.fewest_devices
    assert n is not None and n >= 2
    d = dims_of(shapes, "q4_0")
    assert fewest_devices(d, u, 80) == n
    for k, fits in ((n, True), (n - 1, False)):
        if k >= 2:
            at = train_memory("gemma-3-4b", TrainSetup(seq_len=4096, batch_size=1, teacher="sharded", devices=k),
                              shapes=shapes)
            assert (at.peak_bytes <= 0.95 * 80e9) == fits, k


def test_errors_name_the_fix(tmp_path, capsys):
    with pytest.raises(ValueError, match="shipped model name"):
        train_memory("no-such-model")
    with pytest.raises(ValueError, match="--devices >= 2"):
        train_memory("gemma-3-270m", TrainSetup(teacher="sharded"))
    with pytest.raises(ValueError, match="teacher-cache-k"):
        train_memory("gemma-3-270m", TrainSetup(teacher="cache", cache_k=300000))
    with pytest.raises(ValueError, match="bf16 or fp32"):
        train_memory("gemma-3-270m", TrainSetup(precision="fp16"))
    with pytest.raises(ValueError, match="--seq-len >= 8"):
        train_memory("gemma-3-270m", TrainSetup(seq_len=4))
    assert main(["memory", "gemma-3-270m", "--lora", "4"]) == 2
    assert "need --train" in capsys.readouterr().err
    assert main(["memory", "gemma-3-270m", "--train", "--teacher", "sharded"]) == 2


def test_cli_train_json(tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["memory", "gemma-3-12b", "--train", "--seq-len", "4096", "--batch-size", "1", "--lora", "16",
                 "--devices", "4", "--teacher", "sharded", "--checkpointing", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "peak" in text and "estimate" in text and "fewest 80 GB devices" in text
    r = json.loads(out.read_text())
    assert r["peak_bytes"] == sum(r["items"].values()) + max(r["phases"].values())
    assert r["setup"]["devices"] == 4 and r["setup"]["lora"] == 16 and r["tokens_per_s"] > 0
