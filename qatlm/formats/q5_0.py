"""Q5_0: 32 weights -> fp16 d + u32 high bits + 16 bytes of low nibbles (5.5 bits/weight).
ggml-quants.c quantize_row_q5_0_ref;
with an importance matrix quantize_row_q5_0_impl (see _weighted)."""
import torch
from gguf import GGMLQuantizationType

from ._base import (BlockFormat, Codes, decode_symmetric, encode_symmetric, fp16_bytes, fp16_from_bytes,
                    pack_high_bits, pack_nibbles, unpack_high_bits, unpack_nibbles)
from ._weighted import encode_symmetric_imatrix, fake_symmetric_imatrix_columns, symmetric_imatrix_columns


class Q5_0(BlockFormat):
    imatrix_use = "row"

    def encode(self, blocks: torch.Tensor, fast: bool = False) -> Codes:
        return encode_symmetric(blocks, 16, fast)

    def encode_imatrix(self, blocks, qw, sigma2):  # ggml quantize_row_q5_0_impl
        return encode_symmetric_imatrix(blocks, qw, sigma2, 16)

    def fake_imatrix_columns(self, x, w):  # training's fake quant, compiled (see _kernels)
        return fake_symmetric_imatrix_columns(x, w, 16)

    def imatrix_codes_columns(self, x, w):  # training's codes with learned block scales, compiled (see _kernels)
        return symmetric_imatrix_columns(x, w, 16)

    def decode(self, codes: Codes) -> torch.Tensor:
        return decode_symmetric(codes, 16)

    def pack(self, codes: Codes) -> torch.Tensor:
        # d, qh (bit j = bit 4 of q[j]), qs[16]
        return torch.cat([fp16_bytes(codes.d), pack_high_bits(codes.q), pack_nibbles(codes.q)], dim=1)

    def unpack(self, raw: torch.Tensor) -> Codes:
        q = unpack_nibbles(raw[:, 6:]) | unpack_high_bits(raw[:, 2:6])
        return Codes(q, fp16_from_bytes(raw[:, :2]))


FORMAT = Q5_0("q5_0", int(GGMLQuantizationType.Q5_0), block_size=32, type_size=22)
