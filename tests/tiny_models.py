"""Tiny Hugging Face models built in the tests (random weights, a small byte-level BPE tokenizer, or with
tokenizer="spm" a small SentencePiece model: what llama.cpp's converter reads for Llama, Gemma and Qwen when the
tokenizer is not one of the known BPE pre-tokenizers it recognizes by hash)."""
import json
from pathlib import Path

import torch

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness. The quick brown fox jumps over the lazy dog. To be, or not to be, that is the question. ") * 20


# a ChatML chat template that writes BOS itself (as Gemma's and Llama 3's do) and a generation prompt
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer(out: Path, chat: bool = False):
    """chat=True: with the special tokens <|im_start|> and <|im_end|> and CHAT_TEMPLATE (an instruction-tuned
    model's tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if chat:  # added after the base vocabulary, as instruction-tuned models' turn markers are
        fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def tiny_spm_tokenizer(out: Path, tokenizer_class: str = "LlamaTokenizer", vocab_size: int = 320):
    """A SentencePiece BPE model (byte fallback) trained on TEXT, as tokenizer.model + the fast tokenizer
    transformers converts from it (tokenizer.json)."""
    import io

    import sentencepiece as spm
    from transformers import AutoTokenizer

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT.split(". ")), model_writer=buf, vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, normalization_rule_name="identity", minloglevel=2)
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": tokenizer_class, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False}))
    tok = AutoTokenizer.from_pretrained(out)
    tok.save_pretrained(out)  # adds tokenizer.json beside tokenizer.model
    return tok


def _tokenizer(out: Path, kind: str, spm_class: str = "LlamaTokenizer", chat: bool = False):
    if kind == "bpe":
        return tiny_tokenizer(out, chat)
    if kind == "spm":
        return tiny_spm_tokenizer(out, spm_class)
    raise ValueError(f"tokenizer must be 'bpe' or 'spm', got {kind!r}")


def tiny_llama(out: Path, seed: int = 0, tokenizer: str = "bpe", chat: bool = False) -> Path:
    """A 2-layer Llama (GQA: 4 heads, 2 KV heads) saved as a Hugging Face directory (chat=True: with a chat
    template, tiny_tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(out, tokenizer, chat=chat)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rms_norm_eps=1e-5, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger than the default init so that the logits carry real signal
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(out, safe_serialization=True)
    return out


def tiny_gemma3(out: Path, seed: int = 0, tokenizer: str = "bpe", **config) -> Path:
    """A 2-layer Gemma 3 text model (one sliding, one global layer; tied embeddings). `config` overrides
    Gemma3TextConfig fields; with another num_hidden_layers every 6th layer is global, as in Gemma 3."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    out.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(out, tokenizer, "GemmaTokenizer")
    n = config.get("num_hidden_layers", 2)
    layer_types = ["sliding_attention", "full_attention"] if n == 2 else \
        ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]
    cfg = Gemma3TextConfig(**{**dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                     max_position_embeddings=256, sliding_window=16, layer_types=layer_types,
                                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.eos_token_id, query_pre_attn_scalar=32), **config})
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(out, safe_serialization=True)
    return out


def tiny_qwen(out: Path, version: int = 3, seed: int = 0, tokenizer: str = "bpe") -> Path:
    """A 2-layer Qwen2 (q/k/v biases, untied head) or Qwen3 (q_norm/k_norm, tied head) model."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    _tokenizer(out, tokenizer)
    (out / "config.json").write_text(json.dumps({"model_type": f"qwen{version}"}))
    tok = AutoTokenizer.from_pretrained(out)  # as a Qwen directory: transformers adds <|endoftext|> to an SPM vocab
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if version == 2:
        cfg, cls = Qwen2Config(**common, tie_word_embeddings=False), Qwen2ForCausalLM
    elif version == 3:
        cfg, cls = Qwen3Config(**common, head_dim=16, tie_word_embeddings=True), Qwen3ForCausalLM
    else:
        raise ValueError(f"Qwen version must be 2 or 3, got {version}")
    torch.manual_seed(seed)
    model = cls(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif p.dim() == 1 and not torch.all(p == 1):  # the q/k/v biases: non-zero, so that they matter
                p.normal_(0, 0.02)
    model.save_pretrained(out, safe_serialization=True)
    return out
