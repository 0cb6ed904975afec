"""Shared test utilities: which backends to test and how close is close enough."""
from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

import nasops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REPO = Path(__file__).resolve().parents[1]

# (rtol, atol) of a kernel's result against the float64 reference, per input dtype.
TOLERANCE = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def benchmark_module(name: str):
    """The script benchmarks/<name>.py imported as a module (benchmarks/ is no
    package: on sys.path only for the import; a script that needs its neighbours
    later puts its own folder there)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


class HostReads:
    """Counts the host's reads of tensor values while active (``with HostReads() as
    reads: ...; reads.count``): every ``aten._local_scalar_dense`` (``item()``,
    ``float(t)``, ``int(t)``) and every ``Tensor.tolist`` or ``Tensor.cpu`` call. On a
    GPU each waits for the queued kernels; on the CPU the last two dispatch nothing
    a mode could see, hence their wrappers. Not counted: torch.optim's reads of its
    step counters (Adam's), which are host tensors on every device (unless
    ``capturable``), so they never wait."""

    def __init__(self):
        self.count = 0
        self._mode = None
        self._saved = {}

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default and not _in_torch_optim():
                    outer.count += 1
                return func(*args, **(kwargs or {}))

        for name in ("tolist", "cpu"):
            original = self._saved[name] = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, **kwargs):
                self.count += 1
                return _original(tensor, *args, **kwargs)
            setattr(torch.Tensor, name, counted)
        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        return False


def _in_torch_optim() -> bool:
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith("torch.optim"):
            return True
        frame = frame.f_back
    return False


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


def subprocess_env(**extra) -> dict:
    """The environment for a ``python -m nasops...`` subprocess: this checkout first
    on PYTHONPATH (so the child imports the nasops under test), plus ``extra``."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            **extra}


def torchrun_two_ranks(module: str, argv, **env) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 -m module *argv`` (gloo on the
    CPU, one thread per rank, ``env`` added); asserts that it succeeded."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", module,
         *map(str, argv)],
        env=subprocess_env(OMP_NUM_THREADS="1", **env), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def run_killed_after_epoch(module: str, argv, epoch: int, how: str = "SIGKILL") -> str:
    """``python -m module *argv`` in a subprocess that SIGKILLs itself right after
    epoch ``epoch``'s checkpoint (the drivers' NASOPS_TEST_KILL_AFTER_EPOCH hook), or
    with ``how="SIGINT"`` interrupts itself as Ctrl-C does; asserts that it ended that
    way (SIGINT: the CLI's exit status 130) and returns its stderr."""
    proc = subprocess.run([sys.executable, "-m", module, *map(str, argv)],
                          env=subprocess_env(NASOPS_TEST_KILL_AFTER_EPOCH=f"{epoch}:{how}"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == (130 if how == "SIGINT" else -signal.SIGKILL), proc.stderr[-2000:]
    return proc.stderr


@contextlib.contextmanager
def save_interrupted(monkeypatch):
    """``torch.save`` that writes half a file and raises KeyboardInterrupt, as Ctrl-C
    in the middle of a checkpoint's write."""
    def interrupted_save(obj, path):
        Path(path).write_bytes(b"half a checkp")
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(torch, "save", interrupted_save)
        yield


def unshared_ops(net: torch.nn.Module) -> torch.nn.Module:
    """A copy of the search network ``net`` in which every edge has its own
    parameter-free op modules again, as before ``spaces.base.share_ops``, and
    every op computes its own ReLU of the edge's input, as before
    ``spaces.base.SharedReLU``: each edge then runs them itself (the reference
    for the shared ones)."""
    import copy
    ref = copy.deepcopy(net)
    for cell in ref.cells:
        for edge in getattr(cell, "edges", []):
            for i, op in enumerate(edge.ops):
                if next(op.parameters(), None) is None:
                    edge.ops[i] = copy.deepcopy(op)
            edge._takes_relu = [False] * len(edge.ops)
    return ref


def assert_same_forward_and_backward(net, ref, x, tol: float = 1e-12) -> None:
    """``net`` and ``ref`` (float64 networks with the same parameter names) give the
    same output, gradients and state dict (BatchNorm statistics included) on ``x``,
    each after the same seed (the same random draws)."""
    results = []
    for model in (net, ref):
        torch.manual_seed(1)
        out = model(x)
        out.square().sum().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()},
                        {n: b.clone() for n, b in model.state_dict().items()}))
    (out, grads, state), (ref_out, ref_grads, ref_state) = results
    torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol)
    assert grads.keys() == ref_grads.keys() and state.keys() == ref_state.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=100 * tol, atol=tol, msg=n)
    for n in state:
        torch.testing.assert_close(state[n], ref_state[n], rtol=tol, atol=tol, msg=n)
