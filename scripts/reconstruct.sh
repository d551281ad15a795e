#!/usr/bin/env bash
# Reconstruction eval of a tokenizer (paper setting: 8 Adams-2 steps, ADM centre crop 256): writes
# the reconstructions and reference .npz for the ADM evaluator (rFID), prints PSNR / SSIM, and a
# grid PNG of input | reconstruction | streaming previews.
#
#   DATA_PATH=/data/imagenet/val scripts/reconstruct.sh                       # official v1 tokenizer
#   CKPT=results/tokenizer_v1/final DATA_PATH=... OUT=results/recon.npz scripts/reconstruct.sh --steps 4
#   python -m evaluations.evaluator results/recon_v1_ref.npz results/recon_v1.npz     # then rFID
#
# Environment: DATA_PATH (required), CKPT (default: the showlab/D-AR hub repo), OUT (default
# results/recon_v1.npz), NPROC_PER_NODE (default: all visible GPUs, else 1), NNODES, NODE_RANK,
# MASTER_ADDR, MASTER_PORT. Runs from the repository root, so relative paths are relative to it;
# extra arguments go to `python -m tokenizer.reconstruct` (later flags win, e.g. --steps 4).
# PYTHON picks the interpreter (default `python`; e.g. PYTHON=.venv/bin/python, no activation needed).
set -euo pipefail

: "${DATA_PATH:?set DATA_PATH to the evaluation image folder}"
CKPT="${CKPT:-showlab/D-AR}"
OUT="${OUT:-results/recon_v1.npz}"

source "$(dirname "${BASH_SOURCE[0]}")/_torchrun.sh"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$(dirname "$OUT")"
launch_torchrun tokenizer.reconstruct --ckpt "$CKPT" --data-path "$DATA_PATH" --out "$OUT" \
  --steps 8 --sampler adams2 --image-size 256 "$@"
