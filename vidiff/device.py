"""The device of this process: one GPU per launcher rank, or the CPU."""

from __future__ import annotations

import os
from pathlib import Path

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


def resident_kib() -> dict[str, int]:
    """This process's resident memory now (VmRSS) and its high-water mark (VmHWM), KiB (Linux)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) for k in ("VmRSS", "VmHWM")}


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: the GPU's allocator statistics, or on the CPU the resident high-water mark (VmHWM :=
    VmRSS; where the kernel refuses, the peak stays the process's lifetime peak)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_gb(device: torch.device) -> float:
    """The peak since reset_peak_memory: GPU memory allocated by torch, or the process's resident memory (RSS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resident_kib()["VmHWM"] * 1024 / 1e9
