"""Build nasops and its compiled extension ``nasops._C``.

What gets compiled (mirrors pytorch/ao):
- always: ``csrc/ops.cpp`` (the op schemas), ``csrc/module.cpp`` (pybind11 build
  info) and the C++ CPU kernels ``csrc/cpu/*.cpp``;
- also the CUDA kernels ``csrc/cuda/*.cu`` and their torch glue
  ``csrc/cuda/*.cpp`` when torch is a CUDA build and ``CUDA_HOME`` is set, or
  when ``NASOPS_FORCE_CUDA=1`` (build on a GPU-less machine; set
  ``TORCH_CUDA_ARCH_LIST``, e.g. "9.0"); not with ``NASOPS_SKIP_CUDA=1`` (the
  C++ CPU kernels alone, e.g. beside a CUDA torch whose CUDA version the
  installed toolkit does not match: torch refuses to compile against another
  major version);
- nothing with ``NASOPS_SKIP_EXTENSIONS=1``: a pure-Python install (Triton and
  eager backends only; ``nasops.backends()`` says why the others are missing).

Install with ``pip install --no-build-isolation .`` after torch: build isolation
would pull a fresh (multi-GB CUDA) torch into the build environment.
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# nvcc flags besides the optimization level (tests/test_cuda_sources.py compiles
# with these too). No --use_fast_math: it makes division and square root
# approximate, so CUDA token scores would differ by ulps from the CPU, Triton
# and eager ones and a near-tie could select other tokens on CUDA. It was never
# measured to pay off (the kernels are memory-bound): measure before adding it.
NVCC_FLAGS = ["-std=c++17", "-lineinfo"]


def _env_flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _cuda_toolkit_problem(cuda_home):
    """Why the CUDA toolkit torch builds with (``cuda_home``, torch's
    ``CUDA_HOME``) cannot compile the CUDA kernels, or None.

    Said before compiling: otherwise the build stops at the first glue file with
    ``cuda_runtime.h: No such file or directory``. Without ``CUDA_HOME`` in the
    environment torch guesses the toolkit from where ``nvcc`` lies, which is
    wrong when that ``nvcc`` is a wrapper script or a link in another folder
    (``/usr/local/bin/nvcc`` -> ``CUDA_HOME=/usr/local``); nvcc itself knows
    its toolkit (``--dryrun`` prints ``TOP=``), so the message names it.
    """
    if cuda_home is None:
        return ("nasops: NASOPS_FORCE_CUDA=1, but torch found no CUDA toolkit: set CUDA_HOME to the "
                "toolkit's folder (the one with bin/nvcc and include/cuda_runtime.h)")
    # The header folders torch's CUDAExtension compiles with (cpp_extension.include_paths),
    # and those the compilers search by themselves (their defaults, CPATH, CPLUS_INCLUDE_PATH)
    folders = [os.path.join(cuda_home, "include"), os.environ.get("CUDA_INC_PATH") or "",
               "/usr/local/include", "/usr/include"]
    for variable in ("CPATH", "CPLUS_INCLUDE_PATH"):
        folders += os.environ.get(variable, "").split(os.pathsep)
    if any(os.path.isfile(os.path.join(f, "cuda_runtime.h")) for f in folders if f):
        return None
    guessed = "" if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") else \
        " (torch's guess: CUDA_HOME is not set)"
    toolkit = _nvcc_toolkit()
    hint = (f"The nvcc on PATH belongs to {toolkit}: CUDA_HOME={toolkit} pip install ... builds with it. "
            if toolkit and os.path.normpath(toolkit) != os.path.normpath(cuda_home) else "")
    return (f"nasops: the CUDA kernels need the CUDA toolkit's headers, but CUDA_HOME={cuda_home}{guessed} "
            f"has no include/cuda_runtime.h. {hint}Set CUDA_HOME to the toolkit's folder (the one with "
            "bin/nvcc and include/cuda_runtime.h; CUDA_INC_PATH for headers kept elsewhere), or "
            "NASOPS_SKIP_CUDA=1 to build the C++ CPU kernels alone")


def _nvcc_toolkit():
    """The toolkit folder of the ``nvcc`` on PATH (its ``--dryrun`` ``TOP=``), or None."""
    import shutil
    import subprocess

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        proc = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.startswith("#$ TOP="):
            return os.path.normpath(line[len("#$ TOP="):].strip())
    return None


def get_extensions():
    if _env_flag("NASOPS_SKIP_EXTENSIONS"):
        print("nasops: NASOPS_SKIP_EXTENSIONS=1, installing pure Python")
        return []
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    if _env_flag("NASOPS_FORCE_CUDA") and _env_flag("NASOPS_SKIP_CUDA"):
        raise RuntimeError("nasops: NASOPS_FORCE_CUDA=1 and NASOPS_SKIP_CUDA=1 contradict each other; "
                           "unset one")
    use_cuda = not _env_flag("NASOPS_SKIP_CUDA") and (_env_flag("NASOPS_FORCE_CUDA") or (
        torch.version.cuda is not None and CUDA_HOME is not None
    ))
    debug = _env_flag("NASOPS_DEBUG")
    opt = "-O0" if debug else "-O3"
    # Paths relative to setup.py, as setuptools wants them.
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = [opt, "-std=c++20", "-fopenmp"]
    define_macros = []
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        # One object file per source stem and folder: csrc/cuda/<op>.cu and its
        # csrc/cuda/<op>_glue.cpp; an <op>.cpp beside <op>.cu would overwrite <op>.o.
        stems = [os.path.splitext(s)[0] for s in sources]
        clash = sorted({s for s in stems if stems.count(s) > 1})
        if clash:
            raise RuntimeError(f"nasops: sources {clash} compile to the same object file; "
                               "name CUDA glue files <op>_glue.cpp")
        problem = _cuda_toolkit_problem(CUDA_HOME)
        if problem:
            raise RuntimeError(problem)
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # No GPU to ask: build for A100 and H100, plus PTX for newer GPUs.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        define_macros.append(("NASOPS_WITH_CUDA", None))
        extension = CUDAExtension
        extra = {"cxx": cxx, "nvcc": [opt, *NVCC_FLAGS]}
        print("nasops: building C++ CPU and CUDA kernels")
    else:
        extension = CppExtension
        extra = {"cxx": cxx}
        why = ("NASOPS_SKIP_CUDA=1" if _env_flag("NASOPS_SKIP_CUDA")
               else "torch.version.cuda=%s, CUDA_HOME=%s" % (torch.version.cuda, CUDA_HOME))
        print("nasops: building C++ CPU kernels (no CUDA: %s)" % why)
    return [
        extension(
            "nasops._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"] + (["-g"] if debug else []),
        )
    ]


def get_cmdclass():
    if _env_flag("NASOPS_SKIP_EXTENSIONS"):
        return {}
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    packages=find_packages(include=["nasops", "nasops.*"]),
    package_data={"nasops.spaces": ["data/*"]},
    ext_modules=get_extensions(),
    cmdclass=get_cmdclass(),
)
