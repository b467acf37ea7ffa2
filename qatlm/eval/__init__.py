"""Stage 5, evaluation: perplexity and KLD exactly as llama-perplexity computes them (perplexity), and the
side-by-side report of teacher / PTQ / QAT (compare)."""
