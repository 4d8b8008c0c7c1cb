#!/usr/bin/env bash
# Trains on every host of a Cloud TPU VM pod slice: the same command runs on all workers, each process joins JAX's
# distributed runtime (Cloud TPU metadata gives the coordinator, process count and index), reads its own shard of
# the data and feeds its rows of the global batch; only process 0 logs and writes images; all take part in saves.
#
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a WORKDIR=gs://bucket/ldm scripts/launch_tpu_pod.sh \
#       --config configs/ldm_base.py --config.vae_workdir=gs://bucket/vae --config.mesh.fsdp=8
#
# Multi-slice (e.g. 2 x v5e-256 over DCN): add --config.mesh.dcn_data=2 (data parallel across slices; mesh.data is
# the total data degree). The repository and its .venv must exist at $REPO on every worker (e.g. set up with
# `gcloud compute tpus tpu-vm ssh --worker=all --command="git clone ... && cd ... && make install"`).
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
: "${WORKDIR:?set WORKDIR (a path every host can write, e.g. gs://...)}"
REPO="${REPO:-~/ldm-jax}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}

# 'yes': call jax.distributed.initialize() and let JAX read the pod topology from the TPU metadata server.
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all --command="
  cd $REPO && DIFFUSION_DISTRIBUTED=yes WANDB_MODE=\${WANDB_MODE:-offline} \
  .venv/bin/python train.py --workdir=$WORKDIR $ARGS 2>&1 | tee -a /tmp/train_\$(hostname).log"
