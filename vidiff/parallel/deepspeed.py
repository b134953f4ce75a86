"""The DeepSpeed config dict, built from the run config (never written by hand)."""

from __future__ import annotations

from vidiff.config import RunConfig


def deepspeed_config(cfg: RunConfig) -> dict:
    """ZeRO stage, micro-batch, clipping; the optimizer and schedule are ours, handed to deepspeed.initialize."""
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "zero_allow_untested_optimizer": True,      # torch AdamW: DeepSpeed's fused Adam needs CUDA
        "steps_per_print": 1 << 30,                 # we log; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }
