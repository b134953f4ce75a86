"""The step loop: forward, backward, step, log, checkpoint cadence; resumes from the latest checkpoint."""

from __future__ import annotations

import dataclasses
import math
import os
import random
import warnings
from collections import Counter
from functools import partial
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from vidiff.config import RunConfig, TrainConfig, save_config
from vidiff.data.pipeline import SKIP_REASONS, ShardLoader, to_model_input
from vidiff.device import rank_device
from vidiff.models.dit import count_parameters
from vidiff.models.vae import SPATIAL_FACTOR, latent_frames
from vidiff.parallel.deepspeed import deepspeed_config
from vidiff.parallel.layout import make_layout
from vidiff.parallel.pipeline import build_pipeline_engine, pipeline_step
from vidiff.parallel.sharded import build_sharded_engine
from vidiff.train import checkpoint
from vidiff.train.checkpoint import CONFIG_NAME
from vidiff.train.ema import EMA
from vidiff.train.monitor import Monitor, peak_tflops
from vidiff.train.objectives import build_objective


# torch deprecates the collectives DeepSpeed calls; the warning says nothing a user can act on.
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr after `step` optimizer steps: linear warmup, then constant or cosine to 0."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.lr_decay == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def init_distributed() -> tuple[int, int]:
    """Join the launcher's process group (gloo on CPU, nccl on GPU); a plain `vidiff train` is world size 1."""
    import deepspeed

    if "RANK" not in os.environ:                    # not started by a launcher: one process
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               auto_mpi_discovery=False)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    if not torch.cuda.is_available():               # ranks on one CPU share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        # DeepSpeed's CPU accelerator counts devices from LOCAL_SIZE, or else runs `numactl` (a subprocess)
        # on every ZeRO-3 gradient reduction.
        os.environ.setdefault("LOCAL_SIZE", str(local_world))
        release_shm_workspace()
    return dist.get_rank(), dist.get_world_size()


def release_shm_workspace() -> None:
    """DeepSpeed's CPU backend gives each rank a 69 MB shared-memory workspace,
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>, and never unlinks it: every run leaked
    69 MB of RAM per rank until /dev/shm filled memory (21 GB here after a day of runs). Once every rank has
    mapped its peers' workspaces (DeepSpeed's init does that; the barrier waits for all), the names can go;
    the memory itself lives until the processes exit."""
    dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    (Path("/dev/shm") / name).unlink(missing_ok=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Each value summed over all ranks (on the device: NCCL reduces no CPU tensors)."""
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def _runtime_skips(loader: ShardLoader, before: Counter, device: torch.device) -> dict[str, int]:
    """Samples skipped while decoding, on all ranks, since the run began (earlier restarts included)."""
    reasons = sorted(set(SKIP_REASONS) | set(loader.skipped) | set(before))
    counts = _sum_over_ranks([float(loader.skipped[r]) for r in reasons], device)
    return {r: int(c) + before[r] for r, c in zip(reasons, counts) if c or before[r]}


def _skip_counts(loader: ShardLoader, before: Counter, device: torch.device) -> dict[str, int]:
    """Unusable samples by reason: found in the index (once per dataset) plus skipped while decoding."""
    return dict(Counter(loader.excluded) + Counter(_runtime_skips(loader, before, device)))


def held_out_batches(cfg: RunConfig, device: torch.device) -> list[dict]:
    """The first train.eval_batches batches of data.eval_shards (fixed starts, real captions), decoded once;
    every rank evaluates the same ones, so ZeRO-3 sees the same module calls everywhere."""
    if not (cfg.data.eval_shards and cfg.train.eval_every):
        return []
    eval_cfg = cfg.data.model_copy(update={"shards": cfg.data.eval_shards, "random_start": False,
                                           "caption_dropout": 0.0, "num_workers": 0, "image_fraction": 0.0,
                                           "augment": []})
    loader = ShardLoader(eval_cfg, rank=0, world_size=1, seed=cfg.seed, batch_size=cfg.parallel.micro_batch)
    return [{**b, "video": to_model_input(b["video"], device)} for b in islice(loader, cfg.train.eval_batches)]


def sample_seeds(seed: int, step: int, position: int, n: int) -> list[int]:
    """One seed per sample of the micro-batch at `position` among the step's micro-batches (position =
    micro-step x data-parallel ranks + data-parallel rank: the loader's batch order), so each sample's noise is
    the same under any layout that trains the same global batch."""
    return [int(np.random.SeedSequence([seed, step, position, i]).generate_state(1, np.uint64)[0]) for i in range(n)]


def sample_weights(batch: dict, scale: float, device: torch.device) -> torch.Tensor:
    """Loss weight of each sample of a micro-batch (B,): `scale` for a usable sample, 0 for the placeholder of a
    padding batch (every sample unusable)."""
    return torch.full((len(batch["caption"]),), 0.0 if batch["padding"] else scale, device=device)


def make_optimizer(params, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    # fused: one kernel per step, no full-size temporaries (the unfused step makes one the size of the rank's
    # partition, a quarter of ZeRO-3's ideal 16 bytes per parameter, at the peak of every step).
    optimizer = torch.optim.AdamW([p for p in params if p.requires_grad], lr=cfg.lr, betas=(0.9, 0.99),
                                  weight_decay=cfg.weight_decay, fused=True)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, cfg=cfg))


def _prepare(batch: dict, device: torch.device) -> dict:
    if "video" in batch:
        batch["video"] = to_model_input(batch["video"], device)
    for key in ("latent", "text", "text_mask"):                # from latent shards
        if key in batch:
            batch[key] = batch[key].to(device)
    return batch


def _tokens(batch: dict, cfg: RunConfig) -> tuple[int, tuple[int, int, int]]:
    """Latent tokens the DiT sees in a batch, and their grid (T', H', W')."""
    frames, height, width = (int(n) for n in batch["bucket"].split("x"))
    pt, ph, pw = cfg.model.patch_size
    grid = (latent_frames(frames) // pt, height // SPATIAL_FACTOR // ph, width // SPATIAL_FACTOR // pw)
    return len(batch["key"]) * math.prod(grid), grid


def train(cfg: RunConfig) -> Path:
    """Train cfg.task for cfg.train.steps steps; returns the run folder.

    The loss of a step is the mean of the per-sample losses over the usable samples of the global batch (what
    train/loss logs): each micro-batch's backward gets the sum of its per-sample losses times accumulation x
    data / usable, because DeepSpeed divides by the accumulation and averages over data-parallel ranks. A
    micro-batch of padding weighs nothing, and buckets of different batch sizes weigh by their samples."""
    layout = make_layout(cfg, int(os.environ.get("WORLD_SIZE", "1")))     # checked before any process group
    rank, world = init_distributed()
    device = rank_device(cfg.parallel.tf32)
    run_dir = Path(cfg.out_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / CONFIG_NAME)

    objective = build_objective(cfg, device)
    seed_everything(cfg.seed)                       # identical initial weights on every rank
    ds_config = deepspeed_config(cfg, layout)
    if layout.kind == "pipeline":
        engine, schedule = build_pipeline_engine(cfg, layout, objective.build_model, ds_config, make_optimizer)
    else:
        engine, schedule = build_sharded_engine(cfg, layout, objective.build_model, ds_config, make_optimizer)
    with torch.device("meta"):                      # the whole model's size, however it is split over ranks
        parameters = count_parameters(objective.build_model())
    if rank == 0:
        print(f"{cfg.task} model: {parameters / 1e6:.1f}M parameters; {layout.describe()}")
    ema = EMA(engine.module, cfg.train.ema_decay) if cfg.train.ema_decay else None

    stage, dp_rank, tp_rank = layout.coordinates(rank)
    # Every rank of a tensor-parallel group sees the same data (and every stage of a pipeline the same
    # micro-batches): samples, losses and throughput are summed over one rank each.
    counts_once = 1.0 if stage == 0 and tp_rank == 0 else 0.0
    loader = ShardLoader(cfg.data, dp_rank, layout.data, cfg.seed, batch_size=layout.micro_batch,
                         accumulation=layout.accumulation)
    start_step, samples_seen = 0, 0
    skipped_before: Counter[str] = Counter()      # runtime skips of earlier runs, all ranks summed
    resumed = checkpoint.resume(engine, run_dir)
    if resumed is not None:
        tag_dir, state = resumed
        start_step, samples_seen = state["step"], state["samples_seen"]
        loader.load_state_dict(state["data"])     # the same position on every rank, at any world size
        skipped_before.update(state.get("skipped", {}))
        objective.load_state_dict(state.get("objective", {}))
        if state.get("config_digest") != cfg.digest() and rank == 0:
            print(f"note: config differs from checkpoint {state['config_digest']}; resuming anyway")
        if ema is not None and not ema.load(checkpoint.ema_path(tag_dir, rank)) and rank == 0:
            print("note: no EMA for this layout in the checkpoint; the EMA restarts from the weights")

    eval_batches = held_out_batches(cfg, engine.device)
    monitor = Monitor(run_dir, rank, start_step, cfg.train.steps)
    if cfg.task == "dit":                           # perf/mfu: the DiT's FLOPs are counted (models/dit.py)
        peak, peak_source = peak_tflops(cfg.parallel.precision, cfg.parallel.peak_tflops)
        monitor.message(f"perf/mfu against {peak:.3g} TFLOP/s per rank ({peak_source})")
    if resumed is not None:
        monitor.message(f"resumed from step {start_step} ({resumed[0]})")
    for step in range(start_step + 1, cfg.train.steps + 1):
        micro_batches = [_prepare(next(loader), device) for _ in range(layout.accumulation)]
        seeds = [sample_seeds(cfg.seed, step, j * layout.data + dp_rank, len(b["caption"]))
                 for j, b in enumerate(micro_batches)]
        usable, = _sum_over_ranks([counts_once * sum(len(b["key"]) for b in micro_batches)], device)
        scale = layout.accumulation * layout.data / usable if usable else 0.0
        weights = [sample_weights(b, scale, device) for b in micro_batches]
        extra: dict[str, float] = {}
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)   # this rank's usable per-sample losses
        if layout.kind == "pipeline":
            loss_mean = float(pipeline_step(engine, objective, micro_batches, seeds, weights))
        else:
            for batch, batch_seeds, weight in zip(micro_batches, seeds, weights):
                per_sample, extra = objective.loss(engine, batch, batch_seeds)      # (B,)
                engine.backward((per_sample * weight).sum())
                engine.step()                      # DeepSpeed steps the optimizer after the last micro-batch
                loss_sum += (per_sample.detach() * (weight > 0)).sum()
        if ema is not None:
            ema.update()
        seconds = monitor.step_seconds()
        tokens, flops = 0.0, 0.0
        if cfg.task == "dit":
            for batch in micro_batches:
                n, grid = _tokens(batch, cfg)
                tokens += n
                flops += n * objective.flops_per_token(grid)
        loss_sum, tokens, flops = _sum_over_ranks([counts_once * v for v in (float(loss_sum), tokens, flops)], device)
        if layout.kind != "pipeline":
            loss_mean = loss_sum / usable if usable else float("nan")
        samples_seen += int(usable)
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            perf = {"perf/tokens_per_s": tokens / seconds,
                    "perf/mfu": flops / seconds / (peak * 1e12 * world)} if cfg.task == "dit" else {}
            monitor.log(step, {
                "train/loss": loss_mean, "train/lr": schedule.get_last_lr()[0],
                "train/grad_norm": float(engine.get_global_grad_norm() or 0.0),
                "perf/samples_per_s": usable / seconds, "perf/step_seconds": seconds, **perf,
                **{f"data/skipped/{k}": v for k, v in _skip_counts(loader, skipped_before, device).items()}, **extra,
            })
        monitor.advance()
        if eval_batches and (step % cfg.train.eval_every == 0 or step == cfg.train.steps):
            with torch.no_grad():
                metrics, preview = objective.evaluate(engine, eval_batches)
            monitor.log(step, metrics)
            if preview is not None:
                monitor.video(step, "eval/reconstruction", preview)
        if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
            objective_state = objective.state_dict()
            objective.before_export(engine.module, objective_state)
            tag_dir = checkpoint.save(engine, run_dir, step, {
                "samples_seen": samples_seen, "data": loader.state_dict(), "world_size": world,
                "layout": dataclasses.asdict(layout), "objective": objective_state,
                "skipped": _runtime_skips(loader, skipped_before, device), "config_digest": cfg.digest(),
            }, layout, ema)
            monitor.message(f"step {step}: checkpoint {tag_dir}")
    monitor.close()
    dist.barrier()
    return run_dir
