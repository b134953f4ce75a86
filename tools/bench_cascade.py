"""The cascade benchmark on the moving-shapes ground truth: train the three stages, measure each super-resolution
stage against classical upsampling and the full cascade against a single-stage model.

    python tools/bench_quality.py --root R          # first: the VAE (R/vae) the cascade starts from
    python tools/bench_cascade.py --root R [--ranks 2] [--skip-train] [--vae-steps N]
                                  [--steps base=N,tsr=N,ssr=N] [--single-steps N] [--gif docs/cascade/stages.gif]

Shards: the cascade's final size and frame rate (the last stage's bucket, sample.yaml's fps: 17x48x48 at 16 fps,
one second as the quality benchmark's 9 frames at 8 fps) are made here as pixel shards, R/cascade/shards and
R/cascade/heldout (vidiff shards --synthetic, the quality benchmark's clip counts and splits). The VAE is R/vae, or
with --vae-steps R/vae trained on to N steps on those shards (its last checkpoint resumed with the longer schedule)
into R/cascade/vae; both sides sample through it, and its minutes count on neither. Stages, each through the normal
launcher, each timed: configs/cascade/{base,tsr,ssr}.yaml on R/cascade/shards with that VAE (the stages read pixel
clips and make their conditions on the fly), into R/cascade/<stage>. The single-stage reference samples the final
size: R/dit when it does, or with --single-steps a run of configs/bench/shapes_cpu.yaml at the final size and that
many steps trained here with that VAE (cache-latents included in its minutes) into R/cascade/single. Then
vidiff/eval/cascade.py on held-out clips and prompts, sampled with configs/cascade/sample.yaml's order, steps,
guidance, augmentation and start levels.
Prints one JSON line: per stage its training minutes (wall, and CPU minutes of all its processes), frames, size,
network evaluations and seconds per clip; the tsr and ssr figures beside their baselines; the cascade's and the
single-stage model's checker pass rates; the training-minute ratio of the two sides, wall and CPU (measured in this
run; with --skip-train wall minutes read from the runs' TensorBoard logs).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_quality import HELDOUT_CLIPS, TRAIN_CLIPS  # noqa: E402  (tools/, this script's folder)

STAGES = ("base", "tsr", "ssr")
SINGLE_CONFIG = REPO / "configs/bench/shapes_cpu.yaml"
VAE_CONFIG = REPO / "configs/bench/shapes_vae.yaml"


CPU_MINUTES: dict[str, float] = {}            # per timed command: user + system CPU minutes of all its processes


def _run(*cmd: str, env: dict | None = None, name: str = "") -> float:
    """Run a command from the repository root; wall minutes taken. Its processes' CPU minutes (every rank and
    worker, waited for by the launcher) are added to CPU_MINUTES[name]: unlike wall time, they do not grow when
    something else shares the machine."""
    start, before = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(list(cmd), cwd=REPO, check=True, env={**os.environ, **(env or {})})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / 60
    CPU_MINUTES[name] = CPU_MINUTES.get(name, 0.0) + cpu
    return (time.monotonic() - start) / 60


def logged_minutes(run: Path, since: int = 0) -> float:
    """A run's training time from step `since` (where it was resumed) from its TensorBoard log: the wall time from
    the first to the last logged step, plus the steps before the first log line at the logged rate. Only the last
    training counts: a folder retrained with --no-resume keeps the earlier runs' event files, and a logged step
    lower than the one before it marks where the last training started."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    times = []
    for path in sorted((run / "tb").glob("**/events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        if "train/loss" in acc.Tags()["scalars"]:
            times += [(e.step, e.wall_time) for e in acc.Scalars("train/loss")]
    times.sort(key=lambda entry: entry[1])
    restarts = [i for i in range(1, len(times)) if times[i][0] <= times[i - 1][0]]
    times = times[restarts[-1]:] if restarts else times
    if len(times) < 2:
        raise SystemExit(f"bench_cascade: {run} has no training log to time (train it first)")
    (s0, t0), (s1, t1) = times[0], times[-1]
    return (t1 - t0) * (s1 - since) / max(s1 - s0, 1) / 60


def continue_vae(source: Path, run: Path) -> int:
    """Start run/ from source/'s last checkpoint (resumed there with a longer schedule) -> its step."""
    import shutil

    latest = (source / "checkpoints" / "latest").read_text().strip()
    shutil.rmtree(run, ignore_errors=True)
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / latest, run / "checkpoints" / latest)
    (run / "checkpoints" / "latest").write_text(latest)
    return int(latest.removeprefix("step"))


def final_size() -> tuple[int, int, int, int]:
    """(frames, height, width, fps) of the cascade's last stage, as configs/cascade/ sets them."""
    from vidiff.config import CascadeSampleConfig, load_config

    spec = load_config(REPO / "configs/cascade/sample.yaml", [], CascadeSampleConfig)
    last = spec.stages()[-1][0]
    return (*load_config(REPO / f"configs/cascade/{last}.yaml").data.video_shape, spec.fps)


def check_single(run: Path, size: tuple[int, int, int]) -> None:
    """Before any training: the single-stage reference given must sample the cascade's final size."""
    from vidiff.config import load_config

    config = run / "config.yaml"
    shape = load_config(config).data.video_shape if config.is_file() else None
    if shape != size:
        found = f"samples {shape}" if shape else "is not a run (no config.yaml)"
        raise SystemExit(f"bench_cascade: the single-stage reference {run} {found}, the cascade ends at {size}: "
                         "give --single-steps N to train one at that size")


def parse_steps(text: str | None) -> dict[str, int]:
    steps = {}
    for item in filter(None, (text or "").split(",")):
        name, _, value = item.partition("=")
        if name not in STAGES or not value.isdigit():
            raise SystemExit(f"bench_cascade: --steps {text!r}: give stage=N for stages {', '.join(STAGES)}")
        steps[name] = int(value)
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("runs/shapes"))
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--skip-train", action="store_true", help="evaluate the runs already under --root")
    parser.add_argument("--steps", help="training steps per stage, e.g. base=1000,tsr=500,ssr=500 (default: the "
                                        "configs')")
    parser.add_argument("--vae-steps", type=int, help="train the cascade's VAE on from ROOT/vae to this many steps "
                                                      "(default: use ROOT/vae)")
    parser.add_argument("--single-steps", type=int, help="train the single-stage reference here at this many steps "
                                                         "(default: use ROOT/dit)")
    parser.add_argument("--per-combo", type=int, default=2, help="held-out clips per combination (default 2)")
    parser.add_argument("--gif", type=Path, help="also copy the first prompt's stages GIF here")
    args = parser.parse_args()
    root = args.root.resolve()
    if not (root / "vae").is_dir():
        raise SystemExit(f"bench_cascade: {root / 'vae'} is missing; make it with python tools/bench_quality.py "
                         f"--root {args.root}")
    steps = parse_steps(args.steps)
    vidiff = [sys.executable, "-m", "vidiff"]
    env = {"NPROC": str(args.ranks)}
    runs = {name: root / "cascade" / name for name in STAGES}
    frames, height, width, fps = final_size()
    shards, heldout = root / "cascade" / "shards", root / "cascade" / "heldout"
    final = [f"data.buckets=[[{frames}, {height}, {width}]]"]
    single = root / "cascade" / "single" if args.single_steps else root / "dit"
    if not args.single_steps:
        check_single(single, (frames, height, width))
    minutes, vae = {}, root / "vae"
    if not args.skip_train:
        size = ["--frames", str(frames), "--height", str(height), "--width", str(width), "--fps", str(fps),
                "--max-count", "500"]
        _run(*vidiff, "shards", "--synthetic", str(TRAIN_CLIPS), "--out", str(shards), *size)
        _run(*vidiff, "shards", "--synthetic", str(HELDOUT_CLIPS), "--split", "heldout", "--out", str(heldout), *size)
    if args.vae_steps:
        vae = root / "cascade" / "vae"
        if args.skip_train:
            minutes["vae"] = logged_minutes(vae, since=int(json.loads((vae / "resumed_from.json").read_text())))
        else:
            since = continue_vae(root / "vae", vae)
            (vae / "resumed_from.json").write_text(json.dumps(since))
            minutes["vae"] = _run("launchers/local.sh", str(VAE_CONFIG), f"out_dir={vae}", *final,
                                  f"data.shards={shards}", f"data.eval_shards={heldout}",
                                  f"train.steps={args.vae_steps}", f"train.checkpoint_every={args.vae_steps}",
                                  env=env, name="vae")
    for name in STAGES:
        if args.skip_train:
            minutes[name] = logged_minutes(runs[name])
            continue
        extra = [f"train.steps={steps[name]}", f"train.checkpoint_every={steps[name]}"] if name in steps else []
        minutes[name] = _run("launchers/local.sh", str(REPO / f"configs/cascade/{name}.yaml"), f"out_dir={runs[name]}",
                             f"data.shards={shards}", f"vae.checkpoint={vae}", *extra,
                             "--no-resume", env=env, name=name)
    if args.single_steps:
        if args.skip_train:
            minutes["single"] = logged_minutes(single)
        else:
            common = [f"vae.checkpoint={vae}", f"train.steps={args.single_steps}", "data.eval_shards=null",
                      f"train.checkpoint_every={args.single_steps}", "train.eval_every=0", *final,
                      f"sample.fps={fps}"]
            minutes["single"] = _run(*vidiff, "cache-latents", str(SINGLE_CONFIG), f"data.shards={shards}",
                                     *common, "--text", "--windows", "1", "--out", str(root / "cascade/latents"),
                                     name="single")
            minutes["single"] += _run("launchers/local.sh", str(SINGLE_CONFIG), f"out_dir={single}",
                                      f"data.shards={root / 'cascade/latents'}", *common, "--no-resume", env=env,
                                      name="single")
    else:
        minutes["single"] = logged_minutes(single)

    import torch

    from vidiff.config import CascadeSampleConfig, load_config
    from vidiff.device import rank_device
    from vidiff.eval.cascade import evaluate_cascade

    torch.set_grad_enabled(False)
    spec = load_config(REPO / "configs/cascade/sample.yaml", [f"{n}.run={runs[n]}" for n in STAGES],
                       CascadeSampleConfig)
    start = time.monotonic()
    result = evaluate_cascade(spec, single, args.per_combo, 0, rank_device(), root / "cascade" / "eval")
    if args.gif:
        args.gif.parent.mkdir(parents=True, exist_ok=True)
        args.gif.write_bytes((root / "cascade/eval/stages.gif").read_bytes())
    tsr, ssr = result["tsr"], result["ssr"]
    met = {
        "tsr_psnr_beats_repeat_and_linear": tsr["tsr"]["psnr"] > max(tsr["repeat"]["psnr"], tsr["linear"]["psnr"]),
        "tsr_track_error_beats_repeat_and_linear": tsr["tsr"]["track_error"] < min(tsr["repeat"]["track_error"],
                                                                                  tsr["linear"]["track_error"]),
        "ssr_psnr_beats_bicubic": ssr["ssr"]["psnr"] > ssr["bicubic"]["psnr"],
        "ssr_pass_rate_beats_bicubic": ssr["ssr"]["pass_rate"] > ssr["bicubic"]["pass_rate"],
    }
    cascade_minutes = sum(minutes[n] for n in STAGES)
    cpu = {"cpu_minutes": {k: round(v, 1) for k, v in CPU_MINUTES.items()},
           "cascade_over_single_cpu": round(sum(CPU_MINUTES[n] for n in STAGES) / CPU_MINUTES["single"], 3)} \
        if all(n in CPU_MINUTES for n in (*STAGES, "single")) else {}
    print(json.dumps({"bench": "cascade", **result, "met": met,
                      "train_minutes": {k: round(v, 1) for k, v in minutes.items()}, **cpu,
                      "cascade_over_single_minutes": round(cascade_minutes / minutes["single"], 3),
                      "eval_minutes": round((time.monotonic() - start) / 60, 1)}))


if __name__ == "__main__":
    main()
