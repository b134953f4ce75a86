"""The sharded layout (parallel.pipeline == 1): ZeRO (stage 3 by default) with the model built under
deepspeed.zero.Init, and tensor parallelism by DeepSpeed AutoTP (tensor_parallel.autotp_size with the DiT's layer
specs, parallel/tensor.py). No rank holds the whole model: parameters are gathered module by module and released
after use (the live-parameter limits come from the model's size, parallel/deepspeed.py), and the optimizer step
works on the rank's partitions.

Every layer initializes itself in its constructor (models/attention.Linear), before zero.Init shards it, so
the weights equal a plain single-process build from the same seed.
"""

from __future__ import annotations

from vidiff.config import RunConfig
from vidiff.parallel.layout import Layout


def build_sharded_engine(cfg: RunConfig, layout: Layout, build_model, ds_config: dict, make_optimizer):
    import deepspeed

    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=cfg.parallel.zero == 3):
        model = build_model()
    optimizer, schedule = make_optimizer(model.parameters(), cfg.train)
    engine, _, _, schedule = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                                  config=ds_config)
    share_fp32_master(engine.optimizer)
    share_gradient_partition(engine.optimizer)
    return engine, schedule


def share_fp32_master(optimizer) -> None:
    """Let ZeRO-3's fp32 master partitions be the parameter partitions themselves when both are fp32 on the
    same device.

    DeepSpeed means to skip the master copy in that case (stage3._create_fp32_partitions) but compares the
    tensor's torch.device with the accelerator's device *name*, a str ('cpu', 'cuda:0'), which is never equal,
    so fp32 training keeps two copies: 20 bytes per parameter instead of 16. Adam then updates the shared
    storage in place and DeepSpeed's copy of master into parameters becomes a copy onto itself."""
    for flat, master in zip(getattr(optimizer, "fp16_partitioned_groups_flat", []),
                            getattr(optimizer, "fp32_partitioned_groups_flat", [])):
        if (flat.dtype == master.dtype and flat.device == master.device and flat.shape == master.shape
                and flat.untyped_storage().data_ptr() != master.untyped_storage().data_ptr()):
            master.data = flat.data


def share_gradient_partition(optimizer) -> None:
    """Let ZeRO-3's step() hand Adam the rank's gradient partition itself instead of a copy of it.

    DeepSpeed reduces every gradient into its slice of one flat buffer (grad_partitions_flat_buffer), the slices
    of a sub-group in order, but step() flattens those slices into a new tensor for the fp32 master
    (stage3._prepare_fp32_grad_for_sub_group): a transient 4 bytes per parameter per rank, a quarter of the ideal
    16, at the peak of every step. When a sub-group's slices are consecutive in that buffer and of the master's
    dtype (fp32 gradient accumulation; every parameter trained), the master's gradient is a view of them; the
    buffer is overwritten by the next backward anyway. Otherwise DeepSpeed's own copy is made."""
    prepare = getattr(optimizer, "_prepare_fp32_grad_for_sub_group", None)
    buffer = getattr(optimizer, "grad_partitions_flat_buffer", None)
    if prepare is None or buffer is None:
        return

    def prepare_shared(sub_group_id: int) -> None:
        slices = optimizer.averaged_gradients[sub_group_id]
        master = optimizer.fp32_partitioned_groups_flat[sub_group_id]
        start = slices[0].storage_offset() - buffer.storage_offset() if slices else -1
        offset = start
        for piece in slices:
            if (piece.untyped_storage().data_ptr() != buffer.untyped_storage().data_ptr() or not piece.is_contiguous()
                    or piece.storage_offset() - buffer.storage_offset() != offset):
                return prepare(sub_group_id)
            offset += piece.numel()
        if start < 0 or buffer.dtype != master.dtype or offset - start != master.numel():
            return prepare(sub_group_id)
        master.grad = buffer.narrow(0, start, offset - start)
        optimizer.averaged_gradients[sub_group_id] = None

    optimizer._prepare_fp32_grad_for_sub_group = prepare_shared
