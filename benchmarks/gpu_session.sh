#!/usr/bin/env bash
# Everything nasops needs a GPU for. The device tool lends a GPU for 15 minutes in
# all and 10 minutes a call, and a machine takes minutes to start: the default
# stages are sized to finish in ONE call (a deadline of $DEADLINE s, default 540,
# shared by the stages: a stage that would not fit is skipped and says so). The
# image there has no package registry; it holds torch (2.11 as last seen, not
# this project's 2.13 pin), triton (3.6, not 3.9), pytest, pytest-benchmark,
# hypothesis, scikit-learn, matplotlib, tqdm and compute-sanitizer.
# Default stages, in order:
#   1. build: nasops._C with the CUDA kernels for sm_90 (editable install);
#   2. kernels: the op tests on CUDA tensors (backends cuda, triton and eager:
#      tests use CUDA tensors when a GPU is visible), then python -m nasops.selftest
#      (what a user runs after installing) in float32, bfloat16 and float16;
#   3. sanitizer: compute-sanitizer memcheck, then racecheck, over the CUDA-backend
#      tests of every op (0 errors is issue #16's target);
#   4. bench: the side-by-side op benchmarks (--quick) -> $OUT/RESULTS.md (merge
#      its GPU sections into benchmarks/RESULTS.md afterwards).
# Further stages, one call each after `build` while the machine is warm:
#   tests-all: the whole test suite on the GPU (every method's end-to-end tests);
#   step: the whole DARTS search step (bench_search_step.py: eager NCHW/NHWC,
#      nasops NCHW/NHWC, +recompute; first and second order, batch 64; peak
#      memory) and its projection to a 50-epoch first-order search (target
#      <= 1 GPU-hour) -> $OUT/RESULTS.md and $OUT/search_step_cuda.png;
#   step-methods: the same for the other methods (MIDAS, hard exit, DASViT; their
#      own small networks) -> $OUT/RESULTS-methods.md;
#   step-maxbatch: the largest batch that fits, eager vs nasops vs recompute
#      (first order) -> $OUT/RESULTS-maxbatch.md;
#   step-compile: the step with --compile (first order; the compilation takes minutes).
# Logs and results land in $OUT (default ./gpu-out); the last lines printed are
# the summary. Usage, from the repository root:
#   bash benchmarks/gpu_session.sh [build] [kernels] [sanitizer] [bench] [tests-all] [step] [step-methods] [step-maxbatch] [step-compile]
set -uo pipefail
OUT=${OUT:-gpu-out}
DEADLINE=${DEADLINE:-540}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }
# budget NAME MAX MIN: prints the seconds stage NAME may take (at most MAX, what is
# left before the deadline); fails (and records the skip) when under MIN are left.
budget() {
  local left=$((DEADLINE - SECONDS))
  if ((left < $3)); then summary "$1: skipped, ${left} s left before the ${DEADLINE} s deadline"; return 1; fi
  echo $((left < $2 ? left : $2))
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  | tee -a "$OUT/device.txt"

stages=${*:-build kernels sanitizer bench}
want() { [[ " $stages " == *" $1 "* ]]; }
CUDA_TESTS=(tests/test_mixed_op.py tests/test_patch_attention.py tests/test_topk_tokens.py)

if want build; then
start=$SECONDS
if MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
   timeout 300 python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  summary "build: ok ($((SECONDS - start)) s)"
else
  summary "build: FAILED (see build.log)"; tail -40 "$OUT/build.log"; exit 1
fi
fi
python3 -c "import json, nasops; print(json.dumps(nasops.backends(), indent=1))" | tee "$OUT/backends.json"

if want kernels && t=$(budget "kernel tests" 180 30); then
start=$SECONDS
timeout "$t" python3 -m pytest -q -p no:cacheprovider "${CUDA_TESTS[@]}" tests/test_mixed_op_triton.py \
  tests/test_layouts.py tests/test_triton_launches.py > "$OUT/kernels.log" 2>&1
summary "kernel tests (GPU): rc=$? ($((SECONDS - start)) s): $(tail -1 "$OUT/kernels.log")"
fi
if want kernels && t=$(budget "selftest" 60 20); then
start=$SECONDS
timeout "$t" python3 -m nasops.selftest --dtypes float32 bfloat16 float16 > "$OUT/selftest.log" 2>&1
summary "selftest: rc=$? ($((SECONDS - start)) s): $(tail -1 "$OUT/selftest.log")"
fi

if want tests-all && t=$(budget "tests (all)" 540 60); then
start=$SECONDS
timeout "$t" python3 -m pytest -q -p no:cacheprovider tests > "$OUT/tests.log" 2>&1
summary "tests (all, GPU): rc=$? ($((SECONDS - start)) s): $(tail -1 "$OUT/tests.log")"
fi

if want sanitizer; then
for tool in memcheck racecheck; do
  t=$(budget "compute-sanitizer $tool" 120 30) || continue
  start=$SECONDS
  timeout "$t" compute-sanitizer --tool $tool --error-exitcode 99 --print-limit 20 \
    python3 -m pytest -q -p no:cacheprovider -x -k "cuda and not compile" "${CUDA_TESTS[@]}" \
    > "$OUT/sanitizer-$tool.log" 2>&1
  summary "compute-sanitizer $tool: rc=$? ($((SECONDS - start)) s): $(grep -m1 'ERROR SUMMARY' "$OUT/sanitizer-$tool.log")"
done
fi

if want step && t=$(budget "search step" 540 60); then
start=$SECONDS
timeout "$t" python3 benchmarks/bench_search_step.py --device cuda --steps 5 --methods darts-1st darts-2nd \
  --providers eager-nchw eager-nhwc nasops-nchw nasops-nhwc nasops-recompute \
  --out "$OUT/RESULTS.md" --plot "$OUT/search_step_cuda.png" > "$OUT/step.log" 2>&1
summary "search step: rc=$? ($((SECONDS - start)) s), table in RESULTS.md"
sed -n '/BEGIN search_step cuda/,/END search_step cuda/p' "$OUT/RESULTS.md" | grep "^|" | cut -c1-200
fi

if want step-methods && t=$(budget "search step, other methods" 540 60); then
start=$SECONDS
# (a token network, DASViT's, runs eager / nasops / +recompute: no layout there)
timeout "$t" python3 benchmarks/bench_search_step.py --device cuda --steps 5 --methods midas hardexit dasvit \
  --providers eager-nchw eager-nhwc nasops-nchw nasops-nhwc nasops-recompute \
  --out "$OUT/RESULTS-methods.md" --plot "$OUT/search_step_cuda_methods.png" > "$OUT/step-methods.log" 2>&1
summary "search step, other methods: rc=$? ($((SECONDS - start)) s), table in RESULTS-methods.md"
grep "^|" "$OUT/RESULTS-methods.md" | cut -c1-200
fi

if want step-maxbatch && t=$(budget "largest batch" 540 60); then
start=$SECONDS
timeout "$t" python3 benchmarks/bench_search_step.py --device cuda --steps 2 --no-memory --max-batch \
  --methods darts-1st --providers eager-nchw nasops-nchw nasops-recompute \
  --out "$OUT/RESULTS-maxbatch.md" --plot "$OUT/search_step_cuda_maxbatch.png" > "$OUT/step-maxbatch.log" 2>&1
summary "largest batch: rc=$? ($((SECONDS - start)) s), table in RESULTS-maxbatch.md"
grep "^|" "$OUT/RESULTS-maxbatch.md" | tail -5
fi

if want step-compile && t=$(budget "search step with --compile" 540 60); then
start=$SECONDS
timeout "$t" python3 benchmarks/bench_search_step.py --device cuda --steps 5 --methods darts-1st \
  --providers eager-nchw nasops-nchw nasops-compile --out "$OUT/RESULTS-compile.md" \
  --plot "$OUT/search_step_cuda_compile.png" > "$OUT/step-compile.log" 2>&1
summary "search step with --compile: rc=$? ($((SECONDS - start)) s), table in RESULTS-compile.md"
grep "^|" "$OUT/RESULTS-compile.md" | cut -c1-200
fi

if want bench && t=$(budget "benchmarks" 240 60); then
start=$SECONDS
timeout "$t" python3 benchmarks/report.py --quick --out "$OUT/RESULTS.md" > "$OUT/report.log" 2>&1
summary "benchmarks: rc=$? ($((SECONDS - start)) s), tables in RESULTS.md"
grep -E "^\| .*fwd" "$OUT/RESULTS.md" | cut -c1-160 | tail -60
fi
cat "$OUT/summary.txt"
