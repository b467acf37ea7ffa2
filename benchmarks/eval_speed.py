"""Perplexity throughput: qatlm's torch engine vs llama.cpp (llama-cpp-python) on the same model, text and CPU,
measured in one run. Prints tokens/s of each and their ratio, plus both PPLs.

    python benchmarks/eval_speed.py [--chunks 4] [--ctx 512]
"""
import argparse

from qatlm.corpora import shakespeare_dir
from qatlm.eval.perplexity import evaluate
from qatlm.sources import bundled_gguf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=512)
    a = ap.parse_args()
    data = shakespeare_dir() / "tempest_gut.txt"
    model = str(bundled_gguf())
    evaluate(model, data, a.ctx, 1, "torch", progress=False)  # warm-up: load, caches
    t = evaluate(model, data, a.ctx, a.chunks, "torch", progress=False)
    c = evaluate(model, data, a.ctx, a.chunks, "llama.cpp", progress=False)
    print(f"Gemma 3 270M, {a.chunks} chunks x {a.ctx}, tempest_gut.txt")
    print(f"torch      {t.tokens_per_second:8.1f} tok/s   PPL {t.ppl:.4f}")
    print(f"llama.cpp  {c.tokens_per_second:8.1f} tok/s   PPL {c.ppl:.4f}")
    print(f"torch / llama.cpp speed ratio: {t.tokens_per_second / c.tokens_per_second:.2f}")


if __name__ == "__main__":
    main()
