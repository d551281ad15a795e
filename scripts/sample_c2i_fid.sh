#!/usr/bin/env bash
# 50,000 class-balanced samples with the paper's settings, then the ADM metrics.
#
#   REF_BATCH=VIRTUAL_imagenet256_labeled.npz scripts/sample_c2i_fid.sh L
#   REF_BATCH=... NPROC_PER_NODE=8 BATCH=64 scripts/sample_c2i_fid.sh XL
#
# D-AR-L: linear guidance 1.1 -> 8.0 (paper; the official script uses CFG=1.2,8.0), D-AR-XL:
# 1.1 -> 10.0; temperature 1.0, no top-k / top-p. Sampling is resumable: rerunning with the same
# OUT skips finished shards. Environment (optional unless noted): REF_BATCH (required, an ADM
# reference .npz), GPT_CKPT, GPT_PRESET (empty for checkpoints with a stored config),
# TOKENIZER_CKPT, CFG, SEED, NUM_SAMPLES, BATCH (per process), OUT (folder), FID_WEIGHTS (Inception
# weights for the evaluator, e.g. "pytorch-fid" or a local .pth: needed for the Inception Score), and the torchrun
# settings NPROC_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT. Runs from the repository
# root; extra arguments go to `autoregressive.sample_ddp`. With `--protocol official` among them the protocol
# fixes the sampling settings (cfg 1.2,8.0, temperature 1, no top-k / top-p), so the launcher passes no
# sampling flags of its own (a CFG you set is still passed on, and refused if it contradicts the protocol).
# PYTHON picks the interpreter (default `python`; e.g. PYTHON=.venv/bin/python, no activation needed).
set -euo pipefail

MODEL="${1:-L}"
shift || true
case "$MODEL" in
  L)  DEFAULT_PRESET=GPT-L;  DEFAULT_CFG=1.1,8.0 ;;
  XL) DEFAULT_PRESET=GPT-XL; DEFAULT_CFG=1.1,10.0 ;;
  *)  echo "usage: $0 [L|XL] [extra autoregressive.sample_ddp flags]" >&2; exit 2 ;;
esac
: "${REF_BATCH:?set REF_BATCH to an ADM reference batch, e.g. VIRTUAL_imagenet256_labeled.npz}"

GPT_CKPT="${GPT_CKPT:-showlab/D-AR}"
GPT_PRESET="${GPT_PRESET-$DEFAULT_PRESET}"
TOKENIZER_CKPT="${TOKENIZER_CKPT:-showlab/D-AR}"
SEED="${SEED:-0}"
NUM_SAMPLES="${NUM_SAMPLES:-50000}"
BATCH="${BATCH:-64}"

PROTOCOL=balanced
previous=""
for arg in "$@"; do
  if [[ "$previous" == --protocol ]]; then PROTOCOL="$arg"; fi
  if [[ "$arg" == --protocol=* ]]; then PROTOCOL="${arg#--protocol=}"; fi
  previous="$arg"
done
SAMPLING_ARGS=()
if [[ "$PROTOCOL" == official ]]; then
  if [[ -n "${CFG:-}" ]]; then SAMPLING_ARGS=(--cfg-scale "$CFG"); fi
  OUT="${OUT:-samples/D-AR-$MODEL-official-seed$SEED}"
else
  CFG="${CFG:-$DEFAULT_CFG}"
  SAMPLING_ARGS=(--cfg-scale "$CFG" --temperature 1.0 --top-k 0 --top-p 1.0)
  OUT="${OUT:-samples/D-AR-$MODEL-cfg$CFG-seed$SEED}"
fi

PRESET_ARGS=()
if [[ -n "$GPT_PRESET" ]]; then PRESET_ARGS=(--gpt-preset "$GPT_PRESET"); fi

source "$(dirname "${BASH_SOURCE[0]}")/_torchrun.sh"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
launch_torchrun autoregressive.sample_ddp \
  --gpt-ckpt "$GPT_CKPT" "${PRESET_ARGS[@]}" --tokenizer-ckpt "$TOKENIZER_CKPT" \
  "${SAMPLING_ARGS[@]}" --seed "$SEED" \
  --num-samples "$NUM_SAMPLES" --per-proc-batch-size "$BATCH" --out "$OUT" "$@"

if [[ "${NODE_RANK:-0}" == 0 ]]; then
  "$PYTHON" -m evaluations.evaluator "$REF_BATCH" "$OUT/samples.npz" --json "$OUT/metrics.json" \
    ${FID_WEIGHTS:+--weights "$FID_WEIGHTS"}
fi
