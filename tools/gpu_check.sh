#!/usr/bin/env bash
# Every device path end to end on this machine's GPUs, in a few minutes: VAE training (fp32 and bf16), resume,
# cache-latents, the DiT on pixel shards and on latent shards (fp32 on TF32 and bf16), resume, both parallel
# layouts where the GPUs allow (the pipeline layout and tensor parallelism need 2), sampling to mp4, the cascade's
# three stages trained and sampled with an image, and the training throughput benchmark. One JSON line per path: {"path", "ok", "seconds", ...figures}; exit status 1
# if any path failed. Logs under $GPU_CHECK_OUT (default runs/gpu-check).
#
#   tools/gpu_check.sh                          # on a GPU machine (CPU tests cannot see device bugs)
#   GPU_CHECK_ALLOW_CPU=1 tools/gpu_check.sh    # the same paths on 2 CPU ranks: checks the script itself
set -uo pipefail
cd "$(dirname "$0")/.."
py="${VIDIFF_PYTHON:-.venv/bin/python}"
out="${GPU_CHECK_OUT:-runs/gpu-check}"
gpus=$("$py" -c 'import torch; print(torch.cuda.device_count())')
if [ "$gpus" -eq 0 ] && [ -z "${GPU_CHECK_ALLOW_CPU:-}" ]; then
  echo '{"path": "gpu", "ok": false, "error": "no CUDA GPU on this machine (GPU_CHECK_ALLOW_CPU=1 runs the paths on CPU)"}'
  exit 1
fi
export NPROC="${NPROC:-$([ "$gpus" -gt 0 ] && echo "$gpus" || echo 2)}"
export VIDIFF_PYTHON="$py" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
rm -rf "$out" && mkdir -p "$out"
failed=0

# check NAME COMMAND...: run it, log to $out/NAME.log, print its JSON line (figures from $out/NAME.json if the
# command wrote one).
check() {
  local name=$1; shift
  local start=$SECONDS ok=true
  current=$name
  "$@" > "$out/$name.log" 2>&1 || ok=false
  [ "$ok" = true ] || failed=1
  "$py" - "$name" "$ok" "$((SECONDS - start))" "$out" <<'EOF'
import json, sys
from pathlib import Path
name, ok, seconds, out = sys.argv[1], sys.argv[2] == "true", int(sys.argv[3]), Path(sys.argv[4])
line = {"path": name, "ok": ok, "seconds": seconds}
figures = out / f"{name}.json"
if figures.is_file():
    line.update(json.loads(figures.read_text()))
if not ok:
    line["log_tail"] = (out / f"{name}.log").read_text()[-800:]
print(json.dumps(line), flush=True)
EOF
}

# figures RUN NAME: the last train/loss, grad norm and throughput of a run, for its JSON line.
figures() {
  "$py" - "$1" "$out/$2.json" <<'EOF'
import json, math, sys
from pathlib import Path
from vidiff.train.monitor import read_scalars
run, target = Path(sys.argv[1]), Path(sys.argv[2])
found = {}
for tag in ("train/loss", "train/grad_norm", "perf/samples_per_s", "perf/mfu", "eval/psnr"):
    values = read_scalars(run, tag)
    if values:
        found[tag] = round(values[max(values)], 4)
assert found and all(math.isfinite(v) for v in found.values()), found
found["step"] = max(read_scalars(run, "train/loss"))
target.write_text(json.dumps(found))
EOF
}

train() {               # train RUN CONFIG [overrides]: launch into $out/RUN, then record the check's figures
  local run=$1 config=$2; shift 2
  launchers/local.sh "$config" out_dir="$out/$run" "$@" && figures "$out/$run" "$current"
}

data=(data.shards="$out/shards" "data.buckets=[[9,64,64]]")
vae=("${data[@]}" vae.base_channels=16 vae.latent_channels=8 train.log_every=1 train.checkpoint_every=10
     train.eval_every=10 data.eval_shards="$out/shards" train.eval_batches=1)
dit=("${data[@]}" vae.checkpoint="$out/vae" model.hidden_size=128 model.depth=2 model.num_heads=4 train.log_every=1
     train.checkpoint_every=10 train.ema_decay=0.99 sample.steps=6 "sample.prompts=[a red square moving right]")

check shards "$py" -m vidiff shards --synthetic 64 --frames 9 --height 64 --width 64 --out "$out/shards" --max-count 16
check vae train vae configs/vae/demo.yaml "${vae[@]}" train.steps=10
check vae_resume train vae configs/vae/demo.yaml "${vae[@]}" train.steps=20
grep -q "resumed from step 10" "$out/vae_resume.log" || { failed=1; echo '{"path": "vae_resume", "ok": false, "error": "did not resume from step 10"}'; }
check vae_bf16 train vae-bf16 configs/vae/demo.yaml "${vae[@]}" train.steps=10 parallel.precision=bf16
check dit_pixels train dit configs/demo.yaml "${dit[@]}" train.steps=10
check dit_resume train dit configs/demo.yaml "${dit[@]}" train.steps=20
grep -q "resumed from step 10" "$out/dit_resume.log" || { failed=1; echo '{"path": "dit_resume", "ok": false, "error": "did not resume from step 10"}'; }
check dit_bf16 train dit-bf16 configs/demo.yaml "${dit[@]}" train.steps=10 parallel.precision=bf16
check cache_latents "$py" -m vidiff cache-latents configs/demo.yaml "${dit[@]}" --out "$out/latents" --text
check dit_latents train dit-latents configs/demo.yaml "${dit[@]}" data.shards="$out/latents" train.steps=10
if [ "$NPROC" -ge 2 ]; then
  check pipeline train dit-pipeline configs/demo.yaml "${dit[@]}" train.steps=10 parallel.pipeline=2
  check tensor_parallel train dit-tp configs/demo.yaml "${dit[@]}" train.steps=10 parallel.tensor=2
  check pipeline_bf16 train dit-pipeline-bf16 configs/demo.yaml "${dit[@]}" train.steps=10 parallel.pipeline=2 \
    parallel.precision=bf16
else
  echo '{"path": "pipeline", "ok": null, "skipped": "the pipeline layout and tensor parallelism need 2 GPUs"}'
fi
sample_check() {
  "$py" -m vidiff sample configs/demo.yaml "${dit[@]}" out_dir="$out/dit" && "$py" - "$out/dit" "$out/$current.json" <<'EOF'
import json, sys
from pathlib import Path
import av
mp4s = sorted(Path(sys.argv[1]).glob("samples/*/*.mp4"))
with av.open(str(mp4s[0])) as container:
    frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
assert len(frames) == 9 and frames[0].shape == (64, 64, 3), (len(frames), frames[0].shape)
Path(sys.argv[2]).write_text(json.dumps({"mp4": str(mp4s[0]), "frames": len(frames)}))
EOF
}
check sample sample_check
# The cascade: an image-to-video base, a tsr stage in bf16 and an ssr stage, each trained briefly on the pixel
# shards (their conditions made on the device), then `vidiff sample --cascade --image` to an mp4 of the last size.
cascade=("${dit[@]}" train.steps=5 train.checkpoint_every=5)
check cascade_base train cascade-base configs/demo.yaml "${cascade[@]}" stage=base cascade.image_prob=0.5 \
  "data.buckets=[[5,32,32]]"
check cascade_tsr train cascade-tsr configs/demo.yaml "${cascade[@]}" stage=tsr "data.buckets=[[9,32,32]]" \
  parallel.precision=bf16
check cascade_ssr train cascade-ssr configs/demo.yaml "${cascade[@]}" stage=ssr "data.buckets=[[9,64,64]]"
cascade_sample() {
  "$py" - "$out" <<'EOF'
import sys
from pathlib import Path
import numpy as np
import yaml
from PIL import Image
out = Path(sys.argv[1])
Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(out / "first_frame.png")
stage = {"steps": 3, "guidance": 1.0}
(out / "cascade.yaml").write_text(yaml.safe_dump({
    "prompts": ["a red square moving right"], "out": str(out / "cascade-samples"),
    "base": {"run": str(out / "cascade-base"), "steps": 3, "guidance": 3.0},
    "tsr": {"run": str(out / "cascade-tsr"), **stage, "aug_sigma": 0.1},
    "ssr": {"run": str(out / "cascade-ssr"), **stage, "aug_sigma": 0.1}}))
EOF
  "$py" -m vidiff sample --cascade "$out/cascade.yaml" --image "$out/first_frame.png" && \
  "$py" - "$out/cascade-samples" "$out/$current.json" <<'EOF'
import json, sys
from pathlib import Path
import av
mp4 = sorted(Path(sys.argv[1]).glob("*.mp4"))[0]
with av.open(str(mp4)) as container:
    frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
assert len(frames) == 9 and frames[0].shape == (64, 64, 3), (len(frames), frames[0].shape)
Path(sys.argv[2]).write_text(json.dumps({"mp4": str(mp4), "frames": len(frames)}))
EOF
}
check cascade_sample cascade_sample
bench() { "$py" tools/bench_train.py --steps 3 --warmup 2 | tail -n 1 > "$out/$current.json"; }
if [ "$gpus" -gt 0 ]; then
  check bench_train bench                   # XL in bf16 on one GPU: tokens/s and MFU (perf/mfu's FLOP count)
fi
exit $failed
