"""Q4_0: 32 weights -> fp16 d + 16 bytes of 4-bit codes (4.5 bits/weight). ggml-quants.c quantize_row_q4_0_ref;
with an importance matrix quantize_row_q4_0_impl (see _weighted)."""
import torch
from gguf import GGMLQuantizationType

from ._base import (BlockFormat, Codes, decode_symmetric, encode_symmetric, fp16_bytes, fp16_from_bytes,
                    pack_nibbles, unpack_nibbles)
from ._weighted import encode_symmetric_imatrix, fake_symmetric_imatrix_columns, symmetric_imatrix_columns


class Q4_0(BlockFormat):
    imatrix_use = "row"

    def encode(self, blocks: torch.Tensor, fast: bool = False) -> Codes:
        return encode_symmetric(blocks, 8, fast)

    def encode_imatrix(self, blocks, qw, sigma2):  # ggml quantize_row_q4_0_impl
        return encode_symmetric_imatrix(blocks, qw, sigma2, 8)

    def fake_imatrix_columns(self, x, w):  # training's fake quant, compiled (see _kernels)
        return fake_symmetric_imatrix_columns(x, w, 8)

    def imatrix_codes_columns(self, x, w):  # training's codes with learned block scales, compiled (see _kernels)
        return symmetric_imatrix_columns(x, w, 8)

    def decode(self, codes: Codes) -> torch.Tensor:
        return decode_symmetric(codes, 8)

    def pack(self, codes: Codes) -> torch.Tensor:
        return torch.cat([fp16_bytes(codes.d), pack_nibbles(codes.q)], dim=1)  # d, qs[16]

    def unpack(self, raw: torch.Tensor) -> Codes:
        return Codes(unpack_nibbles(raw[:, 2:]), fp16_from_bytes(raw[:, :2]))


FORMAT = Q4_0("q4_0", int(GGMLQuantizationType.Q4_0), block_size=32, type_size=18)
