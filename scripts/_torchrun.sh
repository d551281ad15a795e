# Sourced by the launchers in this folder (not run on its own).
#
# PYTHON names the interpreter every launcher runs (default: the first `python` on PATH). Set it to
# a virtual environment's interpreter, e.g. PYTHON=.venv/bin/python, to use that environment without
# activating it: nothing else is looked up on PATH (no `torchrun` script is needed; torchrun is
# `python -m torch.distributed.run`). A relative PYTHON is taken from the directory the launcher was
# started in, before the launcher changes to the repository root.
#
# launch_torchrun MODULE [ARGS...] runs `$PYTHON -m torch.distributed.run ... -m MODULE ARGS...` with
# the usual multi-node variables: NPROC_PER_NODE (default: every visible GPU, else 1), NNODES (1),
# NODE_RANK (0), MASTER_ADDR (localhost), MASTER_PORT (29500).
PYTHON="${PYTHON:-python}"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "error: Python interpreter '$PYTHON' not found; set PYTHON to the python that has the requirements installed (e.g. PYTHON=.venv/bin/python)" >&2
  exit 2
fi
if [[ "$PYTHON" == */* ]]; then
  PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")"
fi

launch_torchrun() {
  local nproc="${NPROC_PER_NODE:-}"
  if [[ -z "$nproc" ]]; then
    nproc=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)
    [[ "$nproc" -ge 1 ]] 2>/dev/null || nproc=1
  fi
  local module="$1"
  shift
  "$PYTHON" -m torch.distributed.run \
    --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --nproc_per_node="$nproc" \
    --master_addr="${MASTER_ADDR:-localhost}" --master_port="${MASTER_PORT:-29500}" \
    -m "$module" "$@"
}
