"""Installing without the compiled extension (NASOPS_SKIP_EXTENSIONS=1) gives a
pure-Python package that imports, says what is missing and why, and still runs
every op on the eager backend."""
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_skip_extensions_builds_a_pure_python_wheel(tmp_path):
    env = dict(os.environ, NASOPS_SKIP_EXTENSIONS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
         "-w", str(tmp_path), str(ROOT)],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("nasops-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name  # no compiled code
    names = zipfile.ZipFile(wheel).namelist()
    assert "nasops/ops/mixed_op.py" in names and "nasops/spaces/data/rdarts_spaces.json" in names
    assert "nasops/spaces/data/nb201_test_accuracy.csv.gz" in names  # the NB201 table ships
    assert "nasops/spaces/data/README.md" in names  # with its attribution
    assert "nasops/selftest.py" in names
    assert not [n for n in names if n.endswith(".so")]


def test_package_without_extension_imports_and_explains(tmp_path):
    shutil.copytree(ROOT / "nasops", tmp_path / "nasops", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    script = (
        "import torch, nasops\n"
        "report = nasops.backends()\n"
        "assert not report['cpu']['available'], report\n"
        "assert 'not built' in report['cpu']['reason'], report\n"
        "assert report['eager']['available']\n"
        "o = [torch.randn(2, 3, 4, 4, requires_grad=True) for _ in range(2)]\n"
        "w = torch.tensor([0.25, 0.75], requires_grad=True)\n"
        "y = nasops.ops.mixed_op(o, w)\n"
        "torch.testing.assert_close(y, 0.25 * o[0] + 0.75 * o[1])\n"
        "y.sum().backward()\n"
        "try:\n"
        "    nasops.ops.mixed_op(o, w, backend='cpu')\n"
        "except ValueError as e:\n"
        "    assert 'not built' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('backend=cpu without the extension must fail')\n"
        "print('ok')\n")
    # -S: no site processing, so no .pth file (an editable install's finder among them)
    # can bring the source tree's nasops._C back; torch and friends come from the
    # site-packages folder named after the copy.
    site_packages = Path(torch.__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NASOPS_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(site_packages)])
    proc = subprocess.run([sys.executable, "-S", "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


def _extension_sources(cuda_home, headers=True, path=None, found=True, **env_flags) -> subprocess.CompletedProcess:
    """Run setup.py as if torch were a CUDA build and ``cuda_home`` a toolkit
    (torch.version.cuda and torch.cuda._is_compiled, which cpp_extension reads;
    no GPU; CUDA_HOME in the environment: only paths are computed, nothing
    compiles), with ``env_flags`` set and setuptools.setup replaced; prints the
    sources of the extensions it would build (JSON). ``headers``: give the
    toolkit an include/cuda_runtime.h; ``path``: a folder put first on PATH;
    ``found=False``: torch found no toolkit at all (its CUDA_HOME is None)."""
    if headers:
        (Path(cuda_home) / "include").mkdir(parents=True, exist_ok=True)
        (Path(cuda_home) / "include" / "cuda_runtime.h").touch()
    script = ("import json, runpy, setuptools, torch\n"
              "torch.version.cuda, torch.cuda._is_compiled = '13.0', lambda: True\n"
              "torch.cuda.is_available = lambda: False\n"
              + ("" if found else "import torch.utils.cpp_extension as c; c.CUDA_HOME = None\n") +
              "kw = {}\n"
              "setuptools.setup = lambda **k: kw.update(k)\n"
              "runpy.run_path('setup.py')\n"
              "print(json.dumps([e.sources for e in kw['ext_modules']]))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NASOPS_")}
    env.update(env_flags, CUDA_HOME=str(cuda_home), TORCH_CUDA_ARCH_LIST="9.0")
    if path is not None:
        env["PATH"] = os.pathsep.join([str(path), env.get("PATH", "")])
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_skip_cuda_builds_the_cpu_kernels_alone(tmp_path):
    """NASOPS_SKIP_CUDA=1 leaves the CUDA sources out where they would be built
    (a CUDA torch and a toolkit), and says why; with NASOPS_FORCE_CUDA=1 as well
    it refuses, naming both."""
    default = _extension_sources(tmp_path)
    assert default.returncode == 0, default.stderr[-2000:]
    (default_sources,) = json.loads(default.stdout.splitlines()[-1])
    assert "csrc/cuda/mixed_op.cu" in default_sources

    skipped = _extension_sources(tmp_path, NASOPS_SKIP_CUDA="1")
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    (sources,) = json.loads(skipped.stdout.splitlines()[-1])
    assert "csrc/cpu/mixed_op.cpp" in sources and "csrc/ops.cpp" in sources
    assert not [s for s in sources if s.endswith(".cu") or s.startswith("csrc/cuda/")]
    assert "no CUDA: NASOPS_SKIP_CUDA=1" in skipped.stdout

    both = _extension_sources(tmp_path, NASOPS_FORCE_CUDA="1", NASOPS_SKIP_CUDA="1")
    assert both.returncode != 0
    assert "NASOPS_FORCE_CUDA=1 and NASOPS_SKIP_CUDA=1" in both.stderr


def test_toolkit_without_headers_is_refused_before_compiling(tmp_path):
    """A CUDA_HOME without include/cuda_runtime.h (torch guesses /usr/local from
    a /usr/local/bin/nvcc that is a link or a wrapper) stops setup.py at once,
    naming CUDA_HOME, the header, the toolkit the nvcc on PATH reports, and
    NASOPS_SKIP_CUDA=1, instead of at the first glue file's #include; headers
    found through CUDA_INC_PATH (torch compiles with it too) or CPATH (the
    compilers search it) are enough."""
    if any(Path(d, "cuda_runtime.h").is_file() for d in ("/usr/include", "/usr/local/include")):
        pytest.skip("this machine's compilers find cuda_runtime.h by default: no CUDA_HOME is refused")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    nvcc = bin_dir / "nvcc"  # what a real nvcc --dryrun prints first on stderr
    nvcc.write_text("#!/bin/sh\necho '#$ _NVVM_BRANCH_=nvvm' >&2\necho '#$ TOP=/opt/cuda-13.9/bin/..' >&2\n")
    nvcc.chmod(0o755)
    home = tmp_path / "usr-local"
    home.mkdir()
    refused = _extension_sources(home, headers=False, path=bin_dir)
    assert refused.returncode != 0
    message = refused.stderr.strip().splitlines()[-1]
    assert f"CUDA_HOME={home} has no include/cuda_runtime.h" in message, message
    assert "The nvcc on PATH belongs to /opt/cuda-13.9: CUDA_HOME=/opt/cuda-13.9" in message, message
    assert "NASOPS_SKIP_CUDA=1" in message, message
    assert "nasops: building" not in refused.stdout  # refused before choosing what to build

    elsewhere = tmp_path / "headers"
    elsewhere.mkdir()
    (elsewhere / "cuda_runtime.h").touch()
    found = _extension_sources(home, headers=False, path=bin_dir, CUDA_INC_PATH=str(elsewhere))
    assert found.returncode == 0, found.stderr[-2000:]
    (sources,) = json.loads(found.stdout.splitlines()[-1])
    assert "csrc/cuda/mixed_op.cu" in sources

    on_cpath = _extension_sources(home, headers=False, path=bin_dir, CPATH=f"/nowhere{os.pathsep}{elsewhere}")
    assert on_cpath.returncode == 0, on_cpath.stderr[-2000:]

    skipped = _extension_sources(home, headers=False, path=bin_dir, NASOPS_SKIP_CUDA="1")
    assert skipped.returncode == 0, skipped.stderr[-2000:]

    # NASOPS_FORCE_CUDA=1 where torch found no toolkit at all: refused, naming CUDA_HOME
    forced = _extension_sources(home, found=False, NASOPS_FORCE_CUDA="1")
    assert forced.returncode != 0
    assert "NASOPS_FORCE_CUDA=1, but torch found no CUDA toolkit: set CUDA_HOME" in forced.stderr, forced.stderr[-2000:]
