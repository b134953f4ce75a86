"""Parallel layouts: the layout check (before any process), the DeepSpeed config, a tensor-parallel block
against its unsplit twin, and 20 training steps of every layout against single-process training."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from conftest import REPO, run_vidiff
from vidiff.config import ConfigError, RunConfig, VAEConfig, load_config, save_config
from vidiff.data.latents import npy_bytes
from vidiff.data.shards import write_shards
from vidiff.models.dit import DiTBlock, rope_sequences
from vidiff.models.vae import VideoVAE
from vidiff.parallel.deepspeed import deepspeed_config
from vidiff.parallel.layout import make_layout
from vidiff.parallel.tensor import split_block, split_dim
from vidiff.train.monitor import read_scalars

DEMO = REPO / "configs/demo.yaml"


def _cfg(*overrides: str) -> RunConfig:
    return load_config(DEMO, list(overrides))


@pytest.mark.parametrize("world, overrides, needles", [
    (6, ["parallel.tensor=4"], ["world size 6", "tensor x parallel.pipeline = 4 x 1 = 4", "multiples of 4"]),
    (4, ["parallel.tensor=4", "model.num_heads=2", "model.hidden_size=64"],
     ["model.num_heads 2 is not divisible by parallel.tensor 4", "valid tensor sizes for 2 heads: 1, 2"]),
    (4, ["parallel.pipeline=4", "model.depth=3"], ["model.depth 3 < parallel.pipeline 4", "1 to 3"]),
    (2, ["parallel.global_batch=10"], ["parallel.global_batch 10", "4 x 2 = 8", "multiples of 8"]),
])
def test_an_impossible_layout_is_named_with_what_is_valid(world, overrides, needles):
    with pytest.raises(ConfigError) as info:
        make_layout(_cfg(*overrides), world)
    for needle in needles:
        assert needle in str(info.value)


def test_layout_sizes_and_rank_coordinates():
    layout = make_layout(_cfg("parallel.tensor=2", "parallel.pipeline=2", "parallel.micro_batch=2",
                              "parallel.global_batch=16"), world=8)
    assert (layout.data, layout.accumulation, layout.kind) == (2, 4, "pipeline")
    # DeepSpeed's pipe x data x model order: tensor-parallel ranks adjacent, then data, then stages.
    assert [layout.coordinates(r) for r in range(8)] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]
    assert make_layout(_cfg(), world=3).accumulation == 1          # default global batch: one micro-batch each


def test_the_old_batch_size_key_says_where_it_went():
    with pytest.raises(ConfigError, match="data.batch_size moved to parallel.micro_batch"):
        _cfg("data.batch_size=4")


def test_pipeline_needs_zero_1():
    with pytest.raises(ConfigError, match="pipeline layout runs ZeRO stage 1"):
        _cfg("parallel.pipeline=2", "parallel.zero_stage=3")
    assert _cfg("parallel.pipeline=2").parallel.zero == 1 and _cfg().parallel.zero == 3


def test_launcher_refuses_a_bad_layout_before_starting_ranks():
    env = {**os.environ, "VIDIFF_PYTHON": sys.executable, "NPROC": "3", "PYTHONPATH": str(REPO)}
    result = subprocess.run([str(REPO / "launchers/local.sh"), str(DEMO), "parallel.tensor=2"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "world size 3 is not divisible" in result.stderr
    assert "spawned" not in result.stdout + result.stderr                 # no rank was started


def test_check_refuses_a_passthrough_key_that_parallel_owns():
    result = run_vidiff("check", "--world-size", "2", str(DEMO), "deepspeed={zero_optimization: {stage: 2}}")
    assert result.returncode == 2
    assert "deepspeed.zero_optimization.stage is set from parallel.zero_stage" in result.stderr


def test_deepspeed_config_is_built_from_the_run_config():
    cfg = _cfg("parallel.tensor=2", "parallel.precision=bf16", "parallel.global_batch=16", "model.hidden_size=2048",
               "deepspeed={zero_optimization: {stage3_max_live_parameters: 1000}, comms_logger: {enabled: true}}")
    ds = deepspeed_config(cfg, make_layout(cfg, world=4))
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["bf16"] == {"enabled": True} and ds["data_types"] == {"grad_accum_dtype": "fp32"}
    hidden = cfg.model.hidden_size
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["reduce_bucket_size"] == hidden**2                # from the width
    assert deepspeed_config(_cfg(), make_layout(_cfg(), 1))["zero_optimization"]["reduce_bucket_size"] == 1 << 20
    assert zero["stage3_max_live_parameters"] == 1000 and ds["comms_logger"] == {"enabled": True}   # passthrough
    assert ds["tensor_parallel"]["autotp_size"] == 2
    override = _cfg("deepspeed={zero_optimization: {reduce_bucket_size: 5}}")
    assert deepspeed_config(override, make_layout(override, 1))["zero_optimization"]["reduce_bucket_size"] == 5
    for owned, where in [("{zero_optimization: {stage: 2}}", "parallel.zero_stage"),
                         ("{train_micro_batch_size_per_gpu: 8}", "parallel.micro_batch")]:
        bad = _cfg(f"deepspeed={owned}")
        with pytest.raises(ConfigError, match=where):
            deepspeed_config(bad, make_layout(bad, 1))


# ---- a tensor-parallel DiT block against the unsplit block ----

def _block_case():
    """A DiT block with every branch open (random weights instead of adaLN-Zero's closed start) and its inputs."""
    torch.manual_seed(0)
    block = DiTBlock(32, 4, 4.0)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.1)
    B, T, D = 2, 3, 32
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, 4, D, generator=g, requires_grad=True)          # (B, T, N, D), a 2x2 token grid
    c = torch.randn(B, D, generator=g, requires_grad=True)
    context = torch.randn(B, 5, D, generator=g, requires_grad=True)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    ropes = rope_sequences(T, 2, 2, D // 4, False, B, None)
    return block, (x, c, context), (mask, *ropes)


def _run_block(block, inputs, rest) -> dict[str, torch.Tensor]:
    x, c, context = inputs
    y = block(x, c, context, *rest)
    y.pow(2).sum().backward()
    return {"y": y.detach(), "x.grad": x.grad, "c.grad": c.grad, "context.grad": context.grad,
            **{f"param.{n}": p.grad for n, p in block.named_parameters()}}


def _block_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    block, inputs, rest = _block_case()
    split = split_block(block, dist.new_group(list(range(world))), rank, world)
    save_file(_run_block(split, inputs, rest), f"{out}/rank{rank}.safetensors")
    dist.destroy_process_group()


def _assert_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Equal up to fp32 rounding of a sum split over ranks: 1e-5 of the tensor's largest magnitude."""
    assert a.shape == b.shape, what
    assert (a - b).abs().max() <= 1e-5 * b.abs().max(), f"{what}: {(a - b).abs().max()} vs {b.abs().max()}"


def test_tensor_parallel_block_forward_and_backward_match_the_unsplit_block(tmp_path):
    mp.spawn(_block_worker, args=(2, 29400 + os.getpid() % 500, str(tmp_path)), nprocs=2)
    block, inputs, rest = _block_case()
    whole = _run_block(block, inputs, rest)
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    for r in ranks:                                    # every rank ends with the whole output and input grads
        for key in ("y", "x.grad", "c.grad", "context.grad"):
            _assert_close(r[key], whole[key], key)
    for name, _ in block.named_parameters():
        dim, key = split_dim(name), f"param.{name}"
        if dim is None:                                # replicated (the QK norms too): the whole gradient
            for r in ranks:
                _assert_close(r[key], whole[key], name)
        else:                                          # split: the slices join into the whole gradient
            joined = torch.cat([r[key] for r in ranks], dim=dim)
            _assert_close(joined, whole[key], name)


# ---- every layout against single-process training ----

LAYOUTS = {                      # name: (ranks, overrides)
    "zero3-dp2": (2, []),
    "zero3-dp2-tp2": (4, ["parallel.tensor=2"]),
    "pipeline-pp2": (2, ["parallel.pipeline=2"]),
    "pipeline-pp2-tp2": (4, ["parallel.pipeline=2", "parallel.tensor=2"]),
}
STEPS = 20


def _vae_run(folder) -> None:
    """A VAE run folder as the trainer exports one (untrained: the DiT here reads latent shards)."""
    cfg = RunConfig(task="vae", out_dir=str(folder), vae=VAEConfig(latent_channels=4, base_channels=8))
    tag = folder / "checkpoints/step00000001"
    tag.mkdir(parents=True)
    save_config(cfg, folder / "config.yaml")
    save_file({k: v.contiguous() for k, v in VideoVAE(cfg.vae).state_dict().items()}, str(tag / "model.safetensors"))
    (folder / "checkpoints/latest").write_text(tag.name)


def _latent_samples(n: int):
    """Latent shard samples with cached token embeddings (MiniLM width), a fifth of them with a dropped caption."""
    rng = np.random.default_rng(0)
    for i in range(n):
        mask = np.arange(8) < rng.integers(1, 8)
        dropped = i % 5 == 0
        yield {"__key__": f"s{i:04d}", "txt": "" if dropped else f"caption {i}",
               "latent.npy": npy_bytes(rng.standard_normal((4, 3, 4, 4)).astype(np.float16)),
               "text.npy": npy_bytes(rng.standard_normal((8, 384)).astype(np.float16)),
               "mask.npy": npy_bytes(mask & (not dropped)),
               "json": {"frames": 9, "height": 32, "width": 32, "fps": 8}}


def _shm_workspaces() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")}


def _train(tmp_path, name: str, ranks: int, overrides: list[str]) -> None:
    """Train through the launcher; the run leaves no DeepSpeed shared-memory workspace behind (69 MB each)."""
    before = _shm_workspaces()
    env = {**os.environ, "VIDIFF_PYTHON": sys.executable, "NPROC": str(ranks), "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [str(REPO / "launchers/local.sh"), str(REPO / "configs/demo.yaml"), f"out_dir={tmp_path / name}",
         f"data.shards={tmp_path / 'latents'}", "data.buckets=[[9,32,32]]", "data.caption_dropout=0.0",
         f"vae.checkpoint={tmp_path / 'vae'}", "model.hidden_size=32", "model.depth=2", "model.num_heads=2",
         "text.max_tokens=8", f"train.steps={STEPS}", "train.warmup_steps=0", "train.log_every=1",
         f"train.checkpoint_every={STEPS}", "train.ema_decay=0.9", "parallel.micro_batch=2",
         "parallel.global_batch=8", *overrides],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert _shm_workspaces() <= before


def _weights(run, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step{STEPS:08d}" / name))


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """Single-process training (world 1, 4 micro-batches of 2 per step): the reference of every layout."""
    tmp_path = tmp_path_factory.mktemp("layouts")
    _vae_run(tmp_path / "vae")
    write_shards(_latent_samples(48), tmp_path / "latents", max_count=16)
    _train(tmp_path, "single", 1, [])
    return tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_trains_exactly_like_a_single_process(single_process, name):
    """Same seed, same global batch of 8, fp32: the loss at every step within rtol 1e-3, the step-1 global
    gradient norm within rtol 1e-4 (Adam would hide a wrongly scaled gradient from the loss), and the exported
    weights and EMA after 20 steps equal the single process's."""
    ranks, overrides = LAYOUTS[name]
    _train(single_process, name, ranks, overrides)
    reference, run = single_process / "single", single_process / name
    for tag in ("train/loss", "train/grad_norm", "perf/tokens_per_s", "perf/mfu"):
        assert sorted(read_scalars(run, tag)) == list(range(1, STEPS + 1)), tag      # logged every step
    losses, expected = read_scalars(run, "train/loss"), read_scalars(reference, "train/loss")
    for step in range(1, STEPS + 1):
        assert losses[step] == pytest.approx(expected[step], rel=1e-3), step
    assert read_scalars(run, "train/grad_norm")[1] == pytest.approx(read_scalars(reference, "train/grad_norm")[1],
                                                                     rel=1e-4)
    assert 0 < read_scalars(run, "perf/mfu")[STEPS] < 1
    for export in ("model.safetensors", "ema.safetensors"):
        ours, theirs = _weights(run, export), _weights(reference, export)
        assert ours.keys() == theirs.keys()
        for key, value in theirs.items():          # within 1e-3 of each tensor's norm
            assert (ours[key] - value).norm() <= 1e-3 * value.norm() + 1e-7, (export, key)


@pytest.mark.slow
def test_bf16_trains_close_to_fp32(single_process):
    """bf16 weights and compute with fp32 gradient accumulation (ZeRO-3, 2 ranks): the same run within 2% of
    fp32 at every step, the step-1 gradient norm within 1% (and not equal: bf16 really ran)."""
    _train(single_process, "bf16", 2, ["parallel.precision=bf16"])
    run, reference = single_process / "bf16", single_process / "single"
    losses, expected = read_scalars(run, "train/loss"), read_scalars(reference, "train/loss")
    for step in range(1, STEPS + 1):
        assert losses[step] == pytest.approx(expected[step], rel=2e-2), step
    norm, fp32_norm = read_scalars(run, "train/grad_norm")[1], read_scalars(reference, "train/grad_norm")[1]
    assert norm == pytest.approx(fp32_norm, rel=1e-2) and norm != fp32_norm
