#!/usr/bin/env bash
# Train the class-conditional GPT on extracted codes with the paper recipe (configs/ar/*.yaml:
# batch 1024, 300 epochs, AdamW 4e-4, linear decay over the last 50 epochs, bf16) under torchrun.
#
#   CODE_PATH=codes/imagenet256_tencrop scripts/train_c2i.sh                      # GPT-L
#   CONFIG=configs/ar/gpt_xl.yaml CODE_PATH=... scripts/train_c2i.sh --ema-decay 0.9999
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 CONFIG=configs/ar/gpt_xxl.yaml CODE_PATH=... scripts/train_c2i.sh
#
# The run resumes from its latest checkpoint when relaunched (--resume auto), so the same command
# continues a preempted job. Environment: CODE_PATH (required; from scripts/extract_codes.sh),
# CONFIG (default configs/ar/gpt_l.yaml), RESULTS_DIR (default results/<config name>),
# NPROC_PER_NODE (default: all visible GPUs, else 1), NNODES (1), NODE_RANK (0), MASTER_ADDR
# (localhost), MASTER_PORT (29500). Runs from the repository root, so relative paths are relative
# to it; extra arguments go to `python -m autoregressive.train` (e.g. --wandb, --compile, --fsdp).
# PYTHON picks the interpreter (default `python`; e.g. PYTHON=.venv/bin/python, no activation needed).
set -euo pipefail

: "${CODE_PATH:?set CODE_PATH to a folder written by scripts/extract_codes.sh}"
CONFIG="${CONFIG:-configs/ar/gpt_l.yaml}"
RESULTS_DIR="${RESULTS_DIR:-results/$(basename "$CONFIG" .yaml)}"

source "$(dirname "${BASH_SOURCE[0]}")/_torchrun.sh"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
launch_torchrun autoregressive.train --config "$CONFIG" --code-path "$CODE_PATH" --results-dir "$RESULTS_DIR" \
  --resume auto "$@"
