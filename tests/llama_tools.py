"""llama.cpp's own command-line tools (llama-imatrix, llama-quantize, llama-perplexity) as a test reference.

    from llama_tools import tool
    subprocess.run([tool("llama-imatrix"), "-m", "model-f32.gguf", "-f", "text.txt", "-o", "out.gguf"])

llama-cpp-python ships llama.cpp's libraries but not its tools, so they are built here from the llama.cpp
sources vendored in the llama-cpp-python sdist of exactly the installed version (the same C code the Python
bindings run): `pip download --no-deps --no-binary llama-cpp-python llama-cpp-python==<version>` (only that
package as source: `--no-binary :all:` would also compile the build backend's own requirements, cmake itself
among them, from source to prepare the sdist's metadata: still at it after 35 min here), then cmake (CPU only,
Release, LLAMA_CURL=OFF, static libraries so the binaries do not point into the build tree, only the needed
targets, -j2). That takes minutes on 2 cores, so the result is cached:

    $QATLM_CACHE (default ~/.cache/qatlm) / llama.cpp-tools / <version> / bin / llama-imatrix ...
                                                                      / build-info.json

Built once and atomically: the build runs in a temporary directory beside the target, under a file lock, and is
renamed into place only when complete (build-info.json written last), so a second caller, concurrent or later,
either waits for the first or finds a complete build; an interrupted build leaves nothing behind.

ggml compiles for the building machine's CPU (GGML_NATIVE), so build-info.json records the CPU's feature flags;
a cache restored onto a machine with different flags is rebuilt rather than crashing with SIGILL.

llama.cpp's converter, convert_hf_to_gguf.py, is Python and ships in the same sdist (not in the `gguf` package):
`converter()` extracts it with what it imports (conversion/, gguf-py/, models/templates/) to

    $QATLM_CACHE / llama.cpp-convert / <version> / convert_hf_to_gguf.py ...

once, atomically and under the same kind of lock; run it with this interpreter (it needs torch, numpy,
transformers and, for SentencePiece tokenizers, sentencepiece: the test extra).

Run `python tests/llama_tools.py` to build (or find) the tools and print their paths and the build time.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

TOOLS = ("llama-imatrix", "llama-quantize", "llama-perplexity")
JOBS = 2


def cache_root() -> Path:
    """qatlm's cache directory: $QATLM_CACHE or ~/.cache/qatlm (the rule of qatlm's own cache)."""
    return Path(os.environ.get("QATLM_CACHE", Path.home() / ".cache" / "qatlm"))


def llama_cpp_version() -> str:
    """The installed llama-cpp-python version, e.g. '0.3.36' (whose vendored llama.cpp is built)."""
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError("llama-cpp-python is not installed; install qatlm's test extra: "
                           "pip install -e '.[test]'") from None


def tools_dir(version: str | None = None) -> Path:
    return cache_root() / "llama.cpp-tools" / (version or llama_cpp_version())


def _cpu_flags() -> str:
    """A short fingerprint of the CPU features a GGML_NATIVE build depends on."""
    flags = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags += " " + " ".join(sorted(line.split(":", 1)[1].split()))
                break
    except OSError:
        pass
    return hashlib.sha256(flags.encode()).hexdigest()[:16]


def _complete(d: Path) -> dict | None:
    """build-info.json of a complete build for this CPU in `d`, else None."""
    try:
        info = json.loads((d / "build-info.json").read_text())
    except (OSError, ValueError):
        return None
    if info.get("cpu_flags") != _cpu_flags():
        return None
    if not all((d / "bin" / t).is_file() for t in TOOLS):
        return None
    return info


def _executable(name: str) -> str:
    """`name` from PATH, else from this interpreter's environment (the `cmake` / `ninja` PyPI packages)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found:
        return found
    if name == "cmake":
        try:
            import cmake  # the PyPI package ships a full cmake

            return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
        except ImportError:
            pass
        raise RuntimeError("cmake is needed to build llama.cpp's tools and is not on PATH; "
                           "install it (pip install cmake, or your system's package)")
    return ""


def _run(cmd: list[str], log: Path, **kw) -> None:
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(map(str, cmd)) + "\n")
        fh.flush()
        r = subprocess.run(list(map(str, cmd)), stdout=fh, stderr=subprocess.STDOUT, **kw)
    if r.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"building llama.cpp's tools failed at `{' '.join(map(str, cmd))}` "
                           f"(exit {r.returncode}); last lines of {log}:\n{tail}")


def _vendored_llama_cpp(version: str, work: Path, log: Path, members=None) -> Path:
    """Download the sdist of llama-cpp-python==version into `work` and extract it (only the paths under its
    vendor/llama.cpp/ that `members(relative_path)` accepts, if given); returns its vendor/llama.cpp."""
    src_dir = work / "sdist"
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
          f"llama-cpp-python=={version}", "-d", src_dir], log)
    archives = sorted(src_dir.glob("llama_cpp_python-*.tar.gz")) + sorted(src_dir.glob("llama-cpp-python-*.tar.gz"))
    if not archives:
        raise RuntimeError(f"pip download left no llama_cpp_python sdist in {src_dir}: {os.listdir(src_dir)}")
    with tarfile.open(archives[0]) as tar:
        chosen = None
        if members is not None:
            def wanted(m):
                parts = m.name.split("/", 3)  # <root>/vendor/llama.cpp/<rest>
                return len(parts) == 4 and parts[1:3] == ["vendor", "llama.cpp"] and members(parts[3])
            chosen = [m for m in tar.getmembers() if wanted(m)]
        try:
            tar.extractall(work / "src", members=chosen, filter="data")  # refuses links and paths leaving the target
        except TypeError:  # Python < 3.11.4: no extraction filters
            tar.extractall(work / "src", members=chosen)
    (root,) = (work / "src").iterdir()
    return root / "vendor" / "llama.cpp"


def _build(version: str, work: Path, out: Path) -> dict:
    """Download the sdist of llama-cpp-python==version into `work`, build TOOLS, put them in `out`/bin."""
    t0 = time.perf_counter()
    log = work / "build.log"
    llama = _vendored_llama_cpp(version, work, log)
    if not (llama / "CMakeLists.txt").is_file():
        raise RuntimeError(f"the llama-cpp-python {version} sdist has no vendored llama.cpp at {llama}")
    t_download = time.perf_counter() - t0

    cmake = _executable("cmake")
    ninja = _executable("ninja")
    gen = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []
    build = work / "build"
    _run([cmake, "-S", llama, "-B", build, *gen, "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
          "-DBUILD_SHARED_LIBS=OFF", "-DGGML_CUDA=OFF", "-DGGML_METAL=OFF", "-DGGML_VULKAN=OFF",
          "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"], log)
    _run([cmake, "--build", build, "--config", "Release", "-j", str(JOBS), "--target", *TOOLS], log)
    (out / "bin").mkdir(parents=True)
    for t in TOOLS:
        found = [p for p in (build / "bin" / t, build / "bin" / "Release" / t) if p.is_file()]
        if not found:
            raise RuntimeError(f"the build finished but made no {t} under {build / 'bin'}; see {log}")
        shutil.copy2(found[0], out / "bin" / t)
    shutil.copy2(log, out / "build.log")
    return {"llama_cpp_python": version, "tools": list(TOOLS), "cpu_flags": _cpu_flags(),
            "download_s": round(t_download, 1), "build_s": round(time.perf_counter() - t0, 1),
            "built_at": time.strftime("%Y-%m-%d %H:%M:%S")}


def ensure_built(version: str | None = None) -> Path:
    """The directory holding bin/<tool> for llama-cpp-python==version (the installed one), built if needed."""
    from filelock import FileLock  # a dependency of torch and huggingface_hub, so always there

    version = version or llama_cpp_version()
    final = tools_dir(version)
    if _complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final.parent / f".{version}.lock")):
        if _complete(final):  # built by another caller while we waited for the lock
            return final
        work = Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=".partial", dir=final.parent))
        try:
            out = work / "out"
            info = _build(version, work, out)
            (out / "build-info.json").write_text(json.dumps(info, indent=1) + "\n")  # last: marks complete
            if final.exists():  # an incomplete or other-CPU build: move it away, then swap the new one in
                old = final.with_name(f".{version}.old.{os.getpid()}")
                os.replace(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(out, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return final


def tool(name: str) -> Path:
    """Path of llama.cpp's `name` (one of TOOLS), built from the installed llama-cpp-python's sources."""
    if name not in TOOLS:
        raise ValueError(f"unknown llama.cpp tool {name!r}; this helper builds {', '.join(TOOLS)}")
    return ensure_built() / "bin" / name


# what convert_hf_to_gguf.py reads besides itself (paths relative to the vendored llama.cpp)
CONVERTER_FILES = ("convert_hf_to_gguf.py", "LICENSE", "conversion/", "gguf-py/", "models/templates/")


def converter(version: str | None = None) -> Path:
    """Path of llama.cpp's convert_hf_to_gguf.py from the installed llama-cpp-python's sdist (extracted once)."""
    from filelock import FileLock

    version = version or llama_cpp_version()
    final = cache_root() / "llama.cpp-convert" / version
    script = final / "convert_hf_to_gguf.py"
    if (final / "extracted.json").is_file():
        return script
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final.parent / f".{version}.lock")):
        if (final / "extracted.json").is_file():
            return script
        work = Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=".partial", dir=final.parent))
        try:
            t0 = time.perf_counter()
            llama = _vendored_llama_cpp(version, work, work / "download.log",
                                        lambda rel: any(rel == f or (f.endswith("/") and rel.startswith(f))
                                                        for f in CONVERTER_FILES))
            if not (llama / "convert_hf_to_gguf.py").is_file():
                raise RuntimeError(f"the llama-cpp-python {version} sdist has no convert_hf_to_gguf.py in {llama}")
            (llama / "extracted.json").write_text(json.dumps({"llama_cpp_python": version,
                                                              "download_s": round(time.perf_counter() - t0, 1)}))
            if final.exists():
                shutil.rmtree(final)
            os.replace(llama, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return script


def build_info() -> dict:
    """build-info.json of the (built) tools: version, CPU fingerprint, build_s (seconds the build took)."""
    return json.loads((ensure_built() / "build-info.json").read_text())


if __name__ == "__main__":
    t = time.perf_counter()
    for name in TOOLS:
        print(tool(name))
    print(converter())
    print(json.dumps(build_info()), f"(this call: {time.perf_counter() - t:.1f} s)")
