"""Preflight: what a run needs from every rank, checked before any step (`vidiff doctor`, and `vidiff train` at
start on every rank).

Every rank joins the process group within train.preflight_timeout seconds (a rank that cannot join fails with
a message, it does not hang), all-reduces its rank id (the sum is checked), and reports its host, device, torch /
deepspeed / NCCL versions, whether it can write the run's checkpoint folder, whether it can read the shards, and the
free disk under the run folder. Rank 0 gathers the reports; every problem names the rank and host and says what to
fix, and every rank raises PreflightError with the whole list. Versions that differ across ranks are a problem.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from vidiff.config import InputError, RunConfig
from vidiff.data.pipeline import INDEX_NAME

CHECKPOINT_FOLDER = "checkpoints"


class PreflightError(InputError):
    """A rank cannot run this config: the message lists each problem with its rank and host."""


@dataclass
class RankReport:
    rank: int
    host: str
    device: str
    versions: dict[str, str]
    free_gb: float
    problems: list[str] = field(default_factory=list)


def join(timeout_s: float, backend: str) -> None:
    """Join the launcher's process group within timeout_s (deepspeed.init_distributed); a rank that cannot (the
    master unreachable, a node that never started) raises PreflightError naming itself and the address. Once
    joined, collectives get torch's default timeout again."""
    import deepspeed
    from torch.distributed.constants import default_pg_nccl_timeout, default_pg_timeout

    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    try:
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=timedelta(seconds=timeout_s))
    except Exception as error:                      # DistStoreError, DistNetworkError, TimeoutError, ...
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PreflightError(
            f"rank {os.environ.get('RANK')} on {socket.gethostname()}: the {os.environ.get('WORLD_SIZE')} ranks did "
            f"not all join at {where} within train.preflight_timeout {timeout_s:g} s ({first}). Start every node, "
            "give them the same MASTER_ADDR and MASTER_PORT, make node 0 reachable on that port, or raise "
            "train.preflight_timeout when nodes start far apart") from None
    dist.distributed_c10d._set_pg_timeout(default_pg_nccl_timeout if backend == "nccl" else default_pg_timeout)


def versions() -> dict[str, str]:
    import deepspeed

    nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "none (no GPU)"
    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "nccl": nccl}


def write_problem(run_dir: Path) -> str | None:
    """Why this rank cannot write, flush and delete a file in the run's checkpoint folder (None: it can)."""
    folder = Path(run_dir) / CHECKPOINT_FOLDER
    probe = folder / f".write-probe-{socket.gethostname()}-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as error:
        return f"cannot write checkpoints to {folder}: {error}. Give every rank write access to it, or set out_dir " \
               "to a folder they can write"
    return None


def shard_problem(shards: str) -> str | None:
    """Why this rank cannot read the shards data.shards names (None: every file is there, non-empty, readable)."""
    folder = Path(shards)
    if (folder / INDEX_NAME).is_file():
        try:
            paths = [folder / s["path"] for s in json.loads((folder / INDEX_NAME).read_text())["shards"]]
        except (OSError, ValueError, KeyError) as error:
            return f"data.shards {shards}: unreadable {INDEX_NAME} ({error})"
    else:
        paths = sorted(folder.glob("*.tar")) if folder.is_dir() else sorted(Path(p) for p in glob.glob(shards))
    if not paths:
        return f"data.shards {shards}: no *.tar shards there. Mount the data on every node at the same path, or fix " \
               "data.shards"
    bad = [p for p in paths if not p.is_file() or p.stat().st_size == 0]
    if bad:
        return f"data.shards {shards}: {len(bad)} of {len(paths)} shard files missing or empty here (first: " \
               f"{bad[0]}). Mount the data on every node at the same path"
    try:
        with open(paths[0], "rb") as f:
            f.read(512)
    except OSError as error:
        return f"data.shards {shards}: cannot read {paths[0]} ({error})"
    return None


def checkpoint_bytes(cfg: RunConfig) -> int:
    """About the bytes one checkpoint of this run writes, all ranks together: per parameter the fp32 master and
    Adam's two moments (12), the training-dtype weights (2 or 4), the gathered model and EMA exports (4 each), each
    rank's EMA part (4). The model is built on the meta device (no memory); a DiT's text width is taken as its
    hidden size (the text encoder is not loaded yet), which moves the count by a fraction of a percent."""
    from vidiff.models.dit import DiT
    from vidiff.models.vae import VideoVAE

    with torch.device("meta"):
        model = VideoVAE(cfg.vae) if cfg.task == "vae" else DiT(cfg.model, cfg.vae.latent_channels,
                                                                 cfg.model.hidden_size)
        n = sum(p.numel() for p in model.parameters())
    ema = cfg.train.ema_decay > 0
    per_param = 12 + (2 if cfg.parallel.precision == "bf16" else 4) + 4 + (8 if ema else 0)
    return n * per_param


def report(cfg: RunConfig, device: torch.device, needed_bytes: int) -> RankReport:
    """This rank's facts and problems (no collectives)."""
    run_dir = Path(cfg.out_dir)
    problems = [p for p in (write_problem(run_dir), shard_problem(cfg.data.shards)) if p]
    anchor = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    free = shutil.disk_usage(anchor).free
    if free < needed_bytes:
        problems.append(f"{free / 1e9:.1f} GB free under {anchor}, a checkpoint of this run needs about "
                        f"{needed_bytes / 1e9:.1f} GB. Free some space, lower train.keep_last, or set out_dir "
                        "elsewhere")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return RankReport(dist.get_rank(), socket.gethostname(), f"{device} ({name})", versions(), free / 1e9, problems)


def check(cfg: RunConfig, device: torch.device, needed_bytes: int) -> list[RankReport]:
    """Every rank's report, checked (every rank must call, after `join`); raises PreflightError on any problem."""
    rank, world = dist.get_rank(), dist.get_world_size()
    ids = torch.tensor([float(rank)], dtype=torch.float64, device=device)
    dist.all_reduce(ids)
    ours = report(cfg, device, needed_bytes)
    expected = world * (world - 1) / 2
    if float(ids) != expected:
        ours.problems.append(f"the all-reduce of the rank ids gave {float(ids):g}, expected {expected:g}: the "
                             "collective backend is broken between these ranks (check the network settings, "
                             "NCCL_SOCKET_IFNAME)")
    reports = [None] * world
    dist.all_gather_object(reports, asdict(ours))
    reports = [RankReport(**r) for r in reports]
    problems = [f"rank {r.rank} on {r.host}: {p}" for r in reports for p in r.problems]
    for name in reports[0].versions:
        seen: dict[str, list[int]] = {}
        for r in reports:
            seen.setdefault(r.versions[name], []).append(r.rank)
        if len(seen) > 1:
            problems.append(f"{name} versions differ across ranks: " + "; ".join(
                f"{v} on ranks {_ranks(ranks, reports)}" for v, ranks in seen.items())
                + f". Install the same {name} on every node")
    if problems:
        raise PreflightError("preflight failed:\n  " + "\n  ".join(problems))
    return reports


def _ranks(ranks: list[int], reports: list[RankReport]) -> str:
    return ", ".join(f"{r} ({reports[r].host})" for r in ranks)


def summary(reports: list[RankReport], needed_bytes: int) -> str:
    hosts = sorted({r.host for r in reports})
    first = reports[0]
    return (f"preflight ok: {len(reports)} ranks on {len(hosts)} host(s) ({', '.join(hosts[:4])}"
            f"{', ...' if len(hosts) > 4 else ''}), {first.device}, torch {first.versions['torch']}, deepspeed "
            f"{first.versions['deepspeed']}, nccl {first.versions['nccl']}; at least "
            f"{min(r.free_gb for r in reports):.1f} GB free for a checkpoint of about {needed_bytes / 1e9:.2f} GB")
