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
set -euo pipefail

: "${DATA_PATH:?set DATA_PATH to the evaluation image folder}"
CKPT="${CKPT:-showlab/D-AR}"
OUT="${OUT:-results/recon_v1.npz}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)
  [[ "$NPROC_PER_NODE" -ge 1 ]] 2>/dev/null || NPROC_PER_NODE=1
fi

cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$(dirname "$OUT")"
exec torchrun \
  --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --nproc_per_node="$NPROC_PER_NODE" \
  --master_addr="${MASTER_ADDR:-localhost}" --master_port="${MASTER_PORT:-29500}" \
  -m tokenizer.reconstruct --ckpt "$CKPT" --data-path "$DATA_PATH" --out "$OUT" \
  --steps 8 --sampler adams2 --image-size 256 "$@"
