#!/usr/bin/env bash
# Runs any jaxboost command as N local processes under jax.distributed (CPU: gloo collectives on
# 127.0.0.1), each with D simulated devices. For testing multi-host code paths on one machine.
#   launch/local_multiprocess.sh 2 2 jaxboost train --config configs/clipseg.py:tiny --workdir runs/mp
set -euo pipefail
N=${1:?number of processes}; D=${2:?devices per process}; shift 2
PORT=${JAXBOOST_PORT:-$((20000 + RANDOM % 20000))}
# The caller's other XLA flags pass through; the device count is this script's.
FLAGS="$(sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g' <<< "${XLA_FLAGS:-}") --xla_force_host_platform_device_count=$D"
pids=()
for ((i = 0; i < N; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="$FLAGS" \
  JAXBOOST_COORDINATOR="127.0.0.1:$PORT" JAXBOOST_NUM_PROCESSES=$N JAXBOOST_PROCESS_ID=$i \
    "$@" > >(sed "s/^/[p$i] /") 2>&1 &
  pids+=($!)
done
# The first process to fail stops the others: they would otherwise wait on it in a collective until the
# coordinator's heartbeat timeout.
status=0
running=("${pids[@]}")
while ((${#running[@]})); do
  finished=""
  wait -n -p finished "${running[@]}" || status=$?
  left=(); for p in "${running[@]}"; do [[ $p == "$finished" ]] || left+=("$p"); done; running=("${left[@]}")
  if ((status != 0)); then
    kill "${running[@]}" 2>/dev/null || true
    break
  fi
done
wait  # every process and its output filter
exit $status
