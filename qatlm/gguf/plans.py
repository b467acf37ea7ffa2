"""Type plans: which GGUF type each tensor gets, following llama-quantize's rules (src/llama-quant.cpp).

A plan name is a llama.cpp file type (`q4_0`, `q4_1`, `q5_0`, `q5_1`, `q8_0`, `q4_k_m`, `q6_k`, `f16`,
`f32`) or `pure:<type>` (every quantizable weight to <type>, no exceptions, like `llama-quantize --pure`).
Overrides `PATTERN=TYPE` (a regular expression searched in the tensor name) come last and win.

The rules for a file type:
- only tensors with >= 2 dims whose names end in "weight" are quantized; 1-D norms stay as they are (F32);
- the output projection (`output.weight`, or `token_embd.weight` when embeddings are tied and there is no
  `output.weight`) gets Q6_K, or Q8_0 when its row length is not a multiple of 256 (Q8_0 file type: Q8_0);
- every other quantizable weight gets the file type's type, except in Q4_K_M: `attn_v` and `ffn_down` of
  layer i of n get Q6_K where `use_more_bits(i, n)`: i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2 (integer
  division; i counts those tensors in file order, as llama-quantize's counters do); the rest Q4_K;
- with an importance matrix, Q4_0 / Q5_0 files store ffn_down of layers i < n/8 as Q4_1 / Q5_1;
- a K-quant whose 256-block does not divide the row falls back (Q4_K->Q5_0, Q5_K->Q5_1, Q6_K->Q8_0,
  Q2_K/Q3_K->Q4_0), to F16 if 32 does not divide it either. Q4_0..Q8_0 have no fallback: an error.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .. import formats

# llama.cpp's llama_ftype values for the plans that are file types
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q4_k_m": 15, "q6_k": 18}
_DEFAULT_TYPE = {"q4_k_m": "q4_k"}  # file types whose ordinary weights are not of the file type's own name
_MORE_BITS = {"q4_k_m": ("q6_k", ("attn_v.weight", "ffn_down"))}  # type and tensors of use_more_bits layers
_IMATRIX_GUARD = {"q4_0": "q4_1", "q5_0": "q5_1"}  # first n/8 ffn_down layers when an imatrix is given
# types qatlm can write: the exact block formats plus plain floats
WRITABLE = ["f32", "f16", *formats.names()]
_K_FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0", "q2_k": "q4_0", "q3_k": "q4_0"}
_NOT_QUANTIZED_NAMES = ("_norm.weight", "pos_embd", "token_types")


def block_size(type_name: str) -> int:
    return GGML_QUANT_SIZES[GGMLQuantizationType[type_name.upper()]][0]


def type_bytes(t: str, n: int) -> float:
    """Bytes of n weights of type t (plus the comparison types bf16 and int4 of `qatlm memory`)."""
    if t == "bf16":
        return 2 * n
    if t == "int4":
        return n / 2
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[t.upper()]]
    return n // block * size


def is_quantizable(name: str, ne: tuple[int, ...]) -> bool:
    """llama-quantize quantizes tensors with >= 2 dims whose names end in 'weight' (norms excluded)."""
    return len(ne) >= 2 and name.endswith("weight") and not any(s in name for s in _NOT_QUANTIZED_NAMES)


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

    def tensor_type(self, name: str, ne: tuple[int, ...], has_output: bool, source_type: str = "f32",
                    more_bits: bool = False, guarded: str | None = None) -> str:
        if not is_quantizable(name, ne):
            chosen = source_type  # copied as-is, like llama-quantize
        else:
            chosen = _MORE_BITS[self.file_type_name][0] if more_bits else guarded or self.default
            is_output = name == "output.weight" or (not has_output and name == "token_embd.weight")
            if not self.pure and self.default not in ("f32", "f16") and is_output and self.default != "q8_0":
                chosen = "q6_k"
            if not self.pure:
                chosen = _fallback(chosen, ne[0])
        for pattern, t in self.overrides:
            if pattern.search(name):
                chosen = t
        if is_quantizable(name, ne) and ne[0] % block_size(chosen):
            raise ValueError(f"plan {self.name!r}: tensor {name} has rows of {ne[0]}, not a multiple of "
                             f"{chosen.upper()}'s block of {block_size(chosen)}; override it (e.g. "
                             f"--override '{re.escape(name)}=f16')")
        return chosen

    def types(self, tensors: list[tuple[str, tuple[int, ...], str]], imatrix: bool = False) -> dict[str, str]:
        """tensors: (name, ne, source type name) in file order -> {name: planned type name}. `imatrix`: whether
        an importance matrix is given (llama-quantize then guards the first ffn_down layers of Q4_0 / Q5_0)."""
        has_output = any(n == "output.weight" for n, _, _ in tensors)
        more = self._more_bits([n for n, _, _ in tensors])
        guarded = self._imatrix_guard([n for n, _, _ in tensors]) if imatrix else {}
        out = {}
        for n, ne, src in tensors:
            out[n] = self.tensor_type(n, ne, has_output, src, n in more, guarded.get(n))
        return out

    def _imatrix_guard(self, names: list[str]) -> dict[str, str]:
        """llama_tensor_get_type: with an imatrix, Q4_0 / Q5_0 files store ffn_down of layers i < n/8 as
        Q4_1 / Q5_1 ("guard against craziness in the first few ffn_down layers")."""
        if self.pure or self.file_type_name not in _IMATRIX_GUARD:
            return {}
        group = [n for n in names if "ffn_down" in n]
        return {name: _IMATRIX_GUARD[self.file_type_name] for i, name in enumerate(group) if i < len(group) // 8}

    def _more_bits(self, names: list[str]) -> set[str]:
        """Tensors that llama-quantize's use_more_bits(i, n) promotes in this file type (Q4_K_M)."""
        if self.pure or self.file_type_name not in _MORE_BITS:
            return set()
        out = set()
        for key in _MORE_BITS[self.file_type_name][1]:
            group = [n for n in names if key in n]
            n = len(group)
            out |= {name for i, name in enumerate(group) if i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2}
        return out


def _fallback(t: str, row: int) -> str:
    if t in _K_FALLBACK and row % 256:
        t = _K_FALLBACK[t]
        if row % 32:
            t = "f16"
    return t


def parse_plan(plan: str, overrides: list[str] | tuple[str, ...] = ()) -> Plan:
    """A file type ('q4_0', 'q4_k_m', ... see FILE_TYPES) or 'pure:<type>', plus 'PATTERN=TYPE' overrides."""
    p = plan.strip().lower()
    pure = p.startswith("pure:")
    default = p[5:] if pure else _DEFAULT_TYPE.get(p, p)
    known = sorted(FILE_TYPES) + [f"pure:{t}" for t in WRITABLE]
    if default not in WRITABLE or (not pure and p not in FILE_TYPES):
        raise ValueError(f"unknown plan {plan!r}; known plans: {', '.join(known)}")
    parsed = []
    for o in overrides:
        if "=" not in o:
            raise ValueError(f"override {o!r} must be PATTERN=TYPE, e.g. 'token_embd=q8_0'")
        pattern, t = o.rsplit("=", 1)
        t = t.strip().lower()
        if t not in WRITABLE:
            raise ValueError(f"override {o!r}: unknown type {t!r}; qatlm writes {', '.join(WRITABLE)}")
        try:
            parsed.append((re.compile(pattern.strip()), t))
        except re.error as e:
            raise ValueError(f"override {o!r}: bad regular expression ({e})") from None
    return Plan(plan, default, pure, parsed, (default if default in FILE_TYPES else None) if pure else p)
