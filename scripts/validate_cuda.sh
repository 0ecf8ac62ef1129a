#!/usr/bin/env bash
# Validate the CUDA backend on a GPU machine: build, GPU tests, memcheck, benchmarks.
#
#   bash scripts/validate_cuda.sh                 # every step, in this order
#   bash scripts/validate_cuda.sh build tests     # some steps (build tests fsdp memcheck bench)
#
# The lent GPU machines reach no package index: the build uses what is installed there
# (torch, setuptools, pybind11, cmake, ninja), hence --no-build-isolation --no-deps.
# Benchmark results go to benchmarks/results/cuda-<gpu>-<date>.json (raw) and its summary (.md,
# .summary.json, .png: commit these).
# Tuning without rebuilding: GAPKERN_LATENT_PLAN="mb=4,splits=7" (csrc/latent_mma.cu, make_plan).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(build tests fsdp memcheck bench)

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr -c 'A-Za-z0-9\n' '-' || true)
results="benchmarks/results/cuda-${gpu:-gpu}-$(date +%Y%m%d-%H%M%S).json"

for step in "${steps[@]}"; do
  echo "== $step"
  case "$step" in
    build)
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
      log=$(mktemp)
      start=$SECONDS
      if ! "$PY" -m pip install --no-build-isolation --no-deps -v -e . >"$log" 2>&1; then
        tail -n 60 "$log"
        exit 1
      fi
      grep -E "gapkern:|\[[0-9]+/[0-9]+\]" "$log" || true
      echo "build took $((SECONDS - start)) s"
      "$PY" -c "import gapkern, gapkern._C; print('backends:', gapkern.ops.backend_info())"
      ;;
    tests)
      "$PY" -m pytest -q -m gpu tests
      ;;
    fsdp)
      # README's FSDP recipe on one GPU: a tiny checkpoint and data, 4 steps with the Gap units, then generate.
      work=$(mktemp -d)
      trap 'rm -rf "$work"' EXIT
      "$PY" - "$work" <<'EOF'
import sys
sys.path.insert(0, "tests")
from train_data import make_checkpoint, make_data
base, head = make_checkpoint(sys.argv[1])
make_data(sys.argv[1], base, n=8, g=2)
EOF
      "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m gapkern.cli train --model "$work/base" \
          --data "$work/data" --head "$work/head.safetensors" --out "$work/fsdp" --lr 1e-3 --batch 2 \
          --max-steps 4 --logging-steps 1 --save-steps 2 -- --fsdp "full_shard auto_wrap"
      "$PY" -m gapkern.cli generate --model "$work/fsdp" --max-new-tokens 6 --span-at 1
      ;;
    memcheck)
      compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" -m pytest -q tests/ops -k cuda
      ;;
    bench)
      mkdir -p benchmarks/results
      "$PY" -m pytest benchmarks/ --benchmark-only -q --benchmark-json="$results"
      "$PY" -m benchmarks.report "$results"  # the committed summary: .md, .summary.json, .png
      echo "benchmark results: $results (raw, not committed) and its summary beside it"
      ;;
    *)
      echo "unknown step '$step' (build, tests, fsdp, memcheck, bench)" >&2
      exit 2
      ;;
  esac
done
