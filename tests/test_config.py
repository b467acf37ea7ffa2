"""The one config rule of train / run / --resume (qatlm.train.config), and the bugs a new user hit with it."""
import json
from pathlib import Path

import pytest
import yaml

from qatlm.cli import main
from qatlm.train import config as C
from tiny_models import TEXT, tiny_llama


def test_precedence_defaults_recipe_saved_flags(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps: 7\nlr: 2.0e-5\nseq_len: 64\n")
    cfg = C.resolve(recipe, flags={"lr": 3e-5})
    assert (cfg.steps, cfg.lr, cfg.seq_len, cfg.warmup) == (7, 3e-5, 64, C.TrainConfig.warmup)
    run = tmp_path / "run"
    run.mkdir()
    C.save(C.TrainConfig(steps=9, seq_len=32, out="elsewhere"), run)
    notes = []
    resumed = C.resolve(recipe, saved=run, flags={"steps": 20, "seq_len": 32}, notes=notes)
    assert (resumed.steps, resumed.seq_len, resumed.lr) == (20, 32, C.TrainConfig.lr)  # saved beats the recipe
    assert resumed.out == str(run)  # --resume DIR continues DIR, whatever `out` says
    assert notes == ["steps: 9 -> 20"]


def test_resume_refuses_flags_that_change_the_model(tmp_path):
    C.save(C.TrainConfig(plan="q4_0", lora_rank=0), tmp_path)
    for flags in ({"plan": "q8_0"}, {"lora_rank": 16}, {"data": ["other.txt"]}):
        with pytest.raises(ValueError, match="would train a different model"):
            C.resolve(saved=tmp_path, flags=flags)
    assert C.resolve(saved=tmp_path, flags={"plan": "q4_0"}).plan == "q4_0"  # the same value is fine


def test_default_recipe_is_the_run_default():
    cfg = C.resolve("default")
    assert (cfg.steps, cfg.budget_minutes, cfg.train_embeddings, cfg.save_every, cfg.lr, cfg.data_free,
            cfg.sampled_fraction, cfg.hidden_weight) == (400, 7.5, False, 20, 3e-5, 48, 0.75, 30.0)


@pytest.mark.parametrize("argv, says", [
    (["--set", "no_such_key=1"], "unknown setting 'no_such_key'"),
    (["--set", "steps=banana"], "steps must be an integer"),
    (["--set", "train_embeddings=maybe"], "train_embeddings must be true or false"),
    (["--set", "lr"], "use KEY=VALUE"),
    (["--set", "scale_lr=fast"], "scale_lr must be a number"),
    (["--set", "hidden_weight=-1"], "hidden_weight must be >= 0"),
    (["--set", "hidden_weight=1", "--teacher-cache", "cache/"], "a teacher_cache does not hold"),
])
def test_bad_settings_are_one_line(tmp_path, capsys, argv, says):
    rc = main(["train", "--data", "x.txt", "--out", str(tmp_path / "r"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_exponent_without_a_dot_is_a_number(tmp_path):
    """PyYAML (YAML 1.1) reads `1e-3` as a string; a user writes it that way in --set and in recipes."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 1e-4\n")
    cfg = C.resolve(recipe, flags=C.parse_set(["scale_lr=3e-3"]))
    assert (cfg.lr, cfg.scale_lr) == (1e-4, 3e-3)


def test_bad_flag_value_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--steps", "banana"])
    assert e.value.code == 2 and "--steps" in capsys.readouterr().err


def test_bad_recipe_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    assert main(["train", "--config", str(bad), "--data", "x.txt"]) == 2
    assert f"{bad}: a config must be a YAML mapping" in capsys.readouterr().err
    bad.write_text("stepz: 3\n")
    assert main(["train", "--config", str(bad), "--data", "x.txt"]) == 2
    assert "unknown setting 'stepz'" in capsys.readouterr().err


def test_resume_from_another_directory_continues_the_run(tmp_path, monkeypatch):
    """A run started with a relative --out, resumed by absolute path from another working directory, continues
    that run (it used to start a fresh one under the new working directory)."""
    data = tmp_path / "train.txt"
    data.write_text(TEXT * 3)
    teacher = tiny_llama(tmp_path / "llama")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    common = ["--seq-len", "32", "--batch-size", "4", "--lr", "3e-4", "--save-every", "2"]
    assert main(["train", "--teacher", str(teacher), "--data", str(data), "--out", "runs/r", "--steps", "2",
                 *common]) == 0
    run = tmp_path / "a" / "runs" / "r"
    assert yaml.safe_load((run / "config.yaml").read_text())["out"] == "runs/r"
    monkeypatch.chdir(tmp_path / "b")
    assert main(["train", "--resume", str(run), "--steps", "4"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert not (tmp_path / "b" / "runs").exists()
    assert main(["train", "--resume", str(run), "--plan", "q8_0"]) == 2  # would change the model: refused
    assert Path(run / "checkpoint").is_dir()
