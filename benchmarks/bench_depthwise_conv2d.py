"""depthwise_conv2d benchmark: the ReLU -> depthwise conv of DARTS' SepConv and DilConv.

Shapes: the DARTS search network's maps at batch 64, (64,16,32,32) and
(64,64,16,16), channels_last (the driver's layout on the CPU, and PyTorch's
faster one there) and contiguous (the driver's layout on CUDA); the four
depthwise convolutions of the DARTS ops (3x3 and 5x5, plain and dilated by 2,
stride 1); forward and forward+backward (grads of x and of the weight).
Providers: eager as DARTS' code writes it (``nn.ReLU`` then ``nn.Conv2d(C, C,
k, groups=C)``), torch.compile of that, nasops per usable backend
(harness.py). On CUDA ``nasops-cuda`` runs the same PyTorch expression (PyTorch's CUDA
convolution: no CUDA C++ kernel) and ``nasops-triton`` the Triton kernels
(nasops/ops/depthwise_conv2d.py). On the CPU the C++ kernel reads
channels_last maps only: there the contiguous cases' nasops is PyTorch's.

    pytest benchmarks/bench_depthwise_conv2d.py             # pytest-benchmark groups
    python benchmarks/report.py --ops depthwise_conv2d      # side-by-side table in RESULTS.md
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nasops
from harness import BENCH_PROVIDERS, MODES, Case, Inputs, OpBenchmark, benchmark_step

SHAPES = {
    "darts-edge": (64, 16, 32, 32),
    "darts-deep": (64, 64, 16, 16),
}
# name -> (kernel, padding, dilation): DARTS' sep_conv_3x3/5x5 and dil_conv_3x3/5x5.
CONVS = {
    "3x3": (3, 1, 1),
    "5x5": (5, 2, 1),
    "dil3x3": (3, 2, 2),
    "dil5x5": (5, 4, 2),
}


def eager(args):
    # DARTS: nn.Sequential(nn.ReLU(inplace=False), nn.Conv2d(C, C, k, padding=p, dilation=d, groups=C), ...)
    x = args["x"]
    return F.conv2d(F.relu(x), args["weight"], padding=args["padding"], dilation=args["dilation"],
                    groups=x.shape[1])


def nasops_depthwise(args, backend):
    return nasops.ops.depthwise_conv2d(args["x"], args["weight"], padding=args["padding"],
                                       dilation=args["dilation"], relu_input=True, backend=backend)


# name -> memory format of the maps
LAYOUTS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def _make_inputs(shape, conv, layout):
    kernel, padding, dilation = CONVS[conv]
    memory_format = LAYOUTS[layout]

    def make(device, dtype):
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        x = x.contiguous(memory_format=memory_format).requires_grad_()
        w = torch.randn(shape[1], 1, kernel, kernel, generator=gen).to(device=device, dtype=dtype)
        w.requires_grad_()
        grad_out = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        grad_out = grad_out.contiguous(memory_format=memory_format)
        return Inputs(args={"x": x, "weight": w, "padding": padding, "dilation": dilation},
                      leaves=[x, w], grad_out=grad_out)
    return make


def _floor_bytes(shape, conv):
    """Each map read or written once: forward reads x, writes y; the backward
    reads grad and x, writes grad x (the weights and their gradient are a few KiB)."""
    kernel = CONVS[conv][0]

    def floor(mode, dtype):
        n = 1
        for s in shape:
            n *= s
        e = torch.empty((), dtype=dtype).element_size()
        w = shape[1] * kernel * kernel * e
        if mode == "fwd":
            return (n * e + w, n * e)
        return (3 * n * e + 2 * w, 2 * n * e + w)
    return floor


def cases(quick: bool = False) -> list[Case]:
    found = []
    for layout in LAYOUTS:
        for shape_name, shape in SHAPES.items():
            for conv in CONVS:
                if quick and conv not in ("3x3", "5x5"):
                    continue
                found.append(Case(
                    group=f"depthwise_conv2d {shape_name} {tuple(shape)} relu+{conv} {layout}",
                    make_inputs=_make_inputs(shape, conv, layout),
                    eager=eager,
                    nasops=nasops_depthwise,
                    floor_bytes=_floor_bytes(shape, conv),
                    params={"shape": shape_name, "conv": conv, "layout": layout},
                ))
    return found


BENCHMARK = OpBenchmark(
    op="depthwise_conv2d",
    cases=cases,
    description="y = conv2d(relu(x), w, groups=C), the ReLU -> depthwise conv of DARTS' SepConv "
                "and DilConv (not a SPEC op: the search step's); eager is `F.conv2d(F.relu(x), w, "
                "groups=C)` on channels_last and contiguous maps.",
)


# ---- pytest-benchmark ---------------------------------------------------------------------

_CASES = cases()


def _case_id(case):  # e.g. dwconv-darts-edge-5x5 (channels_last), dwconv-nchw-darts-edge-5x5: selectable with -k
    layout = "" if case.params["layout"] == "channels_last" else "nchw-"
    return f"dwconv-{layout}{case.params['shape']}-{case.params['conv']}"


@pytest.mark.parametrize("provider", BENCH_PROVIDERS)
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.replace("+", "_"))
@pytest.mark.parametrize("case", _CASES, ids=_case_id)
def test_depthwise_conv2d(benchmark, case, mode, provider):
    benchmark_step(benchmark, case, mode, provider)
