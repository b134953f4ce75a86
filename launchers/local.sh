#!/usr/bin/env bash
# Train on this machine: launchers/local.sh CONFIG [key.path=value ...]
# NPROC ranks (default: every GPU, or 2 CPU ranks with gloo when there is none). The config is checked
# before any process starts (its layout too: tensor x pipeline must divide NPROC); a bad one exits 2 with the
# key named.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${VIDIFF_PYTHON:-$here/.venv/bin/python}"
[ -x "$py" ] || py=python3
config="${1:?usage: launchers/local.sh CONFIG [key.path=value ...]}"
shift

gpus=$("$py" -c 'import torch; print(torch.cuda.device_count())')
if [ "$gpus" -gt 0 ]; then
  nproc="${NPROC:-$gpus}"
else
  export DS_ACCELERATOR=cpu
  nproc="${NPROC:-2}"
fi

# The config and its parallel layout on this many ranks, checked before any process starts.
"$py" -m vidiff check --world-size "$nproc" "$config" "$@"
port="${MASTER_PORT:-$((29500 + RANDOM % 1000))}"
exec "$(dirname "$py")/deepspeed" --num_gpus "$nproc" --master_port "$port" --module vidiff train "$config" "$@"
