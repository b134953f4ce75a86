"""The device of this process: one GPU per launcher rank, or the CPU."""

from __future__ import annotations

import os

import torch


def rank_device(tf32: bool = True) -> torch.device:
    """cuda:LOCAL_RANK when there is a GPU (the launcher gives each rank its own; DeepSpeed's engine takes the same
    one), else the CPU. On a GPU, fp32 matmuls and convolutions run on TF32 tensor cores when tf32 is on (the MFU
    peak of fp32 runs assumes it: parallel.tf32)."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    return torch.device("cuda", local_rank)
