"""Sampling to files: one DiT run (`vidiff sample CONFIG`) or a cascade (`vidiff sample --cascade FILE`).

Under a launcher the prompts are spread over the ranks (prompt i on rank i mod world, with its own seed, so the
clips do not depend on the number of ranks); each rank writes its own prompts' files, named by the prompt's
index. A cascade keeps each stage's output: for prompt i, i_<prompt>/<stage>.mp4 and .gif for every stage, the
final clip's frames as PNG, and <out>/<i>_<prompt>_stages.gif with the stages side by side at the final size.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vidiff.config import CascadeSampleConfig, InputError, RunConfig
from vidiff.data.pipeline import to_model_input, to_uint8
from vidiff.data.video import ClipError, contact_sheet, decode_image, encode_gif, encode_mp4
from vidiff.diffusion.cascade import Stage, evaluations_per_clip, generate, run_cascade
from vidiff.models.vae import latent_shape
from vidiff.train.checkpoint import latest_tag
from vidiff.train.objectives import load_denoiser

BATCH = 8                                           # prompts sampled together


def rank_prompts(prompts: list[str], rank: int, world: int) -> list[int]:
    """The indices of the prompts this rank samples: i with i mod world == rank."""
    return [i for i in range(len(prompts)) if i % world == rank]


def clip_name(index: int, prompt: str) -> str:
    return f"{index:03d}_{'_'.join(prompt.split())[:60]}"


def check_lines(clips: list[np.ndarray], prompts: list[str], check: bool) -> tuple[list[str], int]:
    """The moving-shapes checker's verdict per clip (vidiff/eval/shapes.py) as a line suffix, and the passes."""
    if not check:
        return [""] * len(clips), 0
    from vidiff.eval.shapes import check_clip

    results = [check_clip(clip, prompt) for prompt, clip in zip(prompts, clips)]
    lines = ["  check: pass" if r.passed else "  check: FAIL (" + "; ".join(r.reasons[:2]) + ")" for r in results]
    return lines, sum(r.passed for r in results)


def print_pass_rate(passed: int, total: int) -> None:
    print(f"checker pass rate: {passed}/{total} ({100 * passed / max(total, 1):.0f}%)")


def sheet_name(world: int, rank: int) -> str:
    return "contact_sheet.png" if world == 1 else f"contact_sheet.rank{rank}.png"


def sample_run(cfg: RunConfig, run_dir: Path, prompts: list[str], out: Path | None, check: bool,
               device: torch.device, rank: int = 0, world: int = 1) -> Path:
    """One DiT run's latest export (EMA weights where kept) -> one mp4 per prompt and a contact sheet, sampled
    with cfg.sample at the run's first video bucket; returns the output folder."""
    run_cfg, model, text, vae = load_denoiser(run_dir, device)
    shape = latent_shape(*run_cfg.data.video_shape, vae.cfg.latent_channels)
    mine = rank_prompts(prompts, rank, world)
    seeds = [cfg.sample.seed + i for i in mine]
    videos = generate(model, text, vae.decode, [prompts[i] for i in mine], shape, cfg.sample, run_cfg.edm, seeds,
                      image_channels=run_cfg.takes_image)
    out = out or run_dir / "samples" / latest_tag(run_dir).name
    out.mkdir(parents=True, exist_ok=True)
    clips = [to_uint8(v) for v in videos]
    lines, passed = check_lines(clips, [prompts[i] for i in mine], check)
    for i, clip, line in zip(mine, clips, lines):
        path = out / f"{clip_name(i, prompts[i])}.mp4"
        encode_mp4(clip, cfg.sample.fps, path)
        print(f"wrote {path}  ({len(clip)} frames, {clip.shape[2]}x{clip.shape[1]}){line}")
    if check:
        print_pass_rate(passed, len(clips))
    if clips:
        contact_sheet(clips, out / sheet_name(world, rank))
        print(f"wrote {out / sheet_name(world, rank)}")
    return out


# ---- the cascade ----

def load_stage(name: str, cfg: CascadeSampleConfig, device: torch.device):
    """A stage's run, checked to be that stage and its augmentation level to be one it trained at
    -> (Stage, text encoder, VAE)."""
    settings = getattr(cfg, name)
    try:
        run_cfg, model, text, vae = load_denoiser(settings.run, device)
    except InputError as exc:                              # no finished checkpoint there, or not a DiT run
        raise InputError(f"{name}.run: {exc}") from None
    if run_cfg.stage != name:
        raise InputError(f"{name}.run {settings.run} trained stage {run_cfg.stage!r}, not {name!r} (its config's "
                         "`stage`)")
    if name == "base" and settings.start_sigma is not None:
        raise InputError(f"base.start_sigma {settings.start_sigma:g}: valid only for tsr and ssr (the base stage has "
                         "no condition to start from): leave it unset")
    edm = run_cfg.edm
    if settings.start_sigma is not None and not edm.sigma_min < settings.start_sigma <= edm.sigma_max:
        raise InputError(f"{name}.start_sigma {settings.start_sigma:g}: valid ({edm.sigma_min:g}, {edm.sigma_max:g}] "
                         "(the run's edm.sigma_min, sigma_max)")
    limit = 0.0 if name == "base" else run_cfg.cascade.aug_max
    if not 0 <= settings.aug_sigma <= limit:
        valid = "0 (the base stage has no augmented condition)" if name == "base" else \
            f"[0, {limit:g}] (the run's cascade.aug_max)"
        raise InputError(f"{name}.aug_sigma {settings.aug_sigma:g}: valid {valid}")
    return Stage(name, model, run_cfg, settings), text, vae


def load_stages(cfg: CascadeSampleConfig, device: torch.device) -> tuple[list[Stage], object, object]:
    """Every stage of the cascade, checked (load_stage, check_chain) -> (stages, text encoder, VAE)."""
    loaded = [load_stage(name, cfg, device) for name, _ in cfg.stages()]
    stages = [stage for stage, _, _ in loaded]
    check_chain(stages)
    return stages, loaded[0][1], loaded[0][2]


def stage_size(stage: Stage) -> tuple[int, int, int]:
    return stage.run.data.video_shape


def check_chain(stages: list[Stage]) -> None:
    """Every stage decodes with one VAE and text encoder, and each stage's output size is what the next stage's
    condition is made from: tsr multiplies the frame intervals by its frame_factor, ssr the height and width by
    its spatial_factor."""
    base = stages[0]
    for stage in stages[1:]:
        for key in ("vae.checkpoint", "text"):
            ours, theirs = (_setting(s.run, key) for s in (stage, base))
            if ours != theirs:
                raise InputError(f"{stage.name}.run {stage.sample.run} has {key} {ours}, the base stage's run "
                                 f"{base.sample.run} {theirs}: the stages must share one VAE and text encoder")
    for previous, stage in zip(stages, stages[1:]):
        (frames, height, width), cascade = stage_size(previous), stage.run.cascade
        if stage.name == "tsr":
            expected = (1 + (frames - 1) * cascade.frame_factor, height, width)
        else:
            expected = (frames, height * cascade.spatial_factor, width * cascade.spatial_factor)
        if stage_size(stage) != expected:
            raise InputError(f"{stage.name}.run {stage.sample.run} makes {stage_size(stage)} (frames, height, "
                             f"width) clips, but after the {previous.name} stage's {stage_size(previous)} it must "
                             f"make {expected}; train it at that bucket or change the chain")


def _setting(run: RunConfig, key: str) -> str:
    if key == "vae.checkpoint":
        return str(Path(run.vae.checkpoint).resolve())
    return repr(run.text.model_dump())


def stage_fps(stages: list[Stage], fps: int) -> dict[str, int]:
    """Each stage's frame rate: the last stage's is `fps`; before a tsr stage it is divided by its frame_factor."""
    rates, rate = {}, fps
    for stage in reversed(stages):
        rates[stage.name] = max(1, rate)
        if stage.name == "tsr":
            rate = round(rate / stage.run.cascade.frame_factor)
    return rates


def load_image_latent(path: Path, stage: Stage, vae, device: torch.device) -> torch.Tensor:
    """The first frame for image-to-video: the image at the base stage's size, encoded -> (z, h, w)."""
    if not stage.run.takes_image:
        raise InputError(f"--image {path}: the base stage's run {stage.sample.run} was trained without an image "
                         "condition (cascade.image_prob 0); train one with cascade.image_prob > 0")
    _, height, width = stage_size(stage)
    try:
        frame = decode_image(Path(path).read_bytes(), height, width)          # (1, H, W, 3) uint8
    except (OSError, ClipError) as exc:
        raise InputError(f"--image {path}: not a readable image ({exc})") from None
    video = to_model_input(torch.from_numpy(frame.copy())[None], device)     # (1, 3, 1, H, W)
    return vae.encode(video)[0, :, 0]


def side_by_side(clips: list[np.ndarray], height: int, width: int, frames: int) -> np.ndarray:
    """Stage clips (T_k, H_k, W_k, 3) shown at one size and frame count: nearest in space and in time."""
    shown = []
    for clip in clips:
        T, H, W, _ = clip.shape
        times = np.round(np.linspace(0, T - 1, frames)).astype(int)
        rows = np.arange(height) * H // height
        cols = np.arange(width) * W // width
        shown.append(clip[times][:, rows][:, :, cols])
    return np.concatenate(shown, axis=2)


def sample_cascade(cfg: CascadeSampleConfig, prompts: list[str], out: Path, image: Path | None, check: bool,
                   device: torch.device, rank: int = 0, world: int = 1) -> dict:
    """base -> tsr -> ssr (or ssr -> tsr) -> VAE decode for this rank's prompts; writes the files above and
    out/cascade.json (a record per stage: frames, size, network evaluations and seconds per clip; world > 1:
    cascade.rank<r>.json)."""
    stages, text, vae = load_stages(cfg, device)
    image_latent = load_image_latent(image, stages[0], vae, device) if image is not None else None
    mine = rank_prompts(prompts, rank, world)
    seconds: dict[str, float] = {}
    outputs: list[list[torch.Tensor]] = [[] for _ in stages]
    for start in range(0, len(mine), BATCH):
        chunk = mine[start:start + BATCH]
        latents = run_cascade(stages, text, vae, [prompts[i] for i in chunk], [cfg.seed + i for i in chunk],
                              image_latent, cfg.S_churn, seconds)
        for k, latent in enumerate(latents):
            outputs[k] += list(vae.decode(latent).clamp(-1, 1).float())
    clips = [[to_uint8(v) for v in stage_videos] for stage_videos in outputs]      # [stage][prompt]
    out.mkdir(parents=True, exist_ok=True)
    rates = stage_fps(stages, cfg.fps)
    lines, passed = check_lines(clips[-1], [prompts[i] for i in mine], check)
    for j, i in enumerate(mine):
        folder = out / clip_name(i, prompts[i])
        (folder / "frames").mkdir(parents=True, exist_ok=True)
        for stage, stage_clips in zip(stages, clips):
            encode_mp4(stage_clips[j], rates[stage.name], folder / f"{stage.name}.mp4")
            (folder / f"{stage.name}.gif").write_bytes(encode_gif(stage_clips[j], rates[stage.name]))
        final = clips[-1][j]
        for t, frame in enumerate(final):
            Image.fromarray(frame).save(folder / "frames" / f"{t:03d}.png")
        encode_mp4(final, cfg.fps, out / f"{clip_name(i, prompts[i])}.mp4")
        strip = side_by_side([c[j] for c in clips], *final.shape[1:3], len(final))
        (out / f"{clip_name(i, prompts[i])}_stages.gif").write_bytes(encode_gif(strip, cfg.fps))
        print(f"wrote {out / clip_name(i, prompts[i])}.mp4  ({len(final)} frames, {final.shape[2]}x{final.shape[1]};"
              f" stages in {folder}){lines[j]}")
    if check:
        print_pass_rate(passed, len(mine))
    record = {"prompts": len(mine), "stages": [
        {"stage": s.name, "run": s.sample.run, "frames": stage_size(s)[0], "height": stage_size(s)[1],
         "width": stage_size(s)[2], "fps": rates[s.name], "steps": s.sample.steps, "guidance": s.sample.guidance,
         "aug_sigma": s.sample.aug_sigma,
         "evaluations_per_clip": evaluations_per_clip(s.sample.steps, s.sample.guidance),
         "seconds_per_clip": round(seconds.get(s.name, 0.0) / max(len(mine), 1), 3)} for s in stages]}
    if check:
        record["checker_pass_rate"] = passed / max(len(mine), 1)
    name = "cascade.json" if world == 1 else f"cascade.rank{rank}.json"
    (out / name).write_text(json.dumps(record, indent=1))
    for row in record["stages"]:
        print(f"  {row['stage']:<5} {row['frames']} x {row['height']} x {row['width']} at {row['fps']} fps, "
              f"{row['evaluations_per_clip']} network evaluations and {row['seconds_per_clip']} s per clip")
    return record

