#!/usr/bin/env bash
# Copies this checkout to every worker of a TPU VM pod slice, installs it with the TPU jax build and runs
# one jaxboost command on all workers at once (jax.distributed finds the pod by itself).
#   launch/tpu_pod.sh NAME ZONE jaxboost train --config configs/sdm.py:full --workdir gs://BUCKET/sdm
set -euo pipefail
NAME=${1:?TPU name}; ZONE=${2:?zone}; shift 2
REPO=$(cd "$(dirname "$0")/.." && pwd)
tar -C "$REPO" --exclude=.git --exclude='runs' -czf /tmp/jaxboost.tgz .
gcloud compute tpus tpu-vm scp /tmp/jaxboost.tgz "$NAME":/tmp/ --zone "$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "
  set -e; mkdir -p ~/jaxboost && tar -C ~/jaxboost -xzf /tmp/jaxboost.tgz && cd ~/jaxboost &&
  pip install -q -e '.[tpu]' && $*"
