#!/usr/bin/env bash
# Everything nasops needs a GPU for. The device tool lends a GPU for 15 minutes in
# all (machine starts included) and 10 minutes a call: stages share a deadline of
# $DEADLINE s (default 540); a stage that would not fit is skipped and says so.
# Stages run in the order given on the command line. The image there has no
# package registry; it holds torch (2.11 as last seen, not this project's 2.13
# pin), triton (3.6, not 3.9), pytest, pytest-benchmark, pytest-xdist,
# pytest-timeout, hypothesis, matplotlib and compute-sanitizer.
#   build: nasops._C with the CUDA kernels for sm_90 (editable install); the .so is
#      copied to $OUT, so that a later call (a fresh machine) can carry it instead of
#      building again: put it back in nasops/, name it in the run's `carry`, and set
#      NASOPS_PREBUILT=1 (only while csrc/ is unchanged);
#   depthwise: the Triton depthwise convolutions (never run on a GPU before): their tests
#      on CUDA tensors, then compute-sanitizer memcheck over a few of them;
#   kernels: the op tests on CUDA tensors (backends cuda, triton and eager: tests
#      use CUDA tensors when a GPU is visible; in parallel when pytest-xdist is there),
#      then python -m nasops.selftest (what a user runs after installing) in float32,
#      bfloat16 and float16;
#   sanitizer: compute-sanitizer memcheck over the CUDA-backend tests of every op,
#      then racecheck over those of mixed_op, the one kernel with shared memory (0
#      errors is issue #16's target);
#   bench: the side-by-side op benchmarks (--quick), one op at a time so that a
#      deadline keeps the ops already done -> $OUT/RESULTS.md (merge its GPU sections
#      into benchmarks/RESULTS.md afterwards);
#   checks: kernels' tests (no selftest), memcheck and racecheck in parallel;
#   tests-all: the whole test suite on the GPU (every method's end-to-end tests);
#   graphs: --cuda-graphs (nasops.cuda_graphs): its tests on the GPU (each optimizer
#      step's gradients graphed vs eager, DARTS first/second order x plain/recompute; a
#      graphed search equals the eager one: DARTS first order, second order,
#      --recompute-edges; a two-stage DASViT search), then the DARTS step, first order,
#      batch 64: eager NCHW against nasops NCHW, graphed (NCHW and channels_last), and
#      graphed with --recompute-edges, with --recompute-depthwise and with both (edges in
#      the cells through the first reduction cell, depthwise in the rest) (issue #14's GPU
#      targets: >= 2x eager, <= 1 GPU-hour; memory), graphed with nn.BatchNorm2d in place of
#      AffineFreeBatchNorm2d (what that layer saves), and graphed with the depthwise
#      convolutions on their Triton kernels (ReLU fused; not yet 'auto' on CUDA)
#      -> $OUT/RESULTS-graphs.md;
#   step: the whole DARTS search step (bench_search_step.py: eager NCHW/NHWC,
#      nasops NCHW/NHWC, +graphs, +recompute; first and second order, batch 64; peak
#      memory) and its projection to a 50-epoch first-order search (target
#      <= 1 GPU-hour) -> $OUT/RESULTS-step.md and $OUT/search_step_cuda.png;
#   step-methods: the same for the other methods (MIDAS, hard exit, DASViT; their
#      own small networks) -> $OUT/RESULTS-methods.md;
#   step-maxbatch: the largest batch that fits, eager vs --recompute-edges (first
#      order; nasops without recompute peaked as eager did on 2026-12-04)
#      -> $OUT/RESULTS-maxbatch.md;
#   step-profile: the device time of one step by op category against its wall time
#      (first order, batch 64, eager, nasops, nasops with PyTorch's BatchNorm, nasops
#      with the Triton depthwise kernels): how far the step is bound by the host, and what each
#      BatchNorm and each depthwise convolution costs the device;
#   step-compile: the step with --compile (first order; the compilation takes minutes);
#   train-step: the train step of a found network (nasops.train; bench_train_step.py
#      --full: PyTorch's ops vs nasops', contiguous vs channels_last, float32 and --amp;
#      in float32 also replayed from CUDA graphs as nasops.train --cuda-graphs does), which
#      decides nasops.train's --memory-format auto on CUDA and measures --cuda-graphs
#      -> $OUT/RESULTS-train.md.
#   (STEP_MAX caps each step stage, default 540 s.)
# Logs and results land in $OUT (default ./gpu-out), bundled at the end into
# $OUT/results.tgz beside summary.txt and the built extension; the last lines printed
# are the summary. Usage, from the repository root (default: build depthwise graphs
# step-maxbatch step-profile train-step bench, what is still unmeasured, most wanted first; on
# 2026-12-04 the other op tests passed on CUDA and the sanitizers found nothing):
#   bash benchmarks/gpu_session.sh [STAGE ...]
set -uo pipefail
OUT=${OUT:-gpu-out}
DEADLINE=${DEADLINE:-540}
mkdir -p "$OUT"
: > "$OUT/summary.txt"  # this run's stages only
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }
# budget NAME MAX MIN: prints the seconds stage NAME may take (at most MAX, what is
# left before the deadline); fails (and records the skip) when under MIN are left.
budget() {
  local left=$((DEADLINE - SECONDS))
  if ((left < $3)); then summary "$1: skipped, ${left} s left before the ${DEADLINE} s deadline"; return 1; fi
  echo $((left < $2 ? left : $2))
}
CUDA_TESTS=(tests/test_mixed_op.py tests/test_patch_attention.py tests/test_topk_tokens.py)
# pytest in parallel where pytest-xdist is installed (the GPU machine has 16 cores).
XDIST=()
python3 -c "import xdist" 2>/dev/null && XDIST=(-n "${TEST_WORKERS:-8}")

stage_build() {
  local start=$SECONDS
  if [[ ${NASOPS_PREBUILT:-0} == 1 ]]; then
    summary "build: prebuilt $(ls nasops/_C*.so 2>/dev/null | tr '\n' ' ')"
  elif MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
     timeout 300 python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
    summary "build: ok ($((SECONDS - start)) s)"
    # Host debug info stripped: the full .so is over the 16 MiB a file that comes back may have.
    for so in nasops/_C*.so; do strip -g -o "$OUT/$(basename "$so")" "$so" 2>/dev/null || cp "$so" "$OUT/"; done
  else
    summary "build: FAILED (see build.log)"; tail -40 "$OUT/build.log"; return 1
  fi
  python3 -c "import json, nasops; print(json.dumps(nasops.backends(), indent=1))" | tee "$OUT/backends.json"
}

# The three checks that need the GPU but time nothing; each takes its time limit.
kernel_tests() {
  timeout "$1" python3 -m pytest -v -rfE -p no:cacheprovider "${XDIST[@]}" "${CUDA_TESTS[@]}" \
    tests/test_mixed_op_triton.py tests/test_layouts.py tests/test_triton_launches.py tests/test_depthwise_conv2d.py \
    > "$OUT/kernels.log" 2>&1
}
# compute-sanitizer TOOL over the CUDA-backend op tests (not -x: one failing test must
# not end the check of the others). racecheck looks at shared memory, which only the
# CUDA mixed_op kernels use, and skips gradcheck's thousands of tiny launches.
sanitize() {
  local tool=$1 select="cuda and not compile" tests=("${CUDA_TESTS[@]}")
  [[ $tool == racecheck ]] && select="cuda and not compile and not gradcheck" tests=(tests/test_mixed_op.py)
  timeout "$2" compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 20 \
    python3 -m pytest -q -p no:cacheprovider -k "$select" "${tests[@]}" > "$OUT/sanitizer-$tool.log" 2>&1
}
sanitizer_summary() {  # TOOL RC START
  summary "compute-sanitizer $1: rc=$2 ($((SECONDS - $3)) s): $(grep -m1 'ERROR SUMMARY' "$OUT/sanitizer-$1.log");" \
    "$(grep -E '(passed|failed)' "$OUT/sanitizer-$1.log" | tail -1)"
}

stage_kernels() {
  local t start
  if t=$(budget "kernel tests" 180 30); then
    start=$SECONDS
    kernel_tests "$t"
    summary "kernel tests (GPU): rc=$? ($((SECONDS - start)) s): $(tail -1 "$OUT/kernels.log")"
  fi
  if t=$(budget "selftest" 60 20); then
    start=$SECONDS
    timeout "$t" python3 -m nasops.selftest --dtypes float32 bfloat16 float16 > "$OUT/selftest.log" 2>&1
    summary "selftest: rc=$? ($((SECONDS - start)) s): $(tail -1 "$OUT/selftest.log")"
  fi
}

stage_sanitizer() {
  local t start tool
  for tool in memcheck racecheck; do
    t=$(budget "compute-sanitizer $tool" 150 30) || continue
    start=$SECONDS
    sanitize "$tool" "$t"
    sanitizer_summary "$tool" $? "$start"
  done
}

stage_depthwise() {
  local t start
  if t=$(budget "depthwise tests" 150 30); then
    start=$SECONDS
    timeout "$t" python3 -m pytest -v -rfE -p no:cacheprovider "${XDIST[@]}" -k triton tests/test_depthwise_conv2d.py \
      > "$OUT/depthwise-tests.log" 2>&1
    summary "depthwise tests (GPU, Triton): rc=$? ($((SECONDS - start)) s): $(tail -1 "$OUT/depthwise-tests.log")"
  fi
  if t=$(budget "compute-sanitizer memcheck, depthwise" 90 30); then
    start=$SECONDS
    timeout "$t" compute-sanitizer --tool memcheck --error-exitcode 99 --print-limit 20 python3 -m pytest -q \
      -p no:cacheprovider -k "triton_launches or triton_many or triton_half" tests/test_depthwise_conv2d.py \
      > "$OUT/sanitizer-depthwise.log" 2>&1
    summary "compute-sanitizer memcheck, depthwise: rc=$? ($((SECONDS - start)) s):" \
      "$(grep -m1 'ERROR SUMMARY' "$OUT/sanitizer-depthwise.log");" \
      "$(grep -E '(passed|failed)' "$OUT/sanitizer-depthwise.log" | tail -1)"
  fi
}

# checks: the kernel tests, memcheck and racecheck at once (16 cores), for a call with
# little time left. They slow each other: on 2026-12-04 neither sanitizer finished in 170 s.
stage_checks() {
  local t start pids
  t=$(budget "checks" 300 60) || return
  start=$SECONDS
  kernel_tests "$t" & pids=($!)
  sanitize memcheck "$t" & pids+=($!)
  sanitize racecheck "$t" & pids+=($!)
  wait "${pids[0]}"; summary "kernel tests (GPU): rc=$? ($((SECONDS - start)) s): $(tail -1 "$OUT/kernels.log")"
  wait "${pids[1]}"; sanitizer_summary memcheck $? "$start"
  wait "${pids[2]}"; sanitizer_summary racecheck $? "$start"
}

stage_tests-all() {
  local t start
  t=$(budget "tests (all)" 540 60) || return
  start=$SECONDS
  timeout "$t" python3 -m pytest -v -rfE -p no:cacheprovider "${XDIST[@]}" tests > "$OUT/tests.log" 2>&1
  summary "tests (all, GPU): rc=$? ($((SECONDS - start)) s): $(tail -1 "$OUT/tests.log")"
}

stage_bench() {
  local t start op
  # Every BENCHMARK of benchmarks/bench_*.py (tests/test_benchmarks.py checks), mixed_op first.
  # at most 150 s an op (top-k 240: on 2026-12-04 one of its torch.compile rows took 93 s);
  # report.py writes its section after every case, so a cut keeps the rows done
  for op in mixed_op patch_attention_mixed_op topk_tokens depthwise_conv2d; do
    t=$(budget "benchmarks $op" "$([[ $op == topk_tokens ]] && echo 240 || echo 150)" 40) || continue
    start=$SECONDS
    timeout "$t" python3 benchmarks/report.py --quick --ops "$op" --out "$OUT/RESULTS.md" > "$OUT/report-$op.log" 2>&1
    summary "benchmarks $op: rc=$? ($((SECONDS - start)) s), table in RESULTS.md"
  done
  grep -E "^\| .*fwd" "$OUT/RESULTS.md" 2>/dev/null | cut -c1-160 | tail -40
}

# step_bench NAME FILE LOG ARGS...: one bench_search_step.py run as a stage.
step_bench() {
  local name=$1 file=$2 log=$3 t start; shift 3
  t=$(budget "$name" "${STEP_MAX:-540}" 60) || return
  start=$SECONDS
  timeout "$t" python3 benchmarks/bench_search_step.py --device cuda --out "$OUT/$file" "$@" > "$OUT/$log" 2>&1
  summary "$name: rc=$? ($((SECONDS - start)) s), table in $file"
  grep "^|" "$OUT/$file" 2>/dev/null | cut -c1-200 | tail -12
}
stage_graphs() {
  local t start
  if t=$(budget "graphs tests" 180 30); then
    start=$SECONDS
    # the CUDA tests only (-k on_the_gpu): the file's CPU tests run in CI; in parallel
    # (~20 tests, each its own searches or training runs, every method's)
    timeout "$t" python3 -m pytest -v -rfE -p no:cacheprovider "${XDIST[@]}" -k on_the_gpu tests/test_cuda_graphs.py \
      > "$OUT/graphs-tests.log" 2>&1
    summary "graphs tests: rc=$? ($((SECONDS - start)) s): $(tail -1 "$OUT/graphs-tests.log")"
  fi
  # at most 240 s (GRAPHS_MAX), so that the stages after it still get their turn
  STEP_MAX=${GRAPHS_MAX:-240} step_bench "search step with --cuda-graphs" RESULTS-graphs.md step-graphs.log --steps 5 \
    --methods darts-1st --providers eager-nchw nasops-nchw nasops-graphs nasops-graphs-nhwc nasops-graphs-recompute \
    nasops-graphs-recompute-dw nasops-graphs-recompute-large nasops-graphs-torch-bn nasops-graphs-triton-dw \
    --plot "$OUT/search_step_cuda_graphs.png"
}
stage_step() {
  step_bench "search step" RESULTS-step.md step.log --steps 5 --methods darts-1st darts-2nd \
    --providers eager-nchw eager-nhwc nasops-nchw nasops-nhwc nasops-graphs nasops-recompute \
    --plot "$OUT/search_step_cuda.png"
}
stage_step-methods() {
  # (a token network, DASViT's, runs eager / nasops / +recompute: no layout there)
  step_bench "search step, other methods" RESULTS-methods.md step-methods.log --steps 5 \
    --methods midas hardexit dasvit \
    --providers eager-nchw eager-nhwc nasops-nchw nasops-nhwc nasops-graphs nasops-recompute \
    --plot "$OUT/search_step_cuda_methods.png"
}
stage_step-maxbatch() {
  step_bench "largest batch" RESULTS-maxbatch.md step-maxbatch.log --steps 2 --no-memory --max-batch \
    --methods darts-1st --providers eager-nchw nasops-recompute --plot "$OUT/search_step_cuda_maxbatch.png"
}
stage_step-profile() {
  step_bench "search step, device time by op" RESULTS-profile.md step-profile.log --steps 3 --no-memory --profile \
    --methods darts-1st --providers eager-nchw nasops-nchw nasops-torch-bn nasops-triton-dw \
    --plot "$OUT/search_step_cuda_profile.png"
}
stage_step-compile() {
  step_bench "search step with --compile" RESULTS-compile.md step-compile.log --steps 5 --methods darts-1st \
    --providers eager-nchw nasops-nchw nasops-compile --plot "$OUT/search_step_cuda_compile.png"
}
stage_train-step() {
  local t start amp
  for amp in "" --amp; do
    t=$(budget "train step ${amp:-float32}" "$([[ -z $amp ]] && echo 150 || echo 90)" 40) || continue
    start=$SECONDS
    timeout "$t" python3 benchmarks/bench_train_step.py --device cuda --full --rounds 5 $amp \
      --out "$OUT/RESULTS-train.md" > "$OUT/train-step${amp}.log" 2>&1
    summary "train step ${amp:-float32}: rc=$? ($((SECONDS - start)) s), table in RESULTS-train.md"
  done
  grep "^|" "$OUT/RESULTS-train.md" 2>/dev/null | cut -c1-200 | tail -14
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  | tee -a "$OUT/device.txt"
for stage in ${*:-build depthwise graphs step-maxbatch step-profile train-step bench}; do
  if ! declare -F "stage_$stage" > /dev/null; then summary "unknown stage: $stage"; continue; fi
  "stage_$stage" || { [[ $stage == build ]] && break; }
done
# The device tool returns at most 8 files from $OUT: everything but the summary and the
# built extension goes into one archive (on 2026-12-04 a run left 14 files and lost its logs).
( cd "$OUT" && shopt -s nullglob && files=(*.log *.md *.png *.json *.txt) \
  && files=("${files[@]/summary.txt}") && tar czf results.tgz ${files[@]} && rm -f ${files[@]} )
cat "$OUT/summary.txt"
