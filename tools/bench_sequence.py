"""Sequence parallelism on a long clip: per-rank activation memory, step time and all-to-all bytes at sequence 1,
2 and 4 (dsp), and ulysses beside dsp at 2, all measured in one run.

    python tools/bench_sequence.py [--preset S] [--frames 32 --side 16] [--sizes 1 2 4] [--steps 2]

Each size trains the preset's DiT (factorized attention, patch 1x2x2) in the sharded layout (ZeRO-3) on one clip
of frames x side x side latents (default 32 x 16 x 16: 125 frames at 128x128, 2048 tokens; its activations,
1.6 GiB, are twice the model state of ZeRO-3 on one rank), every rank of the sequence group holding the same
clip. After a warm-up step each rank measures:

- activation memory: the bytes autograd holds for backward at the end of the forward (tensors saved by every
  operation, each storage once, parameters excluded), through torch.autograd.graph.saved_tensors_hooks; on a GPU
  also the peak allocated during forward and backward above the memory at rest;
- step time: forward, backward and optimizer step, the mean of --steps steps (wall clock, all ranks in step);
- all-to-all bytes: every torch.distributed.all_to_all_single call of one forward and backward, counted at the call
  (its input tensor's bytes: what each rank sends, its own chunk included), per block in forward.

Target: activation memory per rank <= 1.2 x (the sequence-1 figure / N); dsp's forward bytes per block equal the
formula 2 x A / N (one switch to positions and one back, A = the bytes of one hidden state B x T' x H'W' x D); ulysses
exchanges q, k, v and the output around temporal attention, 4 x A / N. One JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import batch, build_engine, forward_backward, launch, parse_with_worker, run_config  # noqa: E402

from vidiff.diffusion.edm import edm_loss  # noqa: E402
from vidiff.parallel.layout import make_layout  # noqa: E402
from vidiff.parallel.sequence import sequence_split  # noqa: E402

TARGET_MEMORY = 1.2


class SavedBytes:
    """Bytes of the tensors autograd saves for backward while active (each storage once, parameters excluded)."""

    def __init__(self):
        self.storages: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor):
        if not (isinstance(tensor, torch.nn.Parameter) or hasattr(tensor, "ds_id")):
            storage = tensor.untyped_storage()
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())


class AllToAllBytes:
    """Counts the input bytes of every all_to_all_single while installed (the real collective still runs)."""

    def __init__(self):
        self.bytes, self.calls, self._original = 0, 0, dist.all_to_all_single

    def __enter__(self):
        def counted(output, input, *args, **kwargs):
            self.bytes += input.numel() * input.element_size()
            self.calls += 1
            return self._original(output, input, *args, **kwargs)
        dist.all_to_all_single = counted
        return self

    def __exit__(self, *exc):
        dist.all_to_all_single = self._original


def worker(args: argparse.Namespace) -> None:
    cfg = run_config(args.preset, "fp32", micro_batch=1)
    frames = 1 + 4 * (args.frames - 1)
    side = 8 * args.side
    cfg = cfg.model_copy(update={
        "data": cfg.data.model_copy(update={"buckets": [[frames, side, side]]}),
        "parallel": cfg.parallel.model_copy(update={"sequence": args.size, "sequence_mode": args.mode})})
    engine, rank, world = build_engine(cfg)
    layout = make_layout(cfg, world)
    engine.module.net.split_sequence(sequence_split(layout, rank, args.mode))
    d = batch(cfg, (args.frames, args.side, args.side), engine.device)
    forward_backward(engine, cfg, d)                # warm-up: Adam's state, ZeRO-3's parameter trace
    engine.step()
    saved = SavedBytes()
    peak = 0
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        rest = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    with AllToAllBytes() as exchanged:
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            loss = edm_loss(engine, d["x0"], d["sigma"], d["noise"], cfg.edm.sigma_data, text=d["text"],
                            text_mask=d["text_mask"]).mean()
        forward_bytes = exchanged.bytes
        engine.backward(loss)
    engine.step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - rest
    activations = saved.total
    total_bytes = exchanged.bytes
    dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        forward_backward(engine, cfg, d)
        engine.step()
    dist.barrier()
    step_seconds = (time.perf_counter() - start) / args.steps
    figures = torch.tensor([activations, peak, forward_bytes, total_bytes], dtype=torch.float64)
    everyone = [torch.zeros_like(figures) for _ in range(world)]
    dist.all_gather(everyone, figures)
    if rank == 0:
        D, depth = cfg.model.hidden_size, cfg.model.depth
        tokens = args.frames * (args.side // 2) ** 2
        Path(args.out).write_text(json.dumps({
            "per_rank": [[int(v) for v in t.tolist()] for t in everyone], "step_seconds": step_seconds,
            "hidden_state_bytes": tokens * D * 4, "depth": depth, "tokens": tokens}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="S", choices=["S", "B", "L", "XL"])
    parser.add_argument("--frames", type=int, default=32, help="latent frames of the clip")
    parser.add_argument("--side", type=int, default=16, help="latent height and width")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4], help="sequence sizes (dsp)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the measured one")
    parser.add_argument("--size", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="dsp", help=argparse.SUPPRESS)
    args = parse_with_worker(parser)
    if args.worker:
        return worker(args)
    runs = [(n, "dsp") for n in args.sizes] + [(2, "ulysses")]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n, mode in runs:
            out = Path(tmp) / f"{mode}{n}.json"
            launch(__file__, n, ["--preset", args.preset, "--frames", str(args.frames), "--side", str(args.side),
                                 "--steps", str(args.steps), "--size", str(n), "--mode", mode, "--out", str(out)])
            found = json.loads(out.read_text())
            A, depth = found["hidden_state_bytes"], found["depth"]
            activations, peak, forward_bytes, total_bytes = (max(r[i] for r in found["per_rank"]) for i in range(4))
            results[f"{mode}{n}"] = {
                "ranks": n, "activation_bytes_per_rank": activations, "gpu_peak_above_rest_bytes": peak or None,
                "step_seconds": round(found["step_seconds"], 3),
                "all_to_all_bytes_per_block_forward": forward_bytes / depth,
                "all_to_all_bytes_per_step": total_bytes,
                "formula_bytes_per_block_forward": (2 if mode == "dsp" else 4) * A / n if n > 1 else 0}
            print(f"{mode} {n}: activations {activations / 2**20:.1f} MiB per rank, step "
                  f"{found['step_seconds']:.2f} s, all-to-all {forward_bytes / depth / 2**20:.2f} MiB per block "
                  "forward", file=sys.stderr)
    one = results["dsp1"]["activation_bytes_per_rank"]
    memory_ratios = {k: round(r["activation_bytes_per_rank"] / (one / r["ranks"]), 4) for k, r in results.items()}
    formula_met = all(r["all_to_all_bytes_per_block_forward"] == r["formula_bytes_per_block_forward"]
                      for r in results.values())
    print(json.dumps({
        "benchmark": "sequence_parallel", "preset": args.preset, "latent": [args.frames, args.side, args.side],
        "tokens": args.frames * (args.side // 2) ** 2, "runs": results,
        "activation_ratio_to_ideal": memory_ratios,
        "step_time_ratio_to_sequence_1": {k: round(r["step_seconds"] / results["dsp1"]["step_seconds"], 3)
                                          for k, r in results.items()},
        "ulysses_to_dsp_bytes": round(results["ulysses2"]["all_to_all_bytes_per_block_forward"]
                                      / results["dsp2"]["all_to_all_bytes_per_block_forward"], 3),
        "target_activation_ratio": TARGET_MEMORY, "all_to_all_bytes_equal_formula": formula_met,
        "met": formula_met and all(v <= TARGET_MEMORY for k, v in memory_ratios.items() if k.startswith("dsp"))}))


if __name__ == "__main__":
    main()
