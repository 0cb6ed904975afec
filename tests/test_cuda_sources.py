"""Every CUDA source compiles, so a CUDA typo fails CI on a machine without a GPU.

- csrc/cuda/*.cu: ``nvcc -c`` for sm_90 with the flags of the real build
  (setup.py), the torch include dirs on the path too;
- csrc/cuda/*.cpp (the torch glue, <op>_glue.cpp): ``g++ -fsyntax-only``
  against the installed torch headers and $CUDA_HOME/include. A CPU-only torch
  wheel lacks the generated c10/cuda/impl/cuda_cmake_macros.h; a stub of it is
  written to a temporary include dir for this check only (a real CUDA torch has
  the real header; the stub is never shipped).

All compiles run concurrently (one per core) in one module fixture; the tests
then read their results. Skipped only when nvcc is absent.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from torch.utils.cpp_extension import CUDA_HOME, include_paths

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_SOURCES = sorted(glob.glob(str(CSRC / "cuda" / "*.cu")))
GLUE_SOURCES = sorted(glob.glob(str(CSRC / "cuda" / "*.cpp")))


def _nvcc() -> str | None:
    if CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return os.path.join(CUDA_HOME, "bin", "nvcc")
    return shutil.which("nvcc")


def _cuda_include(nvcc: str | None) -> str | None:
    """The toolkit's include dir (nvcc may be a wrapper script outside the toolkit)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), CUDA_HOME, "/usr/local/cuda"]
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in filter(None, candidates):
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return os.path.join(home, "include")
    return None


NVCC = _nvcc()
CUDA_INCLUDE = _cuda_include(NVCC)
CXX = os.environ.get("CXX", "g++")
TORCH_INCLUDES = [f"-I{p}" for p in include_paths()]
# The real build's nvcc flags (setup.py) and the torch headers' C++ standard.
NVCC_FLAGS = ["-std=c++17", "-O3", "-gencode", "arch=compute_90,code=sm_90"]
CXX_FLAGS = ["-std=c++20", "-DNASOPS_WITH_CUDA"]

pytestmark = pytest.mark.skipif(NVCC is None or CUDA_INCLUDE is None,
                                reason="nvcc or the CUDA headers not found (no CUDA toolkit)")


def _cu_command(src: str, out_dir: Path) -> list[str]:
    return [NVCC, "-c", src, *NVCC_FLAGS, f"-I{CSRC}", *TORCH_INCLUDES,
            "-o", str(out_dir / (Path(src).stem + ".o"))]


def _glue_command(src: str, stub_dir: Path) -> list[str]:
    return [CXX, "-fsyntax-only", src, *CXX_FLAGS, f"-I{CSRC}", *TORCH_INCLUDES,
            f"-I{CUDA_INCLUDE}", f"-I{stub_dir}"]


def _write_stub(include_dir: Path) -> None:
    header = include_dir / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    header.parent.mkdir(parents=True, exist_ok=True)
    header.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")


def _run_all(commands: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        futures = {key: pool.submit(subprocess.run, cmd, capture_output=True, text=True, timeout=300)
                   for key, cmd in commands.items()}
        return {key: f.result() for key, f in futures.items()}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Source path -> the finished compile of it (all compiled concurrently)."""
    out_dir = tmp_path_factory.mktemp("cuda_objects")
    stub_dir = tmp_path_factory.mktemp("stub_include")
    _write_stub(stub_dir)
    commands = {src: _cu_command(src, out_dir) for src in CU_SOURCES}
    commands.update({src: _glue_command(src, stub_dir) for src in GLUE_SOURCES})
    return _run_all(commands)


def _report(src: str, result: subprocess.CompletedProcess) -> str:
    return (f"{os.path.relpath(src, ROOT)} failed to compile:\n$ {' '.join(result.args)}\n"
            f"{result.stdout}{result.stderr}")


def test_there_are_cuda_sources():
    # Guards the globs: a moved csrc/cuda would otherwise pass vacuously.
    assert CU_SOURCES and GLUE_SOURCES, f"no CUDA sources under {CSRC / 'cuda'}"


@pytest.mark.parametrize("src", CU_SOURCES, ids=lambda p: os.path.basename(p))
def test_cu_compiles(compiled, src):
    result = compiled[src]
    assert result.returncode == 0, _report(src, result)


@pytest.mark.parametrize("src", GLUE_SOURCES, ids=lambda p: os.path.basename(p))
def test_glue_compiles(compiled, src):
    result = compiled[src]
    assert result.returncode == 0, _report(src, result)


def test_a_cuda_typo_fails(tmp_path):
    """The check can fail: nvcc with these flags rejects a misspelt intrinsic."""
    src = tmp_path / "typo.cu"
    src.write_text("__global__ void k(float* x) { x[threadIdx.x] = __shfl_xor_snyc(0xffffffffu, 1.f, 1); }\n")
    result = subprocess.run(_cu_command(str(src), tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "__shfl_xor_snyc" in result.stderr + result.stdout
