#!/usr/bin/env bash
# Elastic training: launchers/elastic.sh CONFIG [key.path=value ...] [--resume latest|PATH]
# torchrun with a c10d rendezvous runs `vidiff train` on NPROC ranks per node (default: every GPU, or 2 CPU ranks
# with gloo when there is none) over NNODES nodes (MIN:MAX, default 1:1). When a rank dies, torchrun stops the
# group and starts it again (up to MAX_RESTARTS times, default 3), on whatever world size the rendezvous then
# yields; every start resumes from checkpoints/latest, converting the checkpoint when the world size changed.
# Start the same command on every node; RDZV_ENDPOINT (host:port of one node, default 127.0.0.1:29400) and
# RDZV_ID (default: the config's file name) must agree. The config is checked for the smallest and the largest
# world size before any process starts.
set -euo pipefail
config="${1:?usage: launchers/elastic.sh CONFIG [key.path=value ...] [--resume latest|PATH]}"
shift
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
nnodes="${NNODES:-1:1}"
min_nodes="${nnodes%%:*}"
max_nodes="${nnodes##*:}"

for nodes in $(printf '%s\n' "$min_nodes" "$max_nodes" | sort -u); do
  "$py" -m vidiff check --world-size "$((nodes * nproc))" "$config" "$@"
done
# The workers' process group gets a store of its own each round: with the agent's store shared (torch's default),
# a restarted group can read the dead group's addresses and hang connecting (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
exec "$(dirname "$py")/torchrun" --nnodes "$nnodes" --nproc-per-node "$nproc" \
  --max-restarts "${MAX_RESTARTS:-3}" --rdzv-backend c10d --rdzv-endpoint "${RDZV_ENDPOINT:-127.0.0.1:29400}" \
  --rdzv-id "${RDZV_ID:-$(basename "$config" .yaml)}" -m vidiff train "$config" "$@"
