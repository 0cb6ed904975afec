"""Shared test utilities: which backends to test and how close is close enough."""
from __future__ import annotations

import contextlib
import inspect
from pathlib import Path

import torch

import nasops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (rtol, atol) of a kernel's result against the float64 reference, per input dtype.
TOLERANCE = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def available_backends(device: str = DEVICE) -> list[str]:
    """Backends that can run on ``device`` here (Triton on CPU = the interpreter)."""
    usable = [name for name, info in nasops.backends().items() if info["available"]]
    if device == "cpu":
        usable = [b for b in usable if b != "cuda"]
    else:
        usable = [b for b in usable if b != "cpu"]
    return sorted(usable)


def kernel_backends(device: str = DEVICE) -> list[str]:
    """The available backends other than the eager reference."""
    return [b for b in available_backends(device) if b != "eager"]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0,
                 what: str = "") -> None:
    """Compare a kernel result (any dtype) with a float64 reference; ``scale``
    widens the tolerance for values that sum many terms."""
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol * scale, atol=atol * scale,
                               msg=lambda m: f"{what}: {m}")


@contextlib.contextmanager
def triton_launches():
    """Record every Triton kernel launch in the block (compiled or interpreted):
    a list of ``(kernel name, {parameter: value}, {parameter: annotation})``."""
    import triton.runtime.jit as jit
    from triton.runtime.interpreter import InterpretedFunction

    launches = []
    originals = {cls: cls.run for cls in (jit.JITFunction, InterpretedFunction)}

    def recording(original):
        def run(self, *args, grid, warmup, **kwargs):
            params = inspect.signature(self.fn).parameters
            values = dict(zip(params, args), **kwargs)
            annotations = {name: str(p.annotation) for name, p in params.items()}
            launches.append((self.fn.__name__, values, annotations))
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        return run

    try:
        for cls, original in originals.items():
            cls.run = recording(original)
        yield launches
    finally:
        for cls, original in originals.items():
            cls.run = original


def assert_same_checkpoint_model(resumed_dir, full_dir) -> tuple[dict, dict]:
    """The ``checkpoint.pt`` files of a resumed run and an uninterrupted one hold
    the same network state, tensor for tensor (bit-exact); returns both loaded
    checkpoints for a test's further checks."""
    resumed, full = (torch.load(Path(d) / "checkpoint.pt", weights_only=False) for d in (resumed_dir, full_dir))
    assert resumed["model"].keys() == full["model"].keys()
    for name, value in full["model"].items():
        assert torch.equal(resumed["model"][name], value), name
    return resumed, full
