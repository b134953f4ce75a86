"""The moving-shapes quality benchmark: the whole CPU recipe, then `vidiff eval` on held-out prompts.

    python tools/bench_quality.py [--root runs/shapes] [--ranks 2] [--skip-train]

Stages, each through the normal CLI and launcher, each timed:
  shards    vidiff shards --synthetic 4000 (train split) and 192 held-out clips, 9x48x48, as mp4;
  vae       launchers/local.sh configs/bench/shapes_vae.yaml;
  latents   vidiff cache-latents --text (the DiT then reads latents and token embeddings, no VAE per step);
  dit       launchers/local.sh configs/bench/shapes_cpu.yaml;
  eval      vidiff eval RUN --prompts held-out (vidiff/eval/quality.py: checker pass rates, FD, VAE ceiling).
Prints one JSON line: the eval figures, fd_ratio (FD over its held-out-vs-train baseline, measured in the same
run), each stage's minutes and train_minutes (vae + latents + dit, the recipe's 60-minute budget).
--skip-train evaluates the runs already under --root.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VAE_CONFIG = REPO / "configs/bench/shapes_vae.yaml"
DIT_CONFIG = REPO / "configs/bench/shapes_cpu.yaml"
TRAIN_CLIPS, HELDOUT_CLIPS = 4000, 192
TARGETS = {"vae_ceiling": 0.95, "pass_rate_seen": 0.80, "fd_ratio": 3.0}


def _run(*cmd: str, env: dict | None = None, capture: bool = False) -> float | tuple[float, str]:
    """Run a command from the repository root; minutes taken. Its output streams through, or with capture its
    standard output is returned as well: (minutes, stdout)."""
    start = time.monotonic()
    done = subprocess.run(list(cmd), cwd=REPO, check=True, env={**os.environ, **(env or {})}, text=True,
                          stdout=subprocess.PIPE if capture else None)
    minutes = (time.monotonic() - start) / 60
    return (minutes, done.stdout) if capture else minutes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("runs/shapes"))
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--skip-train", action="store_true", help="evaluate the runs already under --root")
    args = parser.parse_args()
    root = args.root
    vidiff = [sys.executable, "-m", "vidiff"]
    launch_env = {"NPROC": str(args.ranks)}
    overrides = {"vae": [f"out_dir={root / 'vae'}", f"data.shards={root / 'shards'}",
                         f"data.eval_shards={root / 'heldout'}"],
                 "dit": [f"out_dir={root / 'dit'}", f"data.shards={root / 'latents'}",
                         f"data.eval_shards={root / 'heldout-latents'}", f"vae.checkpoint={root / 'vae'}"]}
    minutes = {}
    if not args.skip_train:
        size = ["--frames", "9", "--height", "48", "--width", "48", "--max-count", "500"]
        minutes["shards"] = _run(*vidiff, "shards", "--synthetic", str(TRAIN_CLIPS), "--out", str(root / "shards"),
                                 *size) + _run(*vidiff, "shards", "--synthetic", str(HELDOUT_CLIPS), "--split",
                                               "heldout", "--out", str(root / "heldout"), *size)
        minutes["vae"] = _run("launchers/local.sh", str(VAE_CONFIG), *overrides["vae"], "--no-resume", env=launch_env)
        latents = [*vidiff, "cache-latents", str(DIT_CONFIG), *overrides["dit"]]
        minutes["latents"] = sum(_run(*latents, f"data.shards={root / split}", "--text", "--windows", "1", "--out",
                                      str(root / out)) for split, out in (("shards", "latents"),
                                                                          ("heldout", "heldout-latents")))
        minutes["dit"] = _run("launchers/local.sh", str(DIT_CONFIG), *overrides["dit"], "--no-resume", env=launch_env)
    minutes["eval"], out = _run(*vidiff, "eval", str(root / "dit"), "--prompts", "held-out", "--out",
                                str(root / "eval"), capture=True)
    result = json.loads(out.strip().splitlines()[-1])
    figures = {"vae_ceiling": result["vae_ceiling"], "pass_rate_seen": result["seen"]["pass_rate"],
               "fd_ratio": result["fd_ratio"]}
    met = {k: (v >= TARGETS[k]) if k != "fd_ratio" else (v <= TARGETS[k]) for k, v in figures.items()}
    train = sum(minutes.get(k, 0.0) for k in ("vae", "latents", "dit"))
    print(json.dumps({"bench": "quality", **result, "targets": TARGETS, "met": met,
                      "minutes": {k: round(v, 1) for k, v in minutes.items()},
                      "train_minutes": round(train, 1) if not args.skip_train else None}))


if __name__ == "__main__":
    main()
