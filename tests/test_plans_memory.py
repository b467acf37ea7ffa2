"""Type plans (llama-quantize's rules) and memory accounting."""
import json

import pytest

from qatlm.cli import main
from qatlm.memory import load_shapes, memory
from qatlm.gguf.plans import parse_plan


def gemma_tensors(name):
    return load_shapes(name).tensors


def test_q4_0_plan_for_gemma_sizes():
    for model, out_type in [("gemma-3-270m", "q8_0"), ("gemma-3-1b", "q8_0"), ("gemma-3-4b", "q6_k"),
                            ("gemma-3-27b", "q6_k")]:
        types = parse_plan("q4_0").types(gemma_tensors(model))
        assert types["token_embd.weight"] == out_type, model  # tied output: Q6_K unless 256 doesn't divide
        assert types["blk.0.attn_q.weight"] == "q4_0" and types["blk.0.ffn_down.weight"] == "q4_0"
        assert types["blk.0.attn_norm.weight"] == "f32" and types["output_norm.weight"] == "f32"


def test_other_plans_and_overrides():
    t = gemma_tensors("gemma-3-270m")
    assert parse_plan("q8_0").types(t)["token_embd.weight"] == "q8_0"
    assert set(parse_plan("pure:q4_0").types(t).values()) == {"q4_0", "f32"}
    assert parse_plan("f16").types(t)["token_embd.weight"] == "f16"
    assert parse_plan("q5_0").types(t)["blk.3.ffn_up.weight"] == "q5_0"
    types = parse_plan("q4_0", ["ffn_down=q8_0", r"blk\.0\..*=f16"]).types(t)
    assert types["blk.1.ffn_down.weight"] == "q8_0" and types["blk.0.attn_q.weight"] == "f16"
    # as llama-quantize's --tensor-type: norms and other unquantized tensors keep their type; the first match wins
    types = parse_plan("q4_0", [r"blk\.0\.ffn_down=q5_0", r"blk\..*=mxfp4"]).types(t)
    assert types["blk.0.attn_norm.weight"] == "f32" and types["blk.1.ffn_norm.weight"] == "f32"
    assert types["blk.0.ffn_down.weight"] == "q5_0" and types["blk.0.attn_q.weight"] == "mxfp4"


def test_plan_errors():
    with pytest.raises(ValueError, match="unknown plan 'q3_x'.*q4_0"):
        parse_plan("q3_x")
    with pytest.raises(ValueError, match="PATTERN=TYPE"):
        parse_plan("q4_0", ["ffn_down"])
    with pytest.raises(ValueError, match="not a multiple of Q4_0's block"):
        parse_plan("q4_0").types([("blk.0.ffn_up.weight", (48, 8), "f32")])
    assert parse_plan("q4_k".replace("k", "0")).default == "q4_0"


def test_q4_k_m_plan_follows_use_more_bits():
    """Q4_K_M: attn_v / ffn_down of layers i < n/8, i >= 7n/8 or (i - n/8) % 3 == 2 get Q6_K (Gemma 3 4B:
    34 layers -> 0-3, 6, 9, ..., 27, 29-33), the other weights Q4_K; 2560-wide rows need no fallback."""
    types = parse_plan("q4_k_m").types(gemma_tensors("gemma-3-4b"))
    more = [i for i in range(34) if types[f"blk.{i}.ffn_down.weight"] == "q6_k"]
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 29, 30, 31, 32, 33]
    assert [i for i in range(34) if types[f"blk.{i}.attn_v.weight"] == "q6_k"] == more
    assert types["blk.5.attn_q.weight"] == "q4_k" and types["token_embd.weight"] == "q6_k"
    assert parse_plan("q4_k_m").file_type == 15 and parse_plan("pure:q4_0").file_type == 2


def test_synthesized_shapes_match_the_real_gguf(gemma_gguf):
    real = [(n, tuple(ne)) for n, ne, _ in load_shapes(str(gemma_gguf)).tensors]
    synth = [(n, ne) for n, ne, _ in load_shapes("gemma-3-270m").tensors]
    assert sorted(real) == sorted(synth)


def test_memory_matches_written_file(gemma_gguf, session_tmp):
    """weights_bytes = the tensor data of the file `qatlm quantize` writes for the same plan."""
    from qatlm.gguf.io import validate
    from qatlm.gguf.ptq import quantize_gguf

    path = session_tmp / "qatlm_q4_0.gguf"
    if not path.exists():
        quantize_gguf(gemma_gguf, path, "q4_0", progress=False)
    assert memory(str(gemma_gguf), "q4_0").weights_bytes == sum(t.nbytes for t in validate(path).tensors)


def test_gemma3_published_figures():
    """bf16 weights: 54 / 24 / 8 / 2 GB (27B/12B/4B/1B, text weights, GB = 1e9), as Google quotes them."""
    for model, gb in [("gemma-3-27b", 54), ("gemma-3-12b", 24), ("gemma-3-4b", 8), ("gemma-3-1b", 2)]:
        assert round(memory(model, "bf16").weights_bytes / 1e9) == gb
    assert round(memory("gemma-3-1b", "int4").weights_bytes / 1e9, 1) == 0.5
    # the Gemma 3 report's int4 blocks=32 row for 27B: 15.3 GB; every weight at Q4_0 (4.5 bits): 15.2
    assert round(memory("gemma-3-27b", "pure:q4_0").weights_bytes / 1e9, 1) == 15.2


def test_kv_cache_sliding_window():
    # 270M: 18 layers, 1 KV head of 256, window 512; layers 5, 11, 17 global
    per_token_layer = 2 * 1 * 256 * 2
    r = memory("gemma-3-270m", "q4_0", ctx=4096)
    assert r.kv_bytes == per_token_layer * (3 * 4096 + 15 * 512)
    assert memory("gemma-3-270m", "q4_0", ctx=100).kv_bytes == per_token_layer * 18 * 100


def test_memory_cli_json(tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["memory", "gemma-3-27b", "--plan", "q4_0", "--ctx", "32768", "--json", str(out)]) == 0
    j = json.loads(out.read_text())
    assert j["weights_bytes"] > 15e9 and j["kv_bytes"] > 0 and "q6_k" in j["by_type"]
    assert "vision tower" in capsys.readouterr().out


def test_cli_errors(tmp_path, capsys):
    assert main(["memory", "no-such-model"]) == 2
    assert "shipped model name" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "missing.gguf"), str(tmp_path / "o.gguf")]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "example" in capsys.readouterr().out


def test_q3_k_m_on_640_wide_rows_holds_no_q3_k():
    """Gemma 3 270M under Q3_K_M (as llama-quantize writes it, llamacpp-facts section 10): its 640-wide rows send
    every Q3_K to Q4_0, and `qatlm plan` says so."""
    from collections import Counter

    from qatlm.gguf.plans import fallback_note

    t = gemma_tensors("gemma-3-270m")
    plan = parse_plan("q3_k_m")
    types = Counter(v for v in plan.types(t).values() if v != "f32")
    assert types == {"q4_0": 72, "q4_k": 35, "q5_0": 16, "q5_1": 2, "q5_k": 1, "q8_0": 1}
    fb = plan.fallbacks(t)
    assert fb["blk.0.attn_q.weight"] == ("q3_k", "q4_0") and fb["blk.0.attn_v.weight"] == ("q5_k", "q5_1")
    assert "blk.0.ffn_down.weight" not in fb  # 2048-wide: a real Q5_K
    note = fallback_note(plan, t)
    assert "72 Q3_K -> Q4_0, 16 Q4_K -> Q5_0, 2 Q5_K -> Q5_1" in note and "No tensor is stored as Q3_K" in note
    # Q4_0: only the tied output's Q6_K -> Q8_0 (llama-quantize logs it as a fallback too); pure plans have none
    assert "1 of 127 quantized tensors" in fallback_note(parse_plan("q4_0"), t)
    assert fallback_note(parse_plan("pure:q4_0"), t) == ""


def test_plan_command_reports_fallbacks(capsys):
    assert main(["plan", "bundled", "--plan", "q3_k_m"]) == 0
    assert "No tensor is stored as Q3_K" in capsys.readouterr().out
    assert main(["plan", "bundled", "--plan", "pure:q4_0"]) == 0
    assert "fall back" not in capsys.readouterr().out


def test_iq4_plans_follow_n_gqa_and_the_imatrix():
    """IQ4_NL / IQ4_XS: attn_v -> Q5_K when 4+ heads share a KV head (270M: 4/1; 4B: 8/4 does not), ffn_down of
    layers i < n/8 -> Q5_K only without an imatrix; IQ4_XS falls back to IQ4_NL on 640-wide rows."""
    t = gemma_tensors("gemma-3-270m")
    rtn, im = parse_plan("iq4_nl").types(t), parse_plan("iq4_nl").types(t, imatrix=True)
    assert rtn["blk.0.attn_v.weight"] == im["blk.0.attn_v.weight"] == "q5_1"  # Q5_K on 640 rows
    assert [rtn[f"blk.{i}.ffn_down.weight"] for i in range(3)] == ["q5_k", "q5_k", "iq4_nl"]
    assert [im[f"blk.{i}.ffn_down.weight"] for i in range(3)] == ["iq4_nl"] * 3
    assert parse_plan("iq4_xs").types(t)["blk.3.attn_q.weight"] == "iq4_nl"
    t4 = gemma_tensors("gemma-3-4b")
    types = parse_plan("iq4_xs").types(t4)
    assert types["blk.0.attn_v.weight"] == "iq4_xs" and types["blk.3.ffn_down.weight"] == "q5_k"
    assert types["blk.4.ffn_down.weight"] == "iq4_xs" and types["token_embd.weight"] == "q6_k"
    assert parse_plan("iq4_xs").types(t4, n_gqa=4)["blk.0.attn_v.weight"] == "q5_k"


def test_k_quant_file_types_on_gemma_3_4b():
    """llama_tensor_get_type_impl's choices where 256 divides every row (Gemma 3 4B: 34 layers, 8 heads on 4 KV
    heads)."""
    t = gemma_tensors("gemma-3-4b")

    def layers(plan, key, typ):
        types = parse_plan(plan).types(t)
        return [i for i in range(34) if types[f"blk.{i}.{key}.weight"] == typ]

    q3m = parse_plan("q3_k_m").types(t)
    assert layers("q3_k_m", "attn_v", "q5_k") == [0, 1] and q3m["blk.2.attn_v.weight"] == "q4_k"
    assert layers("q3_k_m", "ffn_down", "q5_k") == [0, 1] and q3m["blk.9.ffn_down.weight"] == "q4_k"
    assert q3m["blk.9.attn_output.weight"] == "q4_k" and q3m["blk.9.ffn_up.weight"] == "q3_k"
    q3l = parse_plan("q3_k_l").types(t)
    assert {q3l[f"blk.5.{k}.weight"] for k in ("attn_v", "ffn_down", "attn_output")} == {"q5_k"}
    assert parse_plan("q3_k_s").types(t)["blk.5.ffn_down.weight"] == "q3_k"
    q2 = parse_plan("q2_k").types(t)
    assert (q2["blk.0.attn_v.weight"], q2["blk.0.ffn_down.weight"], q2["blk.0.attn_output.weight"],
            q2["blk.0.attn_q.weight"]) == ("q3_k", "q3_k", "q3_k", "q2_k")
    assert parse_plan("q2_k").types(t, n_gqa=4)["blk.0.attn_v.weight"] == "q4_k"
    assert layers("q4_k_s", "attn_v", "q5_k") == [0, 1, 2, 3] == layers("q4_k_s", "ffn_down", "q5_k")
    assert layers("q5_k_m", "ffn_down", "q6_k") == layers("q4_k_m", "ffn_down", "q6_k")
    assert set(parse_plan("q5_k_s").types(t).values()) == {"q5_k", "q6_k", "f32"}
    assert [parse_plan(p).file_type for p in ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q5_k_s", "q5_k_m",
                                              "iq4_nl", "iq4_xs")] == [10, 11, 12, 13, 14, 16, 17, 25, 30]
