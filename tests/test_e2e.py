"""The demo pipeline at its smallest size, through the deepspeed launcher with 2 CPU ranks (ZeRO-3, gloo):
shards -> VAE -> DiT -> restart resumes -> sample writes a decodable mp4."""

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import pytest

from conftest import REPO, run_vidiff
from datasets import write_tar
from vidiff.data.shards import write_index
from vidiff.data.synthetic import make_clips
from vidiff.data.video import encode_mp4
from vidiff.train.monitor import read_images, read_scalars

pytestmark = pytest.mark.slow


def launch(config: str, *overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "VIDIFF_PYTHON": sys.executable, "NPROC": "2", "PYTHONPATH": str(REPO)}
    result = subprocess.run([str(REPO / "launchers/local.sh"), str(REPO / config), *overrides], cwd=cwd,
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def test_demo_pipeline_trains_resumes_and_samples(tmp_path):
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

    vae_dir = tmp_path / "vae"
    launch("configs/vae/demo.yaml", *small, "vae.base_channels=8", "vae.latent_channels=4",
           "train.steps=3", "train.checkpoint_every=2", f"out_dir={vae_dir}", "train.eval_every=2",
           f"data.eval_shards={tmp_path / 'shards'}", "train.eval_batches=1", cwd=tmp_path)
    assert sorted(read_scalars(vae_dir, "eval/psnr")) == [2, 3] and read_scalars(vae_dir, "eval/ssim")[3] <= 1
    preview = read_images(vae_dir, "eval/reconstruction")[3]
    assert preview[:4] == b"GIF8"                                              # input | reconstruction
    assert (vae_dir / "checkpoints/latest").read_text() == "step00000003"
    assert (vae_dir / "config.yaml").is_file()

    dit_dir = tmp_path / "dit"
    dit = [*small, "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "train.checkpoint_every=2", "train.log_every=1",
           f"vae.checkpoint={vae_dir}", f"out_dir={dit_dir}", "sample.steps=4", "sample.prompts=[a red square moving up]"]
    launch("configs/demo.yaml", *dit, "train.steps=4", cwd=tmp_path)
    assert (dit_dir / "checkpoints/latest").read_text() == "step00000004"
    first = read_scalars(dit_dir, "train/loss")
    assert sorted(first) == [1, 2, 3, 4]
    for tag in ("train/lr", "train/grad_norm", "perf/samples_per_s"):
        assert sorted(read_scalars(dit_dir, tag)) == [1, 2, 3, 4], tag

    resumed = launch("configs/demo.yaml", *dit, "train.steps=6", cwd=tmp_path)
    assert "resumed from step 4" in resumed.stdout + resumed.stderr
    state = json.loads((dit_dir / "checkpoints/step00000006/vidiff_state.json").read_text())
    assert state["step"] == 6 and state["data"]["step"] == 6
    assert 6 * 2 * 3 <= state["samples_seen"] <= 6 * 2 * 4                  # steps x ranks x batch, less skips
    assert sorted(read_scalars(dit_dir, "train/loss")) == [1, 2, 3, 4, 5, 6]     # the step counter continued
    assert read_scalars(dit_dir, "data/skipped/empty_member")[6] == 1

    # Latent shards: encode once, then a DiT run reads them directly (cached text embeddings too).
    latents = tmp_path / "latents"
    cached = run_vidiff("cache-latents", str(REPO / "configs/demo.yaml"), *dit, "--out", str(latents), "--text",
                        cwd=tmp_path)
    assert cached.returncode == 0, cached.stderr[-3000:]
    assert len(list(latents.glob("latents-*.tar"))) == 5 and (latents / "index.json").is_file()
    latent_dir = tmp_path / "dit-latents"
    launch("configs/demo.yaml", *dit, f"data.shards={latents}", f"out_dir={latent_dir}", "train.steps=2",
           cwd=tmp_path)
    assert sorted(read_scalars(latent_dir, "train/loss")) == [1, 2]

    sampled = run_vidiff("sample", str(REPO / "configs/demo.yaml"), *dit, cwd=tmp_path)
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    mp4s = list((dit_dir / "samples/step00000006").glob("*.mp4"))
    assert len(mp4s) == 1
    with av.open(str(mp4s[0])) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (32, 32, 3)
    assert (dit_dir / "samples/step00000006/contact_sheet.png").is_file()
