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
#      sections into benchmarks/RESULTS.md afterwards).
# Logs and results land in $OUT (default ./gpu-out); the last lines printed are
# the summary. Usage, from the repository root:
#   bash benchmarks/gpu_session.sh [build] [tests] [sanitizer] [bench]   (default: all four)
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

if want bench; then
start=$SECONDS
timeout 330 python3 benchmarks/report.py --out "$OUT/RESULTS.md" > "$OUT/report.log" 2>&1
summary "benchmarks: rc=$? ($((SECONDS - start)) s), tables in RESULTS.md"
grep -E "^\| .*fwd" "$OUT/RESULTS.md" | cut -c1-160 | tail -60
fi
cat "$OUT/summary.txt"
