"""Q4_1: 32 weights -> fp16 d, fp16 min + 16 bytes of 4-bit codes (5 bits/weight).
ggml-quants.c quantize_row_q4_1_ref;
with an importance matrix quantize_row_q4_1_impl (see _weighted)."""
import torch
from gguf import GGMLQuantizationType

from ._base import (BlockFormat, Codes, decode_min, encode_min, fp16_bytes, fp16_from_bytes, pack_nibbles,
                    unpack_nibbles)
from ._weighted import encode_min_imatrix


class Q4_1(BlockFormat):
    imatrix_use = "row"

    def encode(self, blocks: torch.Tensor, fast: bool = False) -> Codes:
        return encode_min(blocks, 15, fast)

    def encode_imatrix(self, blocks, qw, sigma2):  # ggml quantize_row_q4_1_impl
        return encode_min_imatrix(blocks, qw, sigma2, 15)

    def decode(self, codes: Codes) -> torch.Tensor:
        return decode_min(codes)

    def pack(self, codes: Codes) -> torch.Tensor:
        return torch.cat([fp16_bytes(codes.d), fp16_bytes(codes.m), pack_nibbles(codes.q)], dim=1)

    def unpack(self, raw: torch.Tensor) -> Codes:
        return Codes(unpack_nibbles(raw[:, 4:]), fp16_from_bytes(raw[:, :2]), fp16_from_bytes(raw[:, 2:4]))


FORMAT = Q4_1("q4_1", int(GGMLQuantizationType.Q4_1), block_size=32, type_size=20)
