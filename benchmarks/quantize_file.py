"""Whole-model PTQ as a user runs it: `qatlm quantize F32.gguf OUT.gguf --plan q4_0` against llama.cpp's
`llama-quantize F32.gguf OUT.gguf Q4_0 2`, each a new process, on the bundled Gemma 3 270M as F32, measured
side by side (process start, imports, reading, torch.compile cache loading and writing included). The first qatlm
call of a machine also compiles its kernels (printed apart); then the runs alternate and the best of each is
compared. Also checks that the two files are byte-identical.

    python benchmarks/quantize_file.py [--repeats 3] [--plan q4_0]

llama-quantize is built on first use (tests/llama_tools.py).
"""
import argparse
import filecmp
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from llama_tools import tool  # noqa: E402

LLAMA_TYPES = {"q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1", "q8_0": "Q8_0", "q4_k_m": "Q4_K_M"}


def timed(cmd) -> float:
    t = time.perf_counter()
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{cmd[0]} failed:\n{r.stderr[-2000:]}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--plan", default="q4_0", choices=list(LLAMA_TYPES))
    a = ap.parse_args()
    qatlm = [sys.executable, "-m", "qatlm"]
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        f32 = d / "f32.gguf"
        subprocess.run([*qatlm, "quantize", "bundled", f32, "--plan", "f32"], check=True, capture_output=True)
        ours, ref = d / "qatlm.gguf", d / "llama.gguf"
        first = timed([*qatlm, "quantize", f32, ours, "--plan", a.plan])
        print(f"qatlm first call: {first:.2f} s (includes compiling its kernels if this machine never did)")
        t_ours, t_ref = [], []
        for _ in range(a.repeats):
            t_ref.append(timed([tool("llama-quantize"), f32, ref, LLAMA_TYPES[a.plan], 2]))
            t_ours.append(timed([*qatlm, "quantize", f32, ours, "--plan", a.plan]))
        print(f"llama-quantize {LLAMA_TYPES[a.plan]} (2 threads): best {min(t_ref):.2f} s of {a.repeats}")
        print(f"qatlm quantize --plan {a.plan}:        best {min(t_ours):.2f} s of {a.repeats}")
        print(f"qatlm / llama-quantize: {min(t_ours) / min(t_ref):.2f}x; files byte-identical: "
              f"{filecmp.cmp(ours, ref, shallow=False)}")


if __name__ == "__main__":
    main()
