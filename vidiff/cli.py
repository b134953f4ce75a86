"""vidiff train | check | sample | eval | cache-latents | shards | presets. A bad config exits with status 2 before any
process group starts."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from vidiff.config import ConfigError, InputError, RunConfig, load_config

EXIT_BAD_CONFIG = 2


def _prepare_environment() -> None:
    """DeepSpeed picks its accelerator at import; without a CUDA GPU that is the CPU (gloo)."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch
        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


def _load(args: argparse.Namespace) -> RunConfig:
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"vidiff: bad config\n{exc}", file=sys.stderr)
        sys.exit(EXIT_BAD_CONFIG)


def _layout(cfg: RunConfig, world: int, config: str, resume: str | None = None):
    """The run's parallel layout on `world` ranks, its DeepSpeed config built once to check the `deepspeed:`
    passthrough, and the checkpoint it would resume from, checked against that layout (a topology change vidiff
    cannot convert); token embeddings cached with other text.* settings, and latent shards for a super-resolution
    stage, are refused; what cannot run exits 2 with the reason."""
    from vidiff.data.latents import check_cached_text, check_stage_shards
    from vidiff.parallel.deepspeed import deepspeed_config
    from vidiff.parallel.layout import make_layout

    try:
        layout = make_layout(cfg, world)
        deepspeed_config(cfg, layout)
        _check_resume(cfg, layout, resume)
        for key, shards in (("data.shards", cfg.data.shards), ("data.eval_shards", cfg.data.eval_shards)):
            if shards and cfg.task == "dit":
                check_cached_text(shards, cfg.text, key)
                check_stage_shards(shards, cfg.stage, key)
        return layout
    except ConfigError as exc:
        print(f"vidiff: {config} cannot run as configured\n{exc}", file=sys.stderr)
        sys.exit(EXIT_BAD_CONFIG)


def _check_resume(cfg: RunConfig, layout, resume: str | None) -> None:
    """The checkpoint a start would load exists and fits this layout (CheckpointError or LayoutError otherwise)."""
    from vidiff.train.resume import check_topology_change, read_state, resume_target, saved_topology, topology

    tag = resume_target(Path(cfg.out_dir), resume)
    if tag is not None:
        check_topology_change(saved_topology(read_state(tag)), topology(layout, cfg.parallel.zero))


def _resume(args: argparse.Namespace) -> str | None:
    from vidiff.train.resume import RESUME_NONE

    return RESUME_NONE if args.no_resume else args.resume


def _load_resumable(args: argparse.Namespace, world: int) -> tuple[RunConfig, str | None]:
    """The run config, with the resumed checkpoint's global batch kept (train/resume.keep_global_batch)."""
    from vidiff.train.resume import keep_global_batch

    cfg, resume = _load(args), _resume(args)
    return keep_global_batch(cfg, resume, world), resume


def cmd_check(args: argparse.Namespace) -> None:
    cfg, resume = _load_resumable(args, args.world_size)
    layout = _layout(cfg, args.world_size, args.config, resume)
    print(f"{args.config}: ok ({cfg.task} run, out_dir {cfg.out_dir}; {layout.describe()})")


def cmd_train(args: argparse.Namespace) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg, resume = _load_resumable(args, world)
    _layout(cfg, world, args.config, resume)                  # before any process group
    _prepare_environment()
    from vidiff.train.trainer import train

    run_dir = train(cfg, resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run folder: {run_dir}  (tensorboard --logdir {run_dir / 'tb'})")


def cmd_doctor(args: argparse.Namespace) -> None:
    """The preflight `vidiff train` runs at start, alone (under a launcher for every rank: VIDIFF_COMMAND=doctor)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = _load(args)
    _layout(cfg, world, args.config, None)
    _prepare_environment()
    from vidiff.device import rank_device
    from vidiff.train import preflight
    from vidiff.train.trainer import init_distributed

    rank, _ = init_distributed(cfg.train.preflight_timeout)
    needed = preflight.checkpoint_bytes(cfg)
    reports = preflight.check(cfg, rank_device(cfg.parallel.tf32), needed)
    if rank == 0:
        for r in reports:
            print(f"rank {r.rank}: {r.host}, {r.device}, torch {r.versions['torch']}, deepspeed "
                  f"{r.versions['deepspeed']}, nccl {r.versions['nccl']}, {r.free_gb:.1f} GB free")
        print(preflight.summary(reports, needed))


def cmd_sample(args: argparse.Namespace) -> None:
    """One DiT run (CONFIG), or a cascade of stage runs (--cascade FILE); prompts spread over the ranks of a
    launcher. The work is in vidiff/sampling.py."""
    if args.cascade and args.config and OVERRIDE.match(args.config):   # `--cascade F k=v`: no run config
        args.overrides, args.config = [args.config, *args.overrides], None
    if bool(args.config) == bool(args.cascade):
        print("vidiff sample: give a run config (CONFIG) or --cascade FILE, not both", file=sys.stderr)
        sys.exit(EXIT_BAD_CONFIG)
    if args.image and not args.cascade:
        print("vidiff sample: --image goes with --cascade (the base stage takes the first frame)", file=sys.stderr)
        sys.exit(EXIT_BAD_CONFIG)
    if args.cascade:
        from vidiff.config import CascadeSampleConfig

        try:
            cascade = load_config(args.cascade, args.overrides, CascadeSampleConfig)
        except ConfigError as exc:
            print(f"vidiff: bad config\n{exc}", file=sys.stderr)
            sys.exit(EXIT_BAD_CONFIG)
        if args.image and not Path(args.image).is_file():
            print(f"vidiff sample: --image {args.image} does not exist", file=sys.stderr)
            sys.exit(EXIT_BAD_CONFIG)
    else:
        cfg = _load(args)
    import torch

    from vidiff import sampling
    from vidiff.device import rank_device

    torch.set_grad_enabled(False)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    out = Path(args.out) if args.out else None
    if args.cascade:
        sampling.sample_cascade(cascade, args.prompt or cascade.prompts, out or Path(cascade.out),
                                Path(args.image) if args.image else None, args.check, rank_device(), rank, world)
    else:
        sampling.sample_run(cfg, Path(args.run or cfg.out_dir), args.prompt or cfg.sample.prompts, out, args.check,
                            rank_device(), rank, world)


def cmd_eval(args: argparse.Namespace) -> None:
    """The moving-shapes quality figures of a DiT run trained on synthetic clips, as one JSON line."""
    import json

    from vidiff.device import rank_device
    from vidiff.eval.quality import evaluate

    result = evaluate(args.run, args.steps, args.guidance, args.per_combo, args.seed, rank_device(), args.out)
    print(json.dumps({"run": str(args.run), **result}))


def cmd_cache_latents(args: argparse.Namespace) -> None:
    """Encode the config's shards with its VAE into latent shards; under a launcher, ranks split the shards."""
    cfg = _load(args)
    if cfg.task != "dit" or not cfg.vae.checkpoint:
        print(f"vidiff cache-latents: {args.config} must be a DiT config with vae.checkpoint", file=sys.stderr)
        sys.exit(EXIT_BAD_CONFIG)
    import torch
    import torch.distributed as dist

    from vidiff.data.latents import cache_latents
    from vidiff.device import rank_device
    from vidiff.data.shards import write_index
    from vidiff.models.text import TextEncoder
    from vidiff.train.checkpoint import load_vae

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = rank_device()
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    text = TextEncoder(cfg.text).to(device) if args.text else None
    written = cache_latents(cfg, args.out, load_vae(cfg.vae.checkpoint).to(device), text, rank, world, args.windows)
    if world > 1:
        dist.barrier()
    if rank == 0:
        print(f"wrote {len(written)} latent shards on rank 0; index {write_index(args.out)}")
        print(f"train on them with: data.shards={args.out}")


def cmd_shards(args: argparse.Namespace) -> None:
    from vidiff.data.shards import (folder_samples, manifest_samples, synthetic_samples, webdataset_samples,
                                    write_shards)

    sources = [bool(args.synthetic), bool(args.input), bool(args.manifest), bool(args.webdataset)]
    if sum(sources) != 1:
        print("vidiff shards: give exactly one of --input FOLDER, --manifest CSV|JSONL, --webdataset TAR..., "
              "--synthetic N", file=sys.stderr)
        sys.exit(EXIT_BAD_CONFIG)
    workers = args.workers or max(1, os.cpu_count() or 1)
    if args.synthetic:
        samples = synthetic_samples(args.synthetic, args.height, args.width, args.frames, args.fps, args.seed,
                                    args.split, args.second_object, args.texture)
    elif args.input:
        samples = folder_samples(args.input, workers)
    elif args.manifest:
        samples = manifest_samples(args.manifest, workers)
    else:
        samples = webdataset_samples(args.webdataset)
    index = write_shards(samples, args.out, args.prefix, max_count=args.max_count,
                         max_bytes=int(args.max_mb * 2**20), total=args.synthetic or None)
    print(f"wrote shards and {index}")


def cmd_presets(args: argparse.Namespace) -> None:
    from vidiff.config import PRESETS
    from vidiff.models.dit import describe_presets

    counts = describe_presets(args.latent_channels, args.text_dim)
    print(f"DiT size presets (model.preset), {args.latent_channels} latent channels, text width {args.text_dim}:")
    print(f"{'preset':<8}{'hidden':>8}{'depth':>7}{'heads':>7}{'parameters':>14}")
    for name, (hidden, depth, heads) in PRESETS.items():
        print(f"{name:<8}{hidden:>8}{depth:>7}{heads:>7}{counts[name] / 1e6:>13.1f}M")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vidiff", description=__doc__)
    # The deepspeed launcher passes --local_rank=N (LOCAL_RANK is in the environment as well).
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("config", help="run config YAML")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.depth=4 train.steps=50")
        return p

    def with_resume(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        group = p.add_mutually_exclusive_group()
        group.add_argument("--resume", metavar="latest|PATH",
                           help="resume from the latest checkpoint (an error if there is none) or from a checkpoint's "
                                "tag folder (default: the latest if there is one, else start fresh)")
        group.add_argument("--no-resume", action="store_true",
                           help="start fresh; the run's existing checkpoints are moved to checkpoints.set-aside-<time>")
        return p

    p = with_resume(with_config(sub.add_parser("train", help="train the run's network (under a launcher)")))
    p.set_defaults(func=cmd_train)

    p = with_resume(with_config(sub.add_parser(
        "check", help="validate a run config, its layout on --world-size ranks and the checkpoint it would resume")))
    p.add_argument("--world-size", type=positive_int, default=1, help="ranks the run will start (default 1)")
    p.set_defaults(func=cmd_check)

    p = with_config(sub.add_parser(
        "doctor", help="preflight on every rank: collective, versions, run folder, shards, disk (under a launcher)"))
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("sample", help="sample videos from a DiT run's latest checkpoint, or from a cascade of stage "
                                      "runs (--cascade)")
    p.add_argument("config", nargs="?", help="run config YAML (not with --cascade)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the run config or of the --cascade file")
    p.add_argument("--cascade", metavar="FILE",
                   help="cascade sampling config (configs/cascade/sample.yaml): base -> tsr -> ssr stage runs with "
                        "their steps, guidance and augmentation level")
    p.add_argument("--image", metavar="PATH", help="--cascade: the first frame (image-to-video; the base stage must "
                                                   "be trained with cascade.image_prob > 0)")
    p.add_argument("--run", help="the DiT run folder (default: the config's out_dir)")
    p.add_argument("--prompt", action="append", help="prompt (repeatable); default: sample.prompts")
    p.add_argument("--out", help="output folder (default: RUN/samples/<tag>, or the --cascade file's out)")
    p.add_argument("--check", action="store_true",
                   help="score each sample with the moving-shapes checker (vidiff/eval/shapes.py); prompts must "
                        "name a colour, shape and direction")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="sample a synthetic-shapes DiT run on held-out prompts and score it (JSON)")
    p.add_argument("run", help="the DiT run folder")
    p.add_argument("--prompts", choices=("held-out",), default="held-out",
                   help="held-out: every (colour, shape, direction), seen and unseen in training")
    p.add_argument("--per-combo", type=positive_int, default=2, help="prompts per combination (default 2)")
    p.add_argument("--seed", type=int, default=0, help="the held-out clips' seed")
    p.add_argument("--steps", type=positive_int, help="Heun steps (default: the run's sample.steps)")
    p.add_argument("--guidance", type=float, help="guidance weight (default: the run's sample.guidance)")
    p.add_argument("--out", type=Path, help="write grid.png (real | generated) and checks.jsonl here")
    p.set_defaults(func=cmd_eval)

    p = with_config(sub.add_parser("cache-latents", help="encode a DiT config's shards into latent shards"))
    p.add_argument("--out", required=True, help="folder for latents-<shard>.tar and index.json")
    p.add_argument("--text", action="store_true", help="also store the text encoder's token embeddings")
    p.add_argument("--windows", type=positive_int, default=4,
                   help="windows per clip: frame 0 and seeded start frames (default 4; the loader picks one per "
                        "epoch with data.random_start)")
    p.set_defaults(func=cmd_cache_latents)

    p = sub.add_parser("shards", help="write webdataset shards (clip bytes unchanged, .txt, .json) and index.json")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--input", help="folder of videos/images with .txt caption sidecars of the same stem")
    p.add_argument("--manifest", help="CSV (header: path,caption) or JSONL ({'path', 'caption'}) manifest")
    p.add_argument("--webdataset", nargs="+", help="existing (e.g. video2dataset) tar shards to re-shard")
    p.add_argument("--synthetic", type=int, default=0, help="number of synthetic moving-shape clips")
    p.add_argument("--workers", type=int, default=0, help="probing processes (default: all cores)")
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", choices=("train", "heldout"), default="train",
                   help="synthetic: train draws only the seen (colour, shape, direction) combinations")
    p.add_argument("--second-object", type=float, default=0.0, help="synthetic: share of clips with two objects")
    p.add_argument("--texture", type=float, default=0.0, help="synthetic: share of clips on a textured background")
    p.add_argument("--prefix", default="shard")
    p.add_argument("--max-count", type=int, default=100_000, help="samples per shard at most")
    p.add_argument("--max-mb", type=float, default=1024, help="shard size limit in MiB")
    p.set_defaults(func=cmd_shards)

    p = sub.add_parser("presets", help="print the DiT size presets and their parameter counts")
    p.add_argument("--latent-channels", type=positive_int, default=16, help="the VAE's latent channels")
    p.add_argument("--text-dim", type=positive_int, default=384, help="the text encoder's width (MiniLM-L6: 384)")
    p.set_defaults(func=cmd_presets)
    return parser


OVERRIDE = re.compile(r"[A-Za-z_][\w.]*=")      # a dotted override: key.path=value


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The command line, with dotted overrides allowed anywhere after the config (`CONFIG --no-resume k=v` as
    well as `CONFIG k=v --no-resume`): argparse ends a positional list at the first flag, so the overrides it
    leaves over join the rest; anything else left over is an error naming it."""
    args, rest = parser.parse_known_args(argv)
    if hasattr(args, "overrides"):
        args.overrides += [token for token in rest if OVERRIDE.match(token)]
        rest = [token for token in rest if not OVERRIDE.match(token)]
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(build_parser(), argv)
    try:
        args.func(args)
    except InputError as exc:                       # bad shards, checkpoint or model files: one message
        print(f"vidiff {args.command}: {exc}", file=sys.stderr)
        _exit(EXIT_BAD_CONFIG)
    _exit(0, together=True)


def _exit(status: int, together: bool = False) -> None:
    """End the command with status. With a process group up, skip interpreter teardown: a gloo group torn down
    at interpreter exit can abort in C++ ("terminate called without an active exception": exit 250, or signal 6
    through the launcher), which would hide the status. CI saw it after an input error and after a healthy
    `vidiff doctor`. together: every rank waits for the others first (a rank leaving while a peer is still in a
    collective would fail that peer). Without a process group a success just returns."""
    torch_dist = sys.modules.get("torch.distributed")
    if torch_dist is not None and torch_dist.is_available() and torch_dist.is_initialized():
        if together:
            torch_dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
