"""GGUF files: the validating reader and atomic writer (io), llama-quantize's type plans (plans), plain PTQ of a
GGUF (ptq), and the export of a trained student (export)."""
