"""Stage 1, the teacher: a Hugging Face directory (config.json + safetensors) or a GGUF file, as a
`transformers` model plus tokenizer.

    teacher = load_teacher("gemma-3-270m-q4_k_m.gguf")      # or a directory, or "bundled"
    teacher.model, teacher.tokenizer, teacher.gguf_path

GGUF teachers are dequantized by transformers (gguf-py's dequantizers, which agree with llama.cpp's byte
for byte: tests/test_ptq.py), then saved once as a Hugging Face directory in the cache
(~/.cache/qatlm/teachers/<sha256 of the file>, written atomically): converting Gemma's 262k-token vocabulary
takes 15-30 s, and every later load of the same file reads the cached directory in a few seconds.

Hugging Face directories are checked before transformers sees them, so that a broken checkpoint gets an
error naming the file instead of a crash or a model with silently re-initialized, dropped or cast weights: no
FIFO or device among the files (opening one blocks); config.json a JSON object with a supported model_type and
sane sizes (num_hidden_layers >= 2, heads that divide, no quantization_config); the weights read from exactly the
files transformers reads (model.safetensors, else the files model.safetensors.index.json lists, never a stray
*.safetensors beside them) matching the model tensor for tensor: none missing, none left over (a
num_hidden_layers below the checkpoint's would drop layers), the right shapes, float dtypes, no separate
lm_head a tied config would discard; then no NaN/inf once loaded. transformers' own exceptions (config
validation, tokenizer files, GGUF conversion) become one line naming the file. GGUF teachers are checked the
same way (qatlm.gguf.io.check_model_keys, and every GGUF tensor used by the converted model, none invented).
Only safetensors are read (no pickle), and remote code is never run.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from contextlib import contextmanager

import torch

from . import arch
from .atomic import atomic_dir
from .sources import CACHE, read_user_text, regular_file, resolve


@dataclass
class Teacher:
    model: torch.nn.Module
    tokenizer: object
    source: Path  # what the user gave
    hf_dir: Path  # the Hugging Face directory the model was loaded from (the cache for GGUF teachers)
    gguf_path: Path | None  # the source GGUF, when there is one (its metadata is reused on export)
    arch: str  # GGUF architecture name


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read 16 MB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def one_line(e: BaseException) -> str:
    """A library's exception as one short line (transformers' messages span several)."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" + ("..." if len(text) > 300 else "")


@contextmanager
def quiet_transformers():
    """transformers' warnings off while it loads: what they report (a missing or unexpected tensor, a config it
    repairs) is checked here and becomes one error line; a warning table before it would only bury it."""
    from transformers.utils import logging as tlog

    level = tlog.get_verbosity()
    tlog.set_verbosity_error()
    try:
        yield
    finally:
        tlog.set_verbosity(level)


def _refuse_special_files(path: Path) -> None:
    """A FIFO, socket or device in a model directory would block or never end when a library opens it."""
    for f in path.iterdir():
        try:
            st = os.stat(f)
        except OSError:
            continue  # a dangling link: whoever needs it reports it missing
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            regular_file(f, "a regular file in a model directory")  # raises, naming the kind


def _json_file(f: Path, what: str):
    try:
        return json.loads(read_user_text(f, what))
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON ({e}); fix or re-download it") from None
    except RecursionError:
        raise ValueError(f"{f}: JSON nested too deeply to be {what}; fix or re-download it") from None


def _positive_int(cfg_path: Path, c: dict, key: str, lo: int = 1, hi: int = 1 << 24, required: bool = False):
    v = c.get(key)
    if v is None and not required:
        return None
    if type(v) is not int or not lo <= v <= hi:
        raise ValueError(f"{cfg_path}: {key} is {v!r}; expected an integer in {lo}..{hi}. Fix config.json (or "
                         "re-download the model)")
    return v


MAX_LAYERS = 1024  # the largest models have ~130 layers; more is a damaged config (and slow to even build)


def check_hf_config(cfg: object, cfg_path: Path) -> dict:
    """The fields of a config.json that transformers would otherwise fail on with a foreign exception, or use
    silently wrongly: a mapping with a supported string model_type, sane sizes (num_hidden_layers >= 2), heads
    that divide evenly, no quantization_config (bitsandbytes/GPTQ/AWQ weights are not plain floats), no
    attention implementation or weight file redirection that would need other packages or files."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path}: config.json holds a {type(cfg).__name__}, not a JSON object; fix or "
                         "re-download it")
    mt = cfg.get("model_type")
    if not isinstance(mt, str) or mt not in arch.names():
        raise ValueError(f"{cfg_path}: model_type {mt!r} is not supported; supported: {', '.join(arch.names())}")
    for key, why in (("quantization_config", "quantized checkpoints (bitsandbytes, GPTQ, AWQ, ...) are not read; "
                      "give the unquantized model"),
                     ("transformers_weights", "weights are read from model.safetensors or its index only")):
        if key in cfg:
            raise ValueError(f"{cfg_path}: has {key!r}: {why}")
    for key in ("attn_implementation", "_attn_implementation"):
        if cfg.get(key) not in (None, "eager", "sdpa"):
            raise ValueError(f"{cfg_path}: {key} {cfg.get(key)!r} is not supported; remove it (qatlm uses eager "
                             "or sdpa attention)")
    c = cfg.get("text_config", cfg) if mt == "gemma3" else cfg
    if not isinstance(c, dict):
        raise ValueError(f"{cfg_path}: text_config is a {type(c).__name__}, not a JSON object; fix config.json")
    _positive_int(cfg_path, c, "num_hidden_layers", 2, MAX_LAYERS)
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
                "max_position_embeddings", "head_dim", "sliding_window"):
        _positive_int(cfg_path, c, key)
    heads, kv = c.get("num_attention_heads"), c.get("num_key_value_heads")
    if heads and kv and heads % kv:
        raise ValueError(f"{cfg_path}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}; "
                         "fix config.json")
    if heads and c.get("hidden_size") and not c.get("head_dim") and c["hidden_size"] % heads:
        raise ValueError(f"{cfg_path}: hidden_size {c['hidden_size']} is not a multiple of num_attention_heads "
                         f"{heads} and there is no head_dim; fix config.json")
    eps = c.get("rms_norm_eps")
    if eps is not None and (type(eps) not in (int, float) or not 0 < eps < 1):
        raise ValueError(f"{cfg_path}: rms_norm_eps is {eps!r}; expected a small positive number. Fix config.json")
    for d in (cfg, c):
        if not isinstance(d.get("tie_word_embeddings", False), bool):
            raise ValueError(f"{cfg_path}: tie_word_embeddings is {d['tie_word_embeddings']!r}; expected true or "
                             "false. Fix config.json")
    return cfg


def check_hf_dir(path: Path) -> dict:
    """Validate a Hugging Face model directory; returns its config. Raises ValueError naming the file."""
    _refuse_special_files(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"{path}: no config.json; a teacher is a Hugging Face model directory (config.json + "
                         "*.safetensors) or a .gguf file")
    cfg = check_hf_config(_json_file(cfg_path, "a model's config.json"), cfg_path)
    weight_files(path)
    return cfg


WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def weight_files(path: Path) -> dict[str, Path]:
    """Tensor name -> file, for exactly the files transformers loads: model.safetensors if it exists, else the
    files model.safetensors.index.json maps (never other *.safetensors lying in the directory)."""
    single, index = path / WEIGHTS, path / INDEX
    if os.path.lexists(single):
        regular_file(single, "safetensors weights")
        return {k: single for k in _header(single)}
    if not os.path.lexists(index):
        others = sorted(p.name for p in path.glob("*.safetensors"))
        bins = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        extra = (f" (found {', '.join(others)}: transformers reads only {WEIGHTS} or the files its index lists; "
                 f"rename a single file to {WEIGHTS})" if others else
                 f" (found {', '.join(bins)}: pickle files are not loaded; convert them to safetensors)" if bins else "")
        raise ValueError(f"{path}: no {WEIGHTS} or {INDEX} (no *.safetensors weights){extra}")
    idx = _json_file(index, "a safetensors index")
    wm = idx.get("weight_map") if isinstance(idx, dict) else None
    if not isinstance(wm, dict) or not wm or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise ValueError(f"{index}: no \"weight_map\" of tensor name -> file name; fix or re-download the index")
    if not isinstance(idx.get("metadata"), dict):  # transformers reads index["metadata"]
        raise ValueError(f"{index}: no \"metadata\" object (transformers needs one, even empty); fix or "
                         "re-download the index")
    found: dict[str, Path] = {}
    for fname in sorted(set(wm.values())):
        f = path / fname
        if Path(fname).name != fname or fname in (".", ".."):
            raise ValueError(f"{index}: weight_map names {fname!r}, not a file in {path}; fix the index")
        keys = set(_header(f))
        mapped = {k for k, v in wm.items() if v == fname}
        if keys != mapped:
            diff = sorted(mapped ^ keys)
            raise ValueError(f"{index}: lists {len(mapped)} tensors in {fname} but the file holds {len(keys)} "
                             f"(differing: {', '.join(diff[:3])}); the index does not match the shards: re-download")
        found.update((k, f) for k in keys)
    return found


def _header(f: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (safetensors dtype, shape)} of one file's header."""
    from safetensors import safe_open

    regular_file(f, "safetensors weights")
    try:
        with safe_open(str(f), framework="pt") as st:
            return {k: (st.get_slice(k).get_dtype(), tuple(st.get_slice(k).get_shape())) for k in st.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise ValueError(f"{f}: cannot read safetensors header ({one_line(e)}); the file is damaged or truncated") \
            from None


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def check_layers(path: Path, cfg: dict) -> None:
    """num_hidden_layers may not exceed the layers the weights hold (before a skeleton of 2^16 layers is built)."""
    c = cfg.get("text_config", cfg) if cfg.get("model_type") == "gemma3" else cfg
    n = c.get("num_hidden_layers")
    held = {int(m.group(1)) for k in weight_files(path) if (m := _LAYER.search(k))}
    if n is not None and n > len(held):
        raise ValueError(f"{path / 'config.json'}: num_hidden_layers is {n} but the weights hold {len(held)} layers; "
                         "fix config.json or the checkpoint")


def _check_tensors(path: Path, model: torch.nn.Module) -> dict[str, Path]:
    """The weight files match the model exactly: every parameter present with the same shape and a float dtype,
    nothing left over that transformers would silently ignore, no separate lm_head a tied model would drop."""
    files = weight_files(path)
    headers: dict[Path, dict] = {}
    found = {}
    for name, f in files.items():
        if f not in headers:
            headers[f] = _header(f)
        found[name] = (*headers[f][name], f)
    expected = model.state_dict()
    tied = arch.is_tied(model)
    for name, t in expected.items():
        if name not in found:
            if tied and name == "lm_head.weight":
                continue
            raise ValueError(f"{path}: tensor {name!r} {tuple(t.shape)} is missing from the safetensors files; "
                             "the checkpoint is incomplete (re-download or re-export it)")
        dtype, shape, f = found[name]
        if shape != tuple(t.shape):
            raise ValueError(f"{f}: tensor {name!r} has shape {shape} but config.json implies {tuple(t.shape)}; "
                             "the weights do not belong to this config")
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"{f}: tensor {name!r} is stored as {dtype}, not a float type ({', '.join(FLOAT_DTYPES)}); "
                             "quantized or integer checkpoints are not read: give the unquantized model")
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    for name in sorted(set(found) - set(expected)):
        if not any(p.search(name) for p in ignore):
            raise ValueError(f"{found[name][2]}: tensor {name!r} is not a parameter of the model config.json "
                             "describes (num_hidden_layers, vocabulary, ...); transformers would ignore it and drop "
                             "those weights. Fix config.json or the checkpoint")
    if tied and "lm_head.weight" in found:
        from safetensors import safe_open

        emb = next(n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight)
        (fh, fe) = (found["lm_head.weight"][2], found[emb][2])
        with safe_open(str(fh), framework="pt") as a, safe_open(str(fe), framework="pt") as b:
            same = torch.equal(a.get_tensor("lm_head.weight"), b.get_tensor(emb))
        if not same:
            raise ValueError(f"{fh}: has a separate lm_head.weight but config.json sets tie_word_embeddings (or the "
                             "architecture ties the output to the embeddings): the head would be discarded. Set "
                             "\"tie_word_embeddings\": false in config.json, or remove lm_head.weight")
    return {n: v[2] for n, v in found.items()}


def check_finite_weights(model: torch.nn.Module, where,
                         fix: str = "the weights are damaged (re-download or re-export the model)") -> None:
    """ValueError naming the tensor (where(name) -> 'file: tensor ...') when a weight holds NaN or inf."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where(name)} has {int((~torch.isfinite(t)).sum())} NaN/inf value(s); {fix}")


def load_hf(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, object, dict]:
    """Load and check a Hugging Face directory (safetensors only, no remote code)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    cfg = check_hf_dir(path)
    check_layers(path, cfg)
    cfg_path = path / "config.json"
    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(path, trust_remote_code=False)
            with torch.device("meta"):
                skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except Exception as e:  # transformers' own validation (ValueError, KeyError, ZeroDivisionError, ImportError...)
        raise ValueError(f"{cfg_path}: transformers cannot build a model from it ({one_line(e)}); fix config.json") \
            from None
    files = _check_tensors(path, skeleton)
    try:
        with quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                               trust_remote_code=False, output_loading_info=True)
    except Exception as e:
        raise ValueError(f"{path}: transformers cannot load these weights ({one_line(e)}); re-download or re-export "
                         "the checkpoint") from None
    bad = sorted(set(info["missing_keys"]) - {"lm_head.weight"} | set(info["unexpected_keys"])) + \
        sorted(str(k) for k in info["mismatched_keys"])
    if bad:  # _check_tensors should have caught it: never train on re-initialized weights
        raise ValueError(f"{path}: transformers did not load {bad[:3]} as stored; re-download or re-export it")
    check_finite_weights(model, lambda n: f"{files.get(n, path)}: tensor {n!r}")
    model.eval()
    try:
        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as e:
        raise ValueError(f"{path}: cannot load the tokenizer (tokenizer.json / tokenizer_config.json: {one_line(e)}); "
                         "fix or re-download the tokenizer files") from None
    return model, tok, cfg


def gguf_to_hf_cache(gguf_path: Path) -> Path:
    """Convert a GGUF teacher to a cached Hugging Face directory once; returns the directory. The file is
    checked first (structure, architecture, hyperparameters against the tensors, tensor types) and the
    converted model after (every GGUF tensor used, none invented, no NaN/inf), so the cache holds only
    models that are exactly the file."""
    from .gguf.io import architecture, check_dequantizable, check_model_keys, open_gguf

    info, reader = open_gguf(gguf_path)  # validate before transformers parses it
    name = architecture(reader, gguf_path)
    try:
        arch.get(name)
    except ValueError as e:
        raise ValueError(f"{gguf_path}: {e}") from None
    check_dequantizable(gguf_path, info.tensors)
    check_model_keys(info, reader, name)
    target = CACHE / "teachers" / sha256_file(gguf_path)
    if (target / "config.json").is_file():
        return target
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with atomic_dir(target, replace=False) as tmp:  # another process may finish first: keep its copy
        with tqdm(total=2, desc=f"converting {gguf_path.name} (once; cached)", unit="step") as bar:
            try:
                with quiet_transformers():
                    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
                    bar.update()
                    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                                 dtype=torch.float32)
            except Exception as e:  # transformers' GGUF conversion reports bad metadata in many ways
                raise ValueError(f"{gguf_path}: transformers cannot convert this GGUF ({one_line(e)}); re-download or "
                                 "re-convert the file") from None
            tok.save_pretrained(tmp)
            names = arch.gguf_names(model)
            have = {t.name for t in info.tensors} - {"rope_freqs.weight"}  # llama.cpp's own rope table: not a weight
            want = set(names.values())
            if have != want:
                extra, missing = sorted(have - want), sorted(want - have)
                raise ValueError(f"{gguf_path}: its tensors do not match a {name} model of its own metadata ("
                                 + (f"unused: {', '.join(extra[:3])}" if extra else "")
                                 + ("; " if extra and missing else "")
                                 + (f"missing: {', '.join(missing[:3])}" if missing else "")
                                 + "); re-convert the file")
            check_finite_weights(model, lambda n: f"{gguf_path}: tensor {names.get(n, n)!r}")
            # transformers marks GGUF-loaded models as "quantized" and refuses save_pretrained; the weights
            # are plain fp32 by now, so write them (and a config without that marker) directly
            config = model.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            config.save_pretrained(tmp)
            save_state_dict(model, tmp / "model.safetensors")
            bar.update()
        (tmp / "qatlm_source.json").write_text(json.dumps({"gguf": str(gguf_path), "arch": name}))
    return target


def save_state_dict(model: torch.nn.Module, path: Path) -> None:
    """Weights as one safetensors file, the tied lm_head left out (as Hugging Face checkpoints do)."""
    from safetensors.torch import save_file

    tied = arch.is_tied(model)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    try:
        save_file(sd, str(path), metadata={"format": "pt"})
    except Exception as e:  # safetensors' SafetensorError wraps the OS error (a full disk) in its own type
        if isinstance(e, OSError):
            raise
        full = "No space left" in str(e) or "os error 28" in str(e) or "StorageFull" in str(e)
        raise OSError(errno.ENOSPC if full else errno.EIO,
                      f"{'no space left' if full else 'cannot write'} while writing {path} ({one_line(e)}); "
                      + ("free disk space and retry" if full else "check the disk and retry")) from None


def load_teacher(source: str | os.PathLike = "bundled", dtype: torch.dtype = torch.float32) -> Teacher:
    """A GGUF file, a Hugging Face directory, or "bundled" (Gemma 3 270M) -> Teacher (model in eval mode)."""
    src = resolve(source)
    hf_dir = gguf_to_hf_cache(src.path) if src.kind == "gguf" else src.path
    model, tok, cfg = load_hf(hf_dir, dtype)
    return Teacher(model, tok, src.path, hf_dir, src.path if src.kind == "gguf" else None,
                   arch.get(cfg["model_type"]).name)
