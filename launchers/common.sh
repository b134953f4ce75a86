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

# A deepspeed hostfile's ranks (the sum of its slots) and nodes ("HOST slots=N" lines; # comments).
hostfile_world() { awk '!/^[[:space:]]*(#|$)/ { for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) { sub("slots=", "", $i); n += $i } } END { print n + 0 }' "$1"; }
hostfile_nodes() { awk '!/^[[:space:]]*(#|$)/ { n++ } END { print n + 0 }' "$1"; }

# What the launchers run on every rank: `vidiff train` (default) or the preflight alone (VIDIFF_COMMAND=doctor).
command="${VIDIFF_COMMAND:-train}"
case "$command" in
  train|doctor) ;;
  *) echo "launchers: VIDIFF_COMMAND=$command; valid: train, doctor" >&2; exit 2 ;;
esac
