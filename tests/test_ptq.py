"""qatlm's PTQ and export against llama.cpp itself, on the bundled Gemma 3 270M."""
import numpy as np
import pytest
from gguf import GGUFReader

from qatlm.gguf.ptq import quantize_gguf
from ggml_ref import llama_quantize, tensors_by_name

LLAMA_FTYPE_ALL_F32, LLAMA_FTYPE_MOSTLY_Q4_0 = 0, 2


@pytest.fixture(scope="module")
def f32_gguf(gemma_gguf, session_tmp):
    return quantize_gguf(gemma_gguf, session_tmp / "gemma_f32.gguf", "f32", progress=False)


def assert_same_tensors(ours, ref):
    a, b = tensors_by_name(ours), tensors_by_name(ref)
    assert list(a) == list(b) or set(a) == set(b)
    differ = [n for n in b if a[n][0] != b[n][0] or not np.array_equal(a[n][1], b[n][1])]
    assert not differ, f"{len(differ)} of {len(b)} tensors differ, e.g. {differ[:3]}: " \
                       f"{[(a[n][0], b[n][0]) for n in differ[:3]]}"
    return a


def test_f32_export_equals_llamacpp_dequantization(gemma_gguf, f32_gguf, session_tmp):
    """Round trip GGUF -> qatlm -> GGUF (plan f32) reproduces the source's dequantized values exactly:
    byte-identical to llama.cpp's own dequantization of the Q4_K_M file (Q4_K, Q5_0, Q6_K, Q8_0 tensors)."""
    ref = session_tmp / "llama_f32.gguf"
    llama_quantize(gemma_gguf, ref, LLAMA_FTYPE_ALL_F32)
    a = assert_same_tensors(f32_gguf, ref)
    assert {t for t, _ in a.values()} == {"F32"}


def test_q4_0_is_byte_identical_to_llama_quantize(gemma_gguf, f32_gguf, session_tmp):
    """qatlm quantize --plan q4_0 == llama-quantize Q4_0 on an F32 GGUF of the same weights, every tensor."""
    ref = session_tmp / "llama_q4_0.gguf"
    llama_quantize(f32_gguf, ref, LLAMA_FTYPE_MOSTLY_Q4_0)
    ours = quantize_gguf(gemma_gguf, session_tmp / "qatlm_q4_0.gguf", "q4_0", progress=False)
    a = assert_same_tensors(ours, ref)
    types = {}
    for name, (t, _) in a.items():
        types.setdefault(t, []).append(name)
    assert types["Q8_0"] == ["token_embd.weight"]  # tied output, 640 % 256 != 0 -> Q8_0
    assert len(types["Q4_0"]) == 18 * 7 and all(n.endswith("_norm.weight") or n.endswith("norm.weight") for n in types["F32"])
    r = GGUFReader(ours)
    assert r.fields["general.file_type"].contents() == LLAMA_FTYPE_MOSTLY_Q4_0


@pytest.mark.parametrize("plan,ftype", [("q4_k_m", 15), ("q6_k", 18)])
def test_k_quant_plans_are_byte_identical_to_llama_quantize(gemma_gguf, f32_gguf, session_tmp, plan, ftype):
    """Q4_K_M (Q4_K, Q6_K on use_more_bits layers of attn_v/ffn_down, fallbacks Q5_0/Q8_0 for 640-wide rows)
    and Q6_K: every tensor, type and bytes, as llama-quantize writes them."""
    ref = session_tmp / f"llama_{plan}.gguf"
    llama_quantize(f32_gguf, ref, ftype)
    ours = quantize_gguf(f32_gguf, session_tmp / f"qatlm_{plan}.gguf", plan, progress=False)
    a = assert_same_tensors(ours, ref)
    used = {t for t, _ in a.values()}
    assert {"Q4_K", "Q6_K"} <= used if plan == "q4_k_m" else "Q6_K" in used, used
    assert GGUFReader(ours).fields["general.file_type"].contents() == ftype


def test_llamacpp_loads_and_generates(gemma_gguf, session_tmp):
    """llama.cpp loads the Q4_0 file qatlm wrote and generates text from it."""
    import llama_cpp

    path = session_tmp / "qatlm_q4_0.gguf"
    if not path.exists():
        quantize_gguf(gemma_gguf, path, "q4_0", progress=False)
    llm = llama_cpp.Llama(str(path), n_ctx=128, n_threads=2, verbose=False)
    out = llm("The capital of France is", max_tokens=8, temperature=0.0)
    text = out["choices"][0]["text"]
    assert len(llm.tokenize(text.encode(), add_bos=False)) >= 2, text
