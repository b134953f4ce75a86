"""Sequence parallelism (parallel/sequence.py) on two gloo ranks against one process, on random open weights:
the frames <-> positions switch is an exact permutation both ways; temporal attention through it equals the
unsplit temporal attention exactly (forward and input gradient) with parameter gradients that sum to the unsplit
ones; a whole DiT split by frames (dsp, ulysses; factorized and full attention) gives the unsplit output and
gradients. Negative control: a split that skips the switch (temporal attention within a rank's frames) differs."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from einops import rearrange
from safetensors.torch import load_file, save_file

from conftest import free_port
from vidiff.config import DiTConfig
from vidiff.models.attention import Attention
from vidiff.models.dit import DiT, TEMPORAL, rope_sequences
from vidiff.models.sequence import WHOLE
from vidiff.parallel.sequence import FrameSplit
from weights import randomize

P, B, T, N, D = 2, 2, 4, 6, 16
CASES = [("factorized", "dsp"), ("factorized", "ulysses"), ("full", "ulysses")]


class NoSwitch(FrameSplit):
    """Broken on purpose: keeps the frame split through temporal attention (no all-to-all)."""

    def to_positions(self, x):
        return x

    def to_frames(self, x):
        return x

    def temporal_grid(self, T, N):
        return self._share(T), slice(0, N)


def _x() -> torch.Tensor:
    return torch.randn(B, T, N, D, generator=torch.Generator().manual_seed(3))


def _weights() -> torch.Tensor:
    """The loss weights of temporal attention's output (B, T, N, D): loss = (y * weights).sum()."""
    return torch.linspace(-1, 1, B * T * N * D).reshape(B, T, N, D)


def _temporal(attention: Attention, h: torch.Tensor, sequence) -> torch.Tensor:
    """Temporal attention of (B, T/P, N, D) frames through the split's switch, back in frames."""
    rope_t = rope_sequences(T, 2, N // 2, D // 4, False, B, None, sequence)[1]
    h = sequence.to_positions(h)
    out = rearrange(attention(rearrange(h, TEMPORAL[0]), rope=rope_t), TEMPORAL[1], b=B, t=h.shape[1])
    return sequence.to_frames(out)


def _dit(attention: str) -> DiT:
    net = DiT(DiTConfig(hidden_size=D, depth=2, num_heads=4, patch_size=(1, 2, 2), attention=attention), 4, 12)
    return randomize(net, seed=1)


def _dit_inputs():
    g = torch.Generator().manual_seed(5)
    mask = torch.ones(B, 5, dtype=torch.bool)
    mask[1, 2:] = False
    return (torch.randn(B, 4, T, 4, 4, generator=g), torch.randn(B, generator=g), torch.randn(B, 5, 12, generator=g),
            mask)


def _dit_run(net: DiT) -> dict[str, torch.Tensor]:
    """Output and parameter gradients of a weighted sum of the output (the same loss on every rank)."""
    out = net(*_dit_inputs())
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    (out * weight).sum().backward()
    return {"out": out.detach(), **{f"grad.{n}": p.grad for n, p in net.named_parameters() if p.grad is not None}}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(P),
                      LOCAL_RANK=str(rank))
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    group = dist.new_group(list(range(P)))
    split = FrameSplit(group, P, rank, "dsp")
    frames = split.frames(T)
    results = {}

    local = _x()[:, frames].clone().requires_grad_()                       # the switch alone
    switched = split.to_positions(local)
    results["switched"] = switched.detach()
    switched.backward(torch.arange(switched.numel(), dtype=torch.float32).reshape(switched.shape))
    results["switched.grad"] = local.grad
    results["back"] = split.to_frames(switched.detach())

    for name, sequence in (("dsp", split), ("noswitch", NoSwitch(group, P, rank, "dsp"))):
        attention = randomize(Attention(D, 4), seed=2)
        local = _x()[:, frames].clone().requires_grad_()
        y = _temporal(attention, local, sequence)
        (y * _weights()[:, frames]).sum().backward()
        results[f"{name}.y"], results[f"{name}.x.grad"] = y.detach(), local.grad
        for n, p in attention.named_parameters():
            dist.all_reduce(p.grad, group=group)                            # summed over the group
            results[f"{name}.param.{n}"] = p.grad

    for attention, mode in CASES:
        net = _dit(attention)
        net.split_sequence(FrameSplit(group, P, rank, mode))
        for key, value in _dit_run(net).items():
            if key.startswith("grad."):
                dist.all_reduce(value, group=group)
            results[f"{attention}-{mode}.{key}"] = value
    save_file({k: v.contiguous() for k, v in results.items()}, f"{out}/rank{rank}.safetensors")
    dist.barrier()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("sequence")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=P)
    return [load_file(str(out / f"rank{r}.safetensors")) for r in range(P)]


def _share(n: int, rank: int) -> slice:
    return slice(rank * n // P, (rank + 1) * n // P)


def test_the_switch_is_an_exact_permutation_both_ways(ranks):
    x = _x()
    for rank, r in enumerate(ranks):
        assert torch.equal(r["switched"], x[:, :, _share(N, rank)])         # every frame of its positions
        assert torch.equal(r["back"], x[:, _share(T, rank)])                # and back to its frames
    # backward: each rank's frames get the gradient the ranks holding their positions were given
    grads = [torch.arange(B * T * N // P * D, dtype=torch.float32).reshape(B, T, N // P, D) for _ in range(P)]
    whole = torch.cat(grads, dim=2)
    for rank, r in enumerate(ranks):
        assert torch.equal(r["switched.grad"], whole[:, _share(T, rank)])


def _unsplit_temporal():
    attention = randomize(Attention(D, 4), seed=2)
    x = _x().requires_grad_()
    y = _temporal(attention, x, WHOLE)
    (y * _weights()).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in attention.named_parameters()}


def test_temporal_attention_through_the_switch_equals_the_unsplit_one(ranks):
    y, x_grad, params = _unsplit_temporal()
    for rank, r in enumerate(ranks):
        assert torch.equal(r["dsp.y"], y[:, _share(T, rank)])
        assert torch.equal(r["dsp.x.grad"], x_grad[:, _share(T, rank)])
    # the parameter gradients are sums over ranks (another summation order): fp32 rounding (1.3e-6 of the
    # largest seen)
    for n, g in params.items():
        got = ranks[0][f"dsp.param.{n}"]
        assert (got - g).abs().max() <= 1e-5 * g.abs().max(), n


def test_a_split_without_the_switch_differs_negative_control(ranks):
    y, _, _ = _unsplit_temporal()
    assert not torch.allclose(ranks[0]["noswitch.y"], y[:, _share(T, 0)], atol=1e-3)


@pytest.mark.parametrize("attention, mode", CASES)
def test_a_split_dit_gives_the_unsplit_output_and_gradients(ranks, attention, mode):
    whole = _dit_run(_dit(attention))
    for r in ranks:
        for key, value in whole.items():
            got = r[f"{attention}-{mode}.{key}"]
            assert got.shape == value.shape, key
            assert (got - value).abs().max() <= 1e-5 * value.abs().max(), \
                f"{key}: {(got - value).abs().max()} vs {value.abs().max()}"
