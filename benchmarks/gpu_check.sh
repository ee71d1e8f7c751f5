#!/usr/bin/env bash
# GPU check: one run on a machine with an NVIDIA GPU, from a fresh checkout, in under 8 minutes.
#
#   benchmarks/gpu_check.sh                                    # on the GPU machine
#   MINICAFFE_FAKE_CUPY=1 benchmarks/gpu_check.sh --quick      # CI: the same steps on the fake CuPy
#
# Outputs go under $OUT if set, else /tmp/minicaffe-gpu-check; the summary (also $OUT/summary.txt)
# comes last. Steps:
# 1. installs minicaffe's test dependencies and CuPy (cupy-cuda13x, the [gpu] extra) if missing: from
#    wheels in $WHEELS (a folder carried to the machine: `pip download "cupy-cuda13x>=14" -d wheels`)
#    when set, else plain `pip install` (needs a package index);
# 2. tests: the whole test suite, one pytest per test file, several at a time, with MINICAFFE_REAL_CUPY=1
#    (tests/test_gpu_paths.py and the other GPU tests run on the real device);
# 3. the kernel benchmark on the GPU (benchmarks/kernels.py --device gpu): each layer's GB/s next to the
#    device-to-device copy bandwidth;
# 4. LeNet-PReLU MNIST training (benchmarks/train_mnist.py) on the CPU and on the GPU: accuracy and
#    wall time side by side (needs MNIST in $MINICAFFE_SHARED/data/mnist, default ../shared);
# 5. the layer table under NVIDIA's compute-sanitizer (memcheck, initcheck, racecheck) when installed;
# 6. with two GPUs or more: `minicaffe train --gpu 0,1` (NCCL) against one GPU with double the batch
#    (tests/test_parallel.py::test_two_gpus_train_as_one_gpu_with_double_batch).
#
# MINICAFFE_FAKE_CUPY=1: tests/fake_cupy is the `cupy` of every step (nothing installed, no sanitizer),
# so CI runs the script without a GPU and it cannot rot (tests/test_gpu_check.py). --quick: tiny sizes
# (a few GPU tests, --quick benchmark, 10 training iterations).
#
# Every step has a time limit, cut to what is left of the whole run's budget ($GPU_CHECK_SECONDS: 450 s;
# 120 s with --quick, which took about a minute on a busy 2-core machine). The summary gives each step's
# exit status (124: out of time) and seconds; the script exits nonzero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
quick=0
[ "${1:-}" = "--quick" ] && quick=1
fake="${MINICAFFE_FAKE_CUPY:-0}"
budget="${GPU_CHECK_SECONDS:-$([ "$quick" = 1 ] && echo 120 || echo 450)}"
deadline=$((SECONDS + budget))
out="${OUT:-${TMPDIR:-/tmp}/minicaffe-gpu-check}"
mkdir -p "$out"
python="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this tree's minicaffe, whatever is installed
if [ "$fake" = 1 ]; then
  export PYTHONPATH="$PWD/tests/fake_cupy:$PYTHONPATH"
  unset MINICAFFE_REAL_CUPY
else
  export MINICAFFE_REAL_CUPY=1
fi
summary="$out/summary.txt"
: >"$summary"
failed=0

note() { echo "$*" | tee -a "$summary"; }

step() {  # step NAME SECONDS COMMAND...: run within min(SECONDS, time left), output to $out/NAME.txt
  local name="$1" limit="$2" left=$((deadline - SECONDS))
  shift 2
  [ "$left" -lt "$limit" ] && limit="$left"
  echo "== $name (${limit} s at most): $*"
  if [ "$limit" -le 0 ]; then
    note "$name: exit 124 (no time left)"
    failed=1
    return 124
  fi
  local start=$SECONDS
  timeout "$limit" "$@" >"$out/$name.txt" 2>&1
  local rc=$?
  tail -n 5 "$out/$name.txt"
  note "$name: exit $rc ($((SECONDS - start)) s)"
  [ "$rc" -eq 0 ] || failed=1
  return "$rc"
}

if [ "$fake" = 1 ]; then
  note "mode: fake CuPy (tests/fake_cupy)$([ "$quick" = 1 ] && echo ", quick")"
else
  note "mode: real CuPy$([ "$quick" = 1 ] && echo ", quick")"
  nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || echo "nvidia-smi not found" >>"$out/nvidia-smi.txt"
  if ! "$python" -c "import minicaffe, pytest, hypothesis" 2>/dev/null; then  # dependencies missing
    step install-minicaffe 120 "$python" -m pip install -q ".[test]"
  fi
  if ! "$python" -c "import cupy" 2>/dev/null; then
    if [ -n "${WHEELS:-}" ]; then
      step install-cupy 120 "$python" -m pip install -q --no-index --find-links "$WHEELS" "cupy-cuda13x>=14"
    else
      step install-cupy 120 "$python" -m pip install -q "cupy-cuda13x>=14"
    fi
  fi
fi
"$python" -c "import cupy; print('cupy', cupy.__version__, cupy.cuda.runtime.getDeviceCount(), 'device(s)')" \
  2>&1 | tail -n 1 | tee -a "$summary"

# -- 2. tests ------------------------------------------------------------------------------------------
# One pytest per target (a file, or a node id with --quick), GPU_CHECK_JOBS at a time, each job pinned to
# its own share of the usable cores (taskset), so that the jobs' kernel and BLAS threads, which follow
# the cores a process may use, do not oversubscribe them. Each target's output is in $out/tests/, its
# exit status in $out/tests/status.txt (5, nothing collected, counts as passed).
mkdir -p "$out/tests"
: >"$out/tests/status.txt"
export GPU_CHECK_TESTS="$out/tests" GPU_CHECK_PYTHON="$python"
test_one() {
  local log="$GPU_CHECK_TESTS/${1//[^A-Za-z0-9_.-]/_}.txt" cpus pin=()
  read -ra cpus <<<"$GPU_CHECK_CPU_LIST"
  local share=$((${#cpus[@]} / GPU_CHECK_JOBS))
  if [ "$share" -gt 0 ] && command -v taskset >/dev/null; then
    local mine="${cpus[*]:$((GPU_CHECK_SLOT * share)):$share}"
    pin=(taskset -c "${mine// /,}")
  fi
  "${pin[@]}" "$GPU_CHECK_PYTHON" -m pytest -q -p no:cacheprovider -p no:randomly "$1" >"$log" 2>&1
  local rc=$?
  [ "$rc" -eq 5 ] && rc=0
  echo "$rc $1" >>"$GPU_CHECK_TESTS/status.txt"
  return "$rc"
}
export -f test_one
if [ "$quick" = 1 ]; then
  targets=(tests/test_gpu_paths.py::test_class_score_rows_launch_a_warp_per_row
           tests/test_gpu_paths.py::test_launch_grids_stay_within_cuda_limits
           "tests/test_gpu_paths.py::test_layer_gpu_equals_cpu[softmax_rows_in_place-float32]"
           tests/test_dropout.py::test_gpu_mask_matches_cpu)
else  # every test file but this script's own test (it runs this script): the GPU table first, then the
  # largest files first, so that a long one does not start last
  mapfile -t targets < <(echo tests/test_gpu_paths.py; ls -S tests/test_*.py |
    grep -v -e '^tests/test_gpu_check.py$' -e '^tests/test_gpu_paths.py$')
fi
cores="$(nproc 2>/dev/null || echo 2)"
export GPU_CHECK_JOBS="${GPU_CHECK_JOBS:-$((cores < 8 ? cores : 8))}"
GPU_CHECK_CPU_LIST="$("$python" -c 'import os; print(*sorted(os.sched_getaffinity(0)))')"
export GPU_CHECK_CPU_LIST
run_tests='printf "%s\n" "$@" | xargs -P "$GPU_CHECK_JOBS" --process-slot-var=GPU_CHECK_SLOT -I{} \
  bash -c "test_one \"\$1\"" _ {}'
step tests 270 bash -c "$run_tests" _ "${targets[@]}"
passed=$(awk '$1 == 0' "$out/tests/status.txt" | wc -l)
unfinished=$((${#targets[@]} - $(wc -l <"$out/tests/status.txt")))
totals=$(cat "$out"/tests/*.txt | grep -Eo '[0-9]+ (passed|failed|skipped|errors?)' |
  awk '{n[$2] += $1} END {for (k in n) printf "%d %s ", n[k], k}')
note "tests: ${passed} of ${#targets[@]} targets passed, ${unfinished} did not finish; totals: ${totals}"
awk '$1 != 0 {print "  failed: " $2 " (exit " $1 ")"}' "$out/tests/status.txt" | tee -a "$summary"

# -- 3. kernel benchmark -------------------------------------------------------------------------------
cp BENCHMARKS.md "$out/BENCHMARKS.md"  # the benchmark updates this copy, not the checkout
benchmark=("$python" benchmarks/kernels.py --device gpu --output "$out/BENCHMARKS.md")
[ "$quick" = 1 ] && benchmark+=(--quick)
if step benchmark 80 "${benchmark[@]}"; then
  sed -n '/^GPU$/,$p' "$out/benchmark.txt" | grep -v '^updated' | tee -a "$summary"
fi

# -- 4. LeNet-PReLU on MNIST, CPU then GPU ---------------------------------------------------------------
mnist="${MINICAFFE_SHARED:-$PWD/../shared}/data/mnist"
if [ -f "$mnist/t10k-images-idx3-ubyte.gz" ]; then
  train=("$python" benchmarks/train_mnist.py --mnist "$mnist" --models lenet_prelu --no-quickstart
         --no-write)
  [ "$quick" = 1 ] && train+=(--max-iter 10)
  for device in cpu gpu; do
    device_args=()
    [ "$device" = gpu ] && device_args=(--gpu 0)
    step "train-$device" 150 "${train[@]}" "${device_args[@]}" && \
      grep '^| lenet_prelu ' "$out/train-$device.txt" | sed "s/^/$device: /" | tee -a "$summary"
  done
else
  note "training: skipped, MNIST not found in $mnist (set MINICAFFE_SHARED)"
fi

# -- 5. compute-sanitizer --------------------------------------------------------------------------------
sanitizer=""
if [ "$fake" != 1 ]; then
  sanitizer="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null |
    head -n 1)"
fi
if [ -n "$sanitizer" ]; then
  for tool in memcheck initcheck racecheck; do
    step "sanitizer-$tool" 70 "$sanitizer" --tool "$tool" --error-exitcode 99 --print-limit 20 \
      "$python" -m pytest -q -p no:cacheprovider -x tests/test_gpu_paths.py \
      -k "test_layer_gpu_equals_cpu and float32"
  done
else
  note "compute-sanitizer: $([ "$fake" = 1 ] && echo "not with the fake CuPy" || echo "not installed"),"\
" skipped"
fi

# -- 6. two GPUs (NCCL) ------------------------------------------------------------------------------------
gpus=0
[ "$fake" != 1 ] && gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)"
if [ "$gpus" -ge 2 ]; then
  step two-gpus 120 "$python" -m pytest -q -p no:cacheprovider \
    tests/test_parallel.py::test_two_gpus_train_as_one_gpu_with_double_batch && \
    note "two GPUs: train --gpu 0,1 matches one GPU with double the batch"
else
  note "two GPUs: skipped, ${gpus} GPU(s)$([ "$fake" = 1 ] && echo " (fake CuPy)")"
fi

echo "== summary ($out, ${SECONDS} s)"
echo "total: ${SECONDS} s, $([ "$failed" = 0 ] && echo "all steps passed" || echo "FAILED")" >>"$summary"
cat "$summary"
exit "$failed"
