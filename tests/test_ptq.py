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


def assert_same_file(ours, ref):
    """Whole-file byte equality: metadata (its order included), tensor infos, alignment padding and data."""
    a, b = open(ours, "rb").read(), open(ref, "rb").read()
    if a != b:
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        raise AssertionError(f"{ours} differs from {ref} at byte {first} (sizes {len(a)}, {len(b)}): "
                             f"{a[max(0, first - 40):first + 40]!r} vs {b[max(0, first - 40):first + 40]!r}")


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
    # from the same source file, the whole file is llama-quantize's, byte for byte
    assert_same_file(quantize_gguf(f32_gguf, session_tmp / "qatlm_q4_0_from_f32.gguf", "q4_0", progress=False), ref)


# types each plan's file must hold on Gemma 3 270M (640-wide rows: most K-quants fall back, see plans.py)
# (Q3_K_M there, 72 Q3_K -> Q4_0 and no Q3_K left: test_plans_memory; all K plans on 256-wide rows: below)
GEMMA_PLANS = {"q4_k_m": (15, {"Q4_K", "Q6_K", "Q5_0", "Q8_0"}), "q6_k": (18, {"Q6_K", "Q8_0"}),
               "iq4_nl": (25, {"IQ4_NL", "Q5_K", "Q5_1", "Q8_0"})}


@pytest.mark.parametrize("plan", list(GEMMA_PLANS))
def test_k_quant_plans_are_byte_identical_to_llama_quantize(gemma_gguf, f32_gguf, session_tmp, plan):
    """Q4_K_M (Q4_K, Q6_K on use_more_bits layers of attn_v/ffn_down, fallbacks Q5_0/Q8_0 for 640-wide rows),
    Q6_K and IQ4_NL (Q5_K for attn_v with 4 heads per KV head, falling back to Q5_1, and for the first ffn_down
    layers): every tensor, type and bytes, as llama-quantize writes them."""
    ftype, used = GEMMA_PLANS[plan]
    ref = session_tmp / f"llama_{plan}.gguf"
    llama_quantize(f32_gguf, ref, ftype)
    ours = quantize_gguf(f32_gguf, session_tmp / f"qatlm_{plan}.gguf", plan, progress=False)
    a = assert_same_tensors(ours, ref)
    assert {t for t, _ in a.values()} - {"F32"} == used
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


IMATRIX_PLANS = [("q4_0", "Q4_0"), ("q4_1", "Q4_1"), ("q5_0", "Q5_0"), ("q5_1", "Q5_1"), ("q4_k_m", "Q4_K_M"),
                 ("q6_k", "Q6_K"), ("iq4_nl", "IQ4_NL")]


@pytest.fixture(scope="module")
def imatrix_file(f32_gguf, session_tmp):
    """An imatrix of the bundled model (qatlm imatrix, 4 chunks of the GPL-3 text shipped with qatlm)."""
    from qatlm.corpora import ood_text
    from qatlm.imatrix.compute import compute_imatrix

    return compute_imatrix(f32_gguf, [str(ood_text())], session_tmp / "ptq-imatrix.gguf", 512, 4, progress=False)


@pytest.mark.parametrize("plan, llama_type", IMATRIX_PLANS)
def test_imatrix_plans_are_byte_identical_to_llama_quantize(f32_gguf, imatrix_file, session_tmp, llama_tool,
                                                            plan, llama_type):
    """qatlm quantize --imatrix == llama-quantize --imatrix (the tool itself), every tensor, incl. the type
    changes an imatrix causes (Q4_0 / Q5_0 files: ffn_down of blocks 0 and 1 as Q4_1 / Q5_1)."""
    from conftest import run_tool

    ref = session_tmp / f"llama_imatrix_{plan}.gguf"
    run_tool([llama_tool("llama-quantize"), "--imatrix", imatrix_file, f32_gguf, ref, llama_type, 2],
             session_tmp / f"llama-quantize-{plan}.log")
    ours = quantize_gguf(f32_gguf, session_tmp / f"qatlm_imatrix_{plan}.gguf", plan, imatrix=imatrix_file,
                         progress=False)
    a = assert_same_tensors(ours, ref)
    assert_same_file(ours, ref)  # incl. the quantize.imatrix.* keys llama-quantize records
    if plan in ("q4_0", "q5_0"):
        guard = {"q4_0": "Q4_1", "q5_0": "Q5_1"}[plan]
        assert [a[f"blk.{i}.ffn_down.weight"][0] for i in range(3)] == [guard, guard, plan.upper()]
    if plan == "iq4_nl":  # with an imatrix the first ffn_down layers stay IQ4_NL (Q5_K without one)
        assert [a[f"blk.{i}.ffn_down.weight"][0] for i in range(3)] == ["IQ4_NL"] * 3


def test_bad_imatrix_is_refused(f32_gguf, imatrix_file, session_tmp):
    """An imatrix of another model (missing or wrongly sized entries) is an error naming the file and the
    tensor, never a silent round-to-nearest; the earlier output is untouched."""
    from qatlm.imatrix import read_imatrix, write_imatrix

    im = read_imatrix(imatrix_file)
    out = session_tmp / "bad-imatrix-out.gguf"
    out.write_bytes(b"earlier output")
    del im.entries["blk.3.attn_v.weight"]
    missing = write_imatrix(im, session_tmp / "missing.gguf")
    with pytest.raises(ValueError, match=r"missing.gguf: .*no entry for 1 weight\(s\): blk.3.attn_v.weight"):
        quantize_gguf(f32_gguf, out, "q4_0", imatrix=missing, progress=False)
    im = read_imatrix(imatrix_file)
    e = im.entries["blk.0.ffn_down.weight"]
    im.add("blk.0.ffn_down.weight", e.in_sum2[:, :64], e.counts)
    wrong = write_imatrix(im, session_tmp / "wrong.gguf")
    with pytest.raises(ValueError, match=r"wrong.gguf: .*wrong size: blk.0.ffn_down.weight"):
        quantize_gguf(f32_gguf, out, "q4_0", imatrix=wrong, progress=False)
    (session_tmp / "truncated.gguf").write_bytes(imatrix_file.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated.gguf"):
        quantize_gguf(f32_gguf, out, "q4_0", imatrix=session_tmp / "truncated.gguf", progress=False)
    assert out.read_bytes() == b"earlier output"


# ---- every K-quant and IQ4 plan on rows that are multiples of 256 ------------------------------------------

WIDE_PLANS = [("q2_k", "Q2_K", 10), ("q3_k_s", "Q3_K_S", 11), ("q3_k_m", "Q3_K_M", 12), ("q3_k_l", "Q3_K_L", 13),
              ("q4_k_s", "Q4_K_S", 14), ("q4_k_m", "Q4_K_M", 15), ("q5_k_s", "Q5_K_S", 16), ("q5_k_m", "Q5_K_M", 17),
              ("q6_k", "Q6_K", 18), ("iq4_nl", "IQ4_NL", 25), ("iq4_xs", "IQ4_XS", 30)]


@pytest.fixture(scope="module")
def wide_f32(session_tmp):
    """A 16-layer Gemma 3 as an F32 GGUF whose rows are 256 wide (hidden 256; 4 heads of 64 on 1 KV head: n_gqa 4),
    so that the K-quants and IQ4_XS apply, except ffn_down, whose 320-wide rows fall back; 16 layers give every
    layer rule (n/16, n/8, use_more_bits) a layer to act on. 10.5M weights."""
    from qatlm.gguf.export import export_gguf
    from qatlm.teacher import load_teacher
    from tiny_models import tiny_gemma3

    d = tiny_gemma3(session_tmp / "wide-gemma3", hidden_size=256, intermediate_size=320, num_hidden_layers=16,
                    num_attention_heads=4, num_key_value_heads=1, head_dim=64, query_pre_attn_scalar=64)
    return export_gguf(load_teacher(d).model, session_tmp / "wide-gemma3-f32.gguf", "f32", hf_dir=d, progress=False)


@pytest.fixture(scope="module")
def wide_imatrix(wide_f32, session_tmp):
    """An importance matrix for every blk.* weight: log-uniform mean squared activations over 6 decades."""
    from qatlm.imatrix import Imatrix, write_imatrix

    rng = np.random.default_rng(0)
    im = Imatrix(datasets=["synthetic"], chunk_count=4, chunk_size=512)
    for t in GGUFReader(wide_f32).tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2:
            im.add(t.name, (10.0 ** rng.uniform(-3, 3, size=int(t.shape[0]))) * 2048, 2048)
    return write_imatrix(im, session_tmp / "wide-imatrix.gguf")


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["rtn", "imatrix"])
@pytest.mark.parametrize("plan, llama_type, ftype", WIDE_PLANS)
def test_all_k_and_iq4_plans_are_byte_identical_to_llama_quantize(wide_f32, wide_imatrix, session_tmp, llama_tool,
                                                                  plan, llama_type, ftype, with_imatrix):
    """qatlm quantize --plan P [--imatrix] == llama-quantize [--imatrix] P, every tensor's type and bytes, for all of
    llama.cpp's K-quant and IQ4 file types on a model where they are real (plus ffn_down's fallbacks)."""
    from conftest import run_tool

    tag = f"{plan}-{'imatrix' if with_imatrix else 'rtn'}"
    ref = session_tmp / f"llama-wide-{tag}.gguf"
    im = ["--imatrix", wide_imatrix] if with_imatrix else []
    run_tool([llama_tool("llama-quantize"), *im, wide_f32, ref, llama_type, 2], session_tmp / f"quantize-{tag}.log")
    ours = quantize_gguf(wide_f32, session_tmp / f"qatlm-wide-{tag}.gguf", plan,
                         imatrix=wide_imatrix if with_imatrix else None, progress=False)
    a = assert_same_tensors(ours, ref)
    assert_same_file(ours, ref)
    assert GGUFReader(ours).fields["general.file_type"].contents() == ftype
    main = {"q2_k": "Q2_K", "iq4_nl": "IQ4_NL", "iq4_xs": "IQ4_XS"}.get(plan, plan[:4].upper())
    assert sum(t == main for t, _ in a.values()) >= 16, (plan, sorted({t for t, _ in a.values()}))
