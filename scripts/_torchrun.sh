# Sourced by the launchers in this folder (not run on its own).
#
# launch_torchrun MODULE [ARGS...] runs `torchrun ... -m MODULE ARGS...` with the usual multi-node
# variables: NPROC_PER_NODE (default: every visible GPU, else 1), NNODES (1), NODE_RANK (0),
# MASTER_ADDR (localhost), MASTER_PORT (29500).
launch_torchrun() {
  local nproc="${NPROC_PER_NODE:-}"
  if [[ -z "$nproc" ]]; then
    nproc=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)
    [[ "$nproc" -ge 1 ]] 2>/dev/null || nproc=1
  fi
  local module="$1"
  shift
  torchrun \
    --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --nproc_per_node="$nproc" \
    --master_addr="${MASTER_ADDR:-localhost}" --master_port="${MASTER_PORT:-29500}" \
    -m "$module" "$@"
}
