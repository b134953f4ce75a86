#!/usr/bin/env bash
# Train on this machine: launchers/local.sh CONFIG [key.path=value ...] [--resume latest|PATH | --no-resume]
# NPROC ranks (default: every GPU, or 2 CPU ranks with gloo when there is none). The config is checked before any
# process starts (its layout too: tensor x pipeline must divide NPROC); a bad one exits 2 with the key named.
# VIDIFF_COMMAND=doctor runs the preflight alone on every rank (vidiff doctor).
set -euo pipefail
config="${1:?usage: launchers/local.sh CONFIG [key.path=value ...] [--resume latest|PATH | --no-resume]}"
shift
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# The config and its parallel layout on this many ranks, checked before any process starts.
"$py" -m vidiff check --world-size "$nproc" "$config" "$@"
port="${MASTER_PORT:-$((29500 + RANDOM % 1000))}"
exec "$(dirname "$py")/deepspeed" --num_gpus "$nproc" --master_port "$port" --module vidiff "$command" "$config" "$@"
