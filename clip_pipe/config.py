"""One typed config tree for a training run.

A run is described by a YAML file (see `configs/`) plus dotted command-line overrides such as
`optim.lr=3e-4`. Both go through `load_config`, which builds the dataclasses below field by field:
unknown keys and values of the wrong type are `ValueError`s that name the key, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml


@dataclass
class SourceConfig:
    """One weighted source of training shards: an entry of `data.sources`."""

    train: list[str] = field(default_factory=list)
    """Its shards, as `data.train` takes them."""
    weight: float = 1.0
    """Its share of every global batch is weight / (the sum of the weights), in whole samples (largest
    remainder: within one sample of the exact share, the same count every step)."""
    num_samples: int | None = None
    """Its number of samples, for shards with no count files (as `data.num_samples`)."""

    def __post_init__(self):
        if isinstance(self.train, str):
            self.train = [self.train]
        _check(bool(self.train), "each entry of data.sources needs train: [shard sets]")
        _check(self.weight > 0, f"data.sources: weight must be > 0, got {self.weight}")
        _check(self.num_samples is None or self.num_samples >= 1, "data.sources: num_samples must be >= 1")


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)
    """Training shards: folders (`sizes.json` names their shards, else every *.tar), shard URLs with brace
    patterns (`/data/laion/{00000..00041}.tar`), `s3://`, `gs://`, `http(s)://`, `file://` or `pipe:COMMAND`,
    several joined with `::` or given as a list (open_clip's `--train-data`). Sample counts come from
    `sizes.json`, else img2dataset's `<shard>_stats.json`, else `num_samples`. One source; for a weighted
    mix of several, use `sources` instead."""
    sources: list[SourceConfig] = field(default_factory=list)
    """A weighted mix: [{train: [...], weight: 0.7}, {train: [...], weight: 0.3}]. Each source keeps
    its own epochs and streams; every global batch holds the same whole number of samples of each."""
    num_samples: int | None = None
    """The number of training samples, for shards with neither a `sizes.json` nor `*_stats.json` beside
    them (open_clip's `--train-num-samples`); spread evenly over them."""
    counts_file: str | None = None
    """A JSON file of {shard URL: samples}, as `clip-pipe count-shards --out FILE` writes it: counts
    taken before any sizes.json or *_stats.json is read, for shards in a bucket you cannot write to
    (without it, every rank reads one count file per shard at start-up)."""
    batch_size: int = 64
    """Samples per rank per optimizer step. The global batch (and the loss's negatives) is this × world
    size, however many micro-batches `optim.accum_steps` splits it into."""
    num_workers: int = 1
    """Loader processes per rank, each filling its part of every batch (0: a thread of the rank). They
    share the rank's cores, so more is not always faster."""
    shuffle_buffer: int = 1000
    """Samples held for shuffling, over all streams together: each stream shuffles blocks of
    shuffle_buffer / streams consecutive samples of its range (0: read in shard order)."""
    num_streams: int = 0
    """Streams the data is read in, split over the sources by weight; 0: 64, and at most one per four
    shards of a source (a stream mostly starts inside a shard and reads its first part unused). Fixed
    for a run (a resumed run keeps its checkpoint's), whatever the ranks and workers: each loader slot
    reads the streams that reach its part of the batch, so with more slots than streams slots share
    streams, reading their shards twice or more. Set it to at least the largest ranks × workers the run
    will use."""
    resampled: bool = False
    """Draw each stream's shards with replacement (open_clip's --dataset-resampled) instead of epochs
    that read every sample exactly once."""
    seed: int = 0
    """Seeds the shard order, the shuffle and the augmentation."""
    cache_dir: str | None = None
    """Keep copies of remote shards here (local disk; shared by the ranks and workers of a node)."""
    cache_limit: str | None = None
    """The cache's size limit, such as `500GB` or `1.5TiB` (none: up to 95% of the disk). When the data
    are larger, the first shards to arrive stay cached and the rest stream past: no thrashing."""
    num_fetches: int = 8
    """Byte-range requests in flight per loader worker for remote shards (8 MiB each): the shards being
    read and the next ones, so that latency and per-connection bandwidth do not stall the loader."""
    timeout_s: float = 30.0
    """A remote request fails (and is retried, with backoff) when its connection is silent this long."""

    def __post_init__(self):
        if isinstance(self.train, str):
            self.train = [self.train]
        _check(not (self.train and self.sources), "give data.train (one source) or data.sources, not both")
        _check(self.batch_size >= 1, "data.batch_size must be >= 1")
        _check(self.num_workers >= 0, "data.num_workers must be >= 0")
        _check(self.shuffle_buffer >= 0, "data.shuffle_buffer must be >= 0")
        _check(self.num_streams >= 0, "data.num_streams must be >= 0 (0: automatic)")
        _check(self.num_samples is None or self.num_samples >= 1, "data.num_samples must be >= 1")
        _check(self.num_fetches >= 1, "data.num_fetches must be >= 1")
        _check(self.timeout_s > 0, "data.timeout_s must be > 0")
        if self.cache_limit is not None:
            _check(self.cache_dir is not None, "data.cache_limit needs data.cache_dir")
            self.cache_limit_bytes  # noqa: B018 (a ValueError naming the key)

    @property
    def source_list(self) -> list[SourceConfig]:
        """`sources`, or `train` as the one source."""
        return self.sources or [SourceConfig(self.train, num_samples=self.num_samples)]

    @property
    def cache_limit_bytes(self) -> int | None:
        """`cache_limit` in bytes: '500GB', '1.5TiB', '200 MB', '123456'."""
        if self.cache_limit is None:
            return None
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgtp]?)(i?)b?\s*", str(self.cache_limit).lower())
        if match is None:
            raise ValueError(f"data.cache_limit: {self.cache_limit!r} is not a size such as 500GB or 1.5TiB")
        number, prefix, binary = match.groups()
        return int(float(number) * (1024 if binary else 1000) ** "_kmgtp".index(prefix or "_"))


@dataclass
class ModelConfig:
    name: str = "clip-pipe-test"
    """An open_clip model name (`ViT-B-32`, ...) or one shipped in `clip_pipe/model_configs/`."""
    hf_text_model: str | None = None
    """Replace the text tower by a Hugging Face model (hub id or local folder with config + tokenizer)."""
    hf_pretrained: bool = False
    """Load the Hugging Face tower's pretrained weights (False: random init from its config)."""
    context_length: int | None = None
    """Override the tokenizer's context length."""
    pretrained: str | None = None
    """Start the whole model from these weights: a state dict file (`.safetensors`, `.pt`, `.bin`), a folder
    `local-dir:PATH` (an open_clip hub folder, or our export), `hf-hub:ORG/REPO`, or a pretrained tag of
    `name` (`laion2b_s34b_b79k`, ...). Hub weights come from the local Hugging Face cache; with HF_HUB_OFFLINE
    set and the weights missing, the run stops with one line saying so."""
    pretrained_image: str | None = None
    """Start the image tower alone from the `visual.*` weights of such a checkpoint (any of the forms above);
    the text tower stays as built (random, or `hf_text_model` with `hf_pretrained`). LiT's usual start."""
    patch_dropout: float = 0.0
    """Fraction of image patches dropped at random in each training forward pass (FLIP); evaluation always
    sees every patch. ViT image towers only. See `optim.tune_steps` for the unmasked tune at the end."""
    grad_checkpointing: bool = False
    """Activation checkpointing of both towers' transformer blocks: each block's activations are recomputed in
    the backward pass instead of kept, for a much larger batch per device at the cost of one more forward."""
    lock_image: bool = False
    """Freeze the image tower (LiT): no gradients, no optimizer state, and its frozen parts run in eval mode."""
    lock_image_unlocked_groups: int = 0
    """With `lock_image`, leave the top N layer groups of the image tower trainable (for a ViT: the projection,
    the last block with the final norm, then one block per group)."""
    lock_text: bool = False
    """Freeze the text tower as `lock_image` does the image tower: token embedding, transformer, final norm and
    projection (a Hugging Face tower: its transformer; its projection head stays trainable)."""
    lock_text_unlocked_groups: int = 0
    """With `lock_text`, leave the top N groups trainable: the projection, the last block with the final norm,
    then one block per group (a Hugging Face tower: its top N layers)."""

    def __post_init__(self):
        _check(0 <= self.patch_dropout < 1, "model.patch_dropout must be in [0, 1)")
        _check(self.lock_image_unlocked_groups >= 0, "model.lock_image_unlocked_groups must be >= 0")
        _check(self.lock_text_unlocked_groups >= 0, "model.lock_text_unlocked_groups must be >= 0")
        _check(
            self.lock_image or not self.lock_image_unlocked_groups,
            "model.lock_image_unlocked_groups needs model.lock_image: true",
        )
        _check(
            self.lock_text or not self.lock_text_unlocked_groups,
            "model.lock_text_unlocked_groups needs model.lock_text: true",
        )
        # A wholly locked tower runs in eval mode, where patch dropout is off: the setting would do nothing.
        _check(
            not (self.patch_dropout and self.lock_image and not self.lock_image_unlocked_groups),
            "model.patch_dropout does nothing on a wholly locked image tower (it runs in eval mode); "
            "set model.lock_image_unlocked_groups >= 1 or model.patch_dropout=0",
        )


@dataclass
class OptimConfig:
    lr: float = 5e-4
    """Peak learning rate, reached after warmup."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 100
    schedule: str = "cosine"
    """`cosine` (linear warmup, cosine decay to min_lr) or `constant` (linear warmup, then flat)."""
    weight_decay: float = 0.2
    """Decoupled weight decay on matrices; biases, norms and the logit scale are never decayed."""
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables. Always explicit: DeepSpeed defaults to 1.0."""
    tune_steps: int = 0
    """FLIP's unmasked tune: the last N of `run.steps` train with `model.patch_dropout` off, their learning
    rate restarted at `tune_lr` and decayed (cosine or flat, as `schedule`) to min_lr. The main schedule
    ends where the tune begins. Needs model.patch_dropout > 0."""
    tune_lr: float | None = None
    """Peak learning rate of the unmasked tune; default `lr` / 100 (FLIP tuned at about a hundredth)."""
    accum_steps: int = 1
    """Split each rank's batch into this many micro-batches when it does not fit in memory at once. The
    gradient stays that of the whole global batch, negatives included (features are cached across
    micro-batches, as open_clip's `accum_freq`), at the cost of one extra forward pass without gradients."""

    def __post_init__(self):
        _check(self.lr > 0, "optim.lr must be > 0")
        _check(0 <= self.min_lr <= self.lr, "optim.min_lr must be in [0, optim.lr]")
        _check(self.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
        _check(self.schedule in ("cosine", "constant"), "optim.schedule must be 'cosine' or 'constant'")
        _check(self.weight_decay >= 0, "optim.weight_decay must be >= 0")
        _check(self.grad_clip >= 0, "optim.grad_clip must be >= 0 (0 disables clipping)")
        _check(self.accum_steps >= 1, "optim.accum_steps must be >= 1")
        _check(self.tune_steps >= 0, "optim.tune_steps must be >= 0")
        _check(self.tune_lr is None or self.tune_lr > 0, "optim.tune_lr must be > 0")


@dataclass
class ImageSslConfig:
    """The image–image term's views, head and temperature (used only when `loss.image_ssl_weight` > 0).

    The augmentations default to SimCLR's at the model's image size: a random resized crop, a flip,
    colour jitter, grayscale and a Gaussian blur whose kernel is about a tenth of the image side.
    """

    temperature: float = 0.1
    """NT-Xent temperature (fixed, not learned; 0.1 as in SLIP)."""
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    """[min, max] area fraction of the random resized crop."""
    flip_p: float = 0.5
    """Probability of a horizontal flip."""
    color_jitter: float = 0.4
    """Brightness, contrast and saturation jitter (hue gets a quarter of it); 0 disables."""
    color_jitter_p: float = 0.8
    """Probability that the colour jitter applies."""
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    """Probability of a Gaussian blur (sigma drawn from [0.1, 2.0])."""

    def __post_init__(self):
        _check(
            len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
            "loss.image_ssl.crop_scale must be [min, max] with 0 < min <= max <= 1",
        )
        _check(self.temperature > 0, "loss.image_ssl.temperature must be > 0")
        _check(self.color_jitter >= 0, "loss.image_ssl.color_jitter must be >= 0")
        for name in ("flip_p", "color_jitter_p", "grayscale_p", "blur_p"):
            _check(0 <= getattr(self, name) <= 1, f"loss.image_ssl.{name} must be in [0, 1]")


@dataclass
class LossConfig:
    kind: Literal["infonce", "siglip"] = "infonce"
    """`infonce`: CLIP's symmetric softmax cross-entropy over the global batch. `siglip`: SigLIP's pairwise
    sigmoid loss; the model then gets a learnable logit bias (initialised to -10, the scale to 10, as in
    the paper). Both take their negatives from every rank."""
    tile_size: int = 1024
    """The loss computes its logits in blocks of tile_size x tile_size, so its memory grows with
    batch_size x tile_size rather than batch_size x global batch. Larger blocks use the hardware better."""

    image_ssl_weight: float = 0.0
    """Weight of the image–image contrastive term (SLIP): two augmented views of each image, an MLP
    head, NT-Xent over the global batch, added to the image–text loss times this. 0 turns it off (no
    second views are decoded, no head is built)."""
    image_ssl: ImageSslConfig = field(default_factory=ImageSslConfig)

    def __post_init__(self):
        kinds = typing.get_args(typing.get_type_hints(LossConfig)["kind"])
        _check(self.kind in kinds, f"loss.kind must be one of {list(kinds)}, got {self.kind!r}")
        _check(self.tile_size >= 1, "loss.tile_size must be >= 1")
        _check(self.image_ssl_weight >= 0, "loss.image_ssl_weight must be >= 0")


@dataclass
class EvalConfig:
    sets: list[str] = field(default_factory=list)
    """Zero-shot classification sets in CLIP_benchmark's WebDataset layout (`data_prep/make_eval_set.py`)."""
    retrieval_sets: list[str] = field(default_factory=list)
    """Image-text retrieval sets: held-out folders written by `data_prep/make_shards.py` (several captions
    per image grouped by `--group-col`, or by identical images), or CLIP_benchmark retrieval sets."""
    linear_probe_train: str | None = None
    """A labelled set (a make_shards.py folder written with `--label-col`, or a CLIP_benchmark set) to fit
    a linear probe on frozen image features; it is scored on every eval set with labels."""
    batch_size: int = 256
    """Images per rank per forward pass during evaluation."""
    every_steps: int = 0
    """Also evaluate every N steps (0: only at the end, which always happens)."""

    def __post_init__(self):
        if isinstance(self.sets, str):
            self.sets = [self.sets]
        if isinstance(self.retrieval_sets, str):
            self.retrieval_sets = [self.retrieval_sets]
        _check(self.batch_size >= 1, "eval.batch_size must be >= 1")
        _check(self.every_steps >= 0, "eval.every_steps must be >= 0")


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs/{name}"
    """Run directory; `{name}` is replaced by `run.name`."""
    steps: int = 100
    """Optimizer steps to train for."""
    precision: str = "fp32"
    """`fp32` or `bf16` (DeepSpeed's bf16 mode: bf16 weights and activations, fp32 master weights)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage (0-3). Stage 3 partitions the parameters too; evaluation and export gather them."""
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    """Save a resumable checkpoint every N steps (and always at the end)."""
    keep_checkpoints: int = 2
    """Keep only the newest N checkpoints (0 keeps all)."""
    threads_per_rank: int = 0
    """torch intra-op threads per rank; 0 splits the machine's cores evenly between local ranks."""
    deepspeed_config: str | None = None
    """A DeepSpeed JSON merged over the one generated from this config, for deliberate overrides."""
    report_to: list[Literal["tensorboard"]] = field(default_factory=list)
    """Also log the training curves and eval metrics there (rank 0): `tensorboard` writes RUN/tb/."""
    compile: bool = False
    """torch.compile the model (inductor; on a CPU it needs a C++ compiler). The first steps pay for the
    compilation; see docs/benchmarks.md for when it pays back."""
    collective_timeout_s: int = 1800
    """How long a collective waits for the other ranks: when a rank dies, the others fail (non-zero exit,
    resumable with `--resume latest`) after this long instead of hanging."""

    def __post_init__(self):
        _check(self.steps >= 1, "run.steps must be >= 1")
        _check(self.precision in ("fp32", "bf16"), "run.precision must be 'fp32' or 'bf16'")
        _check(self.zero_stage in (0, 1, 2, 3), "run.zero_stage must be 0, 1, 2 or 3")
        _check(self.log_every >= 1, "run.log_every must be >= 1")
        _check(self.checkpoint_every >= 1, "run.checkpoint_every must be >= 1")
        _check(self.keep_checkpoints >= 0, "run.keep_checkpoints must be >= 0")
        _check(self.threads_per_rank >= 0, "run.threads_per_rank must be >= 0")
        _check(self.collective_timeout_s >= 1, "run.collective_timeout_s must be >= 1")

    @property
    def dir(self) -> Path:
        return Path(self.out_dir.format(name=self.name))


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        _check(
            bool(self.data.train or self.data.sources),
            "data.train (or data.sources) must name at least one shard folder",
        )
        _check(
            self.data.num_workers <= self.data.batch_size,
            f"data.num_workers ({self.data.num_workers}) must be at most data.batch_size "
            f"({self.data.batch_size}): each worker fills its own part of every batch",
        )
        _check(
            self.data.batch_size % self.optim.accum_steps == 0,
            f"data.batch_size ({self.data.batch_size}) must be a multiple of optim.accum_steps "
            f"({self.optim.accum_steps}): each micro-batch has batch_size / accum_steps samples",
        )
        if self.optim.tune_steps:
            _check(
                self.model.patch_dropout > 0,
                "optim.tune_steps is the unmasked tune after training with patch dropout: "
                "set model.patch_dropout > 0 too, or optim.tune_steps=0",
            )
            _check(
                self.optim.tune_steps < self.run.steps,
                f"optim.tune_steps ({self.optim.tune_steps}) must be less than run.steps ({self.run.steps})",
            )


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Build a `TrainConfig` from a YAML file and `key.sub=value` overrides (applied in order)."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"config file {path} must hold a mapping at the top level")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        _set_dotted(raw, key.strip(), yaml.safe_load(value) if value.strip() else None)
    return from_dict(TrainConfig, raw)


def _set_dotted(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for name in parents:
        node = tree.setdefault(name, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted!r}: {name!r} is not a section")
        tree = node
    tree[leaf] = value


def from_dict(cls, raw: dict, prefix: str = ""):
    """Build dataclass `cls` from a plain dict, checking every key and value type."""
    if not isinstance(raw, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ValueError(f"unknown config key '{prefix}{key}'{hint}; valid keys: {sorted(fields)}")
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(value, hint, key: str):
    """Return `value` as type `hint`, or raise a ValueError naming `key`."""
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, f"{key}.")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"config key {key!r} must be one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is list:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise ValueError(f"config key {key!r} expects a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(items)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" as a string; accept it as the number it plainly is.
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ValueError(f"config key {key!r} expects {hint.__name__}, got {value!r}")
    return value


def save_config(cfg: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
