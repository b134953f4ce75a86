"""Checkpoints: DeepSpeed's files are read with torch.load(weights_only=True) (code pickled into a checkpoint never
runs), and a `deepspeed:` passthrough that would write checkpoints behind vidiff's back is refused before launch."""

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import REPO, free_port, run_vidiff
from vidiff.config import load_config
from vidiff.parallel.deepspeed import deepspeed_config
from vidiff.parallel.layout import make_layout
from vidiff.parallel.sharded import build_sharded_engine
from vidiff.train import checkpoint, resume
from vidiff.train.resume import restore_engine
from vidiff.train.objectives import build_denoiser
from vidiff.train.trainer import make_optimizer, release_shm_workspace, seed_everything


class _WritesFile:
    """Unpickling this writes a file: what code hidden in a checkpoint could do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return Path.write_text, (Path(self.path), "unpickled")


def _resume_worker(rank: int, port: int, run: str, weights_only: bool) -> None:
    """One rank: train one step, checkpoint it, plant a payload in DeepSpeed's model-states file, resume."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                      LOCAL_SIZE="1")
    import deepspeed

    deepspeed.init_distributed("gloo", auto_mpi_discovery=False)
    cfg = load_config(REPO / "configs/demo.yaml", ["vae.checkpoint=unused", "model.hidden_size=32", "model.depth=1",
                                                    "model.num_heads=2", f"out_dir={run}"])
    layout = make_layout(cfg, 1)
    seed_everything(0)
    engine, _ = build_sharded_engine(cfg, layout, lambda: build_denoiser(cfg, 4, 384), deepspeed_config(cfg, layout),
                                     make_optimizer)
    tag = checkpoint.save(engine, Path(run), 1, {"samples_seen": 0}, layout)
    if weights_only:
        for _ in range(2):                # a run may restore twice (a reload after non-finite steps)
            restore_engine(engine, tag)
    states = next(tag.glob("*model_states.pt"))
    state = torch.load(states, weights_only=False)
    state["payload"] = _WritesFile(f"{run}/canary.txt")
    torch.save(state, states)
    if not weights_only:                  # the negative control: DeepSpeed's own engine (weights_only=False)
        resume.use_weights_only_loading = lambda engine: None
    try:
        restore_engine(engine, tag)
    except checkpoint.CheckpointError as error:
        Path(f"{run}/refused.txt").write_text(str(error))
    release_shm_workspace()
    dist.destroy_process_group()


@pytest.mark.parametrize("weights_only", [True, False])
def test_resume_never_runs_code_pickled_into_a_checkpoint(tmp_path, weights_only):
    mp.spawn(_resume_worker, args=(free_port(), str(tmp_path), weights_only), nprocs=1)
    if weights_only:
        assert not (tmp_path / "canary.txt").exists()
        refused = (tmp_path / "refused.txt").read_text()
        assert "holds pickled objects that are not weights" in refused and "Unsupported global" in refused, refused
    else:                                 # what would happen without it: the payload ran
        assert (tmp_path / "canary.txt").read_text() == "unpickled"


@pytest.mark.parametrize("passthrough, key", [
    ("{checkpoint: {writer: {decoupled: true}}}", "deepspeed.checkpoint.writer"),
    ("{checkpoint: {writer: {type: fast}}}", "deepspeed.checkpoint.writer"),
    ("{datastates_ckpt: {}}", "deepspeed.datastates_ckpt"),
])
def test_an_asynchronous_checkpoint_writer_is_refused_before_launch(passthrough, key, tmp_path):
    result = run_vidiff("check", "--world-size", "2", str(REPO / "configs/demo.yaml"), f"deepspeed={passthrough}")
    assert result.returncode == 2
    assert key in result.stderr and "does not wait" in result.stderr
    allowed = run_vidiff("check", str(REPO / "configs/demo.yaml"), f"out_dir={tmp_path / 'run'}",   # not runs/demo's
                         "deepspeed={datastates_ckpt: false, checkpoint: {tag_validation: FAIL}}")  # checkpoints
    assert allowed.returncode == 0, allowed.stderr


def test_universal_info_names_only_patterns_the_model_has():
    """ds_to_universal refuses a ZeRO-1/2 checkpoint whose merge patterns match no parameter (strict): the VAE has
    no row-parallel layers, so its checkpoints could not resume on another data size until the info left them
    out. Negative control: the DiT's names keep the row-parallel pattern."""
    import re

    from deepspeed.checkpoint.constants import PARAMETER_WITH_ROW_PARALLELISM_PATTERNS as ROW
    from deepspeed.checkpoint.constants import TP_REPLICATED_PARAMETER_PATTERNS as REPLICATED

    from vidiff.models.vae import VideoVAE
    from vidiff.parallel.universal import universal_info

    cfg = load_config(REPO / "configs/vae/demo.yaml")
    with torch.device("meta"):
        vae = [n for n, _ in VideoVAE(cfg.vae).named_parameters()]
        dit = [n for n, _ in build_denoiser(load_config(REPO / "configs/demo.yaml"), 4, 384).named_parameters()]
    for names in (vae, dit):
        info = universal_info(names)
        for pattern in info[ROW] + info[REPLICATED]:
            assert any(re.match(pattern, n) for n in names), pattern
    assert universal_info(vae)[ROW] == [] and len(universal_info(dit)[ROW]) == 1
