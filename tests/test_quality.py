"""`vidiff eval`'s figures from a real (briefly trained) DiT run: every field present and in range, the VAE ceiling
and the checker's own ceiling measured on the same held-out clips, and the examples written."""

import json

import pytest

from conftest import REPO, latent_root, launch
from vidiff.eval.frechet import ClipNetConfig
from vidiff.eval.quality import evaluate

pytestmark = pytest.mark.slow


def test_eval_reports_pass_rates_fd_and_the_vae_ceiling(tmp_path_factory, monkeypatch):
    root = latent_root(tmp_path_factory, "quality", samples=8, per_shard=8)
    run = root / "dit"
    launch(REPO / "configs/demo.yaml", [f"out_dir={run}", f"data.shards={root / 'latents'}", "data.buckets=[[9,32,32]]",
                                        f"vae.checkpoint={root / 'vae'}", "model.hidden_size=32", "model.depth=2",
                                        "model.num_heads=2", "text.max_tokens=8", "parallel.micro_batch=2",
                                        "train.steps=2", "train.ema_decay=0.9"], 1, root)
    monkeypatch.setenv("VIDIFF_CACHE", str(root / "cache"))
    result = evaluate(run, per_combo=1, out=root / "eval",
                      clipnet=ClipNetConfig(frames=9, height=32, width=32, channels=(4, 8, 8), clips=64, epochs=1))
    assert result["prompts"] == {"seen": 42, "unseen": 6}
    for part in ("seen", "unseen"):
        assert set(result[part]) == {"pass_rate", "count", "shape", "motion", "coherence"}
        assert all(0 <= v <= 1 for v in result[part].values())
    assert 0 <= result["vae_ceiling"] <= 1 and 0 <= result["prompt_swap_accuracy"] <= 1
    assert result["fd"] > 0 and result["fd_baseline"] > 0 and result["fd_ratio"] == result["fd"] / result["fd_baseline"]
    assert result["sampler"]["steps"] == 18 and result["sampler"]["size"] == [9, 32, 32]
    checks = [json.loads(line) for line in (root / "eval/checks.jsonl").read_text().splitlines()]
    assert len(checks) == 48 and sum(c["unseen"] for c in checks) == 6
    assert (root / "eval/grid.png").is_file()
