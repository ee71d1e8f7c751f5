#!/usr/bin/env bash
# GPU check, for a session lent a machine with a real NVIDIA GPU (fits a ~8-minute run).
#
#   benchmarks/gpu_check.sh            # outputs under $OUT if set, else /tmp/minicaffe-gpu-check
#
# 1. installs CuPy (cupy-cuda13x, minicaffe's [gpu] extra) if it is missing: from wheels in $WHEELS
#    (a folder carried to the machine: `pip download "cupy-cuda13x>=14" -d wheels` beforehand) when set,
#    else plain `pip install` (needs a package index);
# 2. runs tests/test_gpu_paths.py on the real device (MINICAFFE_REAL_CUPY=1: the GPU == CPU table and
#    the rest of the file, on real CuPy instead of the fake);
# 3. runs the layer table under NVIDIA's compute-sanitizer (memcheck, initcheck, racecheck) when it is
#    installed: out-of-bounds accesses, reads of uninitialized device memory, shared-memory races;
# 4. runs the kernel benchmark on the GPU (benchmarks/kernels.py --device gpu).
# Each step has a time limit; the summary at the end gives every step's exit status (124: timed out),
# and the script exits nonzero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-${TMPDIR:-/tmp}/minicaffe-gpu-check}"
mkdir -p "$out"
python="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this tree's minicaffe, whatever is installed
summary="$out/summary.txt"
: >"$summary"
failed=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, output to $out/NAME.txt
  local name="$1" limit="$2"
  shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" >"$out/$name.txt" 2>&1
  local rc=$?
  tail -n 5 "$out/$name.txt"
  echo "$name: exit $rc" | tee -a "$summary"
  [ "$rc" -eq 0 ] || failed=1
}

nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || echo "nvidia-smi not found" >>"$out/nvidia-smi.txt"

if ! "$python" -c "import minicaffe, pytest" 2>/dev/null; then  # its dependencies are missing
  step install-minicaffe 120 "$python" -m pip install -q ".[test]"
fi
if ! "$python" -c "import cupy" 2>/dev/null; then
  if [ -n "${WHEELS:-}" ]; then
    step install-cupy 120 "$python" -m pip install -q --no-index --find-links "$WHEELS" "cupy-cuda13x>=14"
  else
    step install-cupy 120 "$python" -m pip install -q "cupy-cuda13x>=14"
  fi
fi
"$python" -c "import cupy; print(cupy.__version__, cupy.cuda.runtime.getDeviceCount(), 'device(s)')" \
  >"$out/cupy.txt" 2>&1
cat "$out/cupy.txt"

export MINICAFFE_REAL_CUPY=1
pytest=("$python" -m pytest -q -p no:cacheprovider -p no:randomly)
step test_gpu_paths 210 "${pytest[@]}" tests/test_gpu_paths.py

sanitizer="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)"
if [ -n "$sanitizer" ]; then
  for tool in memcheck initcheck racecheck; do
    step "sanitizer-$tool" 70 "$sanitizer" --tool "$tool" --error-exitcode 99 --print-limit 20 \
      "${pytest[@]}" -x tests/test_gpu_paths.py -k "test_layer_gpu_equals_cpu and float32"
  done
else
  echo "compute-sanitizer: not installed, skipped" | tee -a "$summary"
fi

cp BENCHMARKS.md "$out/BENCHMARKS.md"
step benchmark 100 "$python" benchmarks/kernels.py --device gpu --output "$out/BENCHMARKS.md"

echo "== summary ($out)"
cat "$summary"
exit "$failed"
