#!/usr/bin/env bash
# One command for the GPU test machine (one H100/H200; torch 2.11, triton 3.6, transformers 5.17, no network,
# nothing to install). Runs the GPU tests, then the benchmarks; logs, CSV and PNG go under $OUT (or
# ./bench_out). Budget: under 6 minutes. Usage from the repository root:
#
#     OUT=/some/dir scripts/gpu_check.sh            # everything
#     scripts/gpu_check.sh tests                    # only the GPU tests
#     scripts/gpu_check.sh bench                    # only the benchmarks
#
# Each stage has its own time limit so one slow stage cannot eat the others' time; a failing stage is
# reported and the script goes on, exiting non-zero at the end if any stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-$PWD/bench_out}"
mkdir -p "$OUT"
export OUT
what="${1:-all}"
failed=()

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s) ==="
  local t0=$SECONDS
  timeout --signal=INT --kill-after=10 "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0))s ==="
  [ "$rc" -eq 0 ] || failed+=("$name($rc)")
}

{
  nvidia-smi || true
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt" | tail -n 1

if [ "$what" = all ] || [ "$what" = tests ]; then
  # one forward config instead of autotuning every (head dim, dtype) the tests touch
  RING_ATTN_AUTOTUNE=0 stage gpu_tests 120 python -m pytest -q -m gpu -p no:cacheprovider tests
fi
if [ "$what" = all ] || [ "$what" = bench ]; then
  stage bench_attention 150 python benchmarks/bench_attention.py --plot --rep 50
  stage bench_rope 45 python benchmarks/bench_rope.py
  stage bench_hf_layer 60 python benchmarks/bench_hf_layer.py
  stage bench_ring 45 \
    python -m torch.distributed.run --standalone --nproc_per_node=1 benchmarks/bench_ring.py
fi

if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED stages: ${failed[*]}"
  exit 1
fi
echo "all stages passed; results under $OUT"
