"""Q8_0: 32 weights -> fp16 d + 32 int8 codes (8.5 bits/weight). ggml-quants.c quantize_row_q8_0_ref."""
import torch
from gguf import GGMLQuantizationType

from ._base import BlockFormat, Codes, finite_or_zero, fp16_bytes, fp16_from_bytes, safe_inverse


_BELOW_HALF = 0.49999997  # nextafterf(0.5f, 0): the largest float below one half


def round_half_away(y: torch.Tensor) -> torch.Tensor:
    """C roundf (half AWAY from zero; torch.round is half-to-even) of finite y, as int32.

    trunc(y + copysign(0.5, y)) would be wrong for 0.49999997 (the sum rounds up to 1.0); adding the largest
    float below one half instead is exact for every fp32 y under round-to-nearest-even: below a tie the sum stays
    below the next integer, at a tie it rounds up to it (for y = 0.5, 1 - 2^-25 ties to the even 1.0), and from
    2^22 on it cannot move y off its integer or half. Two passes instead of five (the Q8_0 embedding dominates a
    one-off quantize); tests/test_formats.py checks it against float64 on every float in [2^-3, 2^9).
    """
    return (y + torch.full_like(y, _BELOW_HALF).copysign_(y)).to(torch.int32)


class Q8_0(BlockFormat):
    imatrix_use = "ignored"  # ggml quantize_q8_0: `(void)quant_weights; // not used`

    def encode(self, blocks: torch.Tensor, fast: bool = False) -> Codes:
        hi, lo = blocks.amax(dim=1, keepdim=True), blocks.amin(dim=1, keepdim=True)
        amax = torch.maximum(hi, -lo).abs()  # max |x|; .abs() makes a zero amax +0.0 as C's fabsf does
        d = amax / 127
        inv = safe_inverse(d)
        if fast:  # corner: an overflowing 1/d (|d| < ~2.9e-39)
            q = round_half_away(blocks * inv).to(torch.int8)
            return Codes(q, d.to(torch.float16), fix=torch.isinf(inv),
                         finite=torch.isfinite(hi) & torch.isfinite(lo))
        y = finite_or_zero(blocks * inv, inv, d)
        return Codes(round_half_away(y).to(torch.int8), d.to(torch.float16))

    def decode(self, codes: Codes) -> torch.Tensor:
        return codes.q.to(torch.float32) * codes.d.to(torch.float32)

    def pack(self, codes: Codes) -> torch.Tensor:
        return torch.cat([fp16_bytes(codes.d), codes.q.view(torch.uint8)], dim=1)

    def unpack(self, raw: torch.Tensor) -> Codes:
        return Codes(raw[:, 2:].contiguous().view(torch.int8), fp16_from_bytes(raw[:, :2]))


FORMAT = Q8_0("q8_0", int(GGMLQuantizationType.Q8_0), block_size=32, type_size=34)
