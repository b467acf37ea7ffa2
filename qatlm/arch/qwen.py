"""Qwen2 and Qwen3: llama.cpp's `qwen2` / `qwen3` (convert_hf_to_gguf.py Qwen2Model / Qwen3Model).

No rotary permutation (llama.cpp runs them in NEOX rope mode); Qwen2 has q/k/v biases (plain F32 tensors),
Qwen3 has q_norm / k_norm. Mapped through gguf-py's name maps; not yet tested end to end.
"""
from gguf import MODEL_ARCH

from . import Arch, register
from .llama import _keys

QWEN2 = register(Arch(name="qwen2", model_types=("qwen2",), hf_class="Qwen2ForCausalLM",
                      gguf_arch=MODEL_ARCH.QWEN2, gguf_keys=_keys))
QWEN3 = register(Arch(name="qwen3", model_types=("qwen3",), hf_class="Qwen3ForCausalLM",
                      gguf_arch=MODEL_ARCH.QWEN3, gguf_keys=_keys))
