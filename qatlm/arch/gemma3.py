"""Gemma 3 (text): llama.cpp's `gemma3` (convert_hf_to_gguf.py Gemma3Model, src/models/gemma3.cpp).

- Every RMSNorm multiplies by (1 + w): GGUF stores w + 1.
- The output projection is token_embd (tied; no output.weight is written).
- Embeddings are multiplied by sqrt(hidden_size) at run time (transformers' Gemma3TextScaledWordEmbedding,
  llama.cpp's graph): not baked into the weights.
- 5 of every 6 layers attend within a sliding window; every 6th is global.
"""
from gguf import MODEL_ARCH

from . import Arch, register


def _keys(writer, c) -> None:
    writer.add_sliding_window(c.sliding_window)


ARCH = register(Arch(
    name="gemma3", model_types=("gemma3_text", "gemma3"), hf_class="Gemma3ForCausalLM",
    gguf_arch=MODEL_ARCH.GEMMA3, tied_output=True, norm_offset=1.0, swa_pattern=6,
    embed_scale=lambda c: c.hidden_size ** 0.5, gguf_keys=_keys,
))
