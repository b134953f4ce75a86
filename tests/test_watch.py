"""What people watch, read back with TensorBoard's own reader from a real 2-rank run: loss by noise level, data
wait, phase times, each rank's peak memory, the straggler figures, the config and layout as text; and a stalled
step (one rank SIGSTOPped) that makes every rank print its stack once instead of hanging silently."""

import io
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, latent_root, launch, launcher, vidiff_processes
from vidiff.config import load_config
from vidiff.train.checkpoint import CONFIG_NAME, STATE_NAME
from vidiff.train.monitor import _event_files, read_images, read_scalars, sigma_bin_names
from vidiff.train.objectives import PREVIEW_PROMPTS

pytestmark = pytest.mark.slow


def _overrides(root, name: str, *extra: str) -> list[str]:
    return [f"out_dir={root / name}", f"data.shards={root / 'latents'}", "data.buckets=[[9,32,32]]",
            f"vae.checkpoint={root / 'vae'}", "model.hidden_size=32", "model.depth=2", "model.num_heads=2",
            "text.max_tokens=8", "parallel.micro_batch=2", "parallel.global_batch=8", "train.checkpoint_every=1000",
            *extra]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return latent_root(tmp_path_factory, "watch", samples=32, per_shard=8)


def test_tensorboard_shows_what_people_watch(root):
    run = root / "watched"
    launch(REPO / "configs/demo.yaml", _overrides(root, run.name, "train.steps=6", "train.log_every=3",
                                                  "train.preview_every=3", "train.ema_decay=0.9",
                                                  f"data.eval_shards={root / 'latents'}", "train.eval_every=3",
                                                  "train.eval_batches=1"), 2, root)
    per_bin = {name: read_scalars(run, f"train/samples_by_sigma/{name}") for name in sigma_bin_names()}
    seen = json.loads((run / "checkpoints/step00000006" / STATE_NAME).read_text())["samples_seen"]
    assert sum(sum(counts.values()) for counts in per_bin.values()) == seen          # every sample in one bin
    for step in (3, 6):
        losses = [read_scalars(run, f"train/loss_by_sigma/{n}").get(step) for n in sigma_bin_names()]
        assert sum(v is not None for v in losses) >= 2 and all(v > 0 and math.isfinite(v) for v in losses if v)
    for sigma in load_config(run / CONFIG_NAME).train.eval_sigmas:     # held-out loss at fixed noise levels
        at_sigma = read_scalars(run, f"eval/loss_at_sigma/{sigma:g}")
        assert sorted(at_sigma) == [3, 6] and all(v > 0 and math.isfinite(v) for v in at_sigma.values()), sigma
    wait = read_scalars(run, "perf/data_wait_frac")
    assert sorted(wait) == [3, 6] and all(0 <= v <= 1 for v in wait.values())
    for phase in ("data", "forward_backward", "optimizer"):
        assert all(v > 0 for v in read_scalars(run, f"perf/step_seconds/{phase}").values()), phase
    for rank in (0, 1):                               # RSS on the CPU: torch and DeepSpeed alone are > 0.2 GB
        assert all(0.2 < v < 24 for v in read_scalars(run, f"mem/{rank}/peak_gb").values())
    assert set(read_scalars(run, "perf/slowest_rank").values()) <= {0, 1}
    assert read_scalars(run, "ckpt/save_s")[6] > 0
    prompts = min(PREVIEW_PROMPTS, len(load_config(run / CONFIG_NAME).sample.prompts))
    previews = read_images(run, "preview/samples")
    assert sorted(previews) == [3, 6]
    for encoded in previews.values():               # an animated GIF: 9 frames of 32 x (32 x prompts)
        gif = Image.open(io.BytesIO(encoded))
        assert gif.format == "GIF" and gif.n_frames == 9 and gif.size == (32 * prompts, 32)
        frame = np.asarray(gif.convert("RGB"))
        assert frame.std() > 1.0                    # a sampled picture, not a blank one
    texts = {tag for acc in _event_files(run) for tag in acc.Tags().get("tensors", [])}
    assert {"run/config/text_summary", "run/layout/text_summary"} <= texts, texts


def test_the_pipeline_layout_counts_every_sample_by_sigma(root):
    """The per-sample losses of the pipeline layout exist on its last stage only: they are counted there."""
    run = root / "pipeline"
    launch(REPO / "configs/demo.yaml", _overrides(root, run.name, "train.steps=4", "train.log_every=2",
                                                  "parallel.pipeline=2"), 2, root)
    seen = json.loads((run / "checkpoints/step00000004" / STATE_NAME).read_text())["samples_seen"]
    counts = [read_scalars(run, f"train/samples_by_sigma/{name}") for name in sigma_bin_names()]
    assert sum(sum(c.values()) for c in counts) == seen
    assert any(read_scalars(run, f"train/loss_by_sigma/{name}") for name in sigma_bin_names())


def _rank_pid(port: int, rank: int) -> int | None:
    return next(iter(vidiff_processes(MASTER_PORT=str(port), RANK=str(rank))), None)


def _stopped_at_step_5(root, name: str, extra: list[str], processes, seconds: float) -> tuple[int, str]:
    """A 30-step 2-rank run; at step 5, SIGSTOP the processes that processes(rank 1's pid) names for `seconds`, then
    SIGCONT them; returns the run's exit code and output."""
    command, env = launcher(REPO / "configs/demo.yaml", _overrides(root, name, "train.steps=30", *extra), 2)
    env["VIDIFF_PROGRESS_SECONDS"] = "0"               # a progress line per step, to know where the run is
    process = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if line.startswith("train: 5/30"):
                break
        victims = processes(_rank_pid(int(env["MASTER_PORT"]), 1))
        assert victims, "".join(lines[-30:])
        for pid in victims:
            os.kill(pid, signal.SIGSTOP)
        time.sleep(seconds)
        for pid in victims:
            os.kill(pid, signal.SIGCONT)
        out = "".join(lines) + process.communicate(timeout=300)[0]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    return process.returncode, out


def test_a_stalled_step_prints_the_waiting_ranks_stack_once(root):
    """Rank 1 stopped for 7 s with train.stall_seconds 3: rank 0 waits for it in a collective and its watchdog
    prints its stacks there, once, and the run finishes. Rank 1's own watchdog is frozen with it: once continued,
    it prints too unless rank 1's step ends first and disarms it (a race CI lost once), so it may or may not."""
    code, out = _stopped_at_step_5(root, "stalled", ["train.stall_seconds=3"], lambda pid: [pid] if pid else [], 7)
    assert code == 0, out[-4000:]
    assert 1 <= out.count("Timeout (0:00:03)!") <= 2, out[-6000:]     # at most once a rank, not every slow step
    assert "torch/distributed/distributed_c10d.py" in out, out[-6000:]   # rank 0's stack: waiting in a collective
    assert "vidiff/train/trainer.py" in out and "took more than train.stall_seconds 3 s" in out


def _descendants(pid: int | None) -> list[int]:
    children = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(proc.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def test_a_rank_whose_data_is_slow_is_named_a_straggler(root):
    """Rank 1's data workers are stopped for 4 s (a slow file system): rank 1's data wait dwarfs rank 0's, the log
    names rank 1 and perf/slowest_rank says 1 at that step."""
    code, out = _stopped_at_step_5(root, "straggler", ["data.num_workers=1"], _descendants, 4)
    assert code == 0, out[-4000:]
    assert "rank 1 is a straggler" in out, out[-4000:]
    slowest = read_scalars(root / "straggler", "perf/slowest_rank")
    ratio = read_scalars(root / "straggler", "perf/slowest_over_median")
    flagged = [s for s in slowest if slowest[s] == 1 and ratio[s] > 2]
    assert flagged, (slowest, ratio)
