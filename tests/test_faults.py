"""Faults a long run meets, injected for real: a save killed halfway, a checkpoint folder no rank can write, a
non-finite loss; and checkpoint retention and the resume flags. Runs of the demo DiT on latent shards through
the launcher, 2 CPU ranks (ZeRO-3)."""

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from safetensors.torch import load_file

from conftest import REPO, latent_root, launch, launcher
from datasets import latent_samples
from vidiff.data.latents import npy_bytes
from vidiff.data.shards import write_shards
from vidiff.train.checkpoint import STATE_NAME
from vidiff.train.monitor import read_scalars

pytestmark = pytest.mark.slow


def _overrides(root, name: str, *extra: str) -> list[str]:
    return [f"out_dir={root / name}", f"data.shards={root / 'latents'}", "data.buckets=[[9,32,32]]",
            "data.caption_dropout=0.0", f"vae.checkpoint={root / 'vae'}", "model.hidden_size=64", "model.depth=4",
            "model.num_heads=2", "text.max_tokens=8", "train.warmup_steps=0", "train.log_every=1",
            "train.ema_decay=0.9", "parallel.micro_batch=2", "parallel.global_batch=4", *extra]


def _train(root, name: str, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return launch(REPO / "configs/demo.yaml", _overrides(root, name, *extra), cwd=root, check=check)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return latent_root(tmp_path_factory, "faults", samples=40, per_shard=10)


def _tags(run) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("step*"))


def test_a_save_killed_halfway_leaves_the_previous_checkpoint_which_loads(root):
    """SIGKILL while step 4's checkpoint is being written (its folder exists, its vidiff_state.json does not yet):
    `latest` still names step 2, the restart loads it, removes the half-written folder and finishes."""
    for attempt in range(5):                       # the save takes a fraction of a second: retry a missed window
        run = root / f"killed-save-{attempt}"
        command, env = launcher(REPO / "configs/demo.yaml", _overrides(root, run.name, "train.steps=6",
                                                                       "train.checkpoint_every=2"))
        process = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
        tag, deadline = run / "checkpoints" / "step00000004", time.monotonic() + 600
        while not tag.is_dir() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        if tag.is_dir() and not (tag / STATE_NAME).is_file():
            break
    else:
        pytest.fail("five runs finished step 4's checkpoint before they could be killed during it")
    assert (run / "checkpoints" / "latest").read_text() == "step00000002"
    resumed = _train(root, run.name, "train.steps=6", "train.checkpoint_every=2")
    out = resumed.stdout + resumed.stderr
    assert "resumed from step 2" in out and "a checkpoint whose save did not finish" in out
    assert (tag / STATE_NAME).is_file()            # written again, whole, by the restarted run
    assert (run / "checkpoints" / "latest").read_text() == "step00000006"


def test_an_unwritable_checkpoint_folder_fails_before_any_step(root):
    """Every rank probes the checkpoint folder at start: one it cannot write is a clear error and no step runs
    (here `checkpoints` is a file; the run is root, which ignores permission bits)."""
    run = root / "unwritable"
    run.mkdir()
    (run / "checkpoints").write_text("not a folder")
    result = _train(root, run.name, "train.steps=3", check=False)
    assert result.returncode != 0
    assert "cannot write checkpoints to" in result.stderr
    assert "rank 0 on" in result.stderr and "rank 1 on" in result.stderr                   # every rank names itself
    assert not (run / "tb").exists() or not read_scalars(run, "train/loss")


def _nan_shards(root, name: str, positions: list[int]) -> str:
    """The latent shards with NaN latents in the samples at `positions` (a fault in the data)."""
    samples = list(latent_samples(40))
    for i in positions:
        samples[i] = {**samples[i], "latent.npy": npy_bytes(np.full((4, 3, 4, 4), np.nan, np.float16))}
    write_shards(samples, root / name, max_count=10)
    return str(root / name)


@pytest.mark.parametrize("layout", [[], ["parallel.pipeline=2", "parallel.precision=bf16"],
                                    ["parallel.zero_stage=2", "parallel.precision=bf16"]],
                         ids=["zero3-fp32", "pipeline-bf16", "zero2-bf16"])
def test_a_non_finite_loss_skips_the_step_and_training_continues(root, layout):
    """One sample of NaN latents: the step that reads it has a NaN loss and gradient norm, is skipped (no
    update, counted in train/skipped_nonfinite) and training goes on to its last step with finite weights."""
    shards = _nan_shards(root, "latents-nan", [7])
    run = root / f"nan-{'-'.join(layout) or 'default'}"
    _train(root, run.name, f"data.shards={shards}", "train.steps=8", "train.checkpoint_every=8", *layout)
    skipped = read_scalars(run, "train/skipped_nonfinite")
    assert skipped[8] == 1                                            # one step, counted
    bad = min(s for s, v in skipped.items() if v == 1)
    assert not np.isfinite(read_scalars(run, "train/loss")[bad])
    assert all(np.isfinite(v) for s, v in read_scalars(run, "train/loss").items() if s != bad)
    weights = load_file(str(run / "checkpoints/step00000008/model.safetensors"))
    assert all(bool(t.isfinite().all()) for t in weights.values())


def test_repeated_non_finite_steps_reload_the_checkpoint_then_stop_with_a_message(root):
    """With train.nonfinite_patience 1 the NaN step reloads the last checkpoint; replaying the same data brings it
    back, and the run stops with a message naming the step and what to try."""
    shards = _nan_shards(root, "latents-nan", [7])
    result = _train(root, "nan-stop", f"data.shards={shards}", "train.steps=8", "train.checkpoint_every=1",
                    "train.nonfinite_patience=1", check=False)
    assert result.returncode == 2
    assert "reloading" in result.stdout + result.stderr
    assert "non-finite loss or gradient norm" in result.stderr and "again after reloading" in result.stderr
    assert "train.lr" in result.stderr


def test_retention_keeps_the_last_and_every_mth_checkpoint(root):
    run = root / "retention"
    _train(root, run.name, "train.steps=8", "train.checkpoint_every=1", "train.keep_last=2", "train.keep_every=3")
    assert _tags(run) == ["step00000003", "step00000006", "step00000007", "step00000008"]
    assert all((run / "checkpoints" / t / STATE_NAME).is_file() for t in _tags(run))


def test_checkpoints_by_minutes(root):
    """train.checkpoint_minutes checkpoints whenever that long has passed since the last save, whatever the step
    cadence (rank 0's clock decides for every rank)."""
    run = root / "minutes"
    _train(root, run.name, "train.steps=4", "train.checkpoint_every=1000", "train.checkpoint_minutes=0.0001",
           "train.keep_last=10")
    assert _tags(run) == ["step00000001", "step00000002", "step00000003", "step00000004"]
    assert sorted(read_scalars(run, "ckpt/save_s")) == [1, 2, 3, 4]


def test_resume_flags(root):
    """--resume PATH starts from that checkpoint; --no-resume sets the old checkpoints aside and starts fresh; a
    bad --resume is refused by the launcher's check, before any process starts."""
    run = root / "flags"
    _train(root, run.name, "train.steps=4", "train.checkpoint_every=2", "train.keep_last=5")
    result = _train(root, run.name, "train.steps=4", "train.checkpoint_every=2", "train.keep_last=5", "--resume",
                    str(run / "checkpoints" / "step00000002"))
    assert "resumed from step 2" in result.stdout + result.stderr
    fresh = _train(root, run.name, "train.steps=2", "train.checkpoint_every=2", "--no-resume")
    assert "resumed" not in fresh.stdout + fresh.stderr
    assert [p.name.startswith("checkpoints.set-aside-") for p in run.iterdir()].count(True) == 1
    assert json.loads((run / "checkpoints/step00000002" / STATE_NAME).read_text())["step"] == 2
    bad = _train(root, run.name, "train.steps=4", "--resume", str(run / "nowhere"), check=False)
    assert bad.returncode == 2 and "not a complete checkpoint" in bad.stderr
    assert "spawned" not in bad.stdout + bad.stderr                  # refused before any rank started
