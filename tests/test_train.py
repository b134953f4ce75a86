"""What a training step computes: the loss is the mean over the usable samples of the global batch (a
micro-batch whose samples all failed weighs nothing), and TensorBoard says so next to train/loss."""

import pytest
from safetensors.torch import load_file

from conftest import REPO, run_vidiff
from datasets import latent_samples, vae_run_folder
from vidiff.config import load_config
from vidiff.data.pipeline import ShardLoader
from vidiff.data.shards import write_shards
from vidiff.train.monitor import DESCRIPTIONS, read_scalars, scalar_description


def _train(tmp_path, name: str, shards, *overrides: str):
    run = tmp_path / name
    result = run_vidiff("train", str(REPO / "configs/demo.yaml"), f"out_dir={run}", f"data.shards={shards}",
                        "data.buckets=[[9,32,32]]", "data.caption_dropout=0.0", f"vae.checkpoint={tmp_path / 'vae'}",
                        "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "model.zero_init=false",
                        "text.max_tokens=8", "train.steps=1", "train.warmup_steps=0", "parallel.micro_batch=1",
                        "data.random_start=false", *overrides, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def test_a_padding_micro_batch_weighs_nothing(tmp_path):
    """Step 1 of a run with 2 micro-batches of one sample, one of them unreadable, trains exactly like a run of
    the readable sample alone: same loss, gradient norm and weights (counting the padding batch in the mean
    would halve the loss and the gradient)."""
    vae_run_folder(tmp_path / "vae")
    good, broken = list(latent_samples(3))[1:]                      # (sample 0 has an empty caption)
    broken = {**broken, "latent.npy": b"\x93NUMPY not an array"}                  # found only when read
    both, alone = tmp_path / "both", tmp_path / "alone"
    write_shards([good, broken], both, max_count=1)                  # one shard per micro-batch
    write_shards([good], alone)
    cfg = load_config(REPO / "configs/demo.yaml", [f"data.shards={both}", "data.buckets=[[9,32,32]]",
                                                    "vae.checkpoint=unused"])
    # The data seed whose epoch plan reads the good shard first, so its samples get the same noise in both runs.
    seed = next(s for s in range(20) if ShardLoader(cfg.data.model_copy(update={"seed": s}), 0, 1, 0, batch_size=1)
                .planners["video"].plan(0)[0][1] == (0,))
    mixed = _train(tmp_path, "mixed", both, "parallel.global_batch=2", f"data.seed={seed}")
    single = _train(tmp_path, "single", alone, "parallel.global_batch=1", f"data.seed={seed}")
    assert read_scalars(mixed, "data/skipped/undecodable_latent")[1] == 1
    for tag in ("train/loss", "train/grad_norm"):
        assert read_scalars(mixed, tag)[1] == pytest.approx(read_scalars(single, tag)[1], rel=1e-6), tag
    ours, theirs = (load_file(str(run / "checkpoints/step00000001/model.safetensors")) for run in (mixed, single))
    assert all((ours[k] - v).norm() <= 1e-6 * v.norm() + 1e-9 for k, v in theirs.items())
    assert scalar_description(mixed, "train/loss") == DESCRIPTIONS["train/loss"]
    assert "usable samples of the step's global batch" in DESCRIPTIONS["train/loss"]
