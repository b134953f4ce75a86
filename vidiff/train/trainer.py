"""The step loop: forward, backward, step, log, checkpoint cadence; resumes from a checkpoint (the latest by
default), on the same topology or another one (train/resume.py)."""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
import warnings
from collections import Counter
from contextlib import nullcontext
from functools import partial
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from vidiff.config import InputError, RunConfig, TrainConfig, save_config
from vidiff.data.pipeline import SKIP_REASONS, ShardLoader, to_model_input
from vidiff.device import rank_device
from vidiff.models.dit import count_parameters
from vidiff.data.buckets import token_grid
from vidiff.parallel.deepspeed import deepspeed_config
from vidiff.parallel.layout import make_layout
from vidiff.parallel.pipeline import build_pipeline_engine, dit_name, observe_pipeline_losses, pipeline_step
from vidiff.parallel.sequence import sequence_split
from vidiff.parallel.sharded import build_sharded_engine
from vidiff.train import checkpoint, preflight
from vidiff.train.checkpoint import CONFIG_NAME
from vidiff.train.ema import EMA
from vidiff.train.ledger import Ledger
from vidiff.train.monitor import Monitor, peak_tflops
from vidiff.train.objectives import build_objective
from vidiff.train.resume import (RESUME_NONE, check_topology_change, ema_from_export, read_state, restore_engine,
                                 resume_target, saved_topology, topology)


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


def init_distributed(timeout_s: float = 300.0) -> tuple[int, int]:
    """Join the launcher's process group (gloo on CPU, nccl on GPU) within timeout_s (train/preflight.join); a
    plain `vidiff train` is world size 1."""
    if "RANK" not in os.environ:                    # not started by a launcher: one process
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    preflight.join(timeout_s, backend="nccl" if torch.cuda.is_available() else "gloo")
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
    return [_prepare(b, device) for b in islice(loader, cfg.train.eval_batches)]


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
    grid = token_grid(*(int(n) for n in batch["bucket"].split("x")), cfg.model.patch_size)
    return len(batch["key"]) * math.prod(grid), grid


class NonFiniteError(InputError):
    """Training keeps producing non-finite losses or gradients, after reloading the last checkpoint too (most often
    bad data or a learning rate too high: the message says what to try)."""


def train(cfg: RunConfig, resume: str | None = None) -> Path:
    """Train cfg.task for cfg.train.steps steps; returns the run folder. resume: None (the latest checkpoint if
    there is one), "latest" (it must exist), "none" (start fresh; earlier checkpoints are set aside), or a
    checkpoint's tag folder (train/resume.resume_target).

    The loss of a step is the mean of the per-sample losses over the usable samples of the global batch (what
    train/loss logs): each micro-batch's backward gets the sum of its per-sample losses times accumulation x
    data x sequence / usable, because DeepSpeed divides by the accumulation and averages over its data-parallel
    ranks (data x sequence). A micro-batch of padding weighs nothing, and buckets of different batch sizes weigh
    by their samples. A step whose gradient norm is not finite is not applied (DeepSpeed's overflow path: no
    update, no LR step) and is counted; train.nonfinite_patience of them in a row reload the last checkpoint, and
    again stop the run."""
    layout = make_layout(cfg, int(os.environ.get("WORLD_SIZE", "1")))     # checked before any process group
    rank, world = init_distributed(cfg.train.preflight_timeout)
    device = rank_device(cfg.parallel.tf32)
    run_dir = Path(cfg.out_dir)
    needed = preflight.checkpoint_bytes(cfg)
    reports = preflight.check(cfg, device, needed)  # every rank, before anything is built
    if rank == 0:
        print(preflight.summary(reports, needed))
        save_config(cfg, run_dir / CONFIG_NAME)
        for doomed in checkpoint.remove_incomplete(run_dir):
            print(f"note: removed {doomed}, a checkpoint whose save did not finish")
        if resume == RESUME_NONE and checkpoint.tags(run_dir):
            aside = checkpoint.set_aside(run_dir)
            print(f"note: --no-resume: the run's earlier checkpoints were moved to {aside}")
    dist.barrier()
    tag_dir = resume_target(run_dir, resume)

    objective = build_objective(cfg, device, fresh=tag_dir is None)
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
    if layout.sequence > 1:                         # every rank creates every sequence group
        engine.module.net.split_sequence(sequence_split(layout, rank, cfg.parallel.sequence_mode))
    ema = EMA(engine.module, cfg.train.ema_decay) if cfg.train.ema_decay else None

    stage, dp_rank, sp_rank, tp_rank = layout.coordinates(rank)
    # Every rank of a tensor- or sequence-parallel group sees the same data (and every stage of a pipeline the same
    # micro-batches): samples, losses and throughput (each token once per sequence group) are summed over one rank
    # each.
    counts_once = 1.0 if stage == 0 and tp_rank == 0 and sp_rank == 0 else 0.0
    loader = ShardLoader(cfg.data, dp_rank, layout.data, cfg.seed, batch_size=layout.micro_batch,
                         accumulation=layout.accumulation)
    ledger = Ledger(run_dir, rank, world, enabled=cfg.train.ledger and counts_once > 0)
    monitor = Monitor(run_dir, rank, 0, cfg.train.steps, device, cfg.train.stall_seconds, cfg.train.straggler_factor)
    monitor.text("run/config", f"```yaml\n{(run_dir / CONFIG_NAME).read_text()}```" if rank == 0 else "")
    monitor.text("run/layout", layout.describe())
    if layout.kind == "pipeline" and tp_rank == 0:  # the last stage's per-sample losses, once per sample
        observe_pipeline_losses(engine, monitor.observe_losses)
    run = _Run(cfg, layout, engine, objective, loader, ema, monitor, ledger, run_dir, rank, tp_rank, device)
    step = run.restore(tag_dir) if tag_dir is not None else 0
    ledger.start_segment(step)
    monitor.start_at(step)
    eval_batches = held_out_batches(cfg, engine.device)
    if eval_batches and layout.kind == "pipeline":
        eval_batches = []
        monitor.message("note: train.eval_every: held-out evaluation runs through the sharded layout's engine; the "
                        "pipeline layout gets none (evaluate the exported weights with vidiff eval)")
    peak = 0.0
    if cfg.task == "dit":                           # perf/mfu: the DiT's FLOPs are counted (models/dit.py)
        peak, peak_source = peak_tflops(cfg.parallel.precision, cfg.parallel.peak_tflops)
        monitor.message(f"perf/mfu against {peak:.3g} TFLOP/s per rank ({peak_source})")
    previews = cfg.train.preview_every > 0 and cfg.task == "dit"
    if previews and layout.kind == "pipeline":
        previews = False
        monitor.message("note: train.preview_every: previews sample through the sharded layout's engine; the "
                        "pipeline layout gets none (sample the exported weights with vidiff sample)")
    last_save, nonfinite_in_a_row, reloaded_at = time.monotonic(), 0, None
    while step < cfg.train.steps:
        step += 1
        monitor.begin_step()
        micro_batches = [_prepare(next(loader), device) for _ in range(layout.accumulation)]
        monitor.mark("data")
        ledger.record(step, micro_batches)
        seeds = [sample_seeds(cfg.seed, step, j * layout.data + dp_rank, len(b["caption"]))
                 for j, b in enumerate(micro_batches)]
        usable, = _sum_over_ranks([counts_once * sum(len(b["key"]) for b in micro_batches)], device)
        # DeepSpeed averages gradients over its data-parallel group, data x sequence ranks; a sequence group's
        # gradients are parts of one sum (parallel/sequence.py), hence the factor layout.sequence
        scale = layout.accumulation * layout.data * layout.sequence / usable if usable else 0.0
        weights = [sample_weights(b, scale, device) for b in micro_batches]
        extra: dict[str, float] = {}
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)   # this rank's usable per-sample losses
        skipped_before = engine.skipped_steps
        if layout.kind == "pipeline":                # the optimizer runs inside train_batch: one phase
            loss_mean = float(pipeline_step(engine, objective, micro_batches, seeds, weights))
            monitor.mark("forward_backward")
        else:
            for batch, batch_seeds, weight in zip(micro_batches, seeds, weights):
                per_sample, sigma, extra = objective.loss(engine, batch, batch_seeds)      # (B,), (B,)
                engine.backward((per_sample * weight).sum())
                monitor.mark("forward_backward")
                engine.step()                      # DeepSpeed steps the optimizer after the last micro-batch
                monitor.mark("optimizer")
                loss_sum += (per_sample.detach() * (weight > 0)).sum()
                if sigma is not None and counts_once:
                    monitor.observe_losses(sigma, per_sample, weight > 0)
        applied = engine.skipped_steps == skipped_before
        if ema is not None and applied:
            ema.update()
        monitor.mark("optimizer")
        seconds = monitor.step_seconds()
        tokens, flops = 0.0, 0.0
        if cfg.task == "dit":
            for batch in micro_batches:
                n, grid = _tokens(batch, cfg)
                tokens += n
                flops += n * objective.flops_per_token(grid)
        # Rank 0 decides a time-based checkpoint for everyone (clocks differ between ranks).
        due = float(rank == 0 and cfg.train.checkpoint_minutes > 0
                    and time.monotonic() - last_save >= 60 * cfg.train.checkpoint_minutes)
        loss_sum, tokens, flops, due = _sum_over_ranks(
            [counts_once * v for v in (float(loss_sum), tokens, flops)] + [due], device)
        if layout.kind != "pipeline":
            loss_mean = loss_sum / usable if usable else float("nan")
        run.samples_seen += int(usable)
        run.nonfinite += 0 if applied else 1
        nonfinite_in_a_row = 0 if applied else nonfinite_in_a_row + 1
        log = step % cfg.train.log_every == 0 or step == cfg.train.steps or not applied
        accounting = monitor.end_step(step, log)      # every rank: a collective on log steps
        if log:
            perf = {"perf/tokens_per_s": tokens / seconds,
                    "perf/mfu": flops / seconds / (peak * 1e12 * world)} if cfg.task == "dit" else {}
            monitor.log(step, {
                "train/loss": loss_mean, "train/lr": schedule.get_last_lr()[0],
                "train/grad_norm": float(engine.get_global_grad_norm() or 0.0),
                "train/skipped_nonfinite": run.nonfinite,
                "perf/samples_per_s": usable / seconds, "perf/step_seconds": seconds, **perf,
                **{f"data/skipped/{k}": v for k, v in run.skip_counts().items()}, **extra, **accounting,
            })
        monitor.advance()
        if nonfinite_in_a_row >= cfg.train.nonfinite_patience:
            last = checkpoint.latest_tag(run_dir)
            if reloaded_at is not None or last is None:
                raise NonFiniteError(
                    f"steps {step - nonfinite_in_a_row + 1} to {step} had a non-finite loss or gradient norm "
                    f"({nonfinite_in_a_row} in a row, train.nonfinite_patience {cfg.train.nonfinite_patience})"
                    + (f", again after reloading {reloaded_at}" if reloaded_at else ", and there is no checkpoint to "
                       "reload") + ". Try a lower train.lr or train.grad_clip, fp32 instead of bf16, or look for "
                    "bad samples in the data (data/skipped/*, tools/ledger_check.py with train.ledger=true)")
            monitor.message(f"step {step}: {nonfinite_in_a_row} non-finite steps in a row; reloading {last}")
            step, nonfinite_in_a_row, reloaded_at = run.restore(last), 0, last
            ledger.start_segment(step)
            monitor.start_at(step)
            continue
        if eval_batches and (step % cfg.train.eval_every == 0 or step == cfg.train.steps):
            with torch.no_grad():
                metrics, preview = objective.evaluate(engine, eval_batches)
            monitor.log(step, metrics)
            if preview is not None:
                monitor.video(step, "eval/reconstruction", preview)
        if previews and (step % cfg.train.preview_every == 0 or step == cfg.train.steps):
            with ema.swapped() if ema is not None else nullcontext():
                monitor.video(step, "preview/samples", objective.preview(engine))
        if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps or due:
            seconds = run.save(step)
            last_save = time.monotonic()
            monitor.log(step, {"ckpt/save_s": seconds})
            monitor.message(f"step {step}: checkpoint saved in {seconds:.1f} s")
    ledger.close()
    monitor.close()
    dist.barrier()
    return run_dir


class _Run:
    """What a checkpoint saves and restores besides DeepSpeed's own state: the data position, counters, the
    objective's state, the EMA; and the ledger flushed with it."""

    def __init__(self, cfg, layout, engine, objective, loader, ema, monitor, ledger, run_dir, rank, tp_rank, device):
        self.cfg, self.layout, self.engine, self.objective, self.loader = cfg, layout, engine, objective, loader
        self.ema, self.monitor, self.ledger, self.run_dir = ema, monitor, ledger, run_dir
        self.rank, self.tp_rank, self.device = rank, tp_rank, device
        self.samples_seen, self.nonfinite = 0, 0
        self.skipped_before: Counter[str] = Counter()    # runtime skips of earlier runs, all ranks summed

    def skip_counts(self) -> dict[str, int]:
        return _skip_counts(self.loader, self.skipped_before, self.device)

    def save(self, step: int) -> float:
        """Checkpoint `step` (every rank); returns the seconds it took."""
        start = time.perf_counter()
        self.ledger.flush()                         # the steps this checkpoint commits are on disk first
        objective_state = self.objective.state_dict()
        self.objective.before_export(self.engine.module, objective_state)
        train = self.cfg.train
        checkpoint.save(self.engine, self.run_dir, step, {
            "samples_seen": self.samples_seen, "data": self.loader.state_dict(), "world_size": self.layout.world,
            "layout": dataclasses.asdict(self.layout), "topology": topology(self.layout, self.cfg.parallel.zero),
            "objective": objective_state, "skipped_nonfinite": self.nonfinite,
            "skipped": _runtime_skips(self.loader, self.skipped_before, self.device),
            "config_digest": self.cfg.digest(),
        }, self.layout, self.ema, keep_last=train.keep_last, keep_every=train.keep_every)
        return time.perf_counter() - start

    def restore(self, tag_dir: Path) -> int:
        """Load a checkpoint into the engine and everything around it; returns its step."""
        state = read_state(tag_dir)
        saved = saved_topology(state)
        change = check_topology_change(saved, topology(self.layout, self.cfg.parallel.zero))
        restore_engine(self.engine, tag_dir, saved, change)
        self.samples_seen, self.nonfinite = state["samples_seen"], state.get("skipped_nonfinite", 0)
        self.loader.load_state_dict(state["data"])     # the same position on every rank, at any world size
        self.skipped_before = Counter(state.get("skipped", {}))
        self.loader.skipped.clear()
        self.objective.load_state_dict(state.get("objective", {}))
        if state.get("config_digest") != self.cfg.digest():
            self.monitor.message(f"note: config differs from checkpoint {state['config_digest']}; resuming anyway")
        if self.ema is not None:
            if change is None and self.ema.load(checkpoint.ema_path(tag_dir, self.rank)):
                pass
            elif (tag_dir / checkpoint.EMA_NAME).is_file():
                ema_from_export(self.ema, self.engine, tag_dir, self.layout, self.tp_rank, self._dit_name)
            else:
                self.monitor.message("note: the checkpoint has no EMA; the EMA restarts from the weights")
        self.monitor.message(f"resumed from step {state['step']} ({tag_dir})"
                             + (f" on a new topology: {change}" if change else ""))
        return state["step"]

    def _dit_name(self, name: str) -> str:
        """An engine parameter's name in the exported weights."""
        if self.layout.kind == "pipeline":
            return dit_name(name, self.engine.module.num_blocks)
        return name
