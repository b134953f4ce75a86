# Sourced by the launchers: $here (the repository), $py (its Python) and $nproc (ranks per node: NPROC, or every
# GPU, or 2 CPU ranks with gloo when there is none; DS_ACCELERATOR=cpu is exported then).
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${VIDIFF_PYTHON:-$here/.venv/bin/python}"
[ -x "$py" ] || py=python3
gpus=$("$py" -c 'import torch; print(torch.cuda.device_count())')
if [ "$gpus" -gt 0 ]; then
  nproc="${NPROC:-$gpus}"
else
  export DS_ACCELERATOR=cpu
  nproc="${NPROC:-2}"
fi
