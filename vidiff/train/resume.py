"""Where a run starts, and restoring a checkpoint into a new engine, on its own topology or on another one.

A checkpoint records its topology (layout kind, data / tensor / pipeline / sequence sizes, micro-batch,
accumulation). On the same ZeRO partition (data x sequence ranks) and tensor / pipeline sizes DeepSpeed loads its
own files: the sequence size alone can change (the weights and optimizer state do not depend on it). On others, the
checkpoint is converted once into DeepSpeed's universal format (`deepspeed.checkpoint.ds_to_universal`, rank 0, into
the tag folder, reused by later starts) and loaded from it; the EMA is cut from the gathered `ema.safetensors` into
this rank's part. The data position, the LR schedule's step and the objective's state are layout-independent
already.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file

from vidiff.config import RunConfig
from vidiff.parallel import universal
from vidiff.parallel.layout import Layout, LayoutError
from vidiff.parallel.tensor import split_dim
from vidiff.train.checkpoint import (EMA_NAME, STATE_NAME, CheckpointError, is_complete, latest_tag,
                                     use_weights_only_loading)

RESUME_LATEST, RESUME_NONE = "latest", "none"


def topology(layout: Layout, zero: int) -> dict:
    """What a checkpoint's files depend on, and what a resume keeps (the global batch)."""
    return {"kind": layout.kind, "zero": zero, "world": layout.world, "data": layout.data, "tensor": layout.tensor,
            "pipeline": layout.pipeline, "sequence": layout.sequence, "micro_batch": layout.micro_batch,
            "accumulation": layout.accumulation, "global_batch": layout.global_batch}


def saved_topology(state: dict) -> dict:
    """The topology a checkpoint was written on (older checkpoints: from their layout record)."""
    if "topology" in state:
        return state["topology"]
    saved = state["layout"]
    data = saved["world"] // (saved["tensor"] * saved["pipeline"])
    return {**saved, "data": data, "accumulation": saved["global_batch"] // (saved["micro_batch"] * data)}


def resume_target(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint this start loads: with resume None the one `latest` names if there is one; "latest" that
    one, or an error when there is none; "none" no checkpoint; otherwise the tag folder `resume` names, which must
    be a complete checkpoint. Every rank must call (rank 0 reads `latest` and broadcasts it)."""
    if resume == RESUME_NONE:
        return None
    if resume in (None, RESUME_LATEST):
        tag = latest_tag(run_dir)
        if tag is None and resume == RESUME_LATEST:
            raise CheckpointError(f"--resume latest: {run_dir}/checkpoints has no complete checkpoint to resume")
        return tag
    tag = Path(resume)
    if not is_complete(tag):
        raise CheckpointError(f"--resume {resume}: not a complete checkpoint (a tag folder holding {STATE_NAME}, "
                              f"e.g. {run_dir}/checkpoints/step00001000); complete ones: "
                              f"{sorted(p.parent.name for p in tag.parent.glob(f'*/{STATE_NAME}'))[-5:] or 'none'}")
    return tag


def keep_global_batch(cfg: RunConfig, resume: str | None, world: int) -> RunConfig:
    """cfg with parallel.global_batch set to the resumed checkpoint's when the config leaves it to the default
    (one micro-batch per data-parallel rank) and that default differs on `world` ranks: a run restarted on another
    number of ranks trains on the same global batch, its accumulation recomputed (make_layout says clearly when the
    new world cannot divide it)."""
    tag = resume_target(Path(cfg.out_dir), resume)
    par = cfg.parallel
    if tag is None or par.global_batch is not None:
        return cfg
    batch = saved_topology(read_state(tag))["global_batch"]
    if batch == par.micro_batch * max(1, world // (par.tensor * par.pipeline * par.sequence)):
        return cfg
    return cfg.model_copy(update={"parallel": par.model_copy(update={"global_batch": batch})})


def read_state(tag_dir: Path) -> dict:
    return json.loads((Path(tag_dir) / STATE_NAME).read_text())


def check_topology_change(saved: dict, current: dict) -> str | None:
    """None when the checkpoint's files load as they are; else a description of the change, converted through
    DeepSpeed's universal checkpoint. Raises LayoutError, before any process starts (`vidiff check`), for what
    vidiff cannot convert: a switch between the sharded and the pipeline layout (their parameter names and
    optimizer states differ in DeepSpeed's universal format), a change of ZeRO stage (each stage's loader looks for
    its own model-state file names), ZeRO-0 (no universal format), tensor parallelism in the sharded layout below
    ZeRO-3 (AutoTP's own universal metadata)."""
    keys = ("kind", "zero", "data", "tensor", "pipeline", "sequence")
    saved = {"zero": current["zero"], "sequence": 1, **saved}   # checkpoints from before these were recorded
    same_zero_ranks = saved["data"] * saved["sequence"] == current["data"] * current["sequence"]
    if same_zero_ranks and all(saved[k] == current[k] for k in ("kind", "zero", "tensor", "pipeline")):
        return None
    change = ", ".join(f"{k} {saved[k]} -> {current[k]}" for k in keys if saved[k] != current[k])
    supported = "other data, tensor and pipeline sizes in the pipeline layout, other data and tensor sizes in the " \
        "sharded layout at ZeRO-3, other data sizes in the sharded layout at ZeRO-1/2; the same layout and ZeRO stage"
    sharded_below_3 = current["kind"] == "sharded" and current["zero"] < 3
    if (saved["kind"] != current["kind"] or saved["zero"] != current["zero"] or current["zero"] == 0
            or (sharded_below_3 and (saved["tensor"] > 1 or current["tensor"] > 1))):
        raise LayoutError(f"resuming a checkpoint written with {describe(saved)} on {describe(current)} ({change}): "
                          f"vidiff converts checkpoints to {supported}. Resume on {describe(saved)}")
    return change


def describe(topo: dict) -> str:
    sequence = f" x sequence {topo['sequence']}" if topo.get("sequence", 1) > 1 else ""
    return (f"the {topo['kind']} layout (ZeRO {topo['zero']}, data {topo['data']} x tensor {topo['tensor']} x "
            f"pipeline {topo['pipeline']}{sequence})")


def local_part(name: str, param: torch.nn.Parameter, full: torch.Tensor, layout: Layout, tp_rank: int) -> torch.Tensor:
    """This rank's part of a whole tensor, as it stores the parameter `name`: the tensor-parallel slice
    (parallel/tensor.split_dim), then under ZeRO-3 the rank's partition of its flattened values (DeepSpeed pads
    the last partition)."""
    dim = split_dim(name)
    if dim is not None and layout.tensor > 1:
        full = full.chunk(layout.tensor, dim=dim)[tp_rank]
    if not hasattr(param, "ds_tensor"):
        return full
    size = param.ds_tensor.numel()
    group_rank = dist.get_rank(group=param.ds_process_group)
    flat = full.flatten()
    flat = F.pad(flat, (0, max(0, size * dist.get_world_size(group=param.ds_process_group) - flat.numel())))
    return flat[group_rank * size:(group_rank + 1) * size]


def restore_engine(engine, tag_dir: Path, saved: dict | None = None, change: str | None = None) -> None:
    """Load a checkpoint's weights, optimizer and LR schedule into the engine, with torch.load(weights_only=True):
    its own files on the same topology; on another (`change`), its universal form, which rank 0 makes once from
    the checkpoint (saved: its topology) while the other ranks wait."""
    use_weights_only_loading(engine)
    try:
        if change is None:
            load_path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
            if load_path is None:
                raise CheckpointError(f"DeepSpeed could not load checkpoint {tag_dir}")
            return
        problem = [None]
        if dist.get_rank() == 0:
            try:
                universal.convert(tag_dir, autotp=saved["kind"] == "sharded" and saved["tensor"] > 1)
            except Exception as error:                   # every rank must hear of it, not wait forever
                problem = [f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(problem, src=0)
        if problem[0]:
            raise CheckpointError(f"converting {tag_dir} for {change} failed: {problem[0]}")
        universal.load(engine, tag_dir)
    except pickle.UnpicklingError as error:
        unsupported = next((line.strip() for line in str(error).splitlines() if "Unsupported global" in line), "")
        raise CheckpointError(f"checkpoint {tag_dir} holds pickled objects that are not weights ({unsupported}); "
                              "vidiff loads checkpoints with torch.load(weights_only=True) and will not run them. "
                              "Resume from another tag (--resume PATH)") from None


def ema_from_export(ema, engine, tag_dir: Path, layout: Layout, tp_rank: int, dit_name) -> None:
    """Cut this rank's part of the EMA from the checkpoint's gathered ema.safetensors (another layout's per-rank
    EMA files do not fit this one). dit_name maps an engine parameter name to the exported one."""
    full = load_file(str(Path(tag_dir) / EMA_NAME))
    names = {id(p): n for n, p in engine.module.named_parameters()}
    ema.set_local([local_part(dit_name(names[id(p)]), p, full[dit_name(names[id(p)])], layout, tp_rank).to(
        s.device, s.dtype) for p, s in zip(ema.params, ema.shadow)])


