"""Latent spacetime DiT (Peebles & Xie 2023) with factorized attention: spatial within a frame, temporal
across frames at each location, cross attention to text tokens; adaLN-Zero conditioning on the noise level
and pooled text; 3D RoPE on every self-attention. attention='full' lets both self-attention layers of each
block see all T x H x W tokens instead, with the same parameters (the comparison tools/bench_attention.py makes).

The raw network F(x_in, c_noise, text, text_mask) of EDM: it never sees sigma itself (see diffusion/edm.py).
A caption with no valid token (dropped, or empty for guidance) is replaced by the learned null embedding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from vidiff.config import PRESETS, DiTConfig
from vidiff.models.attention import Attention, Linear, Rope, rope_3d
from vidiff.models.sequence import WHOLE, Whole, sdpa


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = Linear(dim, hidden), Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class NoiseEmbedding(nn.Module):
    """c_noise (B,) -> (B, D): sin/cos features of c_noise = ln(sigma)/4 at frequencies 1..1000, then an MLP."""

    def __init__(self, dim: int, features: int = 256):
        super().__init__()
        self.register_buffer("freqs", torch.logspace(0, 3, features // 2), persistent=False)
        self.mlp = nn.Sequential(Linear(features, dim), nn.SiLU(), Linear(dim, dim))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        angles = c_noise.float()[:, None] * self.freqs[None]                # (B, features/2)
        features = torch.cat([angles.cos(), angles.sin()], dim=1)          # (B, features)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


# Token sequences of each attention, as (to, from) rearrangements of x (B, T, N, D).
SPATIAL = ("b t n d -> (b t) n d", "(b t) n d -> b t n d")        # within a frame
TEMPORAL = ("b t n d -> (b n) t d", "(b n) t d -> b t n d")       # across frames at one location
FULL = ("b t n d -> b (t n) d", "b (t n) d -> b t n d")           # all tokens (and cross attention's queries)


def rope_sequences(T: int, H: int, W: int, head_dim: int, full: bool, batch: int, device,
                   sequence: Whole = WHOLE) -> tuple[Rope, Rope]:
    """RoPE rotations laid out like the spatial and temporal attention's sequences on this rank: (B*T or 1, 1, N or
    T*N, d/2, 2) and (B*N or 1, 1, T or T*N, d/2, 2), T and N this rank's share under sequence parallelism (its
    frames; around dsp's temporal attention, its positions). Each token keeps its true (t, h, w) coordinates."""
    rope = rope_3d(T, H, W, head_dim, device)                               # (T, N, d/2, 2)
    mine = rope[sequence.frames(T)]
    if full:
        flat = mine.flatten(0, 1)[None, None]
        return flat, flat
    frames, positions = sequence.temporal_grid(T, H * W)
    return (rearrange(mine[None].expand(batch, -1, -1, -1, -1), "b t n d two -> (b t) n d two")[:, None],
            rearrange(rope[frames, positions][None].expand(batch, -1, -1, -1, -1),
                      "b t n d two -> (b n) t d two")[:, None])


def block_ropes(cfg: DiTConfig, grid: tuple[int, int, int], batch: int, device,
                sequence: Whole = WHOLE) -> tuple[Rope, Rope]:
    """The DiT blocks' RoPE rotations (spatial, temporal) for a token grid (T', H', W')."""
    return rope_sequences(*grid, cfg.hidden_size // cfg.num_heads, cfg.attention == "full", batch, device, sequence)


class DiTBlock(nn.Module):
    """adaLN-Zero block: spatial attention, temporal attention, cross attention, MLP; identity at init (with
    zero_init=False its gates and cross-attention output start random instead).
    With full=True the two self-attention layers each attend over all T x N tokens."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, full: bool = False, zero_init: bool = True):
        super().__init__()
        self.full = full
        self.norm_s = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn_s = Attention(dim, heads)
        self.norm_t = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn_t = Attention(dim, heads)
        self.norm_x = nn.LayerNorm(dim, eps=1e-6)
        self.cross = Attention(dim, heads, zero_out=zero_init)             # no adaLN gate: starts closed itself
        self.norm_m = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.adaLN = nn.Sequential(nn.SiLU(), Linear(dim, 9 * dim, zero=zero_init))   # adaLN-Zero: gates start at 0
        self.sequence: Whole = WHOLE

    def split_sequence(self, sequence: Whole) -> None:
        """Run on this rank's share of the tokens (models/sequence.py): temporal attention always crosses frames,
        spatial attention only when full."""
        self.sequence = sequence
        self.attn_s.core = sequence.exchange(sdpa, crosses_frames=self.full)
        self.attn_t.core = sequence.exchange(sdpa, crosses_frames=True)

    def forward(self, x: torch.Tensor, c: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                rope_s: Rope, rope_t: Rope) -> torch.Tensor:
        B, T, N, D = x.shape                                                # (B, T, N, D): this rank's frames
        (shift_s, scale_s, gate_s, shift_t, scale_t, gate_t,
         shift_m, scale_m, gate_m) = self.adaLN(c)[:, None, None].chunk(9, dim=-1)   # each (B, 1, 1, D)
        (to_s, from_s), (to_t, from_t) = (FULL, FULL) if self.full else (SPATIAL, TEMPORAL)

        h = rearrange(modulate(self.norm_s(x), shift_s, scale_s), to_s)
        x = x + gate_s * rearrange(self.attn_s(h, rope=rope_s), from_s, b=B, t=T)

        h = self.sequence.to_positions(modulate(self.norm_t(x), shift_t, scale_t))   # dsp: (B, T * P, N / P, D)
        h = rearrange(self.attn_t(rearrange(h, to_t), rope=rope_t), from_t, b=B, t=h.shape[1])
        x = x + gate_t * self.sequence.to_frames(h)

        h = rearrange(self.norm_x(x), FULL[0])
        x = x + rearrange(self.cross(h, text, text_mask), FULL[1], b=B, t=T)

        return x + gate_m * self.mlp(modulate(self.norm_m(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int, zero_init: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN = nn.Sequential(nn.SiLU(), Linear(dim, 2 * dim, zero=zero_init))
        self.linear = Linear(dim, out_dim, zero=zero_init)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN(c)[:, None, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


def patchify(x: torch.Tensor, patch: tuple[int, int, int]) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(B, C, T, H, W) -> tokens (B, T', N, C*pt*ph*pw) and the token grid (T', H', W')."""
    B, C, T, H, W = x.shape
    pt, ph, pw = patch
    if T % pt or H % ph or W % pw:
        raise ValueError(f"latent (T, H, W) = {(T, H, W)} is not divisible by patch_size {patch}")
    tokens = rearrange(x, "b c (t pt) (h ph) (w pw) -> b t (h w) (c pt ph pw)", pt=pt, ph=ph, pw=pw)
    return tokens, (T // pt, H // ph, W // pw)


def unpatchify(x: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of patchify: (B, T', N, C*pt*ph*pw) -> (B, C, T, H, W)."""
    _, Hp, Wp = grid
    pt, ph, pw = patch
    return rearrange(x, "b t (h w) (c pt ph pw) -> b c (t pt) (h ph) (w pw)", h=Hp, w=Wp, pt=pt, ph=ph, pw=pw)


class Embed(nn.Module):
    """Inputs to block inputs: latent patches (with a cascade stage's condition channels) to tokens, the
    conditioning vector c = noise embedding + pooled text (+ the condition's augmentation level), and the text
    context for cross attention (a caption with no valid token gets the null embedding)."""

    def __init__(self, cfg: DiTConfig, in_channels: int, text_dim: int, cond_channels: int = 0):
        super().__init__()
        D, (pt, ph, pw) = cfg.hidden_size, cfg.patch_size
        self.patch, self.cond_channels = cfg.patch_size, cond_channels
        self.sequence: Whole = WHOLE              # under sequence parallelism, this rank embeds its frames only
        self.x_embed = Linear((in_channels + cond_channels) * pt * ph * pw, D)
        self.noise_embed = NoiseEmbedding(D)
        # Cascaded diffusion (Ho et al. 2022): the condition's noise-augmentation level, embedded like c_noise
        self.aug_embed = NoiseEmbedding(D) if cond_channels else None
        self.null_text = nn.Parameter(torch.randn(1, 1, text_dim) * 0.02)  # stands in for a dropped caption
        self.text_proj = Linear(text_dim, D)
        self.text_pool = Linear(text_dim, D)

    def with_null_text(self, text: torch.Tensor, text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepend the learned null token, valid only in rows without any valid token (dropped captions):
        (B, L, Dt), (B, L) -> (B, 1 + L, Dt), (B, 1 + L)."""
        dropped = ~text_mask.any(dim=1, keepdim=True)                      # (B, 1)
        null = self.null_text.to(text.dtype).expand(text.shape[0], -1, -1)
        return torch.cat([null, text], dim=1), torch.cat([dropped, text_mask], dim=1)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                cond: torch.Tensor | None = None, aug: torch.Tensor | None = None):
        """x (B, C, T, H, W), cond (B, C_cond, T, H, W) and aug (B,) for a stage with condition channels
        -> tokens (B, T', N, D) (this rank's frames), c (B, D), context (B, 1 + L, D), mask (B, 1 + L), grid
        (T', H', W') of the whole clip."""
        dtype = self.x_embed.weight.dtype                                   # bf16 runs: inputs follow the weights
        if (cond is None) != (self.aug_embed is None) or (cond is None) != (aug is None):
            raise ValueError(f"this DiT has {self.cond_channels} condition channels: give cond (B, "
                             f"{self.cond_channels}, T, H, W) and aug (B,) exactly when that is > 0")
        if cond is not None:
            x = torch.cat([x, cond.to(x.dtype)], dim=1)                    # (B, C + C_cond, T, H, W)
        tokens, grid = patchify(x.to(dtype), self.patch)
        tokens = tokens[:, self.sequence.frames(grid[0])]
        text, text_mask = self.with_null_text(text.to(dtype), text_mask)
        mask = text_mask.to(dtype)[..., None]                               # (B, L, 1)
        pooled = (text * mask).sum(1) / mask.sum(1)                         # (B, Dt)
        c = self.noise_embed(c_noise) + self.text_pool(pooled)              # (B, D)
        if aug is not None:
            c = c + self.aug_embed(aug)
        return self.x_embed(tokens), c, self.text_proj(text), text_mask, grid


class DiT(nn.Module):
    """F(x_in (B, C, T, H, W), c_noise (B,), text (B, L, Dt), text_mask (B, L)[, cond, aug]) -> (B, C, T, H, W):
    embed, blocks, final layer (the pipeline layout runs the same three as its stages). A cascade stage has
    cond_channels > 0: its condition (B, cond_channels, T, H, W) is concatenated to x channel-wise and its
    augmentation level aug (B,) embedded next to c_noise (diffusion/conditions.py makes both).
    activation_checkpointing recomputes each block in backward instead of keeping its activations."""

    def __init__(self, cfg: DiTConfig, in_channels: int, text_dim: int, activation_checkpointing: bool = False,
                 cond_channels: int = 0):
        super().__init__()
        self.cfg = cfg
        self.in_channels, self.cond_channels = in_channels, cond_channels
        self.activation_checkpointing = activation_checkpointing
        # Every layer initializes itself when built (see attention.Linear); adaLN-Zero closes every residual
        # branch and the output at initialization (unless cfg.zero_init is off).
        self.embed = Embed(cfg, in_channels, text_dim, cond_channels)
        full = cfg.attention == "full"
        D = cfg.hidden_size
        self.blocks = nn.ModuleList([DiTBlock(D, cfg.num_heads, cfg.mlp_ratio, full, cfg.zero_init)
                                     for _ in range(cfg.depth)])
        self.final = FinalLayer(D, in_channels * math.prod(cfg.patch_size), cfg.zero_init)
        self.sequence: Whole = WHOLE

    def split_sequence(self, sequence: Whole) -> None:
        """Hold 1/sequence.size of every clip's latent frames on this rank (parallel/sequence.py): the input and
        output stay whole clips, identical on every rank of the group."""
        self.sequence = self.embed.sequence = sequence
        for block in self.blocks:
            block.split_sequence(sequence)

    def compile_blocks(self) -> None:
        """torch.compile each block in place (parameter names unchanged): regional compilation, in which the
        blocks share one compiled graph, so compile time does not grow with depth."""
        for block in self.blocks:
            block.compile()

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                cond: torch.Tensor | None = None, aug: torch.Tensor | None = None) -> torch.Tensor:
        x, c, context, text_mask, grid = self.embed(x, c_noise, text, text_mask, cond, aug)   # x (B, T', N, D)
        rope_s, rope_t = block_ropes(self.cfg, grid, x.shape[0], x.device, self.sequence)
        for block in self.blocks:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, c, context, text_mask, rope_s, rope_t, use_reentrant=False)
            else:
                x = block(x, c, context, text_mask, rope_s, rope_t)
        out = self.sequence.gather_frames(self.final(x, c))                # (B, T', N, C pt ph pw)
        return unpatchify(out, grid, self.cfg.patch_size)                  # (B, C, T, H, W)


def count_parameters(module: nn.Module) -> int:
    return sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in module.parameters())


def describe_presets(in_channels: int = 16, text_dim: int = 384) -> dict[str, int]:
    """Parameter count of each size preset with the given latent channels and text width."""
    counts = {}
    for name in PRESETS:
        with torch.device("meta"):
            model = DiT(DiTConfig(preset=name), in_channels, text_dim)
        counts[name] = count_parameters(model)
    return counts


def training_flops_per_token(cfg: DiTConfig, grid: tuple[int, int, int], text_tokens: int, in_channels: int,
                             text_dim: int, cond_channels: int = 0) -> float:
    """Model FLOPs of one training step (forward + backward) per latent token: the matmuls that run, counted as
    torch's FlopCounterMode counts them (tests/test_dit.py checks this within 2%), for the convention of perf/mfu.

    A multiply-add is 2 FLOPs. A linear layer costs 2 per weight forward and 2 backward for its weight gradient,
    plus 2 for its input gradient when the input depends on trained weights (not for the patch and noise
    embeddings, whose inputs are data; the text embeddings' inputs hold the learned null token, so they get one).
    What runs per latent token: the patch embedding, in every block the
    q/k/v/out projections of the two self-attentions, q/out of the cross attention and the MLP, and the final
    projection; attention itself, per query and layer, 4 x S x D forward (QK^T and AV) and 8 x S x D backward
    with S the keys it attends to (H'W' spatial and T' temporal when factorized, T'H'W' for both when full,
    1 + text tokens across). What runs per sample, divided over its T'H'W' tokens: the adaLN modulations, the
    noise and text embeddings (and a cascade stage's augmentation-level embedding; its condition channels widen
    the patch embedding) and the cross attention's key/value projections of the text. Not counted: the
    recomputation of activation checkpointing and of flash attention's backward (hardware, not model, FLOPs).
    """
    T, H, W = grid
    tokens = T * H * W
    D, depth, context = cfg.hidden_size, cfg.depth, 1 + text_tokens       # context: the null token + text
    patch = in_channels * math.prod(cfg.patch_size)
    mlp = int(D * cfg.mlp_ratio)
    keys = 2 * tokens if cfg.attention == "full" else H * W + T
    patch_in = (in_channels + cond_channels) * math.prod(cfg.patch_size)   # with the condition's channels
    per_token = (4 * patch_in * D                                           # patch embedding (data input)
                 + 6 * depth * (8 * D * D + 2 * D * D + 2 * D * mlp)        # self q/k/v/out x2, cross q/out, MLP
                 + 6 * D * patch                                            # final projection
                 + 12 * depth * D * (keys + context))                       # attention scores and values
    embeddings = 2 if cond_channels else 1                                 # c_noise (and the augmentation level)
    per_sample = (4 * embeddings * 256 * D                                 # noise (and aug) MLPs in: data input
                  + 6 * (context * text_dim * D + text_dim * D)             # text proj and pool (null token)
                  + 6 * (embeddings * D * D + depth * (9 * D * D + 2 * context * D * D) + 2 * D * D))  # MLPs out,
    return per_token + per_sample / tokens                                  # adaLN, cross k/v, final adaLN
