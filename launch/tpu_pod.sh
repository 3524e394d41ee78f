#!/usr/bin/env bash
# Train cac_jax on a Cloud TPU VM slice (every worker runs the same command).
#
#   launch/tpu_pod.sh [--dry-run] STEP...
#
# STEPs, each idempotent, in order:
#   create    queue a TPU VM slice (queued resource) and wait until it is ACTIVE
#   setup     copy the repo to every worker; make .venv there; install the pinned
#             requirements and jax[tpu]
#   train     start `python -m cac_jax.main --multihost` on all workers (in the
#             background, under nohup), same config and workdir everywhere
#   logs      stream worker 0's log
#   delete    delete the slice and its queued resource
#   all       create setup train logs
#
# Parameters (environment variables):
#   PROJECT (required), ZONE=us-central2-b, ACCELERATOR=v4-32, NAME=cac-jax,
#   RUNTIME=tpu-ubuntu2204-base, CONFIG=configs/voc_r50.py:split=1323,
#   WORKDIR (required for train: gs://bucket/run, shared by all workers),
#   EXTRA_FLAGS (more --config.x=y flags, e.g. data root and init_from),
#   JAX_TPU_VERSION (pip spec, default jax[tpu] at the pinned jax version).
#
# --dry-run prints every gcloud command instead of running it.
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
[[ $# -ge 1 ]] || { sed -n '2,26p' "$0"; exit 2; }

PROJECT="${PROJECT:-}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR="${ACCELERATOR:-v4-32}"
NAME="${NAME:-cac-jax}"
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
CONFIG="${CONFIG:-configs/voc_r50.py:split=1323}"
WORKDIR="${WORKDIR:-}"
EXTRA_FLAGS="${EXTRA_FLAGS:-}"
REPO_DIR="$(cd "$(dirname "$0")/.." && pwd)"
JAX_VERSION="$(sed -n 's/^jax==//p' "$REPO_DIR/requirements.txt")"
JAX_TPU_VERSION="${JAX_TPU_VERSION:-jax[tpu]==$JAX_VERSION}"
REMOTE_DIR=cac_jax  # relative to the remote home directory
LOG=train.log  # in REMOTE_DIR

[[ -n "$PROJECT" ]] || { echo "error: set PROJECT=<gcp project id>" >&2; exit 2; }

run() {  # run or print one command
  if (( DRY_RUN )); then printf '%q ' "$@"; printf '\n'; else "$@"; fi
}

gtpu() { run gcloud compute tpus tpu-vm "$@" --project="$PROJECT" --zone="$ZONE"; }

on_all_workers() { gtpu ssh "$NAME" --worker=all --command="$1"; }

step_create() {
  if (( ! DRY_RUN )) && gcloud compute tpus tpu-vm describe "$NAME" --project="$PROJECT" \
      --zone="$ZONE" >/dev/null 2>&1; then
    echo "slice $NAME exists; skipping create"; return
  fi
  run gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" \
    --project="$PROJECT" --zone="$ZONE" --accelerator-type="$ACCELERATOR" \
    --runtime-version="$RUNTIME"
  if (( DRY_RUN )); then
    run gcloud compute tpus queued-resources describe "$NAME" --project="$PROJECT" --zone="$ZONE"
    return
  fi
  until [[ "$(gcloud compute tpus queued-resources describe "$NAME" --project="$PROJECT" \
      --zone="$ZONE" --format='value(state.state)')" == ACTIVE ]]; do sleep 30; done
}

step_setup() {
  on_all_workers "mkdir -p $REMOTE_DIR"
  gtpu scp --recurse --worker=all "$REPO_DIR/cac_jax" "$REPO_DIR/configs" \
    "$REPO_DIR/requirements.txt" "$NAME:$REMOTE_DIR/"
  # TPU VM images ship an older Python; uv provides 3.12. torch is a test-only
  # reference and is left out on the workers.
  on_all_workers "cd $REMOTE_DIR && pip install -q --user uv && \
(test -d .venv || ~/.local/bin/uv venv --python 3.12 .venv) && \
grep -v '^torch==' requirements.txt > requirements-tpu.txt && \
~/.local/bin/uv pip install -q --python .venv/bin/python -r requirements-tpu.txt '$JAX_TPU_VERSION'"
}

step_train() {
  [[ -n "$WORKDIR" ]] || { echo "error: set WORKDIR=gs://<bucket>/<run> (shared by all workers)" >&2; exit 2; }
  # Same command on every worker; --multihost makes each call
  # jax.distributed.initialize(), which discovers the slice's topology. Rerunning
  # this step resumes from the latest checkpoint in WORKDIR.
  on_all_workers "cd $REMOTE_DIR && nohup .venv/bin/python -m cac_jax.main --multihost \
--config=$CONFIG --workdir=$WORKDIR $EXTRA_FLAGS > $LOG 2>&1 &"
}

step_logs() { gtpu ssh "$NAME" --worker=0 --command="tail -n +1 -F $REMOTE_DIR/$LOG"; }

step_delete() {
  run gcloud compute tpus queued-resources delete "$NAME" --project="$PROJECT" \
    --zone="$ZONE" --force --quiet
}

for step in "$@"; do
  case "$step" in
    create|setup|train|logs|delete) "step_$step" ;;
    all) step_create; step_setup; step_train; step_logs ;;
    *) echo "error: unknown step '$step' (create|setup|train|logs|delete|all)" >&2; exit 2 ;;
  esac
done
