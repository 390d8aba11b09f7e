#!/usr/bin/env bash
# One-GPU check, under 8 minutes: the full-size speed cases (CLIPSeg 352, CRIS 416, SDM, MUMC 256; JAX vs
# torch eager and torch.compile in one process each), the SDM sampler, MFU against the device's published
# bf16 peak (benchmarks/harness.py DEVICE_BF16_PEAK), results.json + results.md + speed.png in OUT.
#
#   bash benchmarks/device_check.sh [OUT]             # on a machine with one GPU (default OUT: device_out)
#   bash benchmarks/device_check.sh --dry-run [OUT]   # on a CPU: the same script at --quick sizes
#
# Each case runs in its own process with a time limit (CASE_TIMEOUT seconds, default 110: 4 cases fit in
# 8 minutes), so a case that runs out of time or memory is named in results.json and the others still run.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
OUT=${1:-device_out}
CASES=${CASES:-clipseg,cris,sdm,mumc}
CASE_TIMEOUT=${CASE_TIMEOUT:-110}
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if [[ $DRY_RUN == 1 ]]; then
  export JAX_PLATFORMS=cpu
  QUICK=--quick
else
  QUICK=
  if ! python -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")'; then
    echo "device_check: jax sees no GPU (backend $(python -c 'import jax; print(jax.default_backend())')); install '.[cuda]' or use --dry-run" >&2
    exit 2
  fi
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  # XLA's GPU autotuner picks the convolution and GEMM algorithms; one device, so use all of its memory
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
fi

python - <<'PY'
import jax
from benchmarks import harness
kind = jax.devices()[0].device_kind
peak = harness.device_bf16_peak(kind)
print(f"device: {kind}; published bf16 peak: {'unknown' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}")
print("bf16 peaks (TFLOP/s, dense): " + ", ".join(f"{k} {v / 1e12:.0f}" for k, v in harness.DEVICE_BF16_PEAK.items()))
PY

timeout 470 python -m benchmarks.run $QUICK --cases "$CASES" --case-timeout "$CASE_TIMEOUT" --out "$OUT"
