"""The validating GGUF reader refuses malformed files with an error naming the file; writes are atomic."""
import struct

import numpy as np
import pytest

from qatlm.gguf.io import GGUFError, validate
from qatlm.gguf.ptq import quantize_gguf
from tiny_gguf import patch, tensor_info_pos, write_tiny


@pytest.fixture
def tiny(tmp_path):
    return write_tiny(tmp_path / "tiny.gguf")


def test_valid_file_passes(tiny):
    info = validate(tiny)
    assert [t.name for t in info.tensors] == ["a.weight", "b.weight"]
    assert info.tensors[0].ne == (64, 4) and info.tensors[0].shape == (4, 64)


def refuse(path, match):
    with pytest.raises(GGUFError, match=match) as e:
        validate(path)
    assert str(path) in str(e.value)


def test_truncated(tiny):
    data = tiny.read_bytes()
    for cut in (3, 20, 60, len(data) // 2, len(data) - 1):
        tiny.write_bytes(data[:cut])
        refuse(tiny, "truncated|magic|cannot fit|remain")


def test_wrong_magic(tiny):
    patch(tiny, 0, b"GGML")
    refuse(tiny, "magic")


def test_bad_version(tiny):
    patch(tiny, 4, struct.pack("<I", 7))
    refuse(tiny, "version 7")


def test_tensor_offset_past_end(tiny):
    p = tensor_info_pos(tiny.read_bytes(), "b.weight") + 4 + 8 * 2 + 4
    patch(tiny, p, struct.pack("<Q", 1 << 40))
    refuse(tiny, "offset")


def test_duplicate_tensor_names(tiny):
    data = tiny.read_bytes()
    patch(tiny, tensor_info_pos(data, "b.weight") - len("b.weight"), b"a.weight")
    refuse(tiny, "duplicate tensor name 'a.weight'")


def test_huge_counts_and_strings(tiny):
    patch(tiny, 8, struct.pack("<Q", 1 << 60))  # tensor count
    refuse(tiny, "cannot fit")


def test_string_arrays_are_checked_item_by_item(tmp_path):
    """A vocabulary-like string array (walked in validate's fast loop) is refused at the faulty item with the
    message of a single string: a length past the end, bytes that are not UTF-8, a file cut inside it."""
    from gguf import GGUFWriter

    def with_tokens(name):
        w = GGUFWriter(str(tmp_path / name), "llama")
        w.add_token_list([f"tok{i}" for i in range(300)])
        w.add_tensor("a.weight", np.zeros((4, 64), np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return tmp_path / name

    assert validate(with_tokens("ok.gguf")).keys["tokenizer.ggml.tokens"] == 9  # ARRAY
    p = with_tokens("long.gguf")
    i = p.read_bytes().index(b"tok150") - 8
    patch(p, i, struct.pack("<Q", 1 << 40))
    refuse(p, "string in array 'tokenizer.ggml.tokens' needs 1099511627776 bytes")
    p = with_tokens("utf8.gguf")
    patch(p, p.read_bytes().index(b"tok7"), b"\xff\xfe")
    refuse(p, "string in array 'tokenizer.ggml.tokens' is not UTF-8")
    p = with_tokens("cut.gguf")
    p.write_bytes(p.read_bytes()[:p.read_bytes().index(b"tok299") + 2])
    refuse(p, "string in array 'tokenizer.ggml.tokens' needs 6 bytes but only 2 remain")


def test_bad_dims_and_type(tmp_path):
    p = write_tiny(tmp_path / "t.gguf")
    pos = tensor_info_pos(p.read_bytes(), "a.weight")
    patch(p, pos, struct.pack("<I", 9))
    refuse(p, "9 dims")
    p = write_tiny(tmp_path / "t2.gguf")
    patch(p, pos + 4, struct.pack("<q", -5))
    refuse(p, "negative")
    p = write_tiny(tmp_path / "t3.gguf")
    patch(p, pos + 4 + 16, struct.pack("<I", 999))
    refuse(p, "unknown type 999")


def test_bad_alignment(tmp_path):
    p = write_tiny(tmp_path / "t.gguf")
    data = p.read_bytes()
    i = data.index(b"general.alignment") + len(b"general.alignment") + 4
    patch(p, i, struct.pack("<I", 24))
    refuse(p, "power of two")


def test_quantize_refuses_damaged_input_and_keeps_outputs(tiny, tmp_path):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"earlier result")
    data = tiny.read_bytes()
    tiny.write_bytes(data[: len(data) - 100])
    with pytest.raises(GGUFError, match="truncated"):
        quantize_gguf(tiny, out, "q8_0", progress=False)
    assert out.read_bytes() == b"earlier result"  # untouched
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out.gguf", "tiny.gguf"]  # no partial files


def test_write_is_atomic_on_failure(tiny, tmp_path, monkeypatch):
    """A failure in the middle of writing (here: a full disk) leaves no file and keeps the old one."""
    import qatlm.gguf.ptq as ptq

    out = tmp_path / "out.gguf"
    out.write_bytes(b"earlier result")
    calls = []

    def full_disk(*a, **k):  # the disk fills up after the header and the first tensor were written
        calls.append(1)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return encode(*a, **k)

    encode = ptq.encode_tensor
    monkeypatch.setattr(ptq, "encode_tensor", full_disk)
    with pytest.raises(OSError, match="no space left while writing .*out.gguf"):
        quantize_gguf(tiny, out, "q8_0", progress=False)
    assert out.read_bytes() == b"earlier result"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out.gguf", "tiny.gguf"]


def test_round_trip_f32_and_q8_0(tiny, tmp_path):
    import qatlm.formats as F
    from gguf import GGUFReader

    out = quantize_gguf(tiny, tmp_path / "q8.gguf", "q8_0", progress=False)
    src = {t.name: np.asarray(t.data) for t in GGUFReader(tiny).tensors}
    for t in GGUFReader(out).tensors:
        assert t.tensor_type.name == "Q8_0"
        assert np.array_equal(np.asarray(t.data).reshape(-1), F.quantize(src[t.name], "q8_0").reshape(-1))
    back = quantize_gguf(tiny, tmp_path / "f32.gguf", "f32", progress=False)
    for t in GGUFReader(back).tensors:
        assert np.array_equal(np.asarray(t.data), src[t.name])
