"""Chat JSONL for instruction-tuned teachers: the teacher's own template, the assistant-token mask (--kd-on
assistant) against a reference built piece by piece, the masked loss against a direct computation, the token
cache keyed on the mode, errors naming the file and line, and a few training steps."""
import json

import numpy as np
import pytest
import torch

from qatlm.teacher import load_teacher
from qatlm.train import config as C
from qatlm.train.chat import assistant_spans, chat_tokens
from qatlm.train.config import TrainConfig
from qatlm.train.data import load_blocks, split_mask
from qatlm.train.kd_loss import kd_loss
from qatlm.train.loop import train
from tiny_models import CHAT_TEMPLATE, tiny_llama

CONVO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "To be or not"},
         {"role": "assistant", "content": "that is the question"}, {"role": "user", "content": "The quick fox?"},
         {"role": "assistant", "content": "jumps over the lazy dog."}]
REPLIES = ["that is the question<|im_end|>", "jumps over the lazy dog.<|im_end|>"]


@pytest.fixture(scope="module")
def chat_teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return load_teacher(str(tiny_llama(root / "llama", chat=True)))


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def conversations(n):
    """n distinct conversations of two assistant turns each."""
    words = "the best of times the worst of times the age of wisdom foolishness quick brown fox".split()
    out = []
    for i in range(n):
        a, b = " ".join(words[i % 7:i % 7 + 4]), " ".join(words[(3 * i) % 9:(3 * i) % 9 + 5])
        out.append({"messages": [{"role": "user", "content": f"Say {i}?"}, {"role": "assistant", "content": a},
                                 {"role": "user", "content": "And then?"}, {"role": "assistant", "content": b}]})
    return out


def test_mask_is_assistant_content_and_end_of_turn(chat_teacher):
    """The mask marks exactly each reply's content and the <|im_end|> closing it; not the system/user turns, the
    '<|im_start|>assistant\\n' header (the generation prompt) or the newline after <|im_end|>. The reference is
    built from the pieces of the ChatML rendering, tokenized one by one."""
    tok = chat_teacher.tokenizer
    assert tok.chat_template == CHAT_TEMPLATE  # the teacher's own template, loaded with its tokenizer
    text, spans = assistant_spans(tok, CONVO, "x.jsonl:1")
    assert [text[s:e] for s, e in spans] == REPLIES
    ids, mask = chat_tokens(tok, CONVO, "x.jsonl:1", assistant_only=True)
    pieces = [("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nTo be or not<|im_end|>\n"
               "<|im_start|>assistant\n", False), (REPLIES[0], True),
              ("\n<|im_start|>user\nThe quick fox?<|im_end|>\n<|im_start|>assistant\n", False), (REPLIES[1], True),
              ("\n", False)]
    want_ids, want_mask = [], []
    for piece, counted in pieces:
        t = tok(piece, add_special_tokens=False).input_ids
        want_ids += t
        want_mask += [counted] * len(t)
    assert ids == want_ids  # the template's own <s> is dropped: the caller puts BOS first, once
    assert mask == want_mask
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "".join(REPLIES)
    all_ids, none = chat_tokens(tok, CONVO, "x.jsonl:1", assistant_only=False)
    assert all_ids == ids and none is None


# google/gemma-2-2b-it's chat template, verbatim (llama.cpp models/templates/google-gemma-2-2b-it.jinja)
GEMMA2 = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
          "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
          "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")


def test_real_gemma_template(chat_teacher):
    """Gemma's template (the "model" role, content trimmed, BOS written by the template): the spans are the
    replies + <end_of_turn>; a system message or two user turns in a row are the template's own errors."""
    import copy

    tok = copy.deepcopy(chat_teacher.tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.chat_template = GEMMA2
    msgs = [m for m in CONVO if m["role"] != "system"]
    msgs[1] = {**msgs[1], "content": "  that is the question \n"}  # trimmed by the template
    text, spans = assistant_spans(tok, msgs, "g.jsonl:1")
    assert [text[s:e] for s, e in spans] == ["that is the question<end_of_turn>",
                                             "jumps over the lazy dog.<end_of_turn>"]
    ids, mask = chat_tokens(tok, msgs, "g.jsonl:1", True)
    assert ids[0] != tok.bos_token_id and tok.decode([i for i, m in zip(ids, mask) if m]) == \
        "that is the question<end_of_turn>jumps over the lazy dog.<end_of_turn>"
    with pytest.raises(ValueError, match=r"g\.jsonl:1: the teacher's chat template cannot render .*System role"):
        chat_tokens(tok, CONVO, "g.jsonl:1", True)
    with pytest.raises(ValueError, match=r"g\.jsonl:1: .*roles must alternate"):
        chat_tokens(tok, [msgs[0], msgs[0], msgs[1]], "g.jsonl:1", False)


def test_gguf_teacher_uses_its_chat_template(chat_teacher, tmp_path):
    """A GGUF teacher renders with the file's tokenizer.chat_template: same tokens and mask as its HF source."""
    from qatlm.gguf.export import export_gguf

    gguf = export_gguf(chat_teacher.model, tmp_path / "chat.gguf", "f32", hf_dir=chat_teacher.hf_dir, progress=False)
    t = load_teacher(str(gguf))
    assert t.tokenizer.chat_template == CHAT_TEMPLATE
    assert chat_tokens(t.tokenizer, CONVO, "x", True) == chat_tokens(chat_teacher.tokenizer, CONVO, "x", True)


def test_blocks_carry_the_mask_and_the_cache_keys_on_the_mode(chat_teacher, tmp_path):
    tok = chat_teacher.tokenizer
    f = write_jsonl(tmp_path / "chat.jsonl", conversations(12))
    cache = tmp_path / "tokens"
    tr_all, held_all = load_blocks([str(f)], tok, 16, 0.2, seed=1, cache=cache)
    tr, held = load_blocks([str(f)], tok, 16, 0.2, seed=1, cache=cache, kd_on="assistant")
    assert len(list(cache.glob("*.npy"))) == 2  # one cached stream per mode
    again = load_blocks([str(f)], tok, 16, 0.2, seed=1, cache=cache, kd_on="assistant")  # from the cache
    assert torch.equal(tr, again[0]) and torch.equal(held, again[1])
    for blocks, plain in ((tr, tr_all), (held, held_all)):
        ids, mask = split_mask(blocks, "assistant")
        assert torch.equal(ids, plain)  # the same tokens and the same split: only the mask was added
        assert split_mask(plain, "all") == (plain, None)
    bos = tok.bos_token_id
    assert ((tr_all[:, 1:] == bos) & (tr_all[:, :-1] == bos)).sum() == 0  # the template's own <s> is not doubled
    assert (tr_all[:, 1:] == bos).sum() >= 5  # (while each conversation does start with one)
    # the masked tokens are the replies' content + <|im_end|>, nothing else (a block's first token is never a
    # target: its sign does not matter)
    ids, mask = split_mask(torch.cat([tr, held]), "assistant")
    text = tok.decode(ids[:, 1:][mask[:, 1:]].tolist())
    assert text.count("<|im_end|>") >= 12 and "<|im_start|>" not in text and "Say" not in text and "\n" not in text
    assert 0.2 < mask[:, 1:].float().mean() < 0.6


@pytest.mark.parametrize("row,message", [
    ("not json", r"bad\.jsonl:2: not JSON"),
    ({"messages": {"role": "user"}}, r"bad\.jsonl:2: 'messages' must be a non-empty list"),
    ({"messages": []}, r"bad\.jsonl:2: 'messages' must be a non-empty list"),
    ({"messages": [{"content": "hi"}]}, r"bad\.jsonl:2: message 0 has no string 'role'"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, r"bad\.jsonl:2: message 0: unknown role 'robot'; use one of"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
     r"bad\.jsonl:2: message 1 \(assistant\) has empty 'content'"),
    ({"messages": [{"role": "user"}]}, r"bad\.jsonl:2: message 0: 'content' is missing"),
    ({"messages": [{"role": "user", "content": ["a", "b"]}]}, r"bad\.jsonl:2: message 0: 'content' is a list"),
])
@pytest.mark.parametrize("kd_on", ["all", "assistant"])
def test_bad_rows_name_file_and_line(chat_teacher, tmp_path, row, message, kd_on):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    f = write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(ValueError, match=message):
        load_blocks([str(f)], chat_teacher.tokenizer, 8, kd_on=kd_on)


def test_assistant_mode_refuses_what_it_cannot_use(chat_teacher, tmp_path):
    tok = chat_teacher.tokenizer
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [good, {"text": "plain text"}])
    with pytest.raises(ValueError, match=r"mixed\.jsonl:2: a 'text' row has no assistant turns.*--kd-on all"):
        load_blocks([str(mixed)], tok, 8, kd_on="assistant")
    txt = tmp_path / "a.txt"
    txt.write_text("plain text " * 50)
    with pytest.raises(ValueError, match=r"a\.txt: --kd-on assistant .* chat JSONL.*--kd-on all"):
        load_blocks([str(txt)], tok, 8, kd_on="assistant")
    users = write_jsonl(tmp_path / "users.jsonl", [{"messages": [{"role": "user", "content": "hi " * 20}]}] * 4)
    with pytest.raises(ValueError, match=r"no assistant turns in .*users\.jsonl"):
        load_blocks([str(users)], tok, 8, kd_on="assistant")
    with pytest.raises(ValueError, match="kd_on assistant distills .* give --data"):
        TrainConfig(kd_on="assistant", data_free=8).validate()
    with pytest.raises(ValueError, match="kd_on must be all or assistant"):
        TrainConfig(kd_on="assistants", data=["x.jsonl"]).validate()


def test_template_errors(chat_teacher, tmp_path):
    import copy

    tok = copy.deepcopy(chat_teacher.tokenizer)
    f = write_jsonl(tmp_path / "c.jsonl", conversations(2))
    # a template that rewrites an earlier turn once more follow (like Qwen 3 dropping earlier reasoning): refused
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] if loop.last or "
                         "m['role'] != 'assistant' else '...' }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(ValueError, match=r"c\.jsonl:1: message 1 \(assistant\).*one row per assistant turn"):
        load_blocks([str(f)], tok, 8, kd_on="assistant")
    load_blocks([str(f)], tok, 8, kd_on="all")  # rendering the whole conversation needs no prefix consistency
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ValueError, match=r"c\.jsonl:1: the teacher's chat template cannot render .*alternate"):
        load_blocks([str(f)], tok, 8)
    tok.chat_template = None
    with pytest.raises(ValueError, match=r"c\.jsonl:1: chat rows need the teacher's chat template.*\"text\""):
        load_blocks([str(f)], tok, 8)


def test_masked_loss_equals_direct_computation(chat_teacher):
    """kd_loss with a mask == T^2 KL and CE from full logits, averaged over the positions whose target token is
    masked in only (value and gradients); no counted position gives 0 and a zero gradient."""
    torch.manual_seed(0)
    teacher = chat_teacher.model
    student = load_teacher(str(chat_teacher.hf_dir)).model
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ids = torch.randint(3, 300, (2, 24))
    mask = torch.rand(2, 24) < 0.4
    T, ce_w = 2.0, 0.3
    loss, parts = kd_loss(student, teacher, ids, T, ce_w, chunk=5, mask=mask)
    g_fused = torch.autograd.grad(loss, [p for p in student.parameters()])

    zs, zt = student(ids).logits[:, :-1], teacher(ids).logits[:, :-1].detach()  # position t predicts t + 1
    keep = mask[:, 1:]
    lps, lpt = torch.log_softmax(zs[keep] / T, -1), torch.log_softmax(zt[keep] / T, -1)
    kl = (lpt.exp() * (lpt - lps)).sum(-1).mean() * T * T
    ce = -torch.log_softmax(zs[keep], -1).gather(1, ids[:, 1:][keep][:, None]).mean()
    assert parts["kl"] == pytest.approx(float(kl.detach()), rel=1e-5)
    assert parts["ce"] == pytest.approx(float(ce.detach()), rel=1e-5)
    g_ref = torch.autograd.grad(kl + ce_w * ce, [p for p in student.parameters()])
    for a, b in zip(g_fused, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # every position counted but the last == the unmasked loss, whose mean also spans the last position
    full, fparts = kd_loss(student, teacher, ids, T, 0.0, chunk=5)
    ones, oparts = kd_loss(student, teacher, ids, T, 0.0, chunk=5, mask=torch.ones_like(mask))
    assert oparts["kl"] == pytest.approx(fparts["kl"] * 24 / 23 - float(_last_kl(student, teacher, ids, T)) / 23,
                                         rel=1e-5)
    none, nparts = kd_loss(student, teacher, ids, T, ce_w, chunk=5, mask=torch.zeros_like(mask))
    assert nparts == {"kl": 0.0, "ce": 0.0}
    none.backward()
    assert all(p.grad is None or not p.grad.any() for p in student.parameters())


def _last_kl(student, teacher, ids, T):
    """Mean over the batch of T^2 KL at the last position (it has no target), summed over rows / batch."""
    with torch.no_grad():
        lps = torch.log_softmax(student(ids).logits[:, -1] / T, -1)
        lpt = torch.log_softmax(teacher(ids).logits[:, -1] / T, -1)
        return (lpt.exp() * (lpt - lps)).sum() * T * T / ids.shape[0]


def test_assistant_only_training(chat_teacher, tmp_path):
    """A few steps of --kd-on assistant: finite falling KL, the held-out KL measured, the mask in heldout.pt;
    kd_on is fixed on resume."""
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(40))
    cfg = TrainConfig(teacher=str(chat_teacher.hf_dir), data=[str(data)], out=str(tmp_path / "run"), steps=6,
                      seq_len=32, batch_size=4, lr=3e-4, warmup=1, save_every=100, kd_on="assistant", eval_every=3,
                      heldout_fraction=0.2)
    run = train(cfg, progress=False)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(np.isfinite(r["kl"]) and r["kl"] > 0 for r in rows)
    assert rows[-1]["kl"] < rows[0]["kl"]
    assert [r["step"] for r in rows if "heldout_kl" in r] == [3, 6]
    held = torch.load(run / "heldout.pt")
    assert (held < 0).any() and (held[:, 1:] >= 0).any()  # sign-encoded mask: both kinds of token
    with pytest.raises(ValueError, match="kd_on was 'assistant' in this run"):
        C.resolve(saved=run, flags={"kd_on": "all"})
