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
    return engine, schedule

