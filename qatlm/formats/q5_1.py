"""Q5_1: 32 weights -> fp16 d, fp16 min, u32 high bits, 16 bytes of low nibbles (6 bits/weight).
ggml-quants.c quantize_row_q5_1_ref (no clamp there: (x-min)*id + 0.5 never exceeds 31.5);
with an importance matrix quantize_row_q5_1_impl (see _weighted)."""
import torch
from gguf import GGMLQuantizationType

from ._base import (BlockFormat, Codes, decode_min, encode_min, fp16_bytes, fp16_from_bytes, pack_high_bits,
                    pack_nibbles, unpack_high_bits, unpack_nibbles)
from ._weighted import encode_min_imatrix


class Q5_1(BlockFormat):
    imatrix_use = "row"

    def encode(self, blocks: torch.Tensor, fast: bool = False) -> Codes:
        return encode_min(blocks, 31, fast)

    def encode_imatrix(self, blocks, qw, sigma2):  # ggml quantize_row_q5_1_impl
        return encode_min_imatrix(blocks, qw, sigma2, 31)

    def decode(self, codes: Codes) -> torch.Tensor:
        return decode_min(codes)

    def pack(self, codes: Codes) -> torch.Tensor:
        return torch.cat([fp16_bytes(codes.d), fp16_bytes(codes.m), pack_high_bits(codes.q),
                          pack_nibbles(codes.q)], dim=1)

    def unpack(self, raw: torch.Tensor) -> Codes:
        q = unpack_nibbles(raw[:, 8:]) | unpack_high_bits(raw[:, 4:8])
        return Codes(q, fp16_from_bytes(raw[:, :2]), fp16_from_bytes(raw[:, 2:4]))


FORMAT = Q5_1("q5_1", int(GGMLQuantizationType.Q5_1), block_size=32, type_size=24)
