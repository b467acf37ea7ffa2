"""Type plans: which GGUF type each tensor gets, following llama-quantize's rules (src/llama-quant.cpp).

A plan name is a llama.cpp file type (`q4_0`, `q4_1`, `q5_0`, `q5_1`, `q8_0`, `q2_k`, `q3_k_s`, `q3_k_m`,
`q3_k_l`, `q4_k_s`, `q4_k_m`, `q5_k_s`, `q5_k_m`, `q6_k`, `iq4_nl`, `iq4_xs`, `f16`, `f32`) or `pure:<type>`
(every quantizable weight to <type>, no exceptions, like `llama-quantize --pure`).
Overrides `PATTERN=TYPE` (a regular expression searched in the tensor name) come last and win.

The rules for a file type (llama_tensor_get_type_impl, for dense models; `_rule` below):
- only tensors with >= 2 dims whose names end in "weight" are quantized; 1-D norms stay as they are (F32);
- the output projection (`output.weight`, or `token_embd.weight` when embeddings are tied and there is no
  `output.weight`) gets Q6_K, or Q8_0 when the file type's block does not divide its rows (Q8_0 file: Q8_0);
- every other weight gets the file type's type, except by category and layer i of n (i counts the tensors of
  that category in file order, as llama-quantize's counters do; more(i, n) = use_more_bits: i < n/8 or
  i >= 7n/8 or (i - n/8) % 3 == 2, integer division):

  file type  attn_v                       ffn_down                         attn_output
  q2_k       q4_k if n_gqa >= 4, else q3_k  q3_k                           q3_k
  q3_k_m     q5_k for i < 2, else q4_k    q5_k for i < n/16, else q4_k     q4_k
  q3_k_l     q5_k                         q5_k                             q5_k
  q4_k_s     q5_k for i < 4               q5_k for i < n/8
  q4_k_m     q6_k if more(i, n)           q6_k if more(i, n)
  q5_k_m     q6_k if more(i, n)           q6_k if more(i, n)
  iq4_nl/xs  q5_k if n_gqa >= 4           q5_k for i < n/8 without an imatrix
  q4_0/q5_0                               q4_1/q5_1 for i < n/8 with an imatrix

  (n_gqa = attention heads / KV heads, read from the attn_q / attn_k shapes; a 70B Llama (80 layers, GQA)
  also lifts Q3_K/Q4_K attn_v to Q5_K.)
- a type whose block does not divide the row falls back (tensor_type_fallback): Q4_K->Q5_0, Q5_K->Q5_1,
  Q6_K->Q8_0, Q2_K/Q3_K->Q4_0, IQ4_XS->IQ4_NL, to F16 if 32 does not divide it either. Q4_0..Q8_0 and IQ4_NL
  themselves have no fallback here: an error naming the override that fixes it. `Plan.fallbacks` lists what
  fell back and `fallback_note` says it in words (`qatlm plan` prints it): on Gemma 3 270M's 640-wide rows,
  Q3_K_M holds no Q3_K tensor at all.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .. import formats

# llama.cpp's llama_ftype values for the plans that are file types
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q2_k": 10, "q3_k_s": 11,
              "q3_k_m": 12, "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18,
              "iq4_nl": 25, "iq4_xs": 30}
# file types whose ordinary weights are not of the file type's own name (llama_ftype_get_default_type)
_DEFAULT_TYPE = {"q3_k_s": "q3_k", "q3_k_m": "q3_k", "q3_k_l": "q3_k", "q4_k_s": "q4_k", "q4_k_m": "q4_k",
                 "q5_k_s": "q5_k", "q5_k_m": "q5_k"}
# types qatlm can write: the exact block formats plus plain floats
WRITABLE = ["f32", "f16", *formats.names()]
_FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0", "q2_k": "q4_0", "q3_k": "q4_0", "iq4_xs": "iq4_nl"}
_NOT_QUANTIZED_NAMES = ("_norm.weight", "pos_embd", "token_types")


def block_size(type_name: str) -> int:
    if formats.is_mlx(type_name):  # an MLX affine group size (qatlm.formats.mlx_affine)
        return formats.get(type_name).block_size
    return GGML_QUANT_SIZES[GGMLQuantizationType[type_name.upper()]][0]


def type_bytes(t: str, n: int) -> float:
    """Bytes of n weights of type t (plus the comparison types bf16 and int4 of `qatlm memory`)."""
    if t == "bf16":
        return 2 * n
    if t == "int4":
        return n / 2
    if formats.is_mlx(t):
        return n // formats.get(t).block_size * formats.get(t).type_size
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[t.upper()]]
    return n // block * size


def is_quantizable(name: str, ne: tuple[int, ...]) -> bool:
    """llama-quantize quantizes tensors with >= 2 dims whose names end in 'weight' (norms excluded)."""
    return len(ne) >= 2 and name.endswith("weight") and not any(s in name for s in _NOT_QUANTIZED_NAMES)


def category(name: str) -> str:
    """llama-quant.cpp tensor_get_category: 'output', 'token_embd', 'attn_v' (also attn_qkv / attn_kv_b),
    'attn_k', 'attn_q', 'attn_output', 'ffn_up', 'ffn_gate', 'ffn_down' or 'other' (first match wins)."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"), ("attn_v.weight", "attn_v"),
                     ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                     ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass(frozen=True)
class ModelFacts:
    """What llama-quantize's rules read besides a tensor's name and shape."""

    n_gqa: int = 1  # attention heads per KV head
    n_attn_v: int = 0  # attn_v-like tensors (qs.n_attention_wv)
    n_layer: int = 0  # blocks (qs.n_ffn_down = n_layer)
    tied: bool = True  # no output.weight: token_embd is the output projection
    is_70b: bool = False  # LLM_TYPE_70B (80-layer Llama with GQA, Qwen2 72B)
    imatrix: bool = False

    @staticmethod
    def of(tensors: list[tuple[str, tuple[int, ...], str]], imatrix: bool = False, arch: str | None = None,
           n_gqa: int | None = None) -> "ModelFacts":
        """From the (name, ne, type) list of a model. n_gqa defaults to rows(attn_q) // rows(attn_k) of the first
        block (= n_head // n_head_kv: q and k share the head size); arch (GGUF general.architecture) only decides
        the 70B rule, which without it follows Llama's (80 layers and GQA)."""
        ne = {n: s for n, s, _ in tensors}
        if n_gqa is None:
            q, k = ne.get("blk.0.attn_q.weight"), ne.get("blk.0.attn_k.weight")
            n_gqa = q[1] // k[1] if q and k and len(q) > 1 and len(k) > 1 and k[1] else 1
        cats = Counter(category(n) for n in ne)
        n_layer = len({m.group(1) for n in ne if (m := re.match(r"blk\.(\d+)\.", n))})
        if arch in ("qwen2", "deci", "olmo"):
            is_70b = n_layer == 80
        else:
            is_70b = (arch is None or arch == "llama") and n_layer == 80 and n_gqa > 1
        return ModelFacts(n_gqa, cats["attn_v"], n_layer, "output.weight" not in ne, is_70b, imatrix)


def _rule(ftype: str, default: str, cat: str, i: int, m: ModelFacts, ne0: int) -> str:
    """llama_tensor_get_type_impl for a dense model (no experts, not Falcon): the type before the fallback.
    i: the tensor's index among those of its category."""
    if cat == "output" or (cat == "token_embd" and m.tied):
        if ne0 % block_size(default):
            return "q8_0"
        return default if default == "q8_0" else "q6_k"
    if cat == "attn_v":
        t = default
        if ftype == "q2_k":
            t = "q4_k" if m.n_gqa >= 4 else "q3_k"
        elif ftype == "q3_k_m":
            t = "q5_k" if i < 2 else "q4_k"
        elif ftype == "q3_k_l":
            t = "q5_k"
        elif ftype in ("iq4_nl", "iq4_xs") and m.n_gqa >= 4:
            t = "q5_k"
        elif ftype in ("q4_k_m", "q5_k_m") and use_more_bits(i, m.n_attn_v):
            t = "q6_k"
        elif ftype == "q4_k_s" and i < 4:
            t = "q5_k"
        if m.is_70b and t in ("q3_k", "q4_k"):
            t = "q5_k"
        return t
    if cat == "ffn_down":
        n = m.n_layer
        if ftype == "q2_k":
            return "q3_k"
        if ftype == "q3_k_m":
            return "q5_k" if i < n // 16 else "q4_k"
        if ftype == "q3_k_l":
            return "q5_k"
        if ftype in ("q4_k_m", "q5_k_m"):
            return "q6_k" if use_more_bits(i, n) else default
        if ftype in ("iq4_nl", "iq4_xs") and i < n // 8 and not m.imatrix:
            return "q5_k"
        if ftype == "q4_k_s" and i < n // 8:
            return "q5_k"
        if ftype in ("q4_0", "q5_0") and m.imatrix and i < n // 8:
            # "guard against craziness in the first few ffn_down layers" (only with an imatrix)
            return "q4_1" if ftype == "q4_0" else "q5_1"
        return default
    if cat == "attn_output":
        return {"q2_k": "q3_k", "q3_k_m": "q4_k", "q3_k_l": "q5_k"}.get(ftype, default)
    return default


def _fallback(t: str, row: int) -> str:
    """tensor_type_fallback for the K- and IQ4_XS types: a 256 block that does not divide the row."""
    if t in _FALLBACK and row % block_size(t):
        t = _FALLBACK[t]
        if row % block_size(t):
            t = "f16"
    return t


@dataclass
class Plan:
    """A parsed plan. `types(tensors)` maps each tensor name to a type name ('q4_0', 'f32', ...)."""

    name: str
    default: str  # type of ordinary quantizable weights
    pure: bool = False
    overrides: list[tuple[re.Pattern, str]] = field(default_factory=list)

    file_type_name: str | None = None  # the llama.cpp file type this plan follows (None for pure: plans)

    @property
    def file_type(self) -> int | None:
        return FILE_TYPES.get(self.file_type_name or "")  # llama_ftype written to general.file_type

    def types(self, tensors: list[tuple[str, tuple[int, ...], str]], imatrix: bool = False, arch: str | None = None,
              n_gqa: int | None = None) -> dict[str, str]:
        """tensors: (name, ne, source type name) in file order -> {name: planned type name}. `imatrix`: whether
        an importance matrix is given (some file types then choose differently); arch / n_gqa: see ModelFacts."""
        return {n: t for n, (_, t) in self._resolve(tensors, imatrix, arch, n_gqa).items()}

    def fallbacks(self, tensors: list[tuple[str, tuple[int, ...], str]], imatrix: bool = False,
                  arch: str | None = None, n_gqa: int | None = None) -> dict[str, tuple[str, str]]:
        """{name: (type the file type's rules chose, type written)} for the tensors whose rows the chosen type's
        block does not divide (llama-quantize's "falling back to ..." warnings)."""
        return {n: (want, got) for n, (want, got) in self._resolve(tensors, imatrix, arch, n_gqa).items()
                if want != got}

    def _resolve(self, tensors, imatrix, arch, n_gqa) -> dict[str, tuple[str, str]]:
        m = ModelFacts.of(tensors, imatrix, arch, n_gqa)
        index = _category_index([n for n, ne, _ in tensors if is_quantizable(n, ne)])
        out = {}
        for name, ne, src in tensors:
            if not is_quantizable(name, ne):
                want = got = src  # copied as-is, like llama-quantize
            elif self.pure or self.default in ("f32", "f16"):
                want = got = self.default
            else:
                want = _rule(self.file_type_name, self.default, category(name), index[name], m, ne[0])
                got = _fallback(want, ne[0])
                if got != self.default and got in formats.names() and ne[0] % block_size(got):
                    got = "f16"  # a 32-block type a rule chose (Q8_0 output, Q4_1 guard): C falls back to F16
            for pattern, t in (self.overrides if is_quantizable(name, ne) else ()):
                if pattern.search(name):  # llama-quantize --tensor-type: quantized tensors only, first match wins
                    want = got = t
                    break
            if is_quantizable(name, ne) and ne[0] % block_size(got):
                raise ValueError(f"plan {self.name!r}: tensor {name} has rows of {ne[0]}, not a multiple of "
                                 f"{got.upper()}'s block of {block_size(got)}; override it (e.g. "
                                 f"--override '{re.escape(name)}=f16')")
            out[name] = (want, got)
        return out


def _category_index(names: list[str]) -> dict[str, int]:
    """Each quantized tensor's index among those of its category, in llama-quantize's order (its weights_map
    sorts by block number, then name: the counters i_attention_wv, i_ffn_down, ... count in that order)."""
    def key(n):
        m = re.match(r"blk\.(\d+)\.", n)
        return (int(m.group(1)) if m else -1, n)

    seen: Counter = Counter()
    out = {}
    for n in sorted(names, key=key):
        c = category(n)
        out[n] = seen[c]
        seen[c] += 1
    return out


def fallback_note(plan: Plan, tensors: list[tuple[str, tuple[int, ...], str]], imatrix: bool = False,
                  arch: str | None = None) -> str:
    """What the row-length fallbacks change, in words ('' when nothing falls back), e.g. on Gemma 3 270M:

    plan q3_k_m: 90 of 127 quantized tensors fall back because 256 does not divide their rows (llama-quantize
    does the same): 72 Q3_K -> Q4_0, 16 Q4_K -> Q5_0, 2 Q5_K -> Q5_1 (rows of 640).
    No tensor is stored as Q3_K, the type q3_k_m is named after: this file is a mix of 4- to 8-bit types ...
    """
    fb = plan.fallbacks(tensors, imatrix, arch)
    if not fb:
        return ""
    ne0 = {n: ne[0] for n, ne, _ in tensors}
    quantized = [n for n, ne, _ in tensors if is_quantizable(n, ne)]
    pairs = Counter(fb.values())
    rows = sorted({ne0[n] for n in fb})
    lines = [f"plan {plan.name}: {len(fb)} of {len(quantized)} quantized tensors fall back because the block of "
             f"their planned type does not divide their rows of {', '.join(map(str, rows))} (llama-quantize "
             f"does the same): " + ", ".join(f"{k} {a.upper()} -> {b.upper()}" for (a, b), k in pairs.most_common())
             + "."]
    main = plan.default
    types = plan.types(tensors, imatrix, arch)
    if main in formats.names() and not any(types[n] == main for n in quantized):
        count = {n: math.prod(ne) for n, ne, _ in tensors}

        def bits(t: dict[str, str]) -> float:
            return 8 * sum(type_bytes(t[n], count[n]) for n in quantized) / sum(count[n] for n in quantized)

        lines.append(f"No tensor is stored as {main.upper()}, the type {plan.name} is named after: the file averages "
                     f"{bits(types):.2f} bits per quantized weight (plan q4_0: "
                     f"{bits(parse_plan('q4_0').types(tensors, imatrix, arch)):.2f}). {main.upper()} needs rows that "
                     f"are multiples of {block_size(main)} (a larger model of the family); for this one, a 32-block "
                     "plan (q4_0, iq4_nl, ...) says what you get.")
    return "\n".join(lines)


def parse_plan(plan: str, overrides: list[str] | tuple[str, ...] = ()) -> Plan:
    """A file type ('q4_0', 'q4_k_m', ... see FILE_TYPES) or 'pure:<type>', plus 'PATTERN=TYPE' overrides."""
    p = plan.strip().lower()
    pure = p.startswith("pure:") or formats.is_mlx(p)  # 'mlx:4g64': every quantizable weight in MLX's groups
    default = p[5:] if p.startswith("pure:") else _DEFAULT_TYPE.get(p, p)
    known = sorted(FILE_TYPES) + [f"pure:{t}" for t in WRITABLE] + ["mlx:<bits>g<group> (e.g. mlx:4g64)"]
    if (default not in WRITABLE and not formats.is_mlx(default)) or (not pure and p not in FILE_TYPES):
        raise ValueError(f"unknown plan {plan!r}; known plans: {', '.join(known)}")
    parsed = []
    for o in overrides:
        if "=" not in o:
            raise ValueError(f"override {o!r} must be PATTERN=TYPE, e.g. 'token_embd=q8_0'")
        pattern, t = o.rsplit("=", 1)
        t = t.strip().lower()
        if t not in WRITABLE and not formats.is_mlx(t):
            raise ValueError(f"override {o!r}: unknown type {t!r}; qatlm writes {', '.join(WRITABLE)} "
                             "(and MLX's mlx:<bits>g<group> with --mlx)")
        try:
            parsed.append((re.compile(pattern.strip()), t))
        except re.error as e:
            raise ValueError(f"override {o!r}: bad regular expression ({e})") from None
    return Plan(plan, default, pure, parsed, (default if default in FILE_TYPES else None) if pure else p)
