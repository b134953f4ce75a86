"""The cascade benchmark on the moving-shapes ground truth: train the three stages, measure each super-resolution
stage against classical upsampling and the full cascade against a single-stage model.

    python tools/bench_quality.py --root R          # first: the shards, the VAE and the single-stage DiT (R/dit)
    python tools/bench_cascade.py --root R [--ranks 2] [--skip-train] [--vae-steps N]
                                  [--steps base=N,tsr=N,ssr=N] [--single-steps N] [--gif docs/cascade/stages.gif]
                                  [--other-tsr RUN]

The cascade's VAE is R/vae, or with --vae-steps R/vae trained on to N steps (its last checkpoint resumed with the
longer schedule) into R/cascade/vae, its extra minutes counted on the cascade's side. Stages, each through the
normal launcher, each timed: configs/cascade/{base,tsr,ssr}.yaml on R/shards with that VAE (the stages read pixel
clips and make their conditions on the fly), into R/cascade/<stage>. The single-stage reference is R/dit (the
quality recipe, about the cascade's total training time at the default steps), or with --single-steps a run of
configs/bench/shapes_cpu.yaml at that many steps trained here with R/vae (cache-latents included in its minutes)
into R/cascade/single. Then vidiff/eval/cascade.py on held-out clips and prompts, sampled with
configs/cascade/sample.yaml's order, steps, guidance, augmentation and start levels.
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
    parser.add_argument("--other-tsr", type=Path, help="also measure this tsr run (trained at another size, e.g. "
                                                       "for order ssr-tsr) as the tsr stage is, with its settings")
    args = parser.parse_args()
    root = args.root.resolve()
    for needed in ("shards", "vae"):
        if not (root / needed).is_dir():
            raise SystemExit(f"bench_cascade: {root / needed} is missing; make it with python tools/bench_quality.py "
                             f"--root {args.root}")
    steps = parse_steps(args.steps)
    vidiff = [sys.executable, "-m", "vidiff"]
    env = {"NPROC": str(args.ranks)}
    runs = {name: root / "cascade" / name for name in STAGES}
    minutes, vae = {}, root / "vae"
    if args.vae_steps:
        vae = root / "cascade" / "vae"
        if args.skip_train:
            minutes["vae"] = logged_minutes(vae, since=int(json.loads((vae / "resumed_from.json").read_text())))
        else:
            since = continue_vae(root / "vae", vae)
            (vae / "resumed_from.json").write_text(json.dumps(since))
            minutes["vae"] = _run("launchers/local.sh", str(VAE_CONFIG), f"out_dir={vae}",
                                  f"data.shards={root / 'shards'}", f"data.eval_shards={root / 'heldout'}",
                                  f"train.steps={args.vae_steps}", f"train.checkpoint_every={args.vae_steps}",
                                  env=env, name="vae")
    for name in STAGES:
        if args.skip_train:
            minutes[name] = logged_minutes(runs[name])
            continue
        extra = [f"train.steps={steps[name]}", f"train.checkpoint_every={steps[name]}"] if name in steps else []
        minutes[name] = _run("launchers/local.sh", str(REPO / f"configs/cascade/{name}.yaml"), f"out_dir={runs[name]}",
                             f"data.shards={root / 'shards'}", f"vae.checkpoint={vae}", *extra,
                             "--no-resume", env=env, name=name)
    single = root / "dit"
    if args.single_steps:
        single = root / "cascade" / "single"
        if args.skip_train:
            minutes["single"] = logged_minutes(single)
        else:
            common = [f"vae.checkpoint={root / 'vae'}", f"train.steps={args.single_steps}", "data.eval_shards=null",
                      f"train.checkpoint_every={args.single_steps}", "train.eval_every=0"]
            minutes["single"] = _run(*vidiff, "cache-latents", str(SINGLE_CONFIG), f"data.shards={root / 'shards'}",
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
    from vidiff.eval.cascade import evaluate_cascade, tsr_figures
    from vidiff.sampling import load_stage

    torch.set_grad_enabled(False)
    spec = load_config(REPO / "configs/cascade/sample.yaml", [f"{n}.run={runs[n]}" for n in STAGES],
                       CascadeSampleConfig)
    start = time.monotonic()
    result = evaluate_cascade(spec, single, args.per_combo, 0, rank_device(), root / "cascade" / "eval")
    if args.other_tsr:
        other = spec.model_copy(update={"tsr": spec.tsr.model_copy(update={"run": str(args.other_tsr)})})
        stage, text, vae = load_stage("tsr", other, rank_device())
        result["other_tsr"] = {"run": str(args.other_tsr), **tsr_figures(stage, text, vae, args.per_combo, 0,
                                                                         rank_device())}
    if args.gif:
        args.gif.parent.mkdir(parents=True, exist_ok=True)
        args.gif.write_bytes((root / "cascade/eval/stages.gif").read_bytes())
    tsr, ssr = result["tsr"], result["ssr"]
    met = {
        "tsr_psnr_beats_repeat_and_linear": tsr["tsr"]["psnr"] > max(tsr["repeat"]["psnr"], tsr["linear"]["psnr"]),
        "tsr_motion_beats_repeat_and_linear": tsr["tsr"]["motion"] > max(tsr["repeat"]["motion"],
                                                                         tsr["linear"]["motion"]),
        "ssr_psnr_beats_bicubic": ssr["ssr"]["psnr"] > ssr["bicubic"]["psnr"],
        "ssr_pass_rate_beats_bicubic": ssr["ssr"]["pass_rate"] > ssr["bicubic"]["pass_rate"],
    }
    if "other_tsr" in result:
        o = result["other_tsr"]
        met["other_tsr_psnr_beats_repeat_and_linear"] = o["tsr"]["psnr"] > max(o["repeat"]["psnr"], o["linear"]["psnr"])
    cascade_side = [*STAGES, *(["vae"] if "vae" in minutes else [])]
    cascade_minutes = sum(minutes[n] for n in cascade_side)
    cpu = {"cpu_minutes": {k: round(v, 1) for k, v in CPU_MINUTES.items()},
           "cascade_over_single_cpu": round(sum(CPU_MINUTES[n] for n in cascade_side) / CPU_MINUTES["single"], 3)} \
        if "single" in CPU_MINUTES and all(n in CPU_MINUTES for n in cascade_side) else {}
    print(json.dumps({"bench": "cascade", **result, "met": met,
                      "train_minutes": {k: round(v, 1) for k, v in minutes.items()}, **cpu,
                      "cascade_over_single_minutes": round(cascade_minutes / minutes["single"], 3),
                      "eval_minutes": round((time.monotonic() - start) / 60, 1)}))


if __name__ == "__main__":
    main()
