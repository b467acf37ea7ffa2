"""Llama (and SmolLM, which is Llama): llama.cpp's `llama` (convert_hf_to_gguf.py LlamaModel).

q_proj / k_proj rows are permuted from Hugging Face's rotate-half rotary layout to llama.cpp's interleaved
pairs; the output is tied only when config.tie_word_embeddings says so.
"""
from gguf import MODEL_ARCH

from . import Arch, register


def _keys(writer, c) -> None:
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(c.vocab_size)


ARCH = register(Arch(name="llama", model_types=("llama",), hf_class="LlamaForCausalLM",
                     gguf_arch=MODEL_ARCH.LLAMA, permute_qk=True, gguf_keys=_keys))
