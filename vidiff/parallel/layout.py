"""Where each rank sits: data x pipeline x tensor parallel sizes (x sequence in the sharded layout) from the config
and the world size, checked before any process group exists (the launcher runs the same check before it starts a
process).

Rank order follows DeepSpeed's topologies: tensor-parallel ranks are adjacent (rank = ((pipe * data) + dp) *
tensor + tp in the pipeline layout; (dp * sequence + sp) * tensor + tp in the sharded one), so a tensor-parallel
group shares a node, and then a sequence group. Every tensor- and sequence-parallel rank of a data-parallel slot
reads the same batch. ZeRO's data-parallel group (all ranks of one tensor rank) spans data x sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from vidiff.config import ConfigError, RunConfig
from vidiff.data.buckets import TEMPORAL_FACTOR, token_grid


class LayoutError(ConfigError):
    """A parallel layout that cannot run on this world size or model; the message says what is valid."""


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


class Coordinates(NamedTuple):
    stage: int                    # pipeline stage
    data: int                     # data-parallel rank: which batches it reads
    sequence: int                 # sequence-parallel rank: which latent frames of them it holds
    tensor: int                   # tensor-parallel rank


@dataclass(frozen=True)
class Layout:
    world: int
    tensor: int
    pipeline: int
    micro_batch: int
    global_batch: int
    kind: str                     # "sharded" | "pipeline" (the rule lives in ParallelConfig.layout)
    sequence: int = 1

    @property
    def data(self) -> int:
        """Data-parallel replicas."""
        return self.world // (self.tensor * self.pipeline * self.sequence)

    @property
    def accumulation(self) -> int:
        """Micro-batches per optimizer step on each data-parallel rank."""
        return self.global_batch // (self.micro_batch * self.data)

    def coordinates(self, rank: int) -> Coordinates:
        """Where a global rank sits."""
        tp = rank % self.tensor
        sp = rank // self.tensor % self.sequence
        dp = rank // (self.tensor * self.sequence) % self.data
        return Coordinates(rank // (self.tensor * self.sequence * self.data), dp, sp, tp)

    def sequence_groups(self) -> list[list[int]]:
        """The ranks of each sequence group (one data rank and tensor rank, every sequence rank), in an order
        every rank can create them in."""
        return [[(dp * self.sequence + sp) * self.tensor + tp for sp in range(self.sequence)]
                for dp in range(self.data) for tp in range(self.tensor)]

    def describe(self) -> str:
        sequence = f" x sequence {self.sequence}" if self.sequence > 1 else ""
        return (f"{self.kind} layout: world {self.world} = data {self.data} x pipeline {self.pipeline} x tensor "
                f"{self.tensor}{sequence}; global batch {self.global_batch} = micro {self.micro_batch} x data "
                f"{self.data} x accumulation {self.accumulation}")


def make_layout(cfg: RunConfig, world: int) -> Layout:
    """The layout of cfg on `world` ranks; raises LayoutError naming the bad value and what is valid."""
    par, model = cfg.parallel, cfg.model
    errors = []
    model_parallel = par.tensor * par.pipeline * par.sequence
    if world % model_parallel:
        errors.append(f"world size {world} is not divisible by parallel.tensor x parallel.pipeline x parallel.sequence "
                      f"= {par.tensor} x {par.pipeline} x {par.sequence} = {model_parallel}; valid world sizes are "
                      f"multiples of {model_parallel}")
    if par.sequence > 1:
        errors += sequence_problems(cfg)
    if cfg.task == "dit":
        if model.num_heads % par.tensor:
            errors.append(f"model.num_heads {model.num_heads} is not divisible by parallel.tensor {par.tensor}; "
                          f"valid tensor sizes for {model.num_heads} heads: {_divisors(model.num_heads)}")
        mlp = int(model.hidden_size * model.mlp_ratio)
        if mlp % par.tensor:
            errors.append(f"the MLP width {mlp} (model.hidden_size x mlp_ratio) is not divisible by parallel.tensor "
                          f"{par.tensor}")
        if model.depth < par.pipeline:
            errors.append(f"model.depth {model.depth} < parallel.pipeline {par.pipeline}: every stage needs at least "
                          f"one block; valid pipeline sizes: 1 to {model.depth}")
    if errors:
        raise LayoutError("\n".join(errors))
    data = world // model_parallel
    per_step = par.micro_batch * data
    global_batch = par.global_batch or per_step
    if global_batch % per_step:
        raise LayoutError(
            f"parallel.global_batch {global_batch} is not divisible by parallel.micro_batch x data-parallel ranks = "
            f"{par.micro_batch} x {data} = {per_step}; valid global batches are multiples of {per_step}")
    return Layout(world, par.tensor, par.pipeline, par.micro_batch, global_batch, par.layout, par.sequence)


def sequence_problems(cfg: RunConfig) -> list[str]:
    """Why the run's clips or model cannot be split over parallel.sequence ranks (none: they can). Every bucket's
    latent frames after patchify split into equal parts; dsp also switches to an equal share of the H'W'
    positions, ulysses to an equal share of every tensor rank's heads; full attention needs ulysses."""
    par, model = cfg.parallel, cfg.model
    n = par.sequence
    if cfg.task != "dit":
        return [f"parallel.sequence {n}: sequence parallelism splits the DiT's tokens; task {cfg.task!r} trains "
                "the VAE (set parallel.sequence 1)"]
    problems = []
    if model.attention == "full" and par.sequence_mode == "dsp":
        problems.append("parallel.sequence_mode dsp with model.attention full: dsp keeps spatial attention within "
                        "a rank's frames, which full attention crosses; use sequence_mode: ulysses")
    pt = model.patch_size[0]
    for frames, height, width in cfg.data.buckets:
        T, Hp, Wp = token_grid(frames, height, width, model.patch_size)
        positions = Hp * Wp
        if T % n:
            valid = ", ".join(str(1 + TEMPORAL_FACTOR * (pt * n * k - 1)) for k in (1, 2, 3))
            problems.append(f"bucket {(frames, height, width)} has {T} latent frames after patchify, not divisible by "
                            f"parallel.sequence {n}; frames that split into {n}: {valid}, ... (images cannot be "
                            "split: no 1-frame buckets with sequence parallelism)")
        if par.sequence_mode == "dsp" and positions % n:
            problems.append(f"bucket {(frames, height, width)} has {positions} latent positions (H'W') after "
                            f"patchify, not divisible by parallel.sequence {n} (dsp splits them around temporal "
                            "attention)")
    heads = model.num_heads // max(1, par.tensor)
    if par.sequence_mode == "ulysses" and heads % n:
        problems.append(f"parallel.sequence_mode ulysses splits each tensor rank's {heads} heads (model.num_heads "
                        f"{model.num_heads} / tensor {par.tensor}) over parallel.sequence {n}: not divisible; valid "
                        f"sequence sizes: {_divisors(heads)}")
    return problems
