#!/usr/bin/env bash
# Train the D-AR tokenizer with the official v1 recipe (configs/tokenizer/train_v1.yaml) under torchrun.
#
#   DATA_PATH=/data/imagenet/train scripts/train_tokenizer.sh
#   DATA_PATH=... RESULTS_DIR=results/tok_ft scripts/train_tokenizer.sh --init-from showlab/D-AR --max-steps 20000
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NPROC_PER_NODE=8 DATA_PATH=... scripts/train_tokenizer.sh \
#       --global-batch-size 1024 --max-steps 210000          # paper recipe on 16 GPUs
#
# The run resumes from its latest checkpoint when relaunched (--resume auto), so the same command
# continues a preempted job. Environment: DATA_PATH (required), CONFIG (default
# configs/tokenizer/train_v1.yaml), RESULTS_DIR (default results/tokenizer_v1), NPROC_PER_NODE
# (default: all visible GPUs, else 1), NNODES (1), NODE_RANK (0), MASTER_ADDR (localhost),
# MASTER_PORT (29500). Runs from the repository root, so relative paths are relative to it; extra
# arguments go to `python -m tokenizer.train` (e.g. --wandb, --compile, --dinov2-weights FILE).
# PYTHON picks the interpreter (default `python`; e.g. PYTHON=.venv/bin/python, no activation needed).
set -euo pipefail

: "${DATA_PATH:?set DATA_PATH to the training image folder}"
CONFIG="${CONFIG:-configs/tokenizer/train_v1.yaml}"
RESULTS_DIR="${RESULTS_DIR:-results/tokenizer_v1}"

source "$(dirname "${BASH_SOURCE[0]}")/_torchrun.sh"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
launch_torchrun tokenizer.train --config "$CONFIG" --data-path "$DATA_PATH" --results-dir "$RESULTS_DIR" \
  --resume auto "$@"
