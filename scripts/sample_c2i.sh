#!/usr/bin/env bash
# Class-conditional sample grid (plus streaming previews and a GIF) with the paper's settings.
#
#   scripts/sample_c2i.sh L            # D-AR-L: linear guidance 1.1 -> 8.0 (official script: CFG=1.2,8.0)
#   scripts/sample_c2i.sh XL           # D-AR-XL: linear guidance 1.1 -> 10.0
#   CFG=1.2,8.0 LABELS=207,360 scripts/sample_c2i.sh L --samples-per-label 8
#
# Environment (all optional): GPT_CKPT, GPT_PRESET (set empty for checkpoints that store their
# config), TOKENIZER_CKPT (default: the showlab/D-AR hub repo), CFG, LABELS, SEED, OUT (output
# prefix). Runs from the repository root, so relative paths are relative to it; extra arguments go
# to `python -m autoregressive.sample`. Paper settings: temperature 1.0, no top-k / top-p.
# PYTHON picks the interpreter (default `python`; e.g. PYTHON=.venv/bin/python, no activation needed).
set -euo pipefail

MODEL="${1:-L}"
shift || true
case "$MODEL" in
  L)  DEFAULT_PRESET=GPT-L;  DEFAULT_CFG=1.1,8.0 ;;
  XL) DEFAULT_PRESET=GPT-XL; DEFAULT_CFG=1.1,10.0 ;;
  *)  echo "usage: $0 [L|XL] [extra autoregressive.sample flags]" >&2; exit 2 ;;
esac

GPT_CKPT="${GPT_CKPT:-showlab/D-AR}"
GPT_PRESET="${GPT_PRESET-$DEFAULT_PRESET}"
TOKENIZER_CKPT="${TOKENIZER_CKPT:-showlab/D-AR}"
CFG="${CFG:-$DEFAULT_CFG}"
LABELS="${LABELS:-207,360,387,974,88,979,417,279}"
SEED="${SEED:-0}"
OUT="${OUT:-samples/D-AR-$MODEL}"

PRESET_ARGS=()
if [[ -n "$GPT_PRESET" ]]; then PRESET_ARGS=(--gpt-preset "$GPT_PRESET"); fi

source "$(dirname "${BASH_SOURCE[0]}")/_torchrun.sh"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$(dirname "$OUT")"
"$PYTHON" -m autoregressive.sample \
  --gpt-ckpt "$GPT_CKPT" "${PRESET_ARGS[@]}" --tokenizer-ckpt "$TOKENIZER_CKPT" \
  --labels "$LABELS" --cfg-scale "$CFG" --temperature 1.0 --top-k 0 --top-p 1.0 --seed "$SEED" \
  --out "$OUT.png" --previews "$OUT-previews.png" --gif "$OUT.gif" "$@"
