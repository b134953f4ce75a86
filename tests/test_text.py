"""The text encoder: the shipped MiniLM by default; a local folder or a HuggingFace model name from the local
cache; a clear error otherwise (nothing is downloaded at run time)."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from vidiff.config import TextConfig
from vidiff.models.text import TextEncoder, TextEncoderError, resolve_encoder

_EMBED = """
import sys, torch
from vidiff.config import TextConfig
from vidiff.models.text import TextEncoder
tokens, mask = TextEncoder(TextConfig(encoder=sys.argv[1]))(["a red square moving up"])
print(float(tokens[mask].sum()), int(mask.sum()))
"""


def _embed(name: str, env: dict) -> str:
    out = subprocess.run([sys.executable, "-c", _EMBED, name], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, **env}, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.split("\n")[-2]


def test_a_huggingface_name_and_a_local_folder_load_offline(tmp_path):
    """A model name is resolved from the HuggingFace cache layout (models--ORG--NAME/snapshots/REV), offline."""
    snapshot = tmp_path / "hub" / "models--vidiff-test--minilm" / "snapshots" / ("0" * 40)
    shutil.copytree(resolve_encoder("minilm"), snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    reference = _embed("minilm", env)
    assert _embed("vidiff-test/minilm", env) == reference
    assert _embed(str(snapshot), env) == reference


@pytest.mark.parametrize("name", ["no-such-org/no-such-model", "/no/such/folder"])
def test_an_unknown_encoder_is_a_clear_error(name):
    with pytest.raises(TextEncoderError, match="nothing is downloaded at run time"):
        TextEncoder(TextConfig(encoder=name))


def test_a_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(TextEncoderError, match="without config.json"):
        TextEncoder(TextConfig(encoder=str(tmp_path)))


def test_empty_captions_have_no_valid_token():
    tokens, mask = TextEncoder(TextConfig())(["a red square", "", "  "])
    assert mask[0].sum() > 2 and not mask[1:].any() and tokens[1:].abs().sum() == 0


def test_text_layer_picks_the_hidden_state():
    """-1 and 6 are MiniLM-L6's last layer; 0 its token embeddings, which set the word apart more: there
    "left" and "right" lie at cosine ~0.5, after the last layer at ~0.8."""
    captions = ["a red square moving left", "a red square moving right"]
    last, mask = TextEncoder(TextConfig())(captions)
    assert torch.equal(TextEncoder(TextConfig(layer=6))(captions)[0], last)
    first, first_mask = TextEncoder(TextConfig(layer=0))(captions)
    assert torch.equal(first_mask, mask) and not torch.allclose(first, last)
    word = int(mask[0].sum()) - 2                                       # the direction's token, before [SEP]
    cosine = {name: float(torch.cosine_similarity(t[0, word], t[1, word], dim=0)) for name, t in
              (("last", last), ("first", first))}
    assert cosine["first"] < cosine["last"] - 0.2, cosine


@pytest.mark.parametrize("layer", [7, -8])
def test_a_text_layer_out_of_range_is_a_clear_error(layer):
    with pytest.raises(TextEncoderError, match=rf"text.layer {layer} is out of range .* 6 layers: use 0 .* to 6"):
        TextEncoder(TextConfig(layer=layer))
