"""Parallel layouts, below the trainer: the layout check (before any process), the DeepSpeed config, the
tensor-parallel split of the pipeline layout (a block) and of the sharded layout (AutoTP's specs, on a whole DiT)
against the unsplit model, gradients included, and zero.Init builds equal to plain builds in any precision.
Training runs of every layout against one process: tests/test_layouts.py."""

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from conftest import REPO, free_port, run_vidiff
from vidiff.config import ConfigError, RunConfig, VAEConfig, load_config
from vidiff.diffusion.edm import edm_loss
from vidiff.models.dit import DiTBlock, count_parameters, rope_sequences
from vidiff.models.vae import VideoVAE
from vidiff.parallel.deepspeed import deepspeed_config
from vidiff.parallel.layout import LayoutError, make_layout
from vidiff.parallel.sharded import build_sharded_engine
from vidiff.parallel.tensor import split_block, split_dim
from vidiff.train.objectives import build_denoiser
from vidiff.train.trainer import make_optimizer, release_shm_workspace, seed_everything
from weights import randomize

DEMO = REPO / "configs/demo.yaml"


def _cfg(*overrides: str) -> RunConfig:
    return load_config(DEMO, list(overrides))


@pytest.mark.parametrize("world, overrides, needles", [
    (6, ["parallel.tensor=4"],
     ["world size 6", "parallel.tensor x parallel.pipeline x parallel.sequence = 4 x 1 x 1 = 4", "multiples of 4"]),
    (4, ["parallel.tensor=4", "model.num_heads=2", "model.hidden_size=64"],
     ["model.num_heads 2 is not divisible by parallel.tensor 4", "valid tensor sizes for 2 heads: 1, 2"]),
    (4, ["parallel.pipeline=4", "model.depth=3"], ["model.depth 3 < parallel.pipeline 4", "1 to 3"]),
    (2, ["parallel.global_batch=10"], ["parallel.global_batch 10", "4 x 2 = 8", "multiples of 8"]),
    (3, ["parallel.sequence=2", "data.buckets=[[13,32,32]]"], ["world size 3", "multiples of 2"]),
    (2, ["parallel.sequence=2", "data.buckets=[[13,32,32],[1,32,32]]"],
     ["bucket (1, 32, 32) has 1 latent frames", "not divisible by parallel.sequence 2", "5, 13, 21"]),
    (2, ["parallel.sequence=2", "data.buckets=[[13,24,24]]", "model.patch_size=[1,1,1]"],
     ["9 latent positions", "dsp splits them"]),
    (2, ["parallel.sequence=2", "data.buckets=[[13,32,32]]", "model.attention=full"],
     ["sequence_mode dsp with model.attention full", "use sequence_mode: ulysses"]),
    (4, ["parallel.sequence=4", "parallel.sequence_mode=ulysses", "data.buckets=[[13,32,32]]", "model.num_heads=2"],
     ["splits each tensor rank's 2 heads", "valid sequence sizes: 1, 2"]),
    (2, ["parallel.sequence=2", "task=vae", "data.buckets=[[13,32,32]]"], ["task 'vae' trains the VAE"]),
])
def test_an_impossible_layout_is_named_with_what_is_valid(world, overrides, needles):
    with pytest.raises(LayoutError) as info:
        make_layout(_cfg(*overrides), world)
    for needle in needles:
        assert needle in str(info.value)


def test_layout_sizes_and_rank_coordinates():
    layout = make_layout(_cfg("parallel.tensor=2", "parallel.pipeline=2", "parallel.micro_batch=2",
                              "parallel.global_batch=16"), world=8)
    assert (layout.data, layout.accumulation, layout.kind) == (2, 4, "pipeline")
    # DeepSpeed's pipe x data x model order: tensor-parallel ranks adjacent, then data, then stages.
    assert [layout.coordinates(r) for r in range(8)] == [
        (0, 0, 0, 0), (0, 0, 0, 1), (0, 1, 0, 0), (0, 1, 0, 1),
        (1, 0, 0, 0), (1, 0, 0, 1), (1, 1, 0, 0), (1, 1, 0, 1)]
    assert make_layout(_cfg(), world=3).accumulation == 1          # default global batch: one micro-batch each


def test_sequence_layout_sizes_groups_and_coordinates():
    layout = make_layout(_cfg("parallel.tensor=2", "parallel.sequence=2", "data.buckets=[[13,32,32]]"), world=8)
    assert (layout.data, layout.sequence, layout.accumulation) == (2, 2, 1)
    # (stage, data, sequence, tensor): tensor ranks adjacent, then sequence, then data
    assert [layout.coordinates(r) for r in range(8)] == [
        (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 1, 0), (0, 0, 1, 1),
        (0, 1, 0, 0), (0, 1, 0, 1), (0, 1, 1, 0), (0, 1, 1, 1)]
    assert layout.sequence_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    for group in layout.sequence_groups():          # one data and tensor rank per group, every sequence rank
        assert len({layout.coordinates(r).data for r in group}) == 1
        assert sorted(layout.coordinates(r).sequence for r in group) == [0, 1]


def test_sequence_needs_the_sharded_layout_and_eager_blocks():
    with pytest.raises(ConfigError, match="sequence parallelism runs in the sharded layout"):
        _cfg("parallel.sequence=2", "parallel.pipeline=2")
    with pytest.raises(ConfigError, match="compile with sequence 2"):
        _cfg("parallel.sequence=2", "parallel.compile=true", "parallel.zero_stage=2")


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
    # No rank holds the whole model: gathered weights are released within one block's parameters.
    with torch.device("meta"):
        block = count_parameters(DiTBlock(hidden, cfg.model.num_heads, cfg.model.mlp_ratio))
        whole = count_parameters(build_denoiser(cfg, 16, 384))
    assert zero["stage3_max_reuse_distance"] == block < whole / cfg.model.depth * 1.01
    assert "memory_efficient_linear" not in zero           # DeepSpeed's default (on): no weight views saved
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
    block = randomize(DiTBlock(32, 4, 4.0))
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
    mp.spawn(_block_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
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


# ---- the sharded layout's AutoTP specs: gradients of a whole DiT against the unsplit one ----

def _tiny_dit_cfg(*overrides: str) -> RunConfig:
    return _cfg("vae.checkpoint=unused", "model.hidden_size=32", "model.depth=2", "model.num_heads=4",
                "model.zero_init=false", "parallel.micro_batch=2", *overrides)


def _dit_inputs() -> tuple[torch.Tensor, ...]:
    """x0 (2, 4, 3, 4, 4), sigma, noise, text (2, 5, 384) and its mask (the second caption dropped: the null
    embedding gets a gradient too)."""
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 4, 3, 4, 4, generator=g)
    mask = torch.tensor([[True, True, True, False, False], [False] * 5])
    return x0, torch.tensor([0.4, 3.0]), torch.randn(x0.shape, generator=g), torch.randn(2, 5, 384, generator=g), mask


def _dit_loss(model, inputs) -> torch.Tensor:
    x0, sigma, noise, text, mask = inputs
    return edm_loss(model, x0, sigma, noise, 1.0, text=text, text_mask=mask).mean()


def _autotp_worker(rank: int, world: int, port: int, out: str, grad_allreduce: bool) -> None:
    """Rank `rank` of the sharded layout with tensor 2 (zero.Init, ZeRO-3, AutoTP with our layer specs): one
    backward, then every parameter's gradient as this rank holds it (split parameters: its slice)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), LOCAL_SIZE=str(world))
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    deepspeed.init_distributed("gloo", auto_mpi_discovery=False)
    torch.set_num_threads(1)
    cfg = _tiny_dit_cfg("parallel.tensor=2")
    layout = make_layout(cfg, world)
    ds = deepspeed_config(cfg, layout)
    for spec in ds["tensor_parallel"]["partition_config"]["layer_specs"]:
        if "grad_allreduce" in spec:
            spec["grad_allreduce"] = grad_allreduce
    seed_everything(cfg.seed)
    engine, _ = build_sharded_engine(cfg, layout, lambda: build_denoiser(cfg, 4, 384), ds, make_optimizer)
    engine.backward(_dit_loss(engine, _dit_inputs()))
    grads = {name: safe_get_full_grad(p).detach().float().contiguous() for name, p in engine.module.named_parameters()}
    save_file(grads, f"{out}/rank{rank}.safetensors")
    release_shm_workspace()
    dist.destroy_process_group()


def _autotp_gradients(tmp_path, grad_allreduce: bool) -> dict[str, float]:
    """Largest difference of each parameter's gradient under AutoTP (slices joined) from the unsplit DiT's,
    relative to the gradient's largest magnitude."""
    mp.spawn(_autotp_worker, args=(2, free_port(), str(tmp_path), grad_allreduce), nprocs=2)
    cfg = _tiny_dit_cfg()
    seed_everything(cfg.seed)
    model = build_denoiser(cfg, 4, 384)
    _dit_loss(model, _dit_inputs()).backward()
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    errors = {}
    for name, p in model.named_parameters():
        dim = split_dim(name)
        got = ranks[0][name] if dim is None else torch.cat([r[name] for r in ranks], dim=dim)
        assert dim is not None or torch.equal(ranks[0][name], ranks[1][name]), name   # replicated: one gradient
        assert got.shape == p.grad.shape, name
        errors[name] = ((got - p.grad).abs().max() / p.grad.abs().max()).item()
    return errors


def test_autotp_specs_give_the_gradients_of_the_unsplit_dit(tmp_path):
    """Every parameter of an open DiT (random gates and final layer, so all have a gradient) under AutoTP with
    tensor 2: split projections' slices join into the unsplit gradient, replicated parameters (adaLN, norms,
    embeddings, final layer and the per-head QK norms) carry the whole one."""
    errors = _autotp_gradients(tmp_path, grad_allreduce=True)
    assert max(errors.values()) <= 1e-5, {k: v for k, v in errors.items() if v > 1e-5}
    assert any("q_norm" in name for name in errors) and any(".q.weight" in name for name in errors)


def test_autotp_without_head_norm_allreduce_fails_the_check(tmp_path):
    """Negative control: without grad_allreduce each rank's QK-norm gradient covers its own heads only, and
    ZeRO-3's average over the ranks halves the sum."""
    errors = _autotp_gradients(tmp_path, grad_allreduce=False)
    head_norms = {k: v for k, v in errors.items() if "_norm." in k and "norm_x" not in k}
    assert head_norms and min(head_norms.values()) > 1e-2, head_norms
    assert max(v for k, v in errors.items() if k not in head_norms) <= 1e-5


# ---- zero.Init builds the weights of a plain build, in any precision ----

def _zero_init_worker(rank: int, port: int, out: str, precision: str, plain_draws: bool) -> None:
    """Build the open DiT and the VAE under zero.Init (ZeRO-3) in `precision`, gather, save as fp32. With
    plain_draws, initialize with torch's in-place nn.init (the broken variant) instead of models/init.py."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                      LOCAL_SIZE="1")
    import deepspeed

    from vidiff.models import attention, init
    if plain_draws:
        attention.xavier_uniform_ = torch.nn.init.xavier_uniform_
        init.Conv3d.reset_parameters = torch.nn.Conv3d.reset_parameters
    deepspeed.init_distributed("gloo", auto_mpi_discovery=False)
    cfg = _tiny_dit_cfg(f"parallel.precision={precision}")
    weights = {}
    with deepspeed.zero.Init(config_dict_or_path=deepspeed_config(cfg, make_layout(cfg, 1))):
        seed_everything(cfg.seed)
        models = {"dit": build_denoiser(cfg, 4, 384), "vae": VideoVAE(VAEConfig(latent_channels=4, base_channels=8))}
    for prefix, model in models.items():
        for name, p in model.named_parameters():
            with deepspeed.zero.GatheredParameters([p]):
                weights[f"{prefix}.{name}"] = p.detach().float().clone()
    save_file(weights, f"{out}/weights.safetensors")
    release_shm_workspace()
    dist.destroy_process_group()


def _zero_init_error(tmp_path, precision: str, plain_draws: bool = False) -> float:
    """Largest relative difference of a zero.Init build from a plain fp32 build of the same seed."""
    mp.spawn(_zero_init_worker, args=(free_port(), str(tmp_path), precision, plain_draws), nprocs=1)
    built = load_file(str(tmp_path / "weights.safetensors"))
    cfg = _tiny_dit_cfg()
    seed_everything(cfg.seed)
    plain = {"dit": build_denoiser(cfg, 4, 384), "vae": VideoVAE(VAEConfig(latent_channels=4, base_channels=8))}
    return max(((built[f"{prefix}.{n}"] - p).norm() / p.norm()).item()
               for prefix, model in plain.items() for n, p in model.named_parameters() if p.norm() > 0)


@pytest.mark.parametrize("precision, bound", [("fp32", 0.0), ("bf16", 4e-3)])
def test_zero_init_builds_the_weights_of_a_plain_build(tmp_path, precision, bound):
    """What makes every layout start from the same weights: fp32 exactly, bf16 up to its rounding (2^-8 of each
    value; measured 2.2e-3 of a tensor's norm)."""
    assert _zero_init_error(tmp_path, precision) <= bound


def test_in_place_init_in_bf16_fails_the_check(tmp_path):
    """Negative control: torch's in-place initializers on the bf16 tensors zero.Init creates draw other numbers
    (measured: 10-26% of most weights' norm)."""
    assert _zero_init_error(tmp_path, "bf16", plain_draws=True) > 5e-2
