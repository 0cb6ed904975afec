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

Beyond "it compiles", the PTX of some kernels is checked for what a CPU test
cannot see: no approximate division or square root in the token scores (no
fast math), and the device-side index check of the row copies; and the
32-bit grid-stride loops are checked on the host (grid_stride.cuh).
"""
from __future__ import annotations

import ast
import glob
import os
import re
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


def setup_nvcc_flags() -> list[str]:
    """setup.py's NVCC_FLAGS, read from its source (running setup.py would build)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "NVCC_FLAGS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py defines no NVCC_FLAGS")


# The real build's nvcc flags (setup.py) and the torch headers' C++ standard.
NVCC_FLAGS = ["-O3", *setup_nvcc_flags(), "-gencode", "arch=compute_90,code=sm_90"]
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


# ---- what the compiled code does ----------------------------------------------------------

FAST_MATH_FLAGS = ("--use_fast_math", "-use_fast_math", "--ftz=true", "-ftz=true", "--prec-div=false",
                   "-prec-div=false", "--prec-sqrt=false", "-prec-sqrt=false")


def test_the_build_has_no_fast_math():
    """Issue #10 item 6: fast math makes CUDA scores differ from CPU/Triton by ulps."""
    flags = setup_nvcc_flags()
    assert not [f for f in flags if f in FAST_MATH_FLAGS], flags


def _ptx(src: Path, tmp_path: Path) -> str:
    out = tmp_path / (src.stem + ".ptx")
    cmd = [NVCC, "--ptx", str(src), *NVCC_FLAGS[:-2], "-arch=sm_90", f"-I{CSRC}", *TORCH_INCLUDES,
           "-o", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, _report(str(src), result)
    return out.read_text()


def _functions(ptx: str, name_part: str) -> list[str]:
    """Bodies of the PTX .entry functions whose mangled name contains name_part."""
    bodies = re.split(r"(?m)^(?=(?:\.visible )?\.entry )", ptx)
    return [b for b in bodies if ".entry " in b.split("(", 1)[0] and name_part in b.split("(", 1)[0]]


def test_token_scores_use_ieee_division_and_square_root(tmp_path):
    """The score kernels divide and take square roots correctly rounded, as the CPU
    and Triton backends do (what --use_fast_math would turn into approximations)."""
    ptx = _ptx(CSRC / "cuda" / "topk_tokens.cu", tmp_path)
    kernels = [f for part in ("select_kernel", "gather_kernel", "rows_backward_kernel", "qk_backward")
               for f in _functions(ptx, part)]
    assert len(kernels) >= 4 * 4, "expected the score kernels for 4 dtypes"
    for body in kernels:
        approximate = re.findall(r"\b(?:div|sqrt|rcp|rsqrt)\.(?:approx|full)\.\S+", body)
        assert not approximate, (body.split("(", 1)[0], sorted(set(approximate)))
    assert any("sqrt.rn.f32" in b for b in kernels) and any("div.rn.f32" in b for b in kernels)


def test_row_copies_check_the_index_on_the_device(tmp_path):
    """Issue #10 item 1: the CUDA row copy asserts idx in range (CUDA_KERNEL_ASSERT)."""
    kernels = _functions(_ptx(CSRC / "cuda" / "rows.cu", tmp_path), "copy_rows_kernel")
    assert len(kernels) == 5  # one per word size
    for body in kernels:
        assert "__assertfail" in body, body.split("(", 1)[0]


GRID_STRIDE_PROBE = r"""
#include <cstdint>
#include <cstdio>
#include "cuda/grid_stride.cuh"

// For a loop of n items, 256 threads a block: is a 32-bit counter allowed, and
// would it escape? The probe runs the loop of the thread that owns item n - 1
// (the one that steps furthest) in 32-bit two's complement arithmetic.
int main() {
  const int64_t sizes[] = {1, 1000, int64_t{1} << 24, (int64_t{1} << 31) - 1000000,
                           (int64_t{1} << 31) - 1000, (int64_t{1} << 31) - 1};
  for (int64_t n : sizes) {
    const int64_t stride = static_cast<int64_t>(nasops::cuda::grid_stride_blocks(n, 256)) * 256;
    const bool fits = nasops::cuda::int32_grid_stride_fits(n, n, stride);
    bool escapes = false;
    int32_t i = static_cast<int32_t>((n - 1) % stride);
    for (int steps = 0; i < static_cast<int32_t>(n) && steps < 100000; ++steps) {
      if (i < 0) { escapes = true; break; }
      i = static_cast<int32_t>(static_cast<uint32_t>(i) + static_cast<uint32_t>(stride));
    }
    std::printf("%lld %d %d\n", static_cast<long long>(n), fits ? 1 : 0, escapes ? 1 : 0);
  }
  return 0;
}
"""


def test_32bit_grid_stride_loops_cannot_wrap(tmp_path):
    """Issue #10 item 4: patch_attention.cu counts in 32 bits only where the counter
    cannot pass 2^31 - 1; just under 2^31 items it must take 64 bits."""
    src = tmp_path / "probe.cpp"
    src.write_text(GRID_STRIDE_PROBE)
    exe = tmp_path / "probe"
    built = subprocess.run([CXX, "-std=c++17", "-O1", f"-I{CSRC}", str(src), "-o", str(exe)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    lines = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60, check=True).stdout
    rows = {int(n): (fits == "1", escapes == "1") for n, fits, escapes in
            (line.split() for line in lines.splitlines())}
    for n, (fits, escapes) in rows.items():
        assert not (fits and escapes), f"n={n}: 32-bit counter allowed but it wraps"
    assert rows[1 << 24] == (True, False)  # ordinary maps keep the cheaper 32-bit math
    assert rows[(1 << 31) - 1000] == (False, True)  # the case that wrapped before
    assert "int32_grid_stride_fits(" in (CSRC / "cuda" / "patch_attention.cu").read_text()
