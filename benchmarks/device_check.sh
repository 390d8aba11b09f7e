#!/usr/bin/env bash
# One-GPU check, under 8 minutes: the full-size train steps (CLIPSeg 352, CRIS 416, MUMC 256, the full SDM
# at 256) and the full SDM's guided DDIM-50 sampler, JAX vs torch eager and torch.compile, both in bf16
# mixed precision on the GPU (JAX: the models' dtype bfloat16, attention "auto" = cuDNN flash attention,
# the SDM's "cudnn"; torch: autocast bf16, scaled_dot_product_attention), MFU against the device's published
# bf16 peak (benchmarks/harness.py DEVICE_BF16_PEAK); results.json + results.md + speed.png in OUT.
#
#   bash benchmarks/device_check.sh [OUT]             # on a machine with one GPU (default OUT: device_out)
#   bash benchmarks/device_check.sh --dry-run [OUT]   # on a CPU: the same script and code paths at --quick
#                                                     # sizes, in bf16, one timed call each (proves, times nothing)
#   DTYPE=float32 bash benchmarks/device_check.sh     # the same on the GPU in float32
#
# Each case runs in its own process with its own time limit, so a case that runs out of time or memory is
# named in results.json and the others still run. The limits are estimates for an H100 / H200 (989 TFLOP/s
# bf16 dense; 30% MFU, pessimistic, is ~300 TFLOP/s), where every step is short and compilation dominates:
#   clipseg  65 s: train 0.33 TFLOP (encoders frozen) ~1 ms, infer 0.32 ~1 ms; JAX compiles ~20 s,
#                  torch.compile of infer + train ~35 s, imports and HF init ~10 s
#   cris     75 s: train 1.64 TFLOP ~6 ms, infer 0.54 ~2 ms; JAX compiles ~25 s, torch.compile ~40 s
#   mumc     70 s: pretrain step 2.0 TFLOP ~7 ms; JAX compile ~25 s, torch.compile ~35 s
#   sdm     245 s: three processes (speed_sdm.PART_TIMEOUT_GPU). Train b4 ~54 TFLOP (13.5 per 256 px sample
#                  with remat) ~0.2 s; guided DDIM-50 b4 ~1.4 PFLOP (100 U-Net calls) ~4.6 s. jax 110 s
#                  (init + convert 652 M parameters ~25 s, train compile ~40 s, sampler compile ~25 s,
#                  2 loops ~10 s); torch eager 40 s (2 loops ~10-20 s); torch.compile 90 s (train only)
# = 455 s, under `timeout 470` with the start-up. CASE_TIMEOUTS overrides (name=seconds,...).
set -euo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
OUT=${1:-device_out}
CASES=${CASES:-clipseg,cris,mumc,sdm}
DTYPE=${DTYPE:-bfloat16}
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if [[ $DRY_RUN == 1 ]]; then
  export JAX_PLATFORMS=cpu BENCH_MAX_ITERS=${BENCH_MAX_ITERS:-1}
  FLAGS=(--quick --device cpu)
  CASE_TIMEOUTS=${CASE_TIMEOUTS:-900}
  TOTAL_TIMEOUT=0  # no limit: a shared CPU's time says nothing about a GPU's
else
  FLAGS=(--device gpu)
  CASE_TIMEOUTS=${CASE_TIMEOUTS:-clipseg=65,cris=75,mumc=70,sdm=245}
  TOTAL_TIMEOUT=470
  if ! python -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")'; then
    echo "device_check: jax sees no GPU (backend $(python -c 'import jax; print(jax.default_backend())')); install '.[cuda]' or use --dry-run" >&2
    exit 2
  fi
  if ! python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "device_check: torch sees no CUDA device (a CPU build of torch?); install a CUDA build of torch" >&2
    exit 2
  fi
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  # one device: let each process grow its memory instead of taking 75% up front (the SDM's parts run in turn)
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

timeout "$TOTAL_TIMEOUT" python -m benchmarks.run "${FLAGS[@]}" --dtype "$DTYPE" --cases "$CASES" \
  --case-timeout "$CASE_TIMEOUTS" --out "$OUT"
