"""Run every benchmark in this folder, one after another, and print their ratios in one go.

    python benchmarks/run_all.py   # quantize, whole-file quantize, eval, KD step, training speed, imatrix (~20 min on 2 cores)
"""
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
BENCHMARKS = [("quantize_speed.py", []), ("eval_speed.py", []), ("kd_step.py", ["--seq", "1024", "--repeats", "1"]),
              ("imatrix_speed.py", ["--chunks", "32"]), ("train_speed.py", ["--repeats", "1", "--sample", "16"]),
              ("quantize_file.py", ["--repeats", "2"])]


def main() -> int:
    failed = 0
    for script, args in BENCHMARKS:
        print(f"\n=== {script} {' '.join(args)}", flush=True)
        t = time.perf_counter()
        r = subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True, text=True)
        lines = [l for l in r.stdout.splitlines() if l.strip()]
        print("\n".join(lines))
        if r.returncode:
            failed += 1
            print(f"FAILED ({r.returncode}): {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ''}")
        print(f"({time.perf_counter() - t:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
