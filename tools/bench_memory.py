"""Per-rank training memory under ZeRO-3 against the ideal 16 x parameters / ranks (fp32 Adam: 4 bytes of
parameter, 4 of gradient, 8 of moments per parameter, each split over the ranks).

    python tools/bench_memory.py [--preset S] [--ranks 1 2 4]

For each rank count, the DiT of the preset is built under zero.Init and trained through our sharded-layout
engine for one step, then one more forward + backward; each rank then sums the bytes of the storages it holds
for parameters (its ZeRO shards, plus the small parameters ZeRO-3 keeps whole: stage3_param_persistence_
threshold), gradients (ZeRO's partitioned gradient buffers) and Adam's moments. One JSON line: the largest
rank's bytes and its ratio to the ideal at each rank count (target <= 1.15).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import batch, build_engine, forward_backward, launch, parse_with_worker, run_config  # noqa: E402

from vidiff.models.dit import count_parameters  # noqa: E402

TARGET = 1.15


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def measure(engine) -> dict[str, int]:
    """Bytes this rank holds for parameters, gradients and optimizer state."""
    optimizer = engine.optimizer
    params = list(engine.module.parameters())
    parameter_tensors = [p.ds_tensor for p in params] + [p.data for p in params]    # shards; whole if persistent
    gradient_tensors = [getattr(optimizer, "grad_partitions_flat_buffer", None)]
    gradient_tensors += [t.grad for t in optimizer.fp32_partitioned_groups_flat]
    state = [v for s in optimizer.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.numel() > 1]
    return {"parameters": _storage_bytes(parameter_tensors + optimizer.fp32_partitioned_groups_flat),
            "gradients": _storage_bytes(gradient_tensors), "optimizer": _storage_bytes(state)}


def worker(args: argparse.Namespace) -> None:
    cfg = run_config(args.preset, "fp32", micro_batch=1)
    engine, rank, world = build_engine(cfg)
    d = batch(cfg, (2, 8, 8), engine.device)
    forward_backward(engine, cfg, d)
    engine.step()
    forward_backward(engine, cfg, d)                # gradients of a second step exist, moments of the first
    usage = measure(engine)
    total = torch.tensor([sum(usage.values())], dtype=torch.float64)
    everyone = [torch.zeros_like(total) for _ in range(world)]
    torch.distributed.all_gather(everyone, total)
    if rank == 0:
        with torch.device("meta"):
            from vidiff.train.objectives import build_denoiser
            parameters = count_parameters(build_denoiser(cfg, 16, 384))
        Path(args.out).write_text(json.dumps({"parameters": parameters, "rank0": usage,
                                              "per_rank": [int(t.item()) for t in everyone]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="S", choices=["S", "B", "L", "XL"])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    args = parse_with_worker(parser)
    if args.worker:
        return worker(args)
    results, parameters = {}, 0
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in args.ranks:
            out = Path(tmp) / f"{ranks}.json"
            launch(__file__, ranks, ["--preset", args.preset, "--out", str(out)])
            found = json.loads(out.read_text())
            parameters = found["parameters"]
            ideal = 16 * parameters / ranks
            worst = max(found["per_rank"])
            results[ranks] = {"bytes_per_rank": worst, "ideal_bytes": round(ideal),
                              "ratio_to_ideal": round(worst / ideal, 4),
                              "rank0": found["rank0"]}
            print(f"{ranks} ranks: {worst / 2**20:.1f} MiB per rank, ideal {ideal / 2**20:.1f} MiB, "
                  f"x{worst / ideal:.3f} ({found['rank0']})", file=sys.stderr)
    worst_ratio = max(r["ratio_to_ideal"] for r in results.values())
    print(json.dumps({"preset": args.preset, "parameters": parameters, "ranks": results,
                      "max_ratio_to_ideal": worst_ratio, "target": TARGET, "met": worst_ratio <= TARGET}))


if __name__ == "__main__":
    main()
