"""The sharded layout (parallel.pipeline == 1): ZeRO (stage 3 by default) with the model built under
deepspeed.zero.Init, so no rank ever holds the whole model, and tensor parallelism by DeepSpeed AutoTP
(tensor_parallel.autotp_size with the DiT's layer specs, parallel/tensor.py).

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
