"""Compile (not run) every nasops Triton kernel for sm_90 (H100) without a GPU.

Adapted from the project's ../shared/tools/triton_sm90.py (Triton 3.9): a fake
driver reports an sm_90 target, and every launch becomes a compile-only
warm-up, so a change that breaks GPU compilation (which the interpreter never
does) fails on a CPU machine. tests/test_triton_sm90.py runs this file as a
script in a subprocess without TRITON_INTERPRET (the test process has it set).

    python tests/triton_sm90.py [--full] [--all-configs] [--json OUT]

Each op's registered Triton launcher (``torch.ops.nasops.<op>_triton``) is
called on CPU tensors with a representative set of arguments: every kernel,
and every value of the constexprs that select code at least once (each dtype,
gates, keep_cls, prior, scatter, strided rows, P == 1 / P > 1, odd and even
grids, maps without 16-byte rows); ``--full`` compiles the cross product. An
autotuned kernel compiles its config with the most elements per thread (the
most registers; ``--all-configs`` compiles every config). ptxas's report gives registers and spills of each compiled variant;
the script prints a table and, with ``--json``, writes every record.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise SystemExit("tests/triton_sm90.py compiles for a GPU: run it with TRITON_INTERPRET unset")
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # ptxas -v output: registers and spills
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning

import torch  # noqa: E402
import triton  # noqa: E402
import triton.runtime.autotuner as autotuner  # noqa: E402
import triton.runtime.jit as jit  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class FakeDriver:
    """The parts of Triton's active driver a compile needs, for an sm_90 GPU."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        raise RuntimeError("tests/triton_sm90.py compiles only; nothing is benchmarked")

    @staticmethod
    def is_active():
        return True


COMPILED: list[dict] = []  # one record per launch
_ALL_CONFIGS = False
_PTXAS = re.compile(r"Function properties for (\w+)\s+(\d+) bytes stack frame, (\d+) bytes spill stores, "
                    r"(\d+) bytes spill loads\s+ptxas\S* info\s*: Used (\d+) registers")


def _arg_name(fn, key) -> str:
    """A constant's parameter name (Triton keys constants by argument index path)."""
    index = key[0] if isinstance(key, tuple) else key
    return fn.arg_names[index] if isinstance(index, int) and index < len(fn.arg_names) else str(key)


def _compile_only(original_run):
    def run(self, *args, grid, warmup, **kwargs):
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # Triton prints the ptxas log of a new compile
            kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        record = {"kernel": self.fn.__name__, "hash": kernel.metadata.hash,
                  "num_warps": kernel.metadata.num_warps, "shared": kernel.metadata.shared,
                  "signature": dict(kernel.src.signature), "ptx": kernel.asm["ptx"],
                  "constants": {_arg_name(self, k): str(v) for k, v in kernel.src.constants.items()}}
        match = _PTXAS.search(log.getvalue())
        if match:
            record.update(stack=int(match[2]), spill_stores=int(match[3]), spill_loads=int(match[4]),
                          registers=int(match[5]))
        COMPILED.append(record)
        return kernel
    return run


def _one_config(self, *args, **kwargs):
    """Autotuner.run: compile the config with the most elements per thread (or all)."""
    def per_thread(config):
        block = max([v for v in config.kwargs.values() if isinstance(v, int)] or [1])
        return block / config.num_warps
    configs = self.configs if _ALL_CONFIGS else [max(self.configs, key=per_thread)]
    for config in configs:
        self.fn.run(*args, **dict(kwargs, **config.all_kwargs()))


def install_fake_driver() -> None:
    driver.set_active(FakeDriver())
    jit.JITFunction.run = _compile_only(jit.JITFunction.run)
    autotuner.Autotuner.run = _one_config


# ---- the representative launches ----------------------------------------------------------
# By default each constexpr value that selects code is compiled at least once (a
# dtype of each kind, each gate, each weight layout), not the cross product; CI
# compile time is about 0.35 s of CPU per variant. --full compiles the product.

DTYPES = (torch.float32, torch.bfloat16, torch.float64)  # float16: as bfloat16, but for the casts
_FULL = False


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pick(choices, i):
    """All choices with --full, else the i-th (cycling): one per dtype covers each."""
    return list(choices) if _FULL else [choices[i % len(choices)]]


def launch_rows() -> None:
    ops = torch.ops.nasops
    # 8-byte words (4 KiB rows), 4-byte words (odd 20-byte rows), bytes (odd rows).
    for x in (torch.zeros(64, 1024), torch.zeros(64, 5), torch.zeros(64, 3001, dtype=torch.uint8)):
        idx = torch.arange(0, 64, 2)
        ops.gather_rows_triton(x, idx)
        ops.scatter_rows_triton(x[:32], idx, 64)
    # Rows wider than the capped grid axis 1 (16 MiB of int64 words, never touched): strided.
    wide = torch.empty(2, 2 ** 21, dtype=torch.int64)
    ops.gather_rows_triton(wide, torch.tensor([1, 0]))
    ops.scatter_rows_triton(wide, torch.tensor([1, 0]), 2)


def launch_topk_tokens() -> None:
    ops = torch.ops.nasops
    gates = ("none", "straight_through", "sigmoid")
    for i, dtype in enumerate(DTYPES):
        B, N, C, D = 2, 197, 96, 64
        x, q, k = (torch.zeros(B, N, c, dtype=dtype) for c in (C, D, D))
        for gate in _pick(gates, i):
            for keep_cls in _pick((True, False), i):
                _, idx, _, k_mean, pos = ops.topk_tokens_triton(x, q, k, 98, keep_cls, gate)
            grads = (torch.zeros(B, 98, C, dtype=dtype), torch.zeros(B, N, dtype=dtype))
            ops.topk_tokens_backward_triton(*grads, x, q, k, idx, k_mean, pos, gate, True, True)
            if _FULL or i == 0:
                ops.topk_tokens_backward_triton(*grads, x, q, k, idx, k_mean, pos, gate, True, False)
                ops.topk_tokens_backward_triton(*grads, x, q, k, idx, k_mean, pos, gate, False, True)
    x, q, k = torch.zeros(1, 4096, 32), torch.zeros(1, 4096, 16), torch.zeros(1, 4096, 16)
    ops.topk_tokens_triton(x, q, k, 1024, True, "sigmoid")  # a long row: 8 warps


def launch_patch_attention() -> None:
    ops = torch.ops.nasops
    B, C, K = 2, 16, 4
    for i, dtype in enumerate(DTYPES):
        acc = _acc(dtype)
        # An even mosaic of 16-byte rows, and an uneven one of a 7x7 map.
        for (H, W), grid in _pick(((((16, 16), [4, 4])), (((7, 7), [3, 2]))), i):
            maps = [torch.zeros(B, C, H, W, dtype=dtype) for _ in range(K + 1)]
            ops.patch_pool_triton(maps, grid)
            P = grid[0] * grid[1]
            ops.patch_pool_backward_triton(torch.zeros(B, P, C, dtype=acc), grid, H, W, dtype)
            ops.patch_attention_outputs_backward_triton(torch.zeros(B, C, H, W, dtype=dtype),
                                                        torch.zeros(B, P, K, dtype=acc),
                                                        torch.zeros(B, P, K, C, dtype=acc), grid)
    for dtype in (torch.float32, torch.float64):  # the attention runs in the accumulation dtype
        q, k = torch.zeros(2, 16, 8, dtype=dtype), torch.zeros(2, 16, 4, 8, dtype=dtype)
        for prior in (torch.zeros(4, dtype=dtype), None):
            w = ops.patch_softmax_attention_triton(q, k, prior, 0.5)
        ops.patch_softmax_attention_backward_triton(torch.zeros_like(w), w, q, k, 0.5, True)


def launch_mixed_op() -> None:
    import nasops.triton.mixed_op as mixed

    if hasattr(mixed, "_on_device"):  # it refuses CPU tensors outside the interpreter
        mixed._on_device = lambda t: contextlib.nullcontext()
    ops = torch.ops.nasops
    # (weights shape, grid): per edge, per sample, an even and an uneven mosaic.
    layouts = (((1, 1, 3), [1, 1]), ((4, 1, 3), [1, 1]), ((4, 16, 3), [4, 4]), ((4, 12, 3), [3, 4]))
    for i, dtype in enumerate(DTYPES):
        acc = _acc(dtype)
        outs = [torch.zeros(4, 16, 32, 32, dtype=dtype) for _ in range(3)]
        grad = torch.zeros(4, 16, 32, 32, dtype=dtype)
        for wshape, grid in (layouts if _FULL or i == 0 else _pick(layouts[1:], i)):
            w = torch.zeros(*wshape, dtype=acc)
            ops.mixed_op_triton(outs, w, grid)
            ops.mixed_op_backward_triton(grad, outs, w, grid, True, True)
            if _FULL or i == 0:
                ops.mixed_op_backward_triton(grad, outs, w, grid, False, True)
        if _FULL or dtype == torch.bfloat16:  # per token: grid (N, 1) of a (B, 1, N, C) view
            tokens = [torch.zeros(2, 1, 197, 768, dtype=dtype) for _ in range(2)]
            w = torch.zeros(2, 197, 2, dtype=acc)
            ops.mixed_op_triton(tokens, w, [197, 1])
            ops.mixed_op_backward_triton(torch.zeros_like(tokens[0]), tokens, w, [197, 1], True, True)
        if _FULL or dtype == torch.bfloat16:  # a 7x7 map: rows without 16-byte vectors
            odd = [torch.zeros(2, 8, 7, 7, dtype=dtype) for _ in range(2)]
            w = torch.zeros(2, 4, 2, dtype=acc)
            ops.mixed_op_triton(odd, w, [2, 2])
            ops.mixed_op_backward_triton(torch.zeros_like(odd[0]), odd, w, [2, 2], True, True)


def launch_depthwise_conv2d() -> None:
    import nasops.triton.depthwise_conv2d as depthwise

    depthwise._on_device = lambda t: contextlib.nullcontext()  # it refuses CPU tensors outside the interpreter
    ops = torch.ops.nasops
    # DARTS' four convolutions on the first cells' maps (64, 16, 32, 32), both layouts
    # (contiguous: the driver's on CUDA), and the reduction cell's stride 2.
    convs = (((3, 3), 1, 1, 1), ((5, 5), 1, 2, 1), ((3, 3), 1, 2, 2), ((5, 5), 1, 4, 2), ((5, 5), 2, 2, 1))
    for i, dtype in enumerate(DTYPES):
        for layout in _pick((torch.contiguous_format, torch.channels_last), i):
            x = torch.zeros(64, 16, 32, 32, dtype=dtype).contiguous(memory_format=layout)
            for kernel, stride, padding, dilation in (convs if _FULL or i == 0 else _pick(convs, i)):
                w = torch.zeros(16, 1, *kernel, dtype=dtype)
                geometry = ([stride] * 2, [padding] * 2, [dilation] * 2)
                y = ops.depthwise_conv2d_triton(x, w, *geometry, True)
                ops.depthwise_conv2d_backward_triton(torch.zeros_like(y), x, w, *geometry, True, True, True)


LAUNCHES = {"rows": launch_rows, "topk_tokens": launch_topk_tokens,
            "patch_attention": launch_patch_attention, "mixed_op": launch_mixed_op,
            "depthwise_conv2d": launch_depthwise_conv2d}


def compile_all(ops=tuple(LAUNCHES)) -> list[dict]:
    """Compile every representative variant; the distinct compiled kernels, each
    with the op that launched it and its registers and spills."""
    import nasops.ops  # noqa: F401  (imports and registers every Triton module)

    seen = {}
    for op in ops:
        start = len(COMPILED)
        LAUNCHES[op]()
        for record in COMPILED[start:]:
            seen.setdefault(record["hash"], dict(record, op=op))
    return list(seen.values())


def table(records: list[dict]) -> str:
    """Per kernel: variants compiled, registers (min-max) and the most spilled bytes."""
    rows = {}
    for r in records:
        rows.setdefault((r["op"], r["kernel"]), []).append(r)
    lines = ["| op | kernel | variants | registers | spill stores (max bytes) | warps |",
             "|---|---|---|---|---|---|"]
    for (op, kernel), rs in rows.items():
        regs = [r.get("registers", -1) for r in rs]
        spills = max(r.get("spill_stores", 0) for r in rs)
        warps = sorted({r["num_warps"] for r in rs})
        lines.append(f"| {op} | `{kernel}` | {len(rs)} | {min(regs)}-{max(regs)} | {spills} | "
                     f"{','.join(map(str, warps))} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    global _ALL_CONFIGS, _FULL, DTYPES
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all-configs", action="store_true", help="compile every autotune config")
    parser.add_argument("--full", action="store_true", help="every dtype with every variant (slow)")
    parser.add_argument("--json", help="write every compiled variant's record (PTX included) here")
    parser.add_argument("--ops", nargs="*", default=list(LAUNCHES), choices=list(LAUNCHES))
    args = parser.parse_args(argv)
    _ALL_CONFIGS, _FULL = args.all_configs, args.full
    if _FULL:
        DTYPES = DTYPES + (torch.float16,)
    install_fake_driver()
    start = time.perf_counter()
    records = compile_all(args.ops)
    seconds = time.perf_counter() - start
    print(table(records))
    print(f"compiled {len(records)} kernel variants for sm_90 in {seconds:.1f} s "
          f"(triton {triton.__version__}, torch {torch.__version__})")
    if args.json:
        Path(args.json).write_text(json.dumps({"seconds": seconds, "records": records}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
