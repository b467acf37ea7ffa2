"""The training configuration and the one rule that merges it, for `qatlm train`, `qatlm run` and `--resume`:

    built-in defaults (TrainConfig)  <  a recipe YAML  <  the saved run (on resume)  <  flags / --set

    cfg = resolve(recipe="my.yaml", flags={"steps": 200})                 # a new run
    cfg = resolve(saved=Path("runs/q4"), flags={"steps": 400})            # resume with more steps

On resume, flags that would change what is being trained (the plan, the teacher, the data, LoRA rank, ...:
FIXED_ON_RESUME) are refused unless they equal the saved value; the others (steps, learning rate, checkpoint
interval, threads, ...) are applied and reported. Every key is checked against TrainConfig's fields and their
types, so a typo or a bad value ends in one line naming the key, never in a traceback.
"""
from __future__ import annotations

import os
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path

import yaml


@dataclass
class TrainConfig:
    teacher: str = "bundled"  # a .gguf, a Hugging Face directory, or "bundled" (Gemma 3 270M)
    data: list[str] = field(default_factory=list)  # text/jsonl/parquet files or directories of them
    data_free: int = 0  # train on this many seq_len sequences sampled from the teacher (with data: mixed in)
    sampled_fraction: float = 0.5  # with both data and data_free: the share of every batch that is sampled text
    out: str = "runs/qat"  # the run directory
    plan: str = "q4_0"  # the GGUF type plan the student is trained for (and exported with)
    overrides: list[str] = field(default_factory=list)  # PATTERN=TYPE plan overrides
    imatrix: str | None = None  # an imatrix file: fake quant and export use llama-quantize --imatrix's rule
    #                             (`qatlm run`: "auto" = the job's own imatrix of the training text)
    steps: int = 100  # optimizer steps
    seq_len: int = 256  # tokens per training sequence
    batch_size: int = 2  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-5  # peak AdamW learning rate
    min_lr_ratio: float = 0.1  # cosine decay floor, as a fraction of lr
    warmup: int = 5  # linear warm-up steps
    weight_decay: float = 0.0
    clip: float = 1.0  # gradient-norm clipping (0: off)
    temperature: float = 1.0  # KD temperature
    ce_weight: float = 0.0  # weight of next-token cross-entropy mixed into the KD loss
    hidden_weight: float = 0.0  # weight of the layers' hidden-state matching added to the KD loss (kd_loss.hidden_mse:
    #                            each layer's output against the teacher's, squared error over the teacher's mean
    #                            square, averaged over the layers); needs the teacher itself (no teacher_cache)
    kd_chunk: int = 128  # positions per chunk of the vocabulary-sized KD computation
    kd_on: str = "all"  # positions distilled: all | assistant (chat JSONL: those whose next token is an assistant
    #                     turn's, content and end-of-turn token; qatlm.train.chat. Sampled --data-free text: all)
    fake_quant_after: int = 0  # steps of plain KD before fake quant is switched on
    snap: float = 0.05  # move weights this fraction toward their PTQ value before training (0: off)
    train_embeddings: bool = True  # also train the (tied) embedding
    heldout_fraction: float = 0.05  # token blocks kept out of training, for validation
    eval_every: int = 10  # held-out KD KL every N steps and at the last one, "heldout_kl" in metrics.jsonl (0: off);
    #                       with budget_minutes also at step 2, whose eval time then counts against the budget
    eval_blocks: int = 4  # held-out blocks it is measured on (a fixed subset spread over heldout.pt): cheap
    save_every: int = 50  # checkpoint every N steps (and at the end)
    seed: int = 0
    threads: int | None = None  # CPU threads (default: torch's)
    budget_minutes: float | None = None  # if set: after step 2, the schedule is sized to fit (step 2's time)
    lora_rank: int = 0  # > 0: train LoRA adapters inside the fake quantizer instead of every weight
    lora_alpha: float | None = None  # LoRA scale alpha / rank (default alpha = rank)
    learn_scales: bool = False  # learn a factor on each block's fp16 d (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 Linear weights),
    #                             written into the GGUF as trained (qatlm.student.fakequant)
    scale_lr: float = 1e-3  # peak learning rate of those factors (they start at 1; same schedule as lr)
    block_lr: bool = False  # each 32-weight block of a fake-quantized Linear weight moves at lr x its size over the
    #                         model's median block size: every block the same fraction of its quantization step
    #                         (qatlm.train.block_lr); single process, not with LoRA
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda
    precision: str = "auto"  # the matmuls' dtype: auto (bf16 on CUDA and on CPUs with native bf16, else fp32)
    #                          | bf16 | fp32; latent weights, fake quant, softmax and optimizer stay fp32
    teacher_precision: str = "auto"  # the teacher's forward (and --data-free sampling): auto (= precision) | bf16 | fp32
    shard_teacher: bool = False  # under torchrun: FSDP2-shard the teacher's layers too (default: replicate it)
    teacher_cache: str | None = None  # a `qatlm teacher-cache` directory: the teacher's top-k outputs come from it, and
    #                                   the teacher is freed once the student is built (qatlm.train.teacher_cache)

    def validate(self) -> "TrainConfig":
        if self.steps < 1 or self.seq_len < 8 or self.batch_size < 1 or self.grad_accum < 1 or self.save_every < 1:
            raise ValueError("steps, batch_size, grad_accum and save_every must be >= 1 and seq_len >= 8")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.scale_lr > 0:
            raise ValueError(f"scale_lr must be > 0, got {self.scale_lr}")
        if not 0 <= self.snap < 1:
            raise ValueError(f"snap must be in [0, 1), got {self.snap}")
        if self.lora_rank < 0 or self.data_free < 0 or self.warmup < 0:
            raise ValueError("lora_rank, data_free and warmup must be >= 0")
        if not 0 < self.sampled_fraction < 1:
            raise ValueError(f"sampled_fraction must be in (0, 1), got {self.sampled_fraction}")
        if self.data and self.data_free == 1:
            raise ValueError("data_free must be 0 (off) or >= 2 sequences to mix into the corpus")
        if self.kd_on not in ("all", "assistant"):
            raise ValueError(f"kd_on must be all or assistant, got {self.kd_on!r}")
        if self.kd_on == "assistant" and not self.data:
            raise ValueError("kd_on assistant distills the assistant turns of chat JSONL: give --data FILES.jsonl "
                             "with {\"messages\": [...]} rows, or use --kd-on all")
        if self.eval_every < 0 or self.eval_blocks < 1:
            raise ValueError(f"eval_every must be >= 0 (0: off) and eval_blocks >= 1, got {self.eval_every} and "
                             f"{self.eval_blocks}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        for key in ("precision", "teacher_precision"):
            if getattr(self, key) not in ("auto", "bf16", "fp32"):
                raise ValueError(f"{key} must be auto, bf16 or fp32, got {getattr(self, key)!r}")
        if self.budget_minutes is not None and not self.budget_minutes > 0:
            raise ValueError(f"budget_minutes must be > 0, got {self.budget_minutes}")
        if not self.hidden_weight >= 0:
            raise ValueError(f"hidden_weight must be >= 0, got {self.hidden_weight}")
        if self.block_lr and self.lora_rank:
            raise ValueError("block_lr scales the updates of the weights themselves; LoRA trains adapters: set "
                             "block_lr false, or train without --lora")
        if self.teacher_cache and self.hidden_weight:
            raise ValueError("hidden_weight matches the teacher's hidden states, which a teacher_cache does not hold: "
                             "set hidden_weight 0, or train without --teacher-cache")
        if self.teacher_cache and self.temperature != 1.0:
            raise ValueError(f"temperature {self.temperature} with teacher_cache: the cache holds the teacher at "
                             "temperature 1 only (exact KD at T != 1 needs every logit); use temperature 1, or train "
                             "without --teacher-cache")
        return self


# what a resumed run may not change: the model, the data and the data order it was trained on
FIXED_ON_RESUME = ("teacher", "data", "data_free", "sampled_fraction", "plan", "overrides", "imatrix", "seq_len",
                   "batch_size", "grad_accum", "seed", "heldout_fraction", "kd_on", "snap", "train_embeddings",
                   "lora_rank", "lora_alpha", "teacher_cache", "learn_scales")
RECIPES = Path(str(resources.files("qatlm.recipes")))


def recipe_path(name: str | Path) -> Path:
    """A recipe file, or the name of one shipped in qatlm/recipes/ (e.g. 'default')."""
    p = Path(name)
    if p.is_file():
        return p
    shipped = RECIPES / f"{name}.yaml"
    if shipped.is_file():
        return shipped
    known = ", ".join(sorted(f.stem for f in RECIPES.glob("*.yaml")))
    raise ValueError(f"{name}: no such recipe file (shipped recipes: {known})")


def _field_types() -> dict[str, object]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in fields(TrainConfig)}


def _check(key: str, value, where: str):
    """value coerced to the field's type, or a ValueError naming the key, the value and the fix."""
    kinds = _field_types()
    if key not in kinds:
        raise ValueError(f"{where}: unknown setting {key!r}; known settings: {', '.join(kinds)}")
    t = kinds[key]
    args = typing.get_args(t)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), t) if isinstance(t, types.UnionType) else t
    if value is None and optional:
        return None
    if typing.get_origin(base) is list:
        value = [value] if isinstance(value, str) else value
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return [str(v) for v in value]
        want = "a list of strings"
    elif base is bool:
        if isinstance(value, bool):
            return value
        want = "true or false"
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        want = "an integer"
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 (PyYAML) reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        want = "a number"
    else:
        if isinstance(value, str):
            return value
        want = "a string"
    raise ValueError(f"{where}: {key} must be {want}" + (" or null" if optional else "") + f", got {value!r}; "
                     f"e.g. --set {key}={asdict(TrainConfig())[key] if key != 'data' else 'texts/'}")


def _load_yaml(path: Path) -> dict:
    from ..sources import read_user_text

    text = read_user_text(path, "a YAML config", max_bytes=1 << 20)  # a regular file: a FIFO would block
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not a readable YAML file ({' '.join(str(e).split())}); fix it") from None
    except RecursionError:
        raise ValueError(f"{path}: YAML nested too deeply to be a config; fix it") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: a config must be a YAML mapping of settings (key: value), got "
                         f"{type(loaded).__name__}")
    return {str(k): _check(str(k), v, str(path)) for k, v in loaded.items()}


def parse_set(items: list[str]) -> dict:
    """--set KEY=VALUE items (VALUE parsed as YAML: 2e-5, true, [a, b]) -> checked settings."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: use KEY=VALUE, e.g. --set lr=2e-5")
        k, v = item.split("=", 1)
        k = k.strip().replace("-", "_")
        try:
            value = yaml.safe_load(v)
        except yaml.YAMLError:
            value = v
        out[k] = _check(k, value, f"--set {item}")
    return out


def saved_config(run: str | Path) -> dict:
    """The config.yaml of a run directory (ValueError if there is none)."""
    f = Path(run) / "config.yaml"
    if not os.path.lexists(f):
        raise ValueError(f"{run}: no config.yaml; --resume takes the run directory of an earlier `qatlm train`")
    return _load_yaml(f)


def resolve(recipe: str | Path | None = None, saved: str | Path | None = None, flags: dict | None = None,
            notes: list[str] | None = None) -> TrainConfig:
    """The one precedence rule (see the module docstring). `saved`: a run directory to resume; its `out` is
    that directory, wherever the command runs from. `notes` collects what resuming changed, for the user."""
    values = asdict(TrainConfig())
    if recipe is not None:
        values.update(_load_yaml(recipe_path(recipe)))
    flags = {k: _check(k, v, f"--{k.replace('_', '-')}") for k, v in (flags or {}).items() if v is not None}
    if saved is not None:
        old = saved_config(saved)
        values.update(old)
        values["out"] = str(Path(saved))
        flags.pop("out", None)
        for k, v in flags.items():
            if k in FIXED_ON_RESUME and v != values.get(k):
                raise ValueError(f"{saved}: {k} was {values.get(k)!r} in this run; changing it to {v!r} would train "
                                 f"a different model. Start a new run (another --out) or drop that flag")
            if v != values.get(k) and notes is not None:
                notes.append(f"{k}: {values.get(k)!r} -> {v!r}")
    values.update(flags)
    return TrainConfig(**values).validate()


def save(cfg: TrainConfig, run: Path) -> None:
    from ..atomic import atomic_write_text

    atomic_write_text(run / "config.yaml", yaml.safe_dump(asdict(cfg), sort_keys=False))
