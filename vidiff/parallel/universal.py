"""Resuming on another topology through DeepSpeed's universal checkpoint (deepspeed.checkpoint.ds_to_universal,
then load_universal), with the workarounds DeepSpeed 0.19.8 needs for vidiff's layouts.

The conversion runs once, on rank 0, into <tag>/universal (written as universal.tmp and renamed when complete),
and later starts reuse it. What 0.19.8 gets wrong, each checked on this project's models:

- A ZeRO-1/2 checkpoint (the pipeline layout, the sharded one below ZeRO-3) converts only with
  UNIVERSAL_CHECKPOINT_INFO in it (`universal_info`, saved with every such checkpoint): without it ds_to_universal
  refuses, and with its --inject_missing_state a later tensor-size change comes back wrong.
- AutoTP under zero.Init: zero.Init partitions every parameter over the whole world (AutoTP's groups do not exist
  yet), then AutoTP re-partitions the layers it replaces over the data-parallel group, so the optimizer's
  sub-groups have two partition sizes, which the checkpoint does not record (stage3.py writes
  ds_zero_partition_groups for AutoEP only) and the converter assumes to be the data-parallel size
  (ds_to_universal.py:188-238: "start ... + length ... exceeds dimension size"); and AutoTP records the empty
  shape (0,) of partitioned parameters it leaves replicated (module_inject/layers.py:745; affine.py:268 "Rank 0
  supplied a shard of 16 elements, but the map describes 0"). `_extract_mixed` and `_with_shapes` replace those
  two steps of the converter while it runs.
- The plain ZeRO-3 converter writes bare tensors, which ZeRO-3's loader does not slice for tensor parallelism
  (stage3.py:3784 slices dict entries only): every file is wrapped as {"param": tensor}.
- ZeRO-3's universal load gives every optimizer sub-group the same "step" tensor (stage3.py:3664/3681), which
  torch's Adam then advances once per sub-group per step, and ZeRO-1's restores a plain number, which fused AdamW
  refuses: each gets its own tensor (`untie_optimizer_steps`).
- Its loaders and the converter call torch.load(weights_only=False) directly (stage3.py:3660/3770,
  base_optimizer.py:337, universal_checkpoint.py:251): both run inside `weights_only_loads`.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from vidiff.parallel.tensor import COLUMN, ROW

UNIVERSAL_DIR = "universal"


def universal_info(names: list[str]) -> dict:
    """UNIVERSAL_CHECKPOINT_INFO for ZeRO-1/2 checkpoints (the pipeline layout, the sharded layout below ZeRO-3),
    over the model's parameter names (the DiT's, the PipelineModule's '1.block.attn_s.q.weight', the VAE's):
    column-parallel weights and biases join on dim 0 (the converter's default), row-parallel weights on dim 1,
    everything else is replicated (the converter checks the copies agree and keeps one). A pattern no name matches
    is left out: the converter refuses unused patterns, and the VAE has no row-parallel layers (its checkpoints
    could not resume on another data size)."""
    from deepspeed.checkpoint.constants import (PARAMETER_WITH_ROW_PARALLELISM_PATTERNS,
                                                TP_REPLICATED_PARAMETER_PATTERNS, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)
    column, row = rf"(?:{COLUMN})\.(?:weight|bias)$", rf"(?:{ROW})\.weight$"

    def used(*patterns: str) -> list[str]:
        return [p for p in patterns if any(re.match(p, name) for name in names)]
    return {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE,
            PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: used(row),
            TP_REPLICATED_PARAMETER_PATTERNS: used(rf"^(?!{column})(?!{row}).*$")}


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Inside, every torch.load runs with weights_only=True and the allowlist of DeepSpeed's types."""
    from vidiff.train.checkpoint import _deepspeed_globals

    original, allowed = torch.load, _deepspeed_globals()

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(allowed):
            return original(*args, **kwargs)
    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def convert(tag_dir: Path, autotp: bool) -> Path:
    """<tag>/universal from the checkpoint in tag_dir (rank 0 only; reused when it exists). autotp: the sharded
    layout with tensor parallelism (the patched converter)."""
    import deepspeed.checkpoint.ds_to_universal as converter
    from deepspeed.checkpoint.constants import PARAM

    final, tmp = Path(tag_dir) / UNIVERSAL_DIR, Path(tag_dir) / f"{UNIVERSAL_DIR}.tmp"
    if final.is_dir():
        return final
    shutil.rmtree(tmp, ignore_errors=True)     # a conversion killed halfway (the converter reads tag_dir recursively)
    args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False)
    stock = converter.extract_zero_shards_stage3, converter._load_universal_checkpoint_info_stage3
    if autotp:
        converter.extract_zero_shards_stage3 = _extract_mixed
        converter._load_universal_checkpoint_info_stage3 = lambda files: _with_shapes(stock[1](files), files)
    try:
        with weights_only_loads():
            converter.main(args)      # one worker: a process pool cost more than it saved on 2 cores
            for path in tmp.glob("zero/*/*.pt"):           # fp32, exp_avg, exp_avg_sq (not step.pt)
                state = torch.load(path)
                if torch.is_tensor(state) and path.stem != "step":
                    torch.save({PARAM: state}, path)
    finally:
        converter.extract_zero_shards_stage3, converter._load_universal_checkpoint_info_stage3 = stock
    (Path(tag_dir) / "latest_universal").unlink(missing_ok=True)   # the converter writes it beside its output
    os.replace(tmp, final)
    return final


def load(engine, tag_dir: Path) -> None:
    """Load <tag>/universal into the engine (weights, optimizer state, LR schedule, step)."""
    engine._config.load_universal_checkpoint = True          # read at load time only (engine.py:1712)
    try:
        with weights_only_loads():
            load_path, _ = engine.load_checkpoint(str(tag_dir), tag=UNIVERSAL_DIR)
    finally:
        engine._config.load_universal_checkpoint = False
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load {Path(tag_dir) / UNIVERSAL_DIR}")
    untie_optimizer_steps(engine)


def untie_optimizer_steps(engine) -> None:
    """Each optimizer state its own "step" tensor, of the dtype and device torch's AdamW keeps it in: ZeRO-3's
    universal load shares one tensor between sub-groups, ZeRO-1's restores a plain number (which fused AdamW
    refuses: "`state_steps` argument must contain a list of singleton tensors")."""
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
    # ZeRO-3 swaps each sub-group's flat partition into param_groups only while it steps: walk the states.
    on_device = any(group.get("fused") or group.get("capturable") for group in optimizer.param_groups)
    for param, state in optimizer.state.items():
        if "step" in state:
            state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32,
                                         device=param.device if on_device else "cpu")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _extract_mixed(optim_files_grid, param_shapes_grid, dp_degree, temp_dir, indices, exclude_param_names=None):
    """ds_to_universal.extract_zero_shards_stage3 for sub-groups partitioned over either the data-parallel group or
    the whole world: a sub-group's partition count is the one whose per-parameter sizes add up to its flat length;
    a world-partitioned fragment of global rank dp x tensor + tp (DeepSpeed's (data, tensor) mesh) is written under
    every tensor-parallel index, so that each index reassembles the whole replicated parameter."""
    import deepspeed.checkpoint.ds_to_universal as converter
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT

    tp_index, dp_index = indices
    tp_degree = len(optim_files_grid)
    world = tp_degree * dp_degree
    state = torch.load(optim_files_grid[tp_index][dp_index], map_location="cpu")[OPTIMIZER_STATE_DICT]
    for idx, shapes in enumerate(param_shapes_grid[tp_index]):
        flat = {"exp_avg": state["optimizer_state_dict"]["state"][idx]["exp_avg"],
                "exp_avg_sq": state["optimizer_state_dict"]["state"][idx]["exp_avg_sq"],
                "fp32": state["fp32_flat_groups"][idx]}
        length = flat["fp32"].numel()
        counts = [c for c in dict.fromkeys((dp_degree, world))
                  if sum(-(-_numel(s) // c) for s in shapes.values()) == length]
        if len(counts) != 1:
            raise RuntimeError(f"optimizer sub-group {idx} (tensor {tp_index}, data {dp_index}) has {length} elements, "
                               f"which fits partition counts {counts} of ({dp_degree}, {world})")
        count = counts[0]
        rank = dp_index if count == dp_degree else dp_index * tp_degree + tp_index
        targets = [tp_index] if count == dp_degree else list(range(tp_degree))
        offset = 0
        for name, shape in shapes.items():
            numel = _numel(shape)
            part = -(-numel // count)
            keep = max(0, min(part, numel - rank * part))
            if name not in (exclude_param_names or set()):
                for key, tensor in flat.items():
                    for t in targets:
                        converter.dump_param_fragment(temp_dir, t, rank, key, tensor, name, offset, keep)
            offset += part


def _with_shapes(info: dict, model_files) -> dict:
    """The converter's universal-checkpoint info with the replicated parameters' affine maps rebuilt from the
    checkpoint's param_shapes (AutoTP recorded the empty shape of a ZeRO-3 partitioned parameter)."""
    from deepspeed.checkpoint.affine import replicated_map
    from deepspeed.checkpoint.constants import AFFINE_MAP, AFFINE_MAP_PARAMS

    maps = info.get(AFFINE_MAP, {}).get(AFFINE_MAP_PARAMS, {})
    shapes = {}
    for group in torch.load(model_files[0], map_location="cpu")["param_shapes"]:
        shapes.update(group)
    for name, shape in shapes.items():
        pattern = rf"^{re.escape(name)}$"
        entry = maps.get(pattern)
        if entry is None:
            continue
        tp = len(entry["ranks"])
        replicated = all(len(piece["locations"]) == tp for r in entry["ranks"].values() for piece in r["pieces"])
        if replicated and list(entry["logical_shape"]) != list(shape):
            maps[pattern] = replicated_map(tuple(shape), tp).to_dict()
    return info
