#!/usr/bin/env bash
# Runs diffax on every worker of a Cloud TPU VM pod slice (one process per host).
#
#   TPU_NAME=my-v5e-64 ZONE=us-west4-a launch/tpu_pod.sh \
#       --config=experiments/imagenet64.py --workdir=gs://my-bucket/runs/in64
#
# The repository must already be at ~/diffax on every worker with diffax installed (e.g. the same
# command with `pip install -e .`; see the README). --distributed makes each process call
# jax.distributed.initialize(), which reads the pod's topology from the TPU metadata. The workdir
# must be reachable from all workers (a GCS bucket). Preemption sends SIGTERM: the run saves and
# stops, and running the same command again resumes from the newest checkpoint.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
repo=${REPO_DIR:-"\$HOME/diffax"}  # expanded on the workers
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all \
  --command="cd $repo && python -m diffax.main --distributed$args"
