#!/usr/bin/env bash
# The GPU check, in one script: on a CUDA machine, the test suite with the kernels compiled for real
# (FASTKD_TEST_DEVICE=cuda: tests/test_cuda.py adds rows x V > 2^31 and a CUDA-graph capture and
# replay of forward + backward), then the quick benchmark.  Logs, tables and plots go to $OUT if set,
# else benchmarks/results/<date>-<gpu>/.  Needs no network: it runs the checkout on PYTHONPATH with
# the machine's torch and triton; Liger-Kernel is compared when importable (carry it as a wheel in
# .whl/ and it is installed from there).  Budget: under 6 minutes on one H200.
#
#   bash benchmarks/gpu_check.sh            # the check
#   bash benchmarks/gpu_check.sh --dry-run  # print the plan and check the environment, run nothing
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0
case "${1:-}" in
  --dry-run) dry=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
gpu=$($PY -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "-") if torch.cuda.is_available() else "")' 2>/dev/null)
out=${OUT:-benchmarks/results/$(date +%Y%m%d-%H%M)-${gpu:-nogpu}}

steps=(
  "FASTKD_TEST_DEVICE=cuda timeout 270 $PY -m pytest -q -p no:cacheprovider tests"
  "timeout 150 $PY -m fastkd.bench --quick --out $out"
)
if [ "$dry" = 1 ]; then
  echo "gpu_check plan (results to $out):"
  printf '  %s\n' "${steps[@]}"
  $PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.cuda.is_available())' || exit 1
  $PY -c 'import fastkd, fastkd.bench; print("fastkd", fastkd.__version__, "imports from", fastkd.__path__[0])' || exit 1
  [ -n "$gpu" ] || echo "no GPU here: the real run needs one"
  exit 0
fi
[ -n "$gpu" ] || { echo "gpu_check: no CUDA device" >&2; exit 1; }
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/fastkd-site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/fastkd-site"
fi
{
  date -u +"date %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  $PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
  $PY -c 'import liger_kernel; print("liger-kernel", getattr(liger_kernel, "__version__", "?"))' 2>/dev/null || echo "liger-kernel: not installed"
} > "$out/environment.txt"
status=0
for i in "${!steps[@]}"; do
  echo "== ${steps[$i]}" | tee -a "$out/gpu_check.log"
  bash -c "${steps[$i]}" 2>&1 | tee "$out/step$i.log"
  rc=${PIPESTATUS[0]}
  echo "== exit $rc" | tee -a "$out/gpu_check.log"
  [ "$rc" = 0 ] || status=1
done
echo "results in $out"
exit $status
