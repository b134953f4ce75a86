"""Quality of a trained DiT run on the moving-shapes ground truth (`vidiff eval RUN --prompts held-out`).

One clip is sampled per held-out prompt with the run's EMA weights and checked by `eval.shapes`: pass rate and
sub-scores for seen and unseen (colour, shape, direction) combinations apart. Beside them:
  vae_ceiling          the checker's pass rate on the held-out real clips after the run's VAE encodes and decodes
                       them: no DiT on these latents can do better;
  real_pass_rate       the checker on the real clips themselves (its own ceiling);
  fd / fd_baseline     Fréchet distance (eval.frechet) of the generated clips of seen prompts to their real
                       clips, beside that of training-split clips of the same prompts to the same real clips;
  prompt_swap_accuracy the same noise as each seen prompt, sampled with another seen prompt of another colour and
                       direction: the share whose colour and motion follow the new prompt.
Real clips go through mp4 and back as training data does.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from vidiff.data.pipeline import to_model_input, to_uint8
from vidiff.data.synthetic import COLORS, DIRECTIONS, SEEN_COMBOS, TEMPLATES, ShapeClip, combo_clips, heldout_clips
from vidiff.data.video import decode_clip, encode_mp4
from vidiff.diffusion.cascade import generate
from vidiff.eval.frechet import ClipNetConfig, accuracy, clip_features, frechet_distance, load_clipnet
from vidiff.eval.shapes import SUB_SCORES, CheckResult, check_clip
from vidiff.models.vae import VideoVAE, latent_shape
from vidiff.train.objectives import load_denoiser

FPS = 8


def real_clips(frames: int, height: int, width: int, per_combo: int, seed: int,
               split: str = "heldout") -> list[tuple[ShapeClip, np.ndarray]]:
    """Held-out (or, for the baseline, training-split) clips of every combination, through mp4 and back."""
    pairs = heldout_clips(height, width, frames, per_combo, seed) if split == "heldout" else \
        combo_clips(height, width, frames, SEEN_COMBOS, per_combo, seed, split)
    return [(clip, decode_clip(encode_mp4(video, FPS), frames, height, width)) for clip, video in pairs]


def summarize(results: list[CheckResult]) -> dict:
    return {"pass_rate": float(np.mean([r.passed for r in results])) if results else None,
            **{k: float(np.mean([r.scores[k] for r in results])) if results else None for k in SUB_SCORES}}


def _follows(video: np.ndarray, prompt: str) -> bool:
    """Colour and motion follow the prompt (the checker's count and motion sub-scores hold)."""
    result = check_clip(video, prompt)
    return result.scores["count"] == 1 and result.scores["motion"] == 1


def swap_prompt(clip: ShapeClip) -> str:
    """Another seen prompt of the same shape with another colour and another direction."""
    obj = clip.objects[0]
    options = [c for c in SEEN_COMBOS if c[1] == obj.shape and c[0] != obj.color and c[2] != obj.direction]
    color, shape, direction = options[(list(COLORS).index(obj.color) + list(DIRECTIONS).index(obj.direction))
                                      % len(options)]
    return TEMPLATES[0].format(color=color, shape=shape, direction=direction)


@torch.no_grad()
def vae_roundtrip(vae: VideoVAE, videos: list[np.ndarray], batch: int = 16) -> list[np.ndarray]:
    device = next(vae.parameters()).device
    out = []
    for i in range(0, len(videos), batch):
        x = to_model_input(torch.from_numpy(np.stack(videos[i:i + batch])), device)
        out += [to_uint8(v) for v in vae.decode(vae.encode(x)).float()]
    return out


@torch.no_grad()
def evaluate(run_dir: str | Path, steps: int | None = None, guidance: float | None = None, per_combo: int = 2,
             seed: int = 0, device: torch.device | str = "cpu", out: Path | None = None,
             clipnet: ClipNetConfig | None = None) -> dict:
    """The figures above for one DiT run, sampled with the run's sample settings (steps and guidance replaced
    where given); clipnet: the FD's feature network (default: ClipNetConfig at the run's clip size)."""
    start = time.monotonic()
    run_cfg, model, text, vae = load_denoiser(run_dir, device)
    sample = run_cfg.sample.model_copy(
        update={k: v for k, v in (("steps", steps), ("guidance", guidance)) if v is not None})
    frames, height, width = run_cfg.data.video_shape
    real = real_clips(frames, height, width, per_combo, seed)
    clips = [c for c, _ in real]
    prompts = [c.caption for c in clips]
    seeds = [sample.seed + i for i in range(len(prompts))]
    shape = latent_shape(frames, height, width, vae.cfg.latent_channels)
    image = run_cfg.cascade.image_prob > 0                                   # an image-to-video base: text alone
    generated = [to_uint8(v) for v in generate(model, text, vae.decode, prompts, shape, sample, run_cfg.edm, seeds,
                                               batch=32, show_progress=False, image_channels=image)]
    seen = [i for i, c in enumerate(clips) if not c.unseen]
    swapped = [swap_prompt(clips[i]) for i in seen]
    swapped_videos = [to_uint8(v) for v in generate(model, text, vae.decode, swapped, shape, sample, run_cfg.edm,
                                                    [seeds[i] for i in seen], batch=32, show_progress=False,
                                                    image_channels=image)]
    checks = [check_clip(v, p) for v, p in zip(generated, prompts)]
    ceiling = [check_clip(v, p) for v, p in zip(vae_roundtrip(vae, [v for _, v in real]), prompts)]
    truth = [check_clip(v, p) for (_, v), p in zip(real, prompts)]

    net = load_clipnet(clipnet or ClipNetConfig(frames=frames, height=height, width=width))
    real_seen = clip_features(net, [real[i][1] for i in seen])
    baseline = [v for _, v in real_clips(frames, height, width, per_combo, seed, split="train")]
    fd = frechet_distance(clip_features(net, [generated[i] for i in seen]), real_seen)
    fd_baseline = frechet_distance(clip_features(net, baseline), real_seen)
    result = {
        "seen": summarize([checks[i] for i in seen]),
        "unseen": summarize([r for r, c in zip(checks, clips) if c.unseen]),
        "prompt_swap_accuracy": float(np.mean([_follows(v, p) for v, p in zip(swapped_videos, swapped)])),
        "fd": fd, "fd_baseline": fd_baseline, "fd_ratio": fd / fd_baseline,
        "vae_ceiling": summarize(ceiling)["pass_rate"], "real_pass_rate": summarize(truth)["pass_rate"],
        "clipnet_accuracy": accuracy(net, clips, [v for _, v in real]),
        "prompts": {"seen": len(seen), "unseen": len(clips) - len(seen)},
        "sampler": {**sample.model_dump(exclude={"prompts", "fps"}), "sampler": "heun",
                    "size": [frames, height, width]},
        "eval_seconds": round(time.monotonic() - start, 1),
    }
    if out is not None:
        _write_examples(Path(out), clips, [v for _, v in real], generated, checks)
    return result


def _write_examples(out: Path, clips: list[ShapeClip], real: list[np.ndarray], generated: list[np.ndarray],
                    checks: list[CheckResult]) -> None:
    """out/grid.png: one row per prompt (the first of each colour x shape), real clip | generated clip; and
    out/checks.jsonl: every prompt's verdict and reasons."""
    import json

    from vidiff.data.video import contact_sheet

    out.mkdir(parents=True, exist_ok=True)
    picked, shown = [], set()
    for i, c in enumerate(clips):
        key = c.objects[0].combo[:2]
        if key not in shown:
            shown.add(key)
            picked.append(i)
    contact_sheet([np.concatenate([real[i], generated[i]], axis=2) for i in picked], out / "grid.png")
    with open(out / "checks.jsonl", "w") as f:
        for c, r in zip(clips, checks):
            f.write(json.dumps({"prompt": c.caption, "unseen": c.unseen, "passed": r.passed, "scores": r.scores,
                                "reasons": r.reasons, "truth": asdict(c)}) + "\n")
