"""Checkpoints: DeepSpeed's files plus vidiff_state.json and a gathered safetensors export per tag.

runs/<name>/checkpoints/<tag>/ holds what DeepSpeed writes for every rank, `vidiff_state.json` (step,
samples seen, the data position, the objective's own state, config digest, world size and layout) and
`model.safetensors` (full weights, for sampling and for the next stage without DeepSpeed). `latest` names the
newest complete tag and moves, atomically, only after every rank's files are written and flushed to disk
(fsync of the files and their folders), so a crash at any point leaves the previous checkpoint intact. Rank 0
reads `latest` and broadcasts it, so every rank loads the same tag even while another job moves it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from vidiff.config import InputError, RunConfig, load_config
from vidiff.models.vae import VideoVAE
from vidiff.train.preflight import CHECKPOINT_FOLDER   # the run folder's checkpoints/, which preflight probes

STATE_NAME = "vidiff_state.json"
WEIGHTS_NAME = "model.safetensors"
EMA_NAME = "ema.safetensors"
CONFIG_NAME = "config.yaml"


class CheckpointError(InputError, FileNotFoundError):
    """No usable checkpoint where one was expected."""


def _deepspeed_globals() -> list[type]:
    """The non-tensor types DeepSpeed pickles into its checkpoint files (ZeRO optimizer states: the stage enum,
    the loss scaler, fragment addresses), allowlisted for torch.load(weights_only=True)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def use_weights_only_loading(engine) -> None:
    """Make the engine read its checkpoint files with torch.load(weights_only=True): DeepSpeed's own torch engine
    passes weights_only=False, which would run any code pickled into a checkpoint. Saving is unchanged. Calling it
    again (a second restore in one run) changes nothing."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        weights_only = True

        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(_deepspeed_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    current = engine.checkpoint_engine
    if getattr(current, "weights_only", False):
        return
    if type(current) is not TorchCheckpointEngine:
        raise CheckpointError(f"DeepSpeed checkpoint engine {type(current).__name__}: vidiff loads checkpoints "
                              "through DeepSpeed's torch engine only (see parallel/deepspeed.py)")
    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    """Replace path with text: written to a temporary file, flushed to disk, renamed, folder flushed."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def _flush_folder(folder: Path) -> None:
    """fsync every file under folder and the folders themselves. Called by one rank per node (LOCAL_RANK 0):
    a node flushes the pages it holds, which on a shared file system are its own ranks' writes."""
    for path in sorted(folder.rglob("*"), reverse=True):       # files before the folders that hold them
        _fsync(path)
    _fsync(folder)


def export_weights(module: nn.Module, path: Path) -> None:
    """Write the full weights on rank 0 (every rank must call): module by module, ZeRO-3 shards are gathered
    and AutoTP's tensor-parallel slices joined, so at most one layer is ever whole at a time."""
    from deepspeed.module_inject.layers import GatherReplacedLayerParams

    state = {}
    for prefix, mod in module.named_modules():
        prefix = f"{prefix}." if prefix else ""
        params = list(mod.parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None), \
                GatherReplacedLayerParams(params, mod, enabled=bool(params)):
            if _rank() == 0:
                tensors = [*mod.named_parameters(recurse=False),
                           *((n, b) for n, b in mod.named_buffers(recurse=False)
                             if n not in mod._non_persistent_buffers_set)]
                state.update({prefix + n: t.detach().to("cpu", torch.float32).clone() for n, t in tensors})
    if _rank() == 0:
        save_file(state, str(path))


def _export(engine, path: Path, layout) -> None:
    if layout.kind == "pipeline":
        from vidiff.parallel.pipeline import export_pipeline
        export_pipeline(engine, path, layout)
    else:
        export_weights(engine.module, path)


def ema_path(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"ema_rank{rank:05d}.safetensors"


def save(engine, run_dir: Path, step: int, state: dict, layout, ema=None, keep_last: int = 1 << 30,
         keep_every: int = 0) -> Path:
    """Write checkpoint `step{step}` on every rank, then move `latest` to it and drop the checkpoints retention
    no longer keeps (`prune`). Returns the tag folder.

    Order: DeepSpeed's files, the gathered exports and each rank's EMA, then (every rank done) each node flushes
    the folder to disk, then rank 0 writes vidiff_state.json, the mark of a complete checkpoint, and moves
    `latest`. A save killed at any point leaves a tag without vidiff_state.json: never loaded, removed at the
    next start (`remove_incomplete`)."""
    ckpt_dir = run_dir / CHECKPOINT_FOLDER
    tag = f"step{step:08d}"
    client_state = {}
    if engine.zero_optimization_stage() in (1, 2):   # how ds_to_universal merges ZeRO-1/2 state (ZeRO-3: not needed)
        from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO
        from vidiff.parallel.universal import universal_info
        client_state[UNIVERSAL_CHECKPOINT_INFO] = universal_info([n for n, _ in engine.module.named_parameters()])
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False, client_state=client_state)
    _export(engine, ckpt_dir / tag / WEIGHTS_NAME, layout)
    if ema is not None:
        ema.save(ema_path(ckpt_dir / tag, _rank()))
        with ema.swapped():
            _export(engine, ckpt_dir / tag / EMA_NAME, layout)
    _barrier()                              # every rank's files are written ...
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        _flush_folder(ckpt_dir / tag)       # ... and on disk, node by node, before the tag is marked complete
    _barrier()
    if _rank() == 0:
        _write_atomic(ckpt_dir / tag / STATE_NAME, json.dumps({"step": step, **state}, indent=1))
        _fsync(ckpt_dir)
        _write_atomic(ckpt_dir / "latest", tag)
        prune(run_dir, keep_last, keep_every)
    _barrier()
    return ckpt_dir / tag


def is_complete(tag_dir: Path) -> bool:
    """A checkpoint whose every file was written and flushed (save() writes vidiff_state.json last)."""
    return (Path(tag_dir) / STATE_NAME).is_file()


def tags(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders (complete or not), oldest step first."""
    folder = Path(run_dir) / CHECKPOINT_FOLDER
    return sorted((d for d in folder.glob("step*") if d.is_dir()), key=lambda d: d.name) if folder.is_dir() else []


def prune(run_dir: Path, keep_last: int, keep_every: int) -> list[Path]:
    """Delete complete checkpoints beyond the last keep_last, except every keep_every-th step's and the one
    `latest` names; returns those deleted (rank 0 only)."""
    complete = [d for d in tags(run_dir) if is_complete(d)]
    latest = Path(run_dir) / CHECKPOINT_FOLDER / "latest"
    protected = {latest.read_text().strip()} if latest.is_file() else set()
    doomed = [d for d in complete[:-keep_last] if d.name not in protected
              and not (keep_every and int(d.name.removeprefix("step")) % keep_every == 0)]
    for d in doomed:
        shutil.rmtree(d)
    return doomed


def remove_incomplete(run_dir: Path) -> list[Path]:
    """Delete checkpoint folders a killed save left half-written (no vidiff_state.json); rank 0, at start, before
    any rank saves. Returns those deleted."""
    doomed = [d for d in tags(run_dir) if not is_complete(d)]
    for d in doomed:
        shutil.rmtree(d)
    return doomed


def set_aside(run_dir: Path) -> Path:
    """Move the run's checkpoints to checkpoints.set-aside-<time> (a start with --no-resume: nothing is lost, and
    retention and `latest` see only the new run's); returns the new folder (rank 0)."""
    folder = Path(run_dir) / CHECKPOINT_FOLDER
    aside = folder.with_name(f"{CHECKPOINT_FOLDER}.set-aside-{time.strftime('%Y%m%d-%H%M%S')}")
    folder.rename(aside)
    return aside


def latest_tag(run_dir: Path) -> Path | None:
    """The tag folder `latest` names, or None. In a distributed run rank 0 reads it and broadcasts it (every
    rank must call), so all ranks agree on one tag."""
    latest = Path(run_dir) / CHECKPOINT_FOLDER / "latest"
    tag = [latest.read_text().strip() if latest.is_file() else None] if _rank() == 0 else [None]
    if dist.is_initialized():
        dist.broadcast_object_list(tag, src=0)
    return None if tag[0] is None else latest.parent / tag[0]


def load_export(run_dir: str | Path, prefer_ema: bool = False) -> tuple[RunConfig, dict[str, torch.Tensor]]:
    """The config and full weights of a run's latest checkpoint, without DeepSpeed; with prefer_ema the EMA
    weights where the run kept them (train.ema_decay > 0)."""
    run_dir = Path(run_dir)
    tag_dir = latest_tag(run_dir)
    if tag_dir is None or not (tag_dir / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{run_dir} has no finished checkpoint (expected {run_dir}/checkpoints/latest)")
    cfg = load_config(run_dir / CONFIG_NAME)
    ema = tag_dir / EMA_NAME
    return cfg, load_file(str(ema if prefer_ema and ema.is_file() else tag_dir / WEIGHTS_NAME))


def load_vae(run_dir: str | Path) -> VideoVAE:
    """The frozen VAE of a finished VAE run."""
    cfg, state = load_export(run_dir)
    if cfg.task != "vae":
        raise CheckpointError(f"{run_dir} is a {cfg.task!r} run; vae.checkpoint must name a VAE run")
    vae = VideoVAE(cfg.vae)
    vae.load_state_dict(state)
    return vae.eval().requires_grad_(False)
