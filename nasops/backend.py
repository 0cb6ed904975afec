"""The one place that decides which backend runs an op (SPEC 2.4).

Backends:
- ``cuda``:   the compiled CUDA kernels of ``nasops._C`` (CUDA tensors);
- ``cpu``:    the compiled C++ kernels of ``nasops._C`` (CPU tensors);
- ``triton``: the Triton kernels in ``nasops.triton`` (CUDA tensors, or CPU
  tensors when ``TRITON_INTERPRET=1`` was set before Triton was imported);
- ``eager``:  the plain-PyTorch references in ``nasops.ops.reference``.

``auto`` (default) picks, for CUDA tensors, ``cuda`` if it was compiled, else
``triton``, else ``eager``; for CPU tensors ``cpu`` if the extension is
built, else ``eager``; it passes over a backend whose kernels cannot take the
call (more ops than the CUDA kernels' fixed bound). Override per call
(``backend=``), per process (:func:`set_backend`) or by the environment
(``NASOPS_BACKEND``), in that order of precedence.
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping

import torch

BACKENDS = ("cuda", "triton", "cpu", "eager")
_CHOICES = ("auto",) + BACKENDS

_override: str | None = None


def _load_extension():
    if importlib.util.find_spec("nasops._C") is None:
        return None, ("nasops._C is not built (installed with NASOPS_SKIP_EXTENSIONS=1, or a source "
                      "checkout without `python setup.py build_ext --inplace`)")
    try:
        from nasops import _C  # noqa: F401  (registers torch.ops.nasops.*)
    except ImportError as exc:  # not built, or built against another torch
        return None, f"nasops._C not importable ({exc}); reinstall without NASOPS_SKIP_EXTENSIONS=1"
    return _C.build_info(), ""


_BUILD_INFO, _EXT_ERROR = _load_extension()


def extension_loaded() -> bool:
    """True when ``nasops._C`` (the compiled ops) is importable."""
    return _BUILD_INFO is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _availability() -> dict[str, str]:
    """Backend name -> '' when usable, else the reason it is not. Fixed for the
    process (what was built and imported, the devices, TRITON_INTERPRET, which
    Triton reads once): computed once, at import, as every op call asks. (Not
    lazily: torch.compile would trace the first computation and guard on the
    cache being empty, then recompile the whole network once it is filled.)"""
    return _AVAILABILITY


def _find_availability() -> dict[str, str]:
    reasons = {"eager": ""}
    reasons["cpu"] = "" if extension_loaded() else _EXT_ERROR
    if not extension_loaded():
        reasons["cuda"] = _EXT_ERROR
    elif not _BUILD_INFO["cuda"]:
        reasons["cuda"] = ("nasops._C was built without CUDA (CPU torch, no CUDA_HOME or NASOPS_SKIP_CUDA=1 "
                           "at build time)")
    elif not torch.cuda.is_available():
        reasons["cuda"] = "no CUDA device visible to torch"
    else:
        reasons["cuda"] = ""
    if importlib.util.find_spec("triton") is None:
        reasons["triton"] = "triton is not installed (pip install triton)"
    elif not (torch.cuda.is_available() or triton_interpreting()):
        reasons["triton"] = "no CUDA device, and TRITON_INTERPRET=1 is not set for the CPU interpreter"
    else:
        reasons["triton"] = ""
    return reasons


_AVAILABILITY = _find_availability()


def kernels_failed_to_import(name: str, reason: str) -> None:
    """Mark backend ``name`` unusable because its kernels did not import (a Triton
    that is installed but too old for them): ``backends()`` says why, ``auto``
    passes over it, and asking for it by name is a ValueError. Called while
    nasops.ops is imported, before any op runs, so the availability is still
    fixed for every call."""
    if not _AVAILABILITY[name]:
        _AVAILABILITY[name] = reason


def backends() -> dict[str, dict]:
    """What is available and why not: ``{name: {"available": bool, "reason": str}}``."""
    return {
        name: {"available": not why, "reason": why or "ok"}
        for name, why in _availability().items()
    }


def check_backend_name(name: str, argname: str) -> str:
    """``name`` if it is 'auto' or a backend's name; ValueError naming ``argname`` otherwise."""
    if name not in _CHOICES:
        raise ValueError(f"{argname}: expected one of {_CHOICES}, got {name!r}")
    return name


def set_backend(name: str | None) -> None:
    """Force a backend for every op in this process (``None`` or 'auto' resets)."""
    global _override
    _override = None if name in (None, "auto") else check_backend_name(name, "backend")


def get_backend() -> str:
    """The process-wide choice: 'auto' unless set by set_backend or NASOPS_BACKEND."""
    if _override is not None:
        return _override
    return check_backend_name(os.environ.get("NASOPS_BACKEND", "auto"), "NASOPS_BACKEND")


def resolve(backend: str | None, device: torch.device, *, count: int = 0,
            limits: Mapping[str, int] | None = None, what: str = "") -> str:
    """The backend that runs an op whose tensors live on ``device``.

    ``limits``: backend -> the most of ``what`` (e.g. ``"outputs (live ops)"``)
    its kernels take in one call, where they have a fixed bound (the CUDA
    mixed_op: 64 live ops); ``count``: how many this call has. ``auto`` passes
    over a backend whose limit ``count`` exceeds and takes the next in its
    order; a backend asked for by name raises ValueError naming ``what``.

    Raises ValueError when an explicitly requested backend cannot run there.
    """
    name = check_backend_name(backend, "backend") if backend is not None else get_backend()
    reasons = _availability()
    dev = torch.device(device).type
    limit = (limits or {}).get
    if name == "auto":
        for candidate in {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}.get(dev, ()):
            if not reasons[candidate] and count <= limit(candidate, count):
                return candidate
        return "eager"
    if reasons[name]:
        raise ValueError(f"backend={name!r} is not available: {reasons[name]}")
    runs_on = {"cuda": ("cuda",), "cpu": ("cpu",), "eager": (dev,),
               "triton": ("cuda", "cpu") if triton_interpreting() else ("cuda",)}[name]
    if dev not in runs_on:
        raise ValueError(f"backend={name!r} cannot run on {dev} tensors (runs on {runs_on})")
    if count > limit(name, count):
        raise ValueError(f"{what}: backend={name!r} takes at most {limit(name)} in one call, got {count} "
                         f"(backend 'auto' picks one that takes them)")
    return name
