"""The cascade on the moving-shapes ground truth (tools/bench_cascade.py).

- tsr: each held-out clip's low-frame-rate version (every frame_factor-th frame, the truth itself) through the tsr
  stage, against frame repetition and linear interpolation of the same frames in pixels;
- ssr: each held-out clip downsampled through the ssr stage, against bicubic upsampling in pixels;
  beside each stage: both kinds of its condition decoded (what the cascade gives without the stage's denoising:
  condition_latent, the low latent upsampled in latent space; condition_pixels, the classical upsampling
  re-encoded) and the VAE round trip of the true clip (no latent stage can beat it);
- cascade: its stages in their order (base -> tsr -> ssr, or base -> ssr -> tsr) on held-out prompts, the
  checker's pass rate at the final size beside that of a single-stage model sampled at the same size, with each
  stage's network evaluations and seconds per clip.
Scores: PSNR against the true clip (mean over clips of each clip's PSNR over all its frames), the checker's pass
rate and its motion sub-score (vidiff/eval/shapes.py: heads the prompted way, which repeated frames also do), and
the track error: the mean distance in pixels of the checker's objects from where the true clip has them
(shapes.track_error; lower is better).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from vidiff.config import CascadeSampleConfig
from vidiff.data.pipeline import to_model_input, to_uint8
from vidiff.diffusion.cascade import Stage, evaluations_per_clip, generate, run_cascade, stage_latents
from vidiff.diffusion.conditions import (condition_from_clip, downsample, drop_frames,
                                         upsample_frames, upsample_video_time)
from vidiff.eval.quality import real_clips, summarize, vae_roundtrip
from vidiff.eval.shapes import check_clip, track_error
from vidiff.models.vae import VideoVAE, latent_shape
from vidiff.sampling import load_stages, side_by_side
from vidiff.train.objectives import load_denoiser

BATCH = 16


def repeat_frames(low: np.ndarray, factor: int) -> np.ndarray:
    """(T, H, W, 3) -> (1 + (T - 1) factor, H, W, 3): each missing frame is the last kept one."""
    return np.repeat(low, factor, axis=0)[: 1 + (len(low) - 1) * factor]


def clip_psnr(ours: list[np.ndarray], truth: list[np.ndarray]) -> float:
    """Mean over clips of each clip's PSNR (dB, peak 255) over all its frames."""
    scores = []
    for a, b in zip(ours, truth):
        mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
        scores.append(10 * np.log10(255.0**2 / max(mse, 1e-10)))
    return float(np.mean(scores))


def scores(clips: list[np.ndarray], truth: list[np.ndarray], prompts: list[str]) -> dict:
    checked = summarize([check_clip(c, p) for c, p in zip(clips, prompts)])
    errors = [track_error(c, t, p) for c, t, p in zip(clips, truth, prompts)]
    return {"psnr": round(clip_psnr(clips, truth), 2), "pass_rate": checked["pass_rate"],
            "motion": checked["motion"], "track_error": round(float(np.nanmean(errors)), 3)}


def _batches(n: int):
    return [slice(i, i + BATCH) for i in range(0, n, BATCH)]


def _decode(vae: VideoVAE, latent: torch.Tensor) -> list[np.ndarray]:
    return [to_uint8(v) for v in vae.decode(latent).clamp(-1, 1).float()]


def _classical(truth: list[np.ndarray], lower, upsample, device) -> list[np.ndarray]:
    """A classical baseline: each true clip lowered (frames dropped or downsampled) and upsampled back."""
    out = []
    for part in _batches(len(truth)):
        video = to_model_input(torch.from_numpy(np.stack(truth[part])), device)
        out += [to_uint8(v) for v in upsample(lower(video))]
    return out


def _conditions(stage: Stage, vae: VideoVAE, truth: list[np.ndarray], device, kind: str | None = None):
    """(batch slice, clean condition) per batch of true clips, made as in training; kind (latent | pixels) in
    place of the run's own condition kind."""
    cascade = stage.run.cascade
    if kind is not None:
        cascade = cascade.model_copy(update={f"{stage.name}_condition": kind})
    for part in _batches(len(truth)):
        video = to_model_input(torch.from_numpy(np.stack(truth[part])), device)
        yield part, condition_from_clip(stage.name, cascade, vae, video)


@torch.no_grad()
def super_resolution(stage: Stage, text, vae: VideoVAE, truth: list[np.ndarray], prompts: list[str],
                     seeds: list[int], device) -> list[np.ndarray]:
    """The stage fed each true clip's low-frame-rate / low-resolution version (made as in training) -> its output
    clips (uint8)."""
    out = []
    for part, clean in _conditions(stage, vae, truth, device):
        out += _decode(vae, stage_latents(stage, 1, text, prompts[part], seeds[part], clean))
    return out


@torch.no_grad()
def decoded_condition(stage: Stage, vae: VideoVAE, truth: list[np.ndarray], device, kind: str) -> list[np.ndarray]:
    """The cascade without the stage: its condition of that kind, decoded (latent: the low clip's latent upsampled
    in latent space; pixels: the classical upsampling re-encoded)."""
    return [clip for _, clean in _conditions(stage, vae, truth, device, kind) for clip in _decode(vae, clean)]


def _figures(stage: Stage, text, vae: VideoVAE, per_combo: int, seed: int, device, baselines) -> dict:
    """The stage, the given classical baselines, both kinds of its condition decoded, the VAE round trip of the
    true clip (no latent stage can beat it) and the truth, each scored against the true clip."""
    frames, height, width = stage.run.data.video_shape
    real = real_clips(frames, height, width, per_combo, seed)
    truth, prompts = [v for _, v in real], [c.caption for c, _ in real]
    methods = {stage.name: super_resolution(stage, text, vae, truth, prompts, list(range(len(truth))), device),
               **{name: make(truth) for name, make in baselines.items()},
               **{f"condition_{kind}": decoded_condition(stage, vae, truth, device, kind)
                  for kind in ("latent", "pixels")},
               "vae_round_trip": vae_roundtrip(vae, truth), "truth": truth}
    return {"size": [frames, height, width], "clips": len(truth), "condition": stage.run.cascade.condition(stage.name),
            **{name: scores(clips, truth, prompts) for name, clips in methods.items()}}


def tsr_figures(stage: Stage, text, vae: VideoVAE, per_combo: int, seed: int, device) -> dict:
    """tsr against frame repetition and linear interpolation of the kept frames."""
    factor = stage.run.cascade.frame_factor
    return _figures(stage, text, vae, per_combo, seed, device, {
        "repeat": lambda truth: [repeat_frames(v[::factor], factor) for v in truth],
        "linear": lambda truth: _classical(truth, lambda v: drop_frames(v, factor),
                                           lambda v: upsample_video_time(v, factor), device)})


def ssr_figures(stage: Stage, text, vae: VideoVAE, per_combo: int, seed: int, device) -> dict:
    """ssr against bicubic upsampling of the downsampled clip."""
    factor = stage.run.cascade.spatial_factor
    return _figures(stage, text, vae, per_combo, seed, device, {
        "bicubic": lambda truth: _classical(truth, lambda v: downsample(v, factor),
                                            lambda v: upsample_frames(v, factor), device)})


def cascade_pass_rate(spec: CascadeSampleConfig, stages: list[Stage], text, vae: VideoVAE, single_run: str | Path,
                      per_combo: int, seed: int, device, out: Path | None = None) -> dict:
    """The full cascade (its loaded stages) and the single-stage model on the held-out prompts (seen and unseen
    combinations), each prompt from seed + its index; per stage: network evaluations and seconds per clip."""
    frames, height, width = stages[-1].run.data.video_shape
    real = real_clips(frames, height, width, per_combo, seed)
    clips, prompts = [c for c, _ in real], [c.caption for c, _ in real]
    seeds = [spec.seed + i for i in range(len(prompts))]
    seconds: dict[str, float] = {}
    finals, first = [], None
    for part in _batches(len(prompts)):
        latents = run_cascade(stages, text, vae, prompts[part], seeds[part], None, spec.S_churn, seconds)
        decoded = [_decode(vae, x) for x in latents]
        finals += decoded[-1]
        if first is None:
            first = [d[0] for d in decoded]                             # the first prompt through every stage
    start = time.perf_counter()
    run_cfg, model, single_text, single_vae = load_denoiser(single_run, device)
    if run_cfg.data.video_shape != (frames, height, width):
        raise ValueError(f"the single-stage run {single_run} samples {run_cfg.data.video_shape}, the cascade "
                         f"{(frames, height, width)}: compare them at one size")
    shape = latent_shape(frames, height, width, single_vae.cfg.latent_channels)
    single = [to_uint8(v) for v in generate(model, single_text, single_vae.decode, prompts, shape, run_cfg.sample,
                                            run_cfg.edm, seeds, batch=BATCH, show_progress=False)]
    single_seconds = time.perf_counter() - start
    if out is not None:
        from vidiff.data.video import encode_gif
        out.mkdir(parents=True, exist_ok=True)
        strip = side_by_side(first, height, width, frames)
        (out / "stages.gif").write_bytes(encode_gif(strip, spec.fps))
        (out / "stages_prompt.txt").write_text(prompts[0] + "\n")

    def split(results):
        seen = [r for r, c in zip(results, clips) if not c.unseen]
        unseen = [r for r, c in zip(results, clips) if c.unseen]
        return {"seen": summarize(seen), "unseen": summarize(unseen)}

    n = len(prompts)
    return {
        "prompts": n,
        "cascade": split([check_clip(v, p) for v, p in zip(finals, prompts)]),
        "single_stage": split([check_clip(v, p) for v, p in zip(single, prompts)]),
        "stages": [{"stage": s.name, "size": list(s.run.data.video_shape), "steps": s.sample.steps,
                    "guidance": s.sample.guidance, "aug_sigma": s.sample.aug_sigma,
                    "evaluations_per_clip": evaluations_per_clip(s.sample.steps, s.sample.guidance),
                    "seconds_per_clip": round(seconds[s.name] / n, 3)} for s in stages],
        "single_stage_sampling": {"steps": run_cfg.sample.steps, "guidance": run_cfg.sample.guidance,
                                  "evaluations_per_clip": evaluations_per_clip(run_cfg.sample.steps,
                                                                               run_cfg.sample.guidance),
                                  "seconds_per_clip": round(single_seconds / n, 3)},
    }


def evaluate_cascade(spec: CascadeSampleConfig, single_run: str | Path, per_combo: int = 2, seed: int = 0,
                     device="cpu", out: Path | None = None) -> dict:
    """Every figure above as one dict."""
    stages, text, vae = load_stages(spec, device)
    by_name = {s.name: s for s in stages}
    result = {}
    if "tsr" in by_name:
        result["tsr"] = tsr_figures(by_name["tsr"], text, vae, per_combo, seed, device)
    if "ssr" in by_name:
        result["ssr"] = ssr_figures(by_name["ssr"], text, vae, per_combo, seed, device)
    result["cascade"] = cascade_pass_rate(spec, stages, text, vae, single_run, per_combo, seed, device, out)
    return result
