#!/usr/bin/env bash
# Everything nasops needs a GPU for, in one call (the lent H100/H200 has no
# package registry; its image already holds torch, triton, pytest,
# pytest-benchmark, hypothesis, scikit-learn, matplotlib and tqdm):
#   1. build nasops._C with the CUDA kernels (in place, editable);
#   2. the whole test suite on the GPU (tests use CUDA tensors when one is visible:
#      backends cuda, triton and eager), then python -m nasops.selftest (what a
#      user runs after installing) in float32, bfloat16 and float16;
#   3. compute-sanitizer memcheck over the CUDA-backend tests of every op;
#   4. the side-by-side benchmarks of every op -> $OUT/RESULTS.md (merge its GPU
#      sections into benchmarks/RESULTS.md afterwards);
#   5. step: the whole DARTS search step (bench_search_step.py: eager NCHW/NHWC,
#      nasops NCHW/NHWC, +recompute; first and second order, batch 64; peak
#      memory) and its projection to a 50-epoch first-order search (target
#      <= 1 GPU-hour) -> $OUT/RESULTS.md and $OUT/search_step_cuda.png;
#   6. step-methods: the same for the other methods (MIDAS, hard exit, DASViT; their
#      own small networks) -> $OUT/RESULTS-methods.md;
#   7. step-maxbatch: the largest batch that fits, eager vs nasops vs recompute
#      (first order) -> $OUT/RESULTS-maxbatch.md;
#   8. step-compile: the step with --compile (first order; the compilation takes minutes).
# Logs and results land in $OUT (default ./gpu-out); the last lines printed are
# the summary. Usage, from the repository root:
#   bash benchmarks/gpu_session.sh [build] [tests] [sanitizer] [bench] [step] [step-methods] [step-maxbatch] [step-compile]
#   (default: the first four; run each step stage as a call of its own, after `build`)
# The device tool allows 10 minutes a call and keeps the machine (and the build)
# warm between quick successive calls: run `build tests`, then `sanitizer bench`.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  | tee -a "$OUT/device.txt"

stages=${*:-build tests sanitizer bench}
want() { [[ " $stages " == *" $1 "* ]]; }

if want build; then
start=$SECONDS
if python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  summary "build: ok ($((SECONDS - start)) s)"
else
  summary "build: FAILED (see build.log)"; tail -40 "$OUT/build.log"; exit 1
fi
fi
python3 -c "import json, nasops; print(json.dumps(nasops.backends(), indent=1))" | tee "$OUT/backends.json"

if want tests; then
start=$SECONDS
timeout 420 python3 -m pytest -q -p no:cacheprovider tests > "$OUT/tests.log" 2>&1
summary "tests (GPU): rc=$? ($((SECONDS - start)) s): $(tail -1 "$OUT/tests.log")"
start=$SECONDS
timeout 120 python3 -m nasops.selftest --dtypes float32 bfloat16 float16 > "$OUT/selftest.log" 2>&1
summary "selftest: rc=$? ($((SECONDS - start)) s): $(tail -1 "$OUT/selftest.log")"
fi

if want sanitizer; then
start=$SECONDS
timeout 240 compute-sanitizer --tool memcheck --error-exitcode 99 --print-limit 20 \
  python3 -m pytest -q -p no:cacheprovider -x -k "cuda and not compile" \
  tests/test_mixed_op.py tests/test_patch_attention.py tests/test_topk_tokens.py > "$OUT/sanitizer.log" 2>&1
summary "compute-sanitizer memcheck: rc=$? ($((SECONDS - start)) s): $(grep -m1 'ERROR SUMMARY' "$OUT/sanitizer.log")"
fi

if want step; then
start=$SECONDS
timeout 540 python3 benchmarks/bench_search_step.py --device cuda --steps 5 --methods darts-1st darts-2nd \
  --providers eager-nchw eager-nhwc nasops-nchw nasops-nhwc nasops-recompute \
  --out "$OUT/RESULTS.md" --plot "$OUT/search_step_cuda.png" > "$OUT/step.log" 2>&1
summary "search step: rc=$? ($((SECONDS - start)) s), table in RESULTS.md"
sed -n '/BEGIN search_step cuda/,/END search_step cuda/p' "$OUT/RESULTS.md" | grep "^|" | cut -c1-200
fi

if want step-methods; then
start=$SECONDS
# (a token network, DASViT's, runs eager / nasops / +recompute: no layout there)
timeout 540 python3 benchmarks/bench_search_step.py --device cuda --steps 5 --methods midas hardexit dasvit \
  --providers eager-nchw eager-nhwc nasops-nchw nasops-nhwc nasops-recompute \
  --out "$OUT/RESULTS-methods.md" --plot "$OUT/search_step_cuda_methods.png" > "$OUT/step-methods.log" 2>&1
summary "search step, other methods: rc=$? ($((SECONDS - start)) s), table in RESULTS-methods.md"
grep "^|" "$OUT/RESULTS-methods.md" | cut -c1-200
fi

if want step-maxbatch; then
start=$SECONDS
timeout 540 python3 benchmarks/bench_search_step.py --device cuda --steps 2 --no-memory --max-batch \
  --methods darts-1st --providers eager-nchw nasops-nchw nasops-recompute \
  --out "$OUT/RESULTS-maxbatch.md" --plot "$OUT/search_step_cuda_maxbatch.png" > "$OUT/step-maxbatch.log" 2>&1
summary "largest batch: rc=$? ($((SECONDS - start)) s), table in RESULTS-maxbatch.md"
grep "^|" "$OUT/RESULTS-maxbatch.md" | tail -5
fi

if want step-compile; then
start=$SECONDS
timeout 540 python3 benchmarks/bench_search_step.py --device cuda --steps 5 --methods darts-1st \
  --providers eager-nchw nasops-nchw nasops-compile --out "$OUT/RESULTS-compile.md" \
  --plot "$OUT/search_step_cuda_compile.png" > "$OUT/step-compile.log" 2>&1
summary "search step with --compile: rc=$? ($((SECONDS - start)) s), table in RESULTS-compile.md"
grep "^|" "$OUT/RESULTS-compile.md" | cut -c1-200
fi

if want bench; then
start=$SECONDS
timeout 330 python3 benchmarks/report.py --out "$OUT/RESULTS.md" > "$OUT/report.log" 2>&1
summary "benchmarks: rc=$? ($((SECONDS - start)) s), tables in RESULTS.md"
grep -E "^\| .*fwd" "$OUT/RESULTS.md" | cut -c1-160 | tail -60
fi
cat "$OUT/summary.txt"
