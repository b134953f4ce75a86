"""The spacetime DiT: shapes, adaLN-Zero identity, what each attention may mix, 3D RoPE, the null caption,
activation checkpointing, presets, and the FLOP count of perf/mfu against torch's FlopCounterMode."""

import math

import pytest
import torch

from conftest import REPO, run_vidiff
from vidiff.config import PRESETS, ConfigError, DiTConfig, load_config
from vidiff.diffusion.edm import Precond
from vidiff.models.attention import apply_rope, rope_3d
from vidiff.models.dit import DiT, describe_presets, training_flops_per_token
from weights import randomize

D, HEADS = 32, 4


def _dit(**kw) -> DiT:
    torch.manual_seed(0)
    return DiT(DiTConfig(hidden_size=D, depth=2, num_heads=HEADS, **kw), in_channels=4, text_dim=12)


def _text(b: int = 2, L: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.ones(b, L, dtype=torch.bool)
    mask[:, 3:] = False
    return torch.randn(b, L, 12, generator=torch.Generator().manual_seed(b)), mask


@pytest.mark.parametrize("attention", ["factorized", "full"])
@pytest.mark.parametrize("shape, patch", [((3, 8, 8), (1, 2, 2)), ((1, 4, 6), (1, 2, 2)), ((5, 6, 4), (1, 2, 2)),
                                          ((4, 4, 4), (2, 1, 1)), ((2, 8, 4), (2, 4, 2))])
def test_output_shape_for_any_frames_resolution_and_patch(shape, patch, attention):
    net = _dit(patch_size=patch, attention=attention)
    x = torch.randn(2, 4, *shape)
    assert net(x, torch.zeros(2), *_text()).shape == x.shape


def test_full_attention_has_the_same_parameters():
    factorized, full = _dit(), _dit(attention="full")
    assert [(n, p.shape) for n, p in factorized.named_parameters()] == \
           [(n, p.shape) for n, p in full.named_parameters()]


@pytest.mark.parametrize("attention", ["factorized", "full"])
def test_blocks_are_identity_at_init_and_denoiser_is_c_skip_x(attention):
    net = _dit(attention=attention)
    B, T, N = 2, 3, 16
    h, c = torch.randn(B, T, N, D), torch.randn(B, D)
    context, mask = net.embed.with_null_text(*_text())
    ropes = _ropes(net, T, 4, 4, B)
    for block in net.blocks:
        torch.testing.assert_close(block(h, c, net.embed.text_proj(context), mask, *ropes), h)
    x, sigma = torch.randn(2, 4, 3, 8, 8), torch.tensor([0.3, 5.0])
    denoised = Precond(net, 0.5)(x, sigma, text=_text()[0], text_mask=_text()[1])
    c_skip = 0.25 / (sigma**2 + 0.25)
    torch.testing.assert_close(denoised, c_skip.reshape(2, 1, 1, 1, 1) * x)


def _ropes(net: DiT, T: int, H: int, W: int, B: int):
    from vidiff.models.dit import rope_sequences
    return rope_sequences(T, H, W, D // HEADS, net.cfg.attention == "full", B, None)


def _only_gate_open(net: DiT, gate: int) -> torch.nn.Module:
    """The first block with every residual branch closed except one self-attention (gate 2: spatial,
    5: temporal): its output is x + that attention layer's output, as laid out in the block."""
    block = net.blocks[0]
    torch.nn.init.normal_(block.attn_s.out.weight)
    torch.nn.init.normal_(block.attn_t.out.weight)
    with torch.no_grad():
        block.adaLN[-1].bias[gate * D:(gate + 1) * D] = 1.0
    return block


def _perturbed_outputs(attention: str, gate: int, where: tuple):
    net = _dit(attention=attention)
    block = _only_gate_open(net, gate)
    B, T, H, W = 2, 4, 3, 3
    x = torch.randn(B, T, H * W, D)
    y = x.clone()
    y[where] += torch.randn_like(y[where])                              # not a constant: LayerNorm removes those
    context, mask = net.embed.with_null_text(*_text())
    args = (torch.randn(B, D), net.embed.text_proj(context), mask, *_ropes(net, T, H, W, B))
    with torch.no_grad():
        return block(x, *args), block(y, *args)


def test_spatial_attention_never_mixes_frames():
    a, b = _perturbed_outputs("factorized", gate=2, where=(slice(None), 1))          # perturb frame 1
    changed = (a - b).abs().amax(dim=(0, 2, 3))                                       # per frame
    assert changed[1] > 0.1 and torch.all(changed[[0, 2, 3]] == 0)
    a, b = _perturbed_outputs("full", gate=2, where=(slice(None), 1))                 # full attention does mix
    assert (a - b).abs().amax(dim=(0, 2, 3))[[0, 2, 3]].min() > 1e-4


def test_temporal_attention_never_mixes_locations():
    a, b = _perturbed_outputs("factorized", gate=5, where=(slice(None), slice(None), 4))   # perturb location 4
    changed = (a - b).abs().amax(dim=(0, 1, 3))                                           # per location
    assert changed[4] > 0.1 and torch.all(changed[torch.arange(9) != 4] == 0)
    a, b = _perturbed_outputs("factorized", gate=5, where=(slice(None), 1))               # but mixes frames
    assert (a - b).abs().amax(dim=(0, 2, 3))[[2, 3]].min() > 1e-4


def test_rope_scores_depend_only_on_relative_position():
    T, H, W, d = 5, 6, 9, 16
    rope = rope_3d(T, H, W, d).reshape(1, 1, -1, d // 2, 2)                       # (cos, sin) rotations
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(d, generator=g), torch.randn(d, generator=g)
    rq = apply_rope(q.expand(1, 1, T * H * W, d), rope)[0, 0].reshape(T, H, W, d)
    rk = apply_rope(k.expand(1, 1, T * H * W, d), rope)[0, 0].reshape(T, H, W, d)

    def score(p, offset):
        return torch.dot(rq[p], rk[tuple(a + o for a, o in zip(p, offset))])

    for offset in [(1, 2, 3), (0, -1, 2), (2, 0, 0), (0, 0, -4)]:
        starts = [(0, 1, 4), (1, 2, 5), (2, 3, 4)]
        scores = torch.stack([score(p, offset) for p in starts])
        torch.testing.assert_close(scores, scores[:1].expand(3), atol=1e-5, rtol=1e-5)
    assert abs(score((0, 1, 4), (1, 2, 3)) - score((0, 1, 4), (1, 2, 2))) > 1e-3    # the offset itself matters
    for axis in range(3):                                                           # each axis is encoded
        offset = [0, 0, 0]
        offset[axis] = 1
        assert abs(score((0, 1, 1), tuple(offset)) - score((0, 1, 1), (0, 0, 0))) > 1e-3


def test_an_image_is_a_one_frame_video():
    net = _dit()
    image = torch.randn(3, 4, 1, 8, 8)
    out = net(image, torch.zeros(3), *_text(3))
    assert out.shape == image.shape and torch.isfinite(out).all()


def test_every_parameter_receives_a_gradient():
    """After the first step every parameter has a gradient (none is left out of the graph); the zero-initialized
    adaLN-Zero gates open from the output inwards, so after three steps every gradient is non-zero, the null
    embedding's included (one caption is dropped)."""
    net = _dit()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    x = torch.randn(2, 4, 3, 8, 8)
    text, mask = _text()
    mask[1] = False                                                      # a dropped caption
    for step in range(3):
        optimizer.zero_grad()
        (net(x, torch.full((2,), 0.5), text, mask) - x).pow(2).mean().backward()
        if step == 0:
            assert not [n for n, p in net.named_parameters() if p.grad is None]
        optimizer.step()
    assert not [n for n, p in net.named_parameters() if p.grad.abs().sum() == 0]


def test_dropped_captions_use_the_null_embedding():
    net = randomize(_dit())
    x = torch.randn(2, 4, 3, 8, 8)
    text, mask = _text()
    dropped = torch.zeros_like(mask)
    with torch.no_grad():
        a = net(x, torch.zeros(2), text, dropped)
        b = net(x, torch.zeros(2), torch.randn_like(text), dropped)     # token content is ignored
        conditioned = net(x, torch.zeros(2), text, mask)
        net.embed.null_text.add_(1.0)
        c = net(x, torch.zeros(2), text, dropped)                       # the null embedding is what is used
    torch.testing.assert_close(a, b)
    assert (a - conditioned).abs().max() > 1e-3 and (a - c).abs().max() > 1e-3


def test_activation_checkpointing_gives_the_same_gradients():
    x, text = torch.randn(2, 4, 3, 8, 8), _text()
    grads = []
    for checkpointing in (False, True):
        net = randomize(_dit())
        net.activation_checkpointing = checkpointing
        (net(x, torch.zeros(2), *text) - x).pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_compiled_blocks_give_the_same_output_and_gradients():
    """parallel.compile: each block compiled in place (names unchanged) matches eager to fp32 noise, and is
    really compiled (dynamo traced a graph for it)."""
    from torch._dynamo.utils import counters

    x, text = torch.randn(2, 4, 3, 8, 8), _text()
    outputs, grads = [], []
    for compiled in (False, True):
        net = randomize(_dit())
        names = [name for name, _ in net.named_parameters()]
        if compiled:
            torch._dynamo.reset()
            counters.clear()
            net.compile_blocks()
            assert [name for name, _ in net.named_parameters()] == names
        out = net(x, torch.zeros(2), *text)
        (out - x).pow(2).mean().backward()
        outputs.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert counters["stats"]["unique_graphs"] >= 1
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


def test_compile_is_refused_where_it_does_not_help():
    with pytest.raises(ConfigError, match="compile with ZeRO stage 3"):
        load_config(REPO / "configs/demo.yaml", ["parallel.compile=true", "parallel.zero_stage=3"])
    with pytest.raises(ConfigError, match="compile with pipeline 2"):
        load_config(REPO / "configs/demo.yaml", ["parallel.compile=true", "parallel.pipeline=2"])
    with pytest.raises(ConfigError, match="task 'vae' has none"):
        load_config(REPO / "configs/vae/cpu_small.yaml", ["parallel.compile=true", "parallel.zero_stage=2"])


def test_presets_follow_the_dit_paper_and_conflicts_fail(tmp_path):
    assert DiTConfig(preset="XL").model_dump(include={"hidden_size", "depth", "num_heads"}) == \
           {"hidden_size": 1152, "depth": 28, "num_heads": 16}
    assert PRESETS["S"] == (384, 12, 6) and PRESETS["B"] == (768, 12, 12) and PRESETS["L"] == (1024, 24, 16)
    with pytest.raises(ConfigError, match="preset XL sets hidden_size 1152"):
        load_config(REPO / "configs/demo.yaml", ["model.preset=XL", "model.hidden_size=384"])
    counts = describe_presets(16, 384)
    assert counts["S"] < counts["B"] < counts["L"] < counts["XL"]
    out = run_vidiff("presets")
    assert out.returncode == 0, out.stderr
    assert f"{counts['XL'] / 1e6:.1f}M" in out.stdout and "1152" in out.stdout
    bad = run_vidiff("presets", "--text-dim", "-5")
    assert bad.returncode == 2 and "--text-dim: must be a positive integer, got -5" in bad.stderr


def _counted_training_flops(cfg: DiTConfig, latent: tuple[int, int, int], batch: int = 2,
                            cond_channels: int = 0) -> float:
    """FLOPs of one forward + backward as torch's FlopCounterMode counts them (on the meta device: shapes only;
    attention through the math backend, whose matmuls the counter sees on any device)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        net = DiT(cfg, 16, 384, cond_channels=cond_channels)
        x, text = torch.randn(batch, 16, *latent), torch.randn(batch, 32, 384)
        mask = torch.ones(batch, 32, dtype=torch.bool)
        cond = {"cond": torch.randn(batch, cond_channels, *latent), "aug": torch.zeros(batch)} if cond_channels else {}
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            net(x, torch.zeros(batch), text, mask, **cond).float().pow(2).mean().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("preset", ["S", "XL"])
@pytest.mark.parametrize("attention", ["factorized", "full"])
@pytest.mark.parametrize("latent", [(9, 32, 32), (1, 32, 32), (3, 8, 12)])
def test_training_flops_per_token_match_the_flop_counter(preset, attention, latent):
    """perf/mfu's FLOP count is what runs (measured: within 0.07% on these shapes). The old convention, 6 x all
    parameters per token plus attention, counted the adaLN, embeddings and the text's key/value projections once
    per token: the negative control, off by far more than 2%."""
    cfg = DiTConfig(preset=preset, attention=attention)
    counted = _counted_training_flops(cfg, latent)
    grid = (latent[0], latent[1] // 2, latent[2] // 2)
    tokens = 2 * math.prod(grid)
    assert tokens * training_flops_per_token(cfg, grid, 32, 16, 384) == pytest.approx(counted, rel=0.02)
    old = 6.0 * describe_presets(16, 384)[preset] + 12.0 * cfg.hidden_size * cfg.depth * (
        (2 * math.prod(grid) if attention == "full" else grid[1] * grid[2] + grid[0]) + 33)
    assert tokens * old > 1.1 * counted


def test_training_flops_per_token_count_a_cascade_stages_condition():
    """A cascade stage's condition channels widen the patch embedding and its augmentation level has an embedding
    of its own: both run, so both are counted, and what they add is what the counter sees them add (measured:
    equal; not counting them would miss all of it)."""
    cfg = DiTConfig(hidden_size=64, depth=1, num_heads=2, patch_size=(1, 1, 1))
    latent, grid = (3, 4, 4), (3, 4, 4)
    added = _counted_training_flops(cfg, latent, cond_channels=17) - _counted_training_flops(cfg, latent)
    tokens = 2 * math.prod(grid)
    ours = tokens * (training_flops_per_token(cfg, grid, 32, 16, 384, cond_channels=17)
                     - training_flops_per_token(cfg, grid, 32, 16, 384))
    assert added > 0 and ours == pytest.approx(added, rel=0.02)
