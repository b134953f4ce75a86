"""Where each rank sits: data x pipeline x tensor parallel sizes from the config and the world size, checked
before any process group exists (the launcher runs the same check before it starts a process).

Rank order follows DeepSpeed's topologies: tensor-parallel ranks are adjacent (rank = ((pipe * data) + dp) *
tensor + tp in the pipeline layout; dp * tensor + tp in the sharded one), so a tensor-parallel group shares a
node. Every tensor-parallel rank of a data-parallel slot reads the same batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from vidiff.config import ConfigError, RunConfig


class LayoutError(ConfigError):
    """A parallel layout that cannot run on this world size or model; the message says what is valid."""


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


@dataclass(frozen=True)
class Layout:
    world: int
    tensor: int
    pipeline: int
    micro_batch: int
    global_batch: int
    kind: str                     # "sharded" | "pipeline" (the rule lives in ParallelConfig.layout)

    @property
    def data(self) -> int:
        """Data-parallel replicas."""
        return self.world // (self.tensor * self.pipeline)

    @property
    def accumulation(self) -> int:
        """Micro-batches per optimizer step on each data-parallel rank."""
        return self.global_batch // (self.micro_batch * self.data)

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """(pipeline stage, data-parallel rank, tensor-parallel rank) of a global rank."""
        tp = rank % self.tensor
        dp = rank // self.tensor % self.data
        return rank // (self.tensor * self.data), dp, tp

    def describe(self) -> str:
        return (f"{self.kind} layout: world {self.world} = data {self.data} x pipeline {self.pipeline} x tensor "
                f"{self.tensor}; global batch {self.global_batch} = micro {self.micro_batch} x data {self.data} x "
                f"accumulation {self.accumulation}")


def make_layout(cfg: RunConfig, world: int) -> Layout:
    """The layout of cfg on `world` ranks; raises LayoutError naming the bad value and what is valid."""
    par, model = cfg.parallel, cfg.model
    errors = []
    model_parallel = par.tensor * par.pipeline
    if world % model_parallel:
        errors.append(f"world size {world} is not divisible by parallel.tensor x parallel.pipeline = {par.tensor} x "
                      f"{par.pipeline} = {model_parallel}; valid world sizes are multiples of {model_parallel}")
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
    return Layout(world, par.tensor, par.pipeline, par.micro_batch, global_batch, par.layout)
