#!/usr/bin/env bash
# Encode an image folder into ten-crop code shards for AR training (the paper recipe) under torchrun.
#
#   DATA_PATH=/data/imagenet/train scripts/extract_codes.sh
#   DATA_PATH=... TOKENIZER_CKPT=results/tokenizer_v1/final CODE_PATH=codes/mine scripts/extract_codes.sh
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 DATA_PATH=... scripts/extract_codes.sh    # second node
#
# An interrupted extraction continues when the same command is run again (complete shards are
# kept). Environment: DATA_PATH (required), TOKENIZER_CKPT (default: the showlab/D-AR hub repo's
# v1 tokenizer), CODE_PATH (default codes/imagenet256_tencrop), IMAGE_SIZE (256), BATCH_SIZE
# (images per GPU, 64), NPROC_PER_NODE (default: all visible GPUs, else 1), NNODES (1), NODE_RANK
# (0), MASTER_ADDR (localhost), MASTER_PORT (29500). Runs from the repository root, so relative
# paths are relative to it; extra arguments go to `python -m tokenizer.extract_codes`.
# PYTHON picks the interpreter (default `python`; e.g. PYTHON=.venv/bin/python, no activation needed).
set -euo pipefail

: "${DATA_PATH:?set DATA_PATH to the image folder (class sub-folders give the labels)}"
TOKENIZER_CKPT="${TOKENIZER_CKPT:-showlab/D-AR}"
CODE_PATH="${CODE_PATH:-codes/imagenet256_tencrop}"

source "$(dirname "${BASH_SOURCE[0]}")/_torchrun.sh"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
launch_torchrun tokenizer.extract_codes --tokenizer-ckpt "$TOKENIZER_CKPT" --data-path "$DATA_PATH" --out "$CODE_PATH" \
  --ten-crop --image-size "${IMAGE_SIZE:-256}" --batch-size "${BATCH_SIZE:-64}" "$@"
