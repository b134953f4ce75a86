"""Elastic checkpoints: a run killed after its step-6 checkpoint resumes on another number of ranks (the
checkpoint converted through DeepSpeed's universal format) and trains steps 7-12 like an uninterrupted run on one
process, with the same global batch, its EMA carried over and every sample of every epoch consumed exactly once
(the ledger). And a rank killed under launchers/elastic.sh: torchrun restarts the group, which resumes."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import REPO, free_port, kill_after_checkpoint, launch, launcher, vidiff_processes
from datasets import latent_samples, vae_run_folder
from vidiff.data.shards import synthetic_samples, write_shards
from vidiff.train.monitor import read_scalars

sys.path.insert(0, str(REPO / "tools"))
from ledger_check import audit  # noqa: E402

pytestmark = pytest.mark.slow

STEPS, MIDDLE = 12, 6
# Measured: steps 7-12 after a change of world size match one process within 3e-7 (loss, gradient norm) and
# 4e-6 of each tensor's norm (weights, EMA): fp32 reduction order, as between layouts (tests/test_layouts.py).
LOSS_RTOL = GRAD_NORM_RTOL = 1e-5
WEIGHT_RTOL = 2e-5


def _overrides(root, name: str, *extra: str) -> list[str]:
    return [f"out_dir={root / name}", f"data.shards={root / 'latents'}", "data.buckets=[[9,32,32]]",
            "data.caption_dropout=0.0", f"vae.checkpoint={root / 'vae'}", "model.hidden_size=32", "model.depth=4",
            "model.num_heads=2", "model.zero_init=false", "text.max_tokens=8", f"train.steps={STEPS}",
            "train.warmup_steps=2", "train.lr_decay=cosine", "train.log_every=1", f"train.checkpoint_every={MIDDLE}",
            "train.ema_decay=0.9", "train.ledger=true", "parallel.micro_batch=2", "parallel.global_batch=8", *extra]


def _run(root, name: str, ranks: int, *extra: str) -> subprocess.CompletedProcess:
    return launch(REPO / "configs/demo.yaml", _overrides(root, name, *extra), ranks, root)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, one process (every layout trains like it: tests/test_layouts.py)."""
    root = tmp_path_factory.mktemp("elastic")
    vae_run_folder(root / "vae")
    write_shards(latent_samples(48), root / "latents", max_count=16)
    _run(root, "single", 1)
    return root / "single"


def _differences(run: Path, reference: Path) -> dict[str, float]:
    out = {}
    for tag in ("train/loss", "train/grad_norm", "train/lr"):
        ours, theirs = read_scalars(run, tag), read_scalars(reference, tag)
        out[tag] = max(abs(ours[s] - theirs[s]) / max(abs(theirs[s]), 1e-12) for s in range(MIDDLE + 1, STEPS + 1))
    for export in ("model.safetensors", "ema.safetensors"):
        ours, theirs = (load_file(str(r / "checkpoints" / f"step{STEPS:08d}" / export)) for r in (run, reference))
        out[export] = max(((ours[k] - v).norm() / v.norm()).item() for k, v in theirs.items() if v.norm() > 0)
    return out


CHANGES = {                    # name: (ranks before, overrides before, ranks after, overrides after)
    "zero3-2-to-1": (2, [], 1, []),
    "zero3-1-to-2": (1, [], 2, []),
    "zero3-2-to-4": (2, [], 4, []),
    "zero2-2-to-1": (2, ["parallel.zero_stage=2"], 1, ["parallel.zero_stage=2"]),      # the VAE recipe's stage
    "zero3-tp2-4-to-2": (4, ["parallel.tensor=2"], 2, ["parallel.tensor=2"]),
    "zero3-tp2-to-tp1": (2, ["parallel.tensor=2"], 2, []),
    "pipeline-pp2-4-to-2": (4, ["parallel.pipeline=2"], 2, ["parallel.pipeline=2"]),
    "pipeline-tp1-to-tp2": (2, ["parallel.pipeline=2"], 4, ["parallel.pipeline=2", "parallel.tensor=2"]),
    "pipeline-pp4-to-pp2": (4, ["parallel.pipeline=4"], 2, ["parallel.pipeline=2"]),
}


@pytest.mark.parametrize("name", CHANGES)
def test_a_run_resumes_on_another_topology_like_an_uninterrupted_one(reference, name):
    before, before_overrides, after, after_overrides = CHANGES[name]
    root = reference.parent
    command, env = launcher(REPO / "configs/demo.yaml", _overrides(root, name, *before_overrides), before)
    kill_after_checkpoint(command, env, root, root / name, f"step{MIDDLE:08d}")
    resumed = _run(root, name, after, *after_overrides)
    out = resumed.stdout + resumed.stderr
    assert f"resumed from step {MIDDLE}" in out and "on a new topology" in out, out[-3000:]
    assert (root / name / f"checkpoints/step{MIDDLE:08d}/universal").is_dir()       # converted once, kept
    state = json.loads((root / name / f"checkpoints/step{STEPS:08d}/vidiff_state.json").read_text())
    assert state["topology"]["global_batch"] == 8 and state["topology"]["world"] == after
    diff = _differences(root / name, reference)
    print(name, diff)
    assert diff["train/loss"] <= LOSS_RTOL and diff["train/grad_norm"] <= GRAD_NORM_RTOL, diff
    assert diff["train/lr"] < 1e-9, diff                                             # the schedule came back
    assert diff["model.safetensors"] <= WEIGHT_RTOL and diff["ema.safetensors"] <= WEIGHT_RTOL, diff   # EMA carried
    report = audit(root / name)
    assert report["ok"] and report["segments"] == 2, report
    assert report["committed_steps"] == STEPS and sum(e["complete"] for e in report["epochs"].values()) >= 2


def test_the_vae_recipe_resumes_on_another_data_size(tmp_path):
    """The VAE trains at ZeRO-2 (its recipe): 2 ranks to step 2, then 1 rank on to step 4 through the universal
    checkpoint (which refused the VAE's checkpoints while their merge info named the DiT's row-parallel layers)."""
    write_shards(synthetic_samples(8, 48, 48, 9, 8, seed=0), tmp_path / "shards", max_count=4)
    common = [f"out_dir={tmp_path / 'vae'}", f"data.shards={tmp_path / 'shards'}", "vae.base_channels=8",
              "train.checkpoint_every=2", "train.log_every=1", "parallel.zero_stage=2", "parallel.micro_batch=1"]
    launch(REPO / "configs/vae/demo.yaml", [*common, "train.steps=2"], 2, tmp_path)
    resumed = launch(REPO / "configs/vae/demo.yaml", [*common, "train.steps=4"], 1, tmp_path)
    out = resumed.stdout + resumed.stderr
    assert "resumed from step 2" in out and "on a new topology" in out, out[-3000:]
    assert (tmp_path / "vae/checkpoints/step00000004/vidiff_state.json").is_file()
    assert sorted(read_scalars(tmp_path / "vae", "train/loss")) == [1, 2, 3, 4]


def test_an_unsupported_change_is_refused_before_any_rank_starts(reference):
    """Switching a checkpoint between the sharded and the pipeline layout is not converted: the launcher's check
    says so and starts nothing."""
    root = reference.parent
    result = launch(REPO / "configs/demo.yaml", _overrides(root, "single", "parallel.pipeline=2"), 2, root,
                    check=False)
    assert result.returncode == 2
    assert "sharded layout" in result.stderr and "pipeline layout" in result.stderr and "Resume on" in result.stderr
    assert "spawned" not in result.stdout + result.stderr


def _workers(run_id: str) -> dict[int, int]:
    """torchelastic run `run_id`'s vidiff workers: {pid: local rank}."""
    return {pid: int(env["LOCAL_RANK"]) for pid, env in vidiff_processes(TORCHELASTIC_RUN_ID=run_id).items()
            if env.get("LOCAL_RANK", "").isdigit()}


def test_a_rank_killed_under_the_elastic_launcher_restarts_the_group_which_resumes(reference):
    """SIGKILL one worker of a run under launchers/elastic.sh between checkpoints: torchrun restarts the group,
    which resumes from step 6 and finishes; the ledger holds every sample of each epoch exactly once over the
    committed steps (the steps the kill lost were replayed, not counted twice)."""
    root, name = reference.parent, "elastic"
    command, env = launcher(REPO / "configs/demo.yaml", _overrides(root, name), 2, script="elastic.sh")
    run_id = f"test-{os.getpid()}-{free_port()}"
    env.update(RDZV_ENDPOINT=f"127.0.0.1:{free_port()}", RDZV_ID=run_id, MAX_RESTARTS="2")
    process = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    latest, deadline = root / name / "checkpoints/latest", time.monotonic() + 600
    while not (latest.is_file() and latest.read_text() == f"step{MIDDLE:08d}"):
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()[-3000:]
        time.sleep(0.02)
    time.sleep(0.3)                                   # into the steps after the checkpoint
    victim = next((pid for pid, local_rank in _workers(run_id).items() if local_rank == 1), None)
    assert victim is not None, "no worker of local rank 1 found"
    os.kill(victim, signal.SIGKILL)
    try:
        out, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        for pid in _workers(run_id):                  # torchrun starts its workers in sessions of their own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert process.returncode == 0, out[-5000:]
    assert "resumed from step" in out
    assert latest.read_text() == f"step{STEPS:08d}"
    report = audit(root / name)
    assert report["ok"] and report["segments"] >= 2 and report["committed_steps"] == STEPS, report
