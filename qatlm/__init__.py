"""qatlm: quantization-aware training that lands exactly on llama.cpp's GGUF formats."""
__version__ = "0.1.0"
