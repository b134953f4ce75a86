"""The pipeline layout: the DiT as a DeepSpeed PipelineModule over a pipe x data x tensor topology, ZeRO <= 1
(DeepSpeed's pipeline engine refuses ZeRO-2/3), explicit tensor-parallel layers (AutoTP does not know stages).

Layers: embed (patches, noise and text conditioning), one layer per DiT block, the final layer; stages get
whole blocks (partition_method type:BlockLayer). Between stages flows the tuple (tokens (B, T', N, D),
c (B, D), context (B, L, D), text mask (B, L) int, token grid (3,) int), all on the stage's device (the engine
sends them over the process group): the pipeline engine sends a gradient back for every float tensor, so c and
context get theirs from every stage that used them. The last stage turns F into the EDM denoiser and the
weighted sum of per-sample losses, from labels (x0, noisy x, sigma, per-sample weight).

Every rank builds the whole DiT from the run seed and keeps its stage's layers (and tensor-parallel slices),
so the initial weights equal a single-process run's.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from vidiff.config import DiTConfig, RunConfig
from vidiff.diffusion.edm import noised, scalings, weighted_error
from vidiff.models.dit import Embed, FinalLayer, block_ropes, unpatchify
from vidiff.parallel.layout import Layout
from vidiff.parallel.tensor import split_block, split_dim


class EmbedLayer(nn.Module):
    """(noisy x, sigma, text, text_mask[, cond, aug]) -> the block inputs, with EDM's c_in and c_noise applied (a
    cascade stage's condition and its augmentation level ride along as the last two inputs)."""

    def __init__(self, embed: Embed, sigma_data: float):
        super().__init__()
        self.embed, self.sigma_data = embed, sigma_data

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x, sigma, text, text_mask, *cond = inputs
        _, _, c_in, c_noise = scalings(sigma, x, self.sigma_data)
        tokens, c, context, mask, grid = self.embed(c_in * x, c_noise, text, text_mask.bool(), *cond)
        return tokens, c, context, mask.long(), torch.tensor(grid, device=x.device)


class BlockLayer(nn.Module):
    """One DiT block (its projections split over the tensor-parallel group when there is one)."""

    def __init__(self, block: nn.Module, cfg: DiTConfig, tp_group, tp_rank: int, tp_size: int):
        super().__init__()
        self.block = split_block(block, tp_group, tp_rank, tp_size) if tp_size > 1 else block
        self.cfg = cfg

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x, c, context, mask, grid = inputs
        rope_s, rope_t = block_ropes(self.cfg, tuple(grid.tolist()), x.shape[0], x.device)
        return self.block(x, c, context, mask.bool(), rope_s, rope_t), c, context, mask, grid


class HeadLayer(nn.Module):
    """The final layer: tokens -> F (B, C, T, H, W)."""

    def __init__(self, final: FinalLayer, patch: tuple[int, int, int]):
        super().__init__()
        self.final, self.patch = final, patch

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, c, _, _, grid = inputs
        return unpatchify(self.final(x, c), tuple(grid.tolist()), self.patch)


def pipeline_loss(F_x: torch.Tensor, labels: tuple[torch.Tensor, ...], sigma_data: float,
                  observe: Callable | None = None) -> torch.Tensor:
    """D = c_skip x + c_out F, then the per-sample EDM losses summed with the trainer's weights (B,) (0 for
    padding; see trainer.sample_weights). observe(sigma, per-sample losses, usable) sees them on the last stage
    (train/loss_by_sigma: observe_losses)."""
    x0, x, sigma, weight = labels
    c_skip, c_out, _, _ = scalings(sigma, x, sigma_data)
    per_sample = weighted_error(c_skip * x + c_out * F_x.to(x.dtype), x0, sigma, sigma_data)      # (B,)
    if observe is not None:
        observe(sigma, per_sample, weight > 0)
    return (per_sample * weight).sum()


def observe_pipeline_losses(engine, observe: Callable) -> None:
    """Have the last stage's loss hand its per-sample losses and sigmas to observe (the engine calls
    module.loss_fn on the last stage only)."""
    engine.module.loss_fn = partial(pipeline_loss, sigma_data=engine.module.loss_fn.keywords["sigma_data"],
                                    observe=observe)


def tensor_group(topology, rank: int):
    """This rank's tensor-parallel group (every rank creates every group, in the same order)."""
    mine = None
    for ranks in topology.get_axis_comm_lists("model"):
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return mine


def build_pipeline_engine(cfg: RunConfig, layout: Layout, build_model, ds_config: dict, make_optimizer):
    import deepspeed
    from deepspeed import checkpointing
    from deepspeed.pipe import LayerSpec, PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    topology = PipeModelDataParallelTopology(num_pp=layout.pipeline, num_mp=layout.tensor, num_dp=layout.data)
    rank = dist.get_rank()
    tp_group = tensor_group(topology, rank)
    tp_rank = layout.coordinates(rank).tensor
    model = build_model()                 # Precond(DiT): the whole model, from the run seed
    dit, sigma_data = model.net, model.sigma_data
    specs = [LayerSpec(EmbedLayer, dit.embed, sigma_data),
             *[LayerSpec(BlockLayer, block, dit.cfg, tp_group, tp_rank, layout.tensor) for block in dit.blocks],
             LayerSpec(HeadLayer, dit.final, dit.cfg.patch_size)]
    # Stage inputs are a tuple with several float tensors: DeepSpeed's default (reentrant) checkpoint breaks
    # on it, the non-reentrant one recomputes exactly. Shapes change between micro-batches (buckets, and an
    # epoch's last partial batch): with dynamic_shape off the stages reuse the first micro-batch's buffers, and a
    # partial batch of 1 arrived in a buffer of 2 (its loss broadcast over a stale row; seen through
    # train/samples_by_sigma).
    module = PipelineModule(specs, topology=topology, loss_fn=partial(pipeline_loss, sigma_data=sigma_data),
                            partition_method="type:BlockLayer",
                            activation_checkpoint_interval=int(cfg.parallel.activation_checkpointing),
                            activation_checkpoint_func=checkpointing.non_reentrant_checkpoint,
                            dynamic_shape=True)
    module.tp_group = tp_group                      # for export: joining the tensor-parallel slices
    module.num_blocks = dit.cfg.depth
    optimizer, schedule = make_optimizer(module.parameters(), cfg.train)
    engine, _, _, schedule = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=schedule,
                                                  config=ds_config)
    return engine, schedule


def pipeline_step(engine, objective, micro_batches: list[dict], seeds: list[list[int]],
                  weights: list[torch.Tensor]) -> torch.Tensor:
    """One optimizer step over the micro-batches through engine.train_batch, each micro-batch's loss the
    weighted sum of its per-sample losses. DeepSpeed averages the micro-batch losses over accumulation and
    data-parallel ranks, so with the trainer's weights the result, on every rank, is the mean loss over the
    usable samples of the global batch."""
    items = []
    for batch, batch_seeds, weight in zip(micro_batches, seeds, weights):
        d = objective.diffusion_inputs(batch, batch_seeds)
        x = noised(d["x0"], d["sigma"], d["noise"])
        cond = (d["cond"]["cond"], d["cond"]["aug"]) if d["cond"] else ()
        items.append(((x, d["sigma"], d["text"], d["text_mask"].long(), *cond), (d["x0"], x, d["sigma"], weight)))
    return engine.train_batch(iter(items))


# ---- export: stage layers and tensor-parallel slices -> one state dict with the DiT's names ----

def dit_name(name: str, depth: int) -> str:
    """'3.block.attn_s.q.weight' (PipelineModule layer 3) -> 'net.blocks.2.attn_s.q.weight' (Precond(DiT))."""
    index, inner = name.split(".", 1)
    index = int(index)
    if index in (0, depth + 1):
        return "net." + inner                       # 'embed.x_embed.weight', 'final.linear.weight'
    return f"net.blocks.{index - 1}." + inner.removeprefix("block.")


def export_pipeline(engine, path: Path, layout: Layout) -> None:
    """Write the whole model's weights to path (every rank calls): tensor-parallel slices are joined within
    each stage, each stage's first rank writes a part, rank 0 merges the parts."""
    rank = dist.get_rank()
    stage, dp, _, tp = layout.coordinates(rank)
    depth = engine.module.num_blocks
    state = {}
    for name, tensor in engine.module.state_dict().items():
        tensor = tensor.detach().float()            # gathered on the device (NCCL moves no CPU tensors)
        dim = split_dim(name)
        if dim is not None and layout.tensor > 1:
            parts = [torch.empty_like(tensor) for _ in range(layout.tensor)]
            dist.all_gather(parts, tensor.contiguous(), group=engine.module.tp_group)
            tensor = torch.cat(parts, dim=dim)
        state[dit_name(name, depth)] = tensor.cpu().contiguous()
    part = path.with_name(f".{path.stem}.stage{stage}.safetensors")
    if dp == 0 and tp == 0:
        save_file(state, str(part))
    dist.barrier()
    if rank == 0:
        merged = {}
        for s in range(layout.pipeline):
            stage_part = path.with_name(f".{path.stem}.stage{s}.safetensors")
            merged.update(load_file(str(stage_part)))
            stage_part.unlink()
        save_file(merged, str(path))
    dist.barrier()
