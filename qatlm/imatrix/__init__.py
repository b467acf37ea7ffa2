"""Importance matrices, as llama-imatrix computes them and llama-quantize --imatrix uses them.

    from qatlm.imatrix import collect, imatrix_chunks, read_imatrix, write_imatrix
    im = collect(model, names, imatrix_chunks(ids, 512, 128, bos))   # statistics from a torch model
    write_imatrix(im, "imatrix.gguf")                               # llama-imatrix's GGUF format
    read_imatrix("imatrix.gguf").weights("blk.0.attn_q.weight")     # what llama-quantize uses per column

file.py: the file formats (GGUF and legacy .dat) and their validation; collect.py: the statistics.
"""
from .collect import collect, imatrix_chunks
from .file import Entry, Imatrix, check, check_against, read_imatrix, write_imatrix

__all__ = ["Entry", "Imatrix", "check", "check_against", "collect", "imatrix_chunks", "read_imatrix",
           "write_imatrix"]
