#!/usr/bin/env bash
# Copies this checkout to every worker of a TPU VM pod slice, installs it with the TPU jax build and runs
# one jaxboost command on all workers at once. Every jaxboost command starts jax.distributed when it sees
# the pod (TPU_WORKER_HOSTNAMES lists several workers), eval and synth included. JAX_COMPILATION_CACHE_DIR
# (e.g. gs://BUCKET/xla-cache), when set here, is passed on: workers and restarts reuse compiled steps.
#   launch/tpu_pod.sh NAME ZONE jaxboost train --config configs/sdm.py:full --workdir gs://BUCKET/sdm
set -euo pipefail
NAME=${1:?TPU name}; ZONE=${2:?zone}; shift 2
REPO=$(cd "$(dirname "$0")/.." && pwd)
tar -C "$REPO" --exclude=.git --exclude='runs' -czf /tmp/jaxboost.tgz .
gcloud compute tpus tpu-vm scp /tmp/jaxboost.tgz "$NAME":/tmp/ --zone "$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "
  set -e; mkdir -p ~/jaxboost && tar -C ~/jaxboost -xzf /tmp/jaxboost.tgz && cd ~/jaxboost &&
  pip install -q -e '.[tpu]' && JAX_COMPILATION_CACHE_DIR='${JAX_COMPILATION_CACHE_DIR:-}' $*"
