"""The demo pipeline at its smallest size, through the deepspeed launcher with 2 CPU ranks (ZeRO-3, gloo):
shards -> VAE -> DiT -> latent shards -> sample a decodable mp4. The VAE and the DiT are each trained straight
and, separately, killed after their middle checkpoint and restarted with the same command: the restarted run's
steps (loss, learning rate, gradient norm) and its final weights and EMA equal the straight run's."""

import json
from pathlib import Path

import av
import pytest
from safetensors.torch import load_file

from conftest import REPO, kill_after_checkpoint, launch, launcher, run_vidiff
from datasets import write_tar
from vidiff.data.shards import write_index
from vidiff.data.synthetic import make_clips
from vidiff.data.video import encode_mp4
from vidiff.train.monitor import read_images, read_scalars

pytestmark = pytest.mark.slow

# Straight vs killed-and-resumed, both fp32 on 2 ranks with the same batches and draws: the resumed steps match
# to fp32 noise (measured: identical; the bound allows reduction order to differ after a restart).
RESUME_RTOL = 1e-5


def launch_and_kill(config: str, *overrides: str, cwd: Path, run: Path, tag: str) -> None:
    kill_after_checkpoint(*launcher(config, list(overrides)), cwd, run, tag)


def assert_resume_is_exact(straight: Path, resumed: Path, steps: range, tag: str) -> None:
    for scalar in ("train/loss", "train/lr", "train/grad_norm"):
        ours, theirs = read_scalars(resumed, scalar), read_scalars(straight, scalar)
        for step in steps:
            assert ours[step] == pytest.approx(theirs[step], rel=RESUME_RTOL, abs=1e-12), (scalar, step)
    for export in ("model.safetensors", "ema.safetensors"):
        ours, theirs = (load_file(str(run / "checkpoints" / tag / export)) for run in (resumed, straight))
        assert ours.keys() == theirs.keys()
        for key, value in theirs.items():
            assert (ours[key] - value).norm() <= RESUME_RTOL * value.norm() + 1e-12, (export, key)


def test_demo_pipeline_trains_resumes_exactly_and_samples(tmp_path):
    small = ["data.buckets=[[9,32,32]]", f"data.shards={tmp_path / 'shards'}"]
    made = run_vidiff("shards", "--synthetic", "16", "--frames", "9", "--height", "32", "--width", "32",
                      "--out", str(tmp_path / "shards"), "--max-count", "4", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    # Bad input the run must survive: a zero-byte clip (found in the index) and a cut one (found decoding).
    (_, frames), = make_clips(1, 32, 32, 9, seed=0)
    clip = encode_mp4(frames, 8)
    meta = json.dumps({"frames": 9, "fps": 8, "width": 32, "height": 32}).encode()
    write_tar(tmp_path / "shards" / "shard-999999.tar", {
        "zz_empty.mp4": b"", "zz_empty.txt": b"empty", "zz_empty.json": meta,
        "zz_cut.mp4": clip[: len(clip) // 2], "zz_cut.txt": b"cut", "zz_cut.json": meta})
    write_index(tmp_path / "shards")

    # VAE: 6 steps straight, and killed after its step-3 checkpoint then restarted (EMA and latent statistics
    # are part of what must come back).
    vae = [*small, "vae.base_channels=8", "vae.latent_channels=4", "train.steps=6", "train.checkpoint_every=3",
           "train.log_every=1", "train.ema_decay=0.9", "train.warmup_steps=2", "train.lr_decay=cosine",
           "train.eval_every=3", f"data.eval_shards={tmp_path / 'shards'}", "train.eval_batches=1"]
    vae_dir, vae_resumed = tmp_path / "vae", tmp_path / "vae-resumed"
    launch("configs/vae/demo.yaml", [*vae, f"out_dir={vae_dir}"], cwd=tmp_path)
    assert sorted(read_scalars(vae_dir, "eval/psnr")) == [3, 6] and read_scalars(vae_dir, "eval/ssim")[6] <= 1
    assert read_images(vae_dir, "eval/reconstruction")[6][:4] == b"GIF8"        # input | reconstruction
    assert (vae_dir / "checkpoints/latest").read_text() == "step00000006" and (vae_dir / "config.yaml").is_file()
    launch_and_kill("configs/vae/demo.yaml", *vae, f"out_dir={vae_resumed}", cwd=tmp_path, run=vae_resumed,
                    tag="step00000003")
    resumed = launch("configs/vae/demo.yaml", [*vae, f"out_dir={vae_resumed}"], cwd=tmp_path)
    assert "resumed from step 3" in resumed.stdout + resumed.stderr
    assert_resume_is_exact(vae_dir, vae_resumed, range(4, 7), "step00000006")
    statistics = load_file(str(vae_resumed / "checkpoints/step00000006/model.safetensors"))["latent_scale"]
    assert not (statistics == 1).all()                                       # the exported scale was learned

    # DiT on the VAE's latents (pixel shards: the VAE encodes every batch): the same, killed after step 3.
    dit_dir, dit_resumed = tmp_path / "dit", tmp_path / "dit-resumed"
    dit = [*small, "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "train.checkpoint_every=3",
           "train.log_every=1", "train.ema_decay=0.9", "train.steps=6", f"vae.checkpoint={vae_dir}",
           "sample.steps=4", "sample.prompts=[a red square moving up]"]
    launch("configs/demo.yaml", [*dit, f"out_dir={dit_dir}"], cwd=tmp_path)
    assert (dit_dir / "checkpoints/latest").read_text() == "step00000006"
    for tag in ("train/loss", "train/lr", "train/grad_norm", "perf/samples_per_s"):
        assert sorted(read_scalars(dit_dir, tag)) == [1, 2, 3, 4, 5, 6], tag
    launch_and_kill("configs/demo.yaml", *dit, f"out_dir={dit_resumed}", cwd=tmp_path, run=dit_resumed,
                    tag="step00000003")
    resumed = launch("configs/demo.yaml", [*dit, f"out_dir={dit_resumed}"], cwd=tmp_path)
    assert "resumed from step 3" in resumed.stdout + resumed.stderr
    assert_resume_is_exact(dit_dir, dit_resumed, range(4, 7), "step00000006")
    state = json.loads((dit_resumed / "checkpoints/step00000006/vidiff_state.json").read_text())
    assert state["step"] == 6 and state["data"]["step"] == 6
    assert 6 * 2 * 3 <= state["samples_seen"] <= 6 * 2 * 4                  # steps x ranks x batch, less skips
    assert read_scalars(dit_resumed, "data/skipped/empty_member")[6] == 1

    # Latent shards: encode once, then a DiT run reads them directly (cached text embeddings too).
    latents = tmp_path / "latents"
    cached = run_vidiff("cache-latents", str(REPO / "configs/demo.yaml"), *dit, f"out_dir={dit_dir}", "--out",
                        str(latents), "--text", cwd=tmp_path)
    assert cached.returncode == 0, cached.stderr[-3000:]
    assert len(list(latents.glob("latents-*.tar"))) == 5 and (latents / "index.json").is_file()
    latent_dir = tmp_path / "dit-latents"
    launch("configs/demo.yaml", [*dit, f"data.shards={latents}", f"out_dir={latent_dir}", "train.steps=2"],
           cwd=tmp_path)
    assert sorted(read_scalars(latent_dir, "train/loss")) == [1, 2]

    sampled = run_vidiff("sample", str(REPO / "configs/demo.yaml"), *dit, f"out_dir={dit_dir}", cwd=tmp_path)
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    mp4s = list((dit_dir / "samples/step00000006").glob("*.mp4"))
    assert len(mp4s) == 1
    with av.open(str(mp4s[0])) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (32, 32, 3)
    assert (dit_dir / "samples/step00000006/contact_sheet.png").is_file()
