"""Fréchet distance between sets of moving-shapes clips, in the features of a small 3D CNN trained here.

No FVD backbone (I3D, VideoMAE) can be downloaded on these machines, so the feature network is trained in-repo
to classify the colour, shape and motion of synthetic training clips: deterministic from its config, a minute
or two on CPU, cached under $VIDIFF_CACHE (default ~/.cache/vidiff) by the hash of its config. The distance is
that of FID/FVD (Heusel et al. 2017): ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), with scipy's
matrix square root.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from vidiff.data.pipeline import to_model_input
from vidiff.data.synthetic import COLORS, DIRECTIONS, SHAPES, make_clips

HEADS = {"color": list(COLORS), "shape": list(SHAPES), "motion": list(DIRECTIONS)}


@dataclass(frozen=True)
class ClipNetConfig:
    frames: int = 9
    height: int = 48
    width: int = 48
    channels: tuple[int, ...] = (16, 32, 64, 64)
    clips: int = 2048                # synthetic training clips (train split)
    epochs: int = 4
    batch: int = 32
    lr: float = 2e-3
    seed: int = 0
    version: int = 1                 # bump when this file changes what a config trains

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


class ClipNet(nn.Module):
    """(B, 3, T, H, W) in [-1, 1] -> features (B, channels[-1]): the frames and their differences through 3D
    convolutions (stride 2 in space twice, then in time and space), averaged over positions; linear heads for
    colour, shape and motion."""

    def __init__(self, cfg: ClipNetConfig):
        super().__init__()
        self.cfg = cfg
        strides = [(1, 2, 2), (1, 2, 2), (2, 2, 2)] + [(1, 1, 1)] * (len(cfg.channels) - 3)
        layers, c_in = [], 6
        for c_out, stride in zip(cfg.channels, strides):
            layers += [nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1), nn.GELU()]
            c_in = c_out
        self.body = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({name: nn.Linear(c_in, len(classes)) for name, classes in HEADS.items()})

    def features(self, video: torch.Tensor) -> torch.Tensor:
        size = (self.cfg.frames, self.cfg.height, self.cfg.width)
        if tuple(video.shape[2:]) != size:
            video = F.interpolate(video, size=size, mode="trilinear", align_corners=False)
        motion = torch.diff(video, dim=2, prepend=video[:, :, :1])              # frame differences: (B, 3, T, H, W)
        return self.body(torch.cat([video, motion], 1)).mean(dim=(2, 3, 4))     # (B, C)

    def forward(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(video)
        return {name: head(h) for name, head in self.heads.items()}


def to_input(videos: np.ndarray | list[np.ndarray]) -> torch.Tensor:
    """uint8 clips (N, T, H, W, 3) -> float (N, 3, T, H, W) in [-1, 1]."""
    return to_model_input(torch.from_numpy(np.ascontiguousarray(np.stack(videos))))


def _labels(clips) -> dict[str, torch.Tensor]:
    return {name: torch.tensor([classes.index(getattr(c.objects[0], "direction" if name == "motion" else name))
                                for c in clips]) for name, classes in HEADS.items()}


@contextlib.contextmanager
def _deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def train_clipnet(cfg: ClipNetConfig) -> ClipNet:
    """Train from scratch on cfg.clips synthetic training clips; the same config gives the same weights."""
    pairs = list(make_clips(cfg.clips, cfg.height, cfg.width, cfg.frames, seed=cfg.seed, split="train"))
    x, y = to_input([v for _, v in pairs]), _labels([c for c, _ in pairs])
    with _deterministic(), torch.enable_grad():             # also when called under no_grad (vidiff eval)
        torch.manual_seed(cfg.seed)
        net = ClipNet(cfg)
        optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.0)
        generator = torch.Generator().manual_seed(cfg.seed)
        steps = cfg.epochs * (len(x) // cfg.batch)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, total_steps=steps)
        for _ in range(cfg.epochs):
            order = torch.randperm(len(x), generator=generator)
            for i in range(len(x) // cfg.batch):
                idx = order[i * cfg.batch:(i + 1) * cfg.batch]
                logits = net(x[idx])
                loss = sum(F.cross_entropy(logits[name], y[name][idx]) for name in HEADS)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
    return net.eval()


def cache_dir() -> Path:
    return Path(os.environ.get("VIDIFF_CACHE", Path.home() / ".cache" / "vidiff")) / "frechet"


def load_clipnet(cfg: ClipNetConfig = ClipNetConfig()) -> ClipNet:
    """The network of this config: from the cache, or trained and cached (written atomically)."""
    path = cache_dir() / f"clipnet-{cfg.key}.safetensors"
    if path.exists():
        net = ClipNet(cfg)
        net.load_state_dict(load_file(path))
        return net.eval()
    net = train_clipnet(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp,
              metadata={"config": json.dumps(asdict(cfg))})
    os.replace(tmp, path)
    return net


@torch.no_grad()
def clip_features(net: ClipNet, videos: list[np.ndarray], batch: int = 64) -> np.ndarray:
    """uint8 clips (T, H, W, 3) -> features (N, C) in float64."""
    return np.concatenate([net.features(to_input(videos[i:i + batch])).double().numpy()
                           for i in range(0, len(videos), batch)])


@torch.no_grad()
def accuracy(net: ClipNet, clips, videos: list[np.ndarray]) -> dict[str, float]:
    """Each head's accuracy on labelled clips (ShapeClip, frames): how well the features know the content."""
    logits = net(to_input(videos))
    return {name: float((logits[name].argmax(1) == y).float().mean()) for name, y in _labels(clips).items()}


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance of Gaussians fitted to feature sets a (N, C) and b (M, C)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():          # near-singular product (few samples): regularize, as FID does
        eps = 1e-6 * np.eye(len(cov_a))
        covmean = scipy.linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))
