#!/usr/bin/env bash
# Train on several nodes with the deepspeed launcher:
#   launchers/multinode.sh CONFIG [key.path=value ...] [--resume latest|PATH | --no-resume]
# HOSTFILE (default: launchers/hostfile) lists the nodes, one "HOST slots=RANKS" line each (hostfile.example);
# the world size is the sum of the slots. Two ways to start:
# - from one node (default): the deepspeed launcher starts every node over ssh with pdsh (LAUNCHER=pdsh, or
#   openmpi, mvapich, ...); MASTER_ADDR defaults to the first host's address;
# - one launcher per node (schedulers, or no ssh between nodes): set NODE_RANK (0 .. nodes-1, this node's line
#   in the hostfile) and MASTER_ADDR (node 0's address) on every node; the same command, the same hostfile.
# MASTER_PORT (default 29500) must be free on node 0. DEEPSPEED_ENV (default: launchers/deepspeed_env if it
# exists; see deepspeed_env.example) holds KEY=VALUE lines, NCCL settings for example, exported on every node.
# The config and its layout are checked for the whole world size before any process starts.
# VIDIFF_COMMAND=doctor runs the preflight alone on every rank (vidiff doctor).
set -euo pipefail
config="${1:?usage: launchers/multinode.sh CONFIG [key.path=value ...] [--resume latest|PATH | --no-resume]}"
shift
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
hostfile="${HOSTFILE:-$here/launchers/hostfile}"
[ -f "$hostfile" ] || { echo "multinode.sh: no hostfile at $hostfile (set HOSTFILE; see launchers/hostfile.example)" >&2; exit 2; }
world=$(hostfile_world "$hostfile")
nodes=$(hostfile_nodes "$hostfile")
[ "$world" -gt 0 ] || { echo "multinode.sh: $hostfile lists no 'HOST slots=N' lines" >&2; exit 2; }

env_file="${DEEPSPEED_ENV:-$here/launchers/deepspeed_env}"
if [ -f "$env_file" ]; then
  # Exported here, so the deepspeed launcher forwards them: over pdsh it passes on NCCL_* and PYTHON* variables,
  # and with --no_ssh its ranks inherit this environment.
  while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in ''|'#'*) continue ;; esac
    export "${line?}"
  done < "$env_file"
fi

"$py" -m vidiff check --world-size "$world" "$config" "$@"
args=(--hostfile "$hostfile" --master_port "${MASTER_PORT:-29500}")
[ -z "${MASTER_ADDR:-}" ] || args+=(--master_addr "$MASTER_ADDR")
if [ -n "${NODE_RANK:-}" ]; then
  [ -n "${MASTER_ADDR:-}" ] || { echo "multinode.sh: NODE_RANK needs MASTER_ADDR (node 0's address)" >&2; exit 2; }
  [ "$NODE_RANK" -ge 0 ] && [ "$NODE_RANK" -lt "$nodes" ] || {
    echo "multinode.sh: NODE_RANK=$NODE_RANK, but $hostfile lists $nodes nodes (valid: 0 to $((nodes - 1)))" >&2; exit 2; }
  args+=(--no_ssh --node_rank "$NODE_RANK")
else
  args+=(--launcher "${LAUNCHER:-pdsh}")
fi
exec "$(dirname "$py")/deepspeed" "${args[@]}" --module vidiff "$command" "$config" "$@"
