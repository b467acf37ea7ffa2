"""Training data: files to packed blocks, the held-out split, JSONL text and chat rows, errors."""
import json

import pytest
import torch

from qatlm.corpora import play_of
from qatlm.train.data import load_blocks
from tiny_models import TEXT, tiny_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    t = tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    t.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    return t


def test_blocks_and_heldout_split(tmp_path, tok):
    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / "b.txt").write_text(TEXT[::-1])
    train, held = load_blocks([str(tmp_path)], tok, 32, 0.1, seed=3, cache=tmp_path / "cache")
    assert train.shape[1] == held.shape[1] == 32 and (train[:, 0] == tok.bos_token_id).all()
    assert len(held) >= 1 and len(train) > 5 * len(held)
    again = load_blocks([str(tmp_path)], tok, 32, 0.1, seed=3, cache=tmp_path / "cache")  # from the cache
    assert torch.equal(train, again[0]) and torch.equal(held, again[1])
    train_rows = {tuple(r.tolist()) for r in train}
    assert not any(tuple(r.tolist()) in train_rows for r in held)


def test_jsonl_text_and_chat(tmp_path, tok):
    rows = [{"text": TEXT[:400]}, {"messages": [{"role": "user", "content": "To be or not"},
                                                {"role": "assistant", "content": "that is the question"}]}] * 5
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    train, held = load_blocks([str(f)], tok, 16, 0.0)
    assert len(held) == 0 and train.numel() > 0
    ids = tok("user: To be or not", add_special_tokens=False).input_ids
    flat = train.reshape(-1).tolist()
    assert any(flat[i:i + len(ids)] == ids for i in range(len(flat)))


def test_bad_data(tmp_path, tok):
    with pytest.raises(ValueError, match="no such file"):
        load_blocks([str(tmp_path / "missing.txt")], tok, 16)
    (tmp_path / "short.txt").write_text("hi")
    with pytest.raises(ValueError, match="fewer than 2 blocks"):
        load_blocks([str(tmp_path / "short.txt")], tok, 16)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"nope": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: a JSONL row needs 'text' or 'messages'"):
        load_blocks([str(bad)], tok, 16)


def test_folio_and_modern_editions_are_one_play(tmp_path):
    assert play_of(tmp_path / "tempest_gut_f.txt") == play_of(tmp_path / "tempest_gut.txt") == "tempest"
    assert play_of(tmp_path / "sonnets_gut.txt") == "sonnets"
