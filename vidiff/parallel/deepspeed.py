"""The DeepSpeed config dict, built from the run config and its layout (never written by hand).

The `deepspeed:` section of a run config is merged over the result for expert knobs (offload, bucket sizes,
communication settings); the keys the `parallel:` section owns are refused there, so there is one place for
each setting.
"""

from __future__ import annotations

from typing import Any

import torch

from vidiff.config import DiTConfig, RunConfig
from vidiff.models.dit import DiTBlock, count_parameters
from vidiff.parallel.layout import Layout, LayoutError
from vidiff.parallel.tensor import autotp_layer_specs

# Keys `parallel:` owns -> where to set them instead.
OWNED = {
    "train_batch_size": "parallel.global_batch", "train_micro_batch_size_per_gpu": "parallel.micro_batch",
    "gradient_accumulation_steps": "parallel.global_batch", "bf16": "parallel.precision",
    "fp16": "parallel.precision", "data_types": "parallel.precision", "tensor_parallel": "parallel.tensor",
    "zero_optimization.stage": "parallel.zero_stage", "gradient_clipping": "train.grad_clip",
}


# Keys that make DeepSpeed's save_checkpoint return before the files are on disk (its decoupled and datastates
# writers; `checkpoint.writer` selects those or the fast writer, which needs async_io and writes only some
# ranks' files with data_parallel): vidiff flushes the files and moves `latest` as soon as save_checkpoint
# returns, and does not wait for a writer working behind it.
ASYNC_CHECKPOINT = {
    "checkpoint.writer": "selects DeepSpeed's fast/decoupled checkpoint writer",
    "datastates_ckpt": "turns on DeepSpeed's asynchronous DataStates checkpointing",
}


def _refuse_async_checkpoints(extra: dict) -> None:
    for path, what in ASYNC_CHECKPOINT.items():
        node: object = extra
        for part in path.split("."):
            node = node.get(part, None) if isinstance(node, dict) else None
        if node is not None and node is not False:
            raise LayoutError(f"deepspeed.{path} {what}, which can return from save_checkpoint before the files are "
                              "written; vidiff moves checkpoints/latest right after it returns and does not wait for "
                              f"an asynchronous writer, so remove deepspeed.{path} (vidiff writes with torch.save and "
                              "fsyncs every file before latest moves)")


def zero3_buckets(cfg: DiTConfig) -> dict[str, int]:
    """ZeRO-3 communication sizes and live-parameter limits from the model's size.

    Buckets after DeepSpeed's HuggingFace integration (reduce and prefetch buckets of about hidden^2 elements,
    parameters under 10 x hidden kept whole on every rank), with floors for narrow models: every collective has a
    fixed cost, and below about 2^20-element buckets and a 10^5-element persistence threshold a small DiT spent
    more time gathering than computing (the demo DiT, hidden 128, took 0.90 s per step with the plain rule and
    about 0.5 s with the floors, 2 CPU ranks).

    Live parameters: DeepSpeed's defaults (10^9 elements each) keep every gathered parameter until its next use
    when the model is smaller than that, i.e. the whole model from forward to backward on every rank. One DiT
    block's parameters as the reuse distance releases a block's weights once it has run (a block recomputed by
    activation checkpointing reuses them within that distance), and as the live limit prefetches at most one
    block ahead (tools/bench_memory.py measures the peak)."""
    bucket = max(cfg.hidden_size * cfg.hidden_size, 1 << 20)
    with torch.device("meta"):
        block = count_parameters(DiTBlock(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio))
    return {"reduce_bucket_size": bucket, "stage3_prefetch_bucket_size": int(0.9 * bucket),
            "stage3_param_persistence_threshold": max(10 * cfg.hidden_size, 100_000),
            "stage3_max_live_parameters": block, "stage3_max_reuse_distance": block}


def _merge(base: dict, extra: dict, path: str = "") -> dict:
    out = dict(base)
    for key, value in extra.items():
        where = f"{path}{key}"
        if where in OWNED:
            raise LayoutError(f"deepspeed.{where} is set from {OWNED[where]}; set it there instead")
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, f"{where}.")
        else:
            out[key] = value
    return out


def deepspeed_config(cfg: RunConfig, layout: Layout) -> dict[str, Any]:
    """ZeRO stage, batch sizes, precision, tensor parallelism; the optimizer and schedule are ours, handed to
    deepspeed.initialize."""
    par = cfg.parallel
    zero: dict[str, Any] = {"stage": par.zero}
    if par.zero == 3 and cfg.task == "dit":
        # ZeRO-3's memory_efficient_linear stays on (DeepSpeed's default): plain F.linear saves a view of each
        # gathered weight for backward, which keeps the whole model gathered from forward to backward whatever
        # the live-parameter limits (tools/bench_memory.py: peak 2.4x the ideal at 4 ranks with it off, and no
        # measurable difference in step time on CPU, preset S or the demo DiT).
        zero.update(zero3_buckets(cfg.model))
    config: dict[str, Any] = {
        # No train_batch_size: DeepSpeed derives it, counting data-parallel ranks only (with AutoTP, zero.Init
        # checks it against the whole world size before the tensor-parallel groups exist).
        "train_micro_batch_size_per_gpu": layout.micro_batch,
        "gradient_accumulation_steps": layout.accumulation,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,      # torch AdamW: DeepSpeed's fused Adam needs CUDA
        "steps_per_print": 1 << 30,                 # we log; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }
    if par.precision == "bf16":
        config["bf16"] = {"enabled": True}
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    if layout.kind == "pipeline":
        # DeepSpeed splits stage-to-stage activations over the tensor-parallel ranks only when a single tensor
        # needs a gradient; ours are a tuple in which c and context need theirs too.
        config["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    if layout.kind == "sharded" and layout.tensor > 1:
        config["tensor_parallel"] = {"autotp_size": layout.tensor,
                                     "partition_config": {"use_default_specs": False,
                                                          "layer_specs": autotp_layer_specs()}}
    _refuse_async_checkpoints(cfg.deepspeed)
    return _merge(config, cfg.deepspeed)
