"""Importance-matrix speed: qatlm.imatrix.collect vs llama.cpp's llama-imatrix on the same F32 model (the bundled
Gemma 3 270M, dequantized by llama-quantize), text, chunks and thread count, measured in one run. Prints wall
times side by side and how closely the two imatrices agree.

    python benchmarks/imatrix_speed.py [--chunks 8] [--ctx 512] [--threads 2] [--text FILE]

llama-imatrix is timed as users run it (it also prints a perplexity, so it computes the [n_ctx, n_vocab] logits)
and with --no-ppl (logits still computed, not scored); qatlm never runs the output head. Both times are whole
runs from the shell's view: model load + tokenization + collection + writing the file; qatlm's model load is
also shown apart (the first ever run converts the GGUF to a cached Hugging Face directory: minutes, excluded).
The tools are built on first use (tests/llama_tools.py).
"""
import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from llama_tools import tool  # noqa: E402

import qatlm  # noqa: E402


def _llama_imatrix(f32: Path, text: Path, out: Path, a, no_ppl: bool) -> tuple[float, float]:
    """(wall seconds, seconds of compute): the compute estimated from the log's "X seconds per pass" (the first
    pass, timed by llama-imatrix itself) times the number of passes (a pass is n_batch / n_ctx = 4 chunks)."""
    cmd = [tool("llama-imatrix"), "-m", f32, "-f", text, "-o", out, "-c", a.ctx, "--chunks", a.chunks,
           "-t", a.threads] + (["--no-ppl"] if no_ppl else [])
    t = time.perf_counter()
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    dt = time.perf_counter() - t
    if r.returncode:
        raise SystemExit(f"llama-imatrix failed:\n{r.stderr[-2000:]}")
    m = re.search(r"([0-9.]+) seconds per pass", r.stdout + r.stderr)
    n_seq = max(1, 2048 // a.ctx)  # llama-imatrix: n_seq = n_batch (default 2048) / n_ctx chunks per pass
    return dt, (float(m.group(1)) * -(-a.chunks // n_seq) if m else float("nan"))


def _qatlm(gguf: Path, text: Path, out: Path, a) -> tuple[float, float, float]:
    from qatlm.arch import gguf_names
    from qatlm.imatrix import collect, imatrix_chunks, write_imatrix
    from qatlm.teacher import load_teacher

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    teacher = load_teacher(gguf)
    t_load = time.perf_counter() - t0
    model, tok = teacher.model, teacher.tokenizer
    names = {p[: -len(".weight")]: g for p, g in gguf_names(model).items()
             if g.startswith("blk.") and isinstance(model.get_submodule(p[: -len(".weight")]), torch.nn.Linear)}
    s = text.read_text(encoding="utf-8")
    s = s[:-1] if s.endswith("\n") else s
    ids = [tok.bos_token_id] + tok(s, add_special_tokens=False).input_ids
    chunks = imatrix_chunks(ids, a.ctx, a.chunks, tok.bos_token_id)
    t1 = time.perf_counter()
    im = collect(model, names, chunks, progress=False, datasets=[str(text)])
    t_collect = time.perf_counter() - t1
    write_imatrix(im, out)
    return time.perf_counter() - t0, t_load, t_collect


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text", type=Path, default=next(Path(qatlm.__file__).parent.rglob("gpl-3.0.txt")))
    a = ap.parse_args()
    from qatlm.imatrix import read_imatrix
    from qatlm.teacher import load_teacher
    from qatlm.sources import bundled_gguf

    src = Path(bundled_gguf())
    load_teacher(src)  # warm-up: the cached Hugging Face conversion and the OS file cache
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        f32 = d / "model-f32.gguf"
        subprocess.run([str(tool("llama-quantize")), "--allow-requantize", str(src), str(f32), "F32",
                        str(a.threads)], check=True, capture_output=True)
        t_ref, c_ref = _llama_imatrix(f32, a.text, d / "llama.gguf", a, no_ppl=False)
        t_ref_noppl, c_ref_noppl = _llama_imatrix(f32, a.text, d / "llama-noppl.gguf", a, no_ppl=True)
        t_ours, t_load, c_ours = _qatlm(src, a.text, d / "qatlm.gguf", a)
        ref, ours = read_imatrix(d / "llama.gguf"), read_imatrix(d / "qatlm.gguf")
        rel = max(float(np.linalg.norm(ours.weights(n) - ref.weights(n)) / np.linalg.norm(ref.weights(n)))
                  for n in ref.entries)
    tokens = a.chunks * a.ctx
    print(f"Gemma 3 270M F32, {a.chunks} chunks x {a.ctx} of {a.text.name}, {a.threads} threads, "
          f"{len(ref)} tensors")
    print(f"{'':24s} {'whole run':>10s} {'compute':>10s} {'tok/s (compute)':>16s}")
    for label, t, c in (("llama-imatrix", t_ref, c_ref), ("llama-imatrix --no-ppl", t_ref_noppl, c_ref_noppl),
                        ("qatlm collect", t_ours, c_ours)):
        print(f"{label:24s} {t:9.1f}s {c:9.1f}s {tokens / c:16.1f}")
    print(f"(qatlm's whole run includes {t_load:.1f} s of Hugging Face model + tokenizer load; llama-imatrix's "
          "compute is its own per-pass timing)")
    print(f"speed ratio llama-imatrix / qatlm: whole run {t_ref / t_ours:.2f} (--no-ppl {t_ref_noppl / t_ours:.2f}), "
          f"compute {c_ref / c_ours:.2f} (--no-ppl {c_ref_noppl / c_ours:.2f}); "
          f"max relative L2 of in_sum2/count: {rel:.1e}")

if __name__ == "__main__":
    main()
