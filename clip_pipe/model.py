"""Build the dual encoder: an open_clip model, optionally with a Hugging Face text tower.

The model knows nothing of ranks. Its forward returns L2-normalised image and text features plus
`exp(logit_scale)`; the loss does the rest. Every model is described by an open_clip architecture dict
(`model_cfg`, the `model_cfg` of an `open_clip_config.json`), so what we train, export and reload is
always something open_clip itself can build.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import types
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import open_clip
import safetensors.torch
import torch
from open_clip.tokenizer import HFTokenizer, SimpleTokenizer
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from open_clip.transformer import PatchDropout, VisionTransformer
from torch import nn

from clip_pipe.checkpoints import save_file
from clip_pipe.config import LossConfig, ModelConfig
from clip_pipe.data.augment import TrainAugment
from clip_pipe.losses.siglip import INIT_LOGIT_BIAS, INIT_LOGIT_SCALE

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)

# The file names open_clip's `local-dir:` loader looks for.
OPEN_CLIP_CONFIG = "open_clip_config.json"
# Weights in a `local-dir:` folder or `hf-hub:` repo, in the order open_clip prefers them; then our exports'.
WEIGHT_FILES = (
    "open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
    "model.safetensors", "model.pt",
)  # fmt: skip
LOCAL_DIR, HF_HUB = "local-dir:", "hf-hub:"
TRUE_VALUES = {"1", "ON", "YES", "TRUE"}


@dataclass
class DualEncoder:
    """A model plus everything needed to feed it."""

    model: nn.Module
    model_cfg: dict[str, Any]
    preprocess_train: TrainAugment  # uint8 crop per sample, normalised per batch (clip_pipe.data.augment)
    preprocess_val: Any
    tokenizer: Any


def model_cfg_for(cfg: ModelConfig, loss: LossConfig | None = None) -> dict[str, Any]:
    """The open_clip architecture dict that `cfg` asks for, with a logit bias if `loss` needs one."""
    model_cfg = open_clip.get_model_config(cfg.name)
    if model_cfg is None:
        raise ValueError(
            f"unknown model {cfg.name!r}: not an open_clip model name nor one of ours in {MODEL_CONFIG_DIR}. "
            f"Known: {', '.join(open_clip.list_models())}"
        )
    model_cfg = copy.deepcopy(model_cfg)
    if cfg.hf_text_model:
        context_length = cfg.context_length or model_cfg["text_cfg"].get("context_length", 77)
        model_cfg["text_cfg"] = {
            "hf_model_name": cfg.hf_text_model,
            "hf_tokenizer_name": cfg.hf_text_model,
            "hf_proj_type": "mlp",
            "hf_pooler_type": "mean_pooler",
            "context_length": context_length,
        }
        model_cfg["custom_text"] = True
    elif cfg.context_length:
        model_cfg["text_cfg"]["context_length"] = cfg.context_length
    if loss is not None and loss.kind == "siglip" and model_cfg.get("init_logit_bias") is None:
        # As open_clip's own SigLIP configs do: the bias lives in the architecture dict, so the exported
        # open_clip_config.json rebuilds a model with the parameter its weights carry.
        model_cfg.update(init_logit_scale=INIT_LOGIT_SCALE, init_logit_bias=INIT_LOGIT_BIAS)
    return model_cfg


def build_model(cfg: ModelConfig, loss: LossConfig | None = None) -> DualEncoder:
    """The model `cfg` names, with what `loss` needs of it (SigLIP: a learnable logit bias): its weights
    (pretrained, whole or image tower), patch dropout, activation checkpointing and locked towers."""
    encoder = create(model_cfg_for(cfg, loss), hf_pretrained=cfg.hf_pretrained)
    model = encoder.model
    if cfg.pretrained:
        load_weights(model, cfg.pretrained, model_name=cfg.name)
    if cfg.pretrained_image:
        load_image_tower(model, cfg.pretrained_image, model_name=cfg.name)
    if cfg.patch_dropout:
        set_patch_dropout(model, cfg.patch_dropout)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.lock_image:
        lock_image_tower(model, cfg.lock_image_unlocked_groups)
    if cfg.lock_text:
        model.lock_text_tower(unlocked_layers=cfg.lock_text_unlocked_groups)
    keep_frozen_in_eval(model)
    return encoder


def set_patch_dropout(model: nn.Module, prob: float) -> None:
    """Drop `prob` of the image patches in training forward passes (FLIP); 0 turns it off.

    A training setting, not part of the architecture: the exported `open_clip_config.json` leaves it out.
    The module stays in place when turned off, so a compiled graph sees an attribute change, not a new
    module. Its masks come from torch's global generator, which the engine seeds per step and rank.
    """
    visual = model.visual
    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"model.patch_dropout needs a ViT image tower; this one is {type(visual).__name__}")
    if isinstance(visual.patch_dropout, PatchDropout):
        visual.patch_dropout.prob = prob
    elif prob:
        visual.patch_dropout = PatchDropout(prob)


def lock_image_tower(model: nn.Module, num_unlocked_groups: int) -> None:
    """Freeze the image tower but its top `num_unlocked_groups` layer groups (open_clip's grouping)."""
    visual = model.visual
    if isinstance(visual, VisionTransformer):
        # open_clip's groups: the patch embedding with ln_pre, each block but the last, the last block with
        # ln_post, and the projection. Unlocking all of them would lock nothing.
        num_groups = len(visual.transformer.resblocks) + 2
        if num_unlocked_groups >= num_groups:
            raise ValueError(
                f"model.lock_image_unlocked_groups={num_unlocked_groups} leaves every one of this image "
                f"tower's {num_groups} groups trainable, so nothing is locked; use at most {num_groups - 1}"
            )
    elif num_unlocked_groups:
        raise ValueError(
            f"model.lock_image_unlocked_groups works for ViT image towers; this one is {type(visual).__name__}"
        )
    model.lock_image_tower(unlocked_groups=num_unlocked_groups)


def _stay_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def keep_frozen_in_eval(model: nn.Module) -> None:
    """Put the frozen parts of `model` in eval mode for good: `model.train()` (the engine calls it every
    step) leaves them there.

    A frozen part must compute what its pretrained weights were trained to compute: its batch norm keeps
    its running statistics rather than the batch's (and never updates them), its dropout stays off. Each
    frozen part's own `train` is replaced, since `nn.Module.train` calls each child's `train`.
    """
    for module in frozen_modules(model):
        module.train = types.MethodType(_stay_in_eval, module)
        module.eval()


def frozen_modules(module: nn.Module) -> Iterator[nn.Module]:
    """The largest submodules that hold parameters, none of them trainable."""
    for child in module.children():
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params):
            yield child
        else:
            yield from frozen_modules(child)


def create(model_cfg: dict[str, Any], hf_pretrained: bool = False) -> DualEncoder:
    """Instantiate an open_clip model from its architecture dict, with random weights."""
    model_cfg = copy.deepcopy(model_cfg)
    extra_preprocess = model_cfg.pop("preprocess_cfg", {})
    if "multimodal_cfg" in model_cfg:
        raise ValueError("CoCa-style models (multimodal_cfg) are not supported; pick a CLIP model")
    text_cfg = model_cfg["text_cfg"]
    is_custom_text = model_cfg.get("custom_text", False) or "hf_model_name" in text_cfg
    build_cfg = {k: v for k, v in model_cfg.items() if k != "custom_text"}
    if "hf_model_name" in text_cfg:
        build_cfg["text_cfg"] = {**text_cfg, "hf_model_pretrained": hf_pretrained}
    model_class = open_clip.CustomTextCLIP if is_custom_text else open_clip.CLIP
    # DeepSpeed cannot broadcast 0-dim parameters, so logit_scale (and logit_bias, for models that have
    # one) is shape (1,) while we train; `export_state_dict` gives them back their 0-dim shape for open_clip.
    model = model_class(**build_cfg, nonscalar_logit_scale=True)

    preprocess_cfg = merge_preprocess_dict(
        asdict(PreprocessCfg(size=model_cfg["vision_cfg"].get("image_size", 224))),
        extra_preprocess,
    )
    open_clip.model.set_model_preprocess_cfg(model, preprocess_cfg)
    pp = PreprocessCfg(**preprocess_cfg)
    return DualEncoder(
        model=model,
        model_cfg=model_cfg,
        preprocess_train=TrainAugment.from_preprocess_cfg(pp),
        preprocess_val=image_transform_v2(pp, is_train=False),
        tokenizer=build_tokenizer(model_cfg),
    )


IMAGE_SSL_HEAD = "image_ssl_head"


def add_image_ssl_head(encoder: DualEncoder) -> None:
    """Give the model the image–image term's projection head, as submodule `image_ssl_head`.

    As a submodule it is trained, checkpointed and partitioned (ZeRO-3) with the rest of the model;
    the exported open_clip state dict leaves it out (`to_export`), since open_clip has no place for it.
    SLIP's head is Linear–BN–ReLU–Linear–BN–ReLU–Linear; BatchNorm would need statistics synchronised
    across ranks and micro-batches, so this one normalises per sample (LayerNorm) instead.
    """
    embed_dim = encoder.model_cfg["embed_dim"]
    head = nn.Sequential(
        nn.Linear(embed_dim, 4 * embed_dim), nn.LayerNorm(4 * embed_dim), nn.GELU(),
        nn.Linear(4 * embed_dim, embed_dim),
    )  # fmt: skip
    encoder.model.add_module(IMAGE_SSL_HEAD, head)


def build_tokenizer(model_cfg: dict[str, Any]):
    text_cfg = model_cfg["text_cfg"]
    context_length = text_cfg.get("context_length", 77)
    if "hf_tokenizer_name" in text_cfg:
        return HFTokenizer(
            text_cfg["hf_tokenizer_name"],
            context_length=context_length,
            **text_cfg.get("tokenizer_kwargs", {}),
        )
    return SimpleTokenizer(context_length=context_length)


def load_weights(model: nn.Module, source: str, model_name: str | None = None) -> None:
    """Load a whole open_clip checkpoint into `model` (see `resolve_weights` for what `source` can be)."""
    path = resolve_weights(source, model_name)
    # open_clip's loader reads .safetensors, or pickles with weights_only=True, converts third-party
    # layouts, and reshapes a 0-dim logit_scale to ours.
    try:
        open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
    # truncated, foreign or mismatched
    except (RuntimeError, EOFError, pickle.UnpicklingError, safetensors.SafetensorError) as e:
        raise ValueError(f"cannot load weights from {path}: {_first_reason(e)}") from None


def load_image_tower(model: nn.Module, source: str, model_name: str | None = None) -> None:
    """Load the image tower's weights alone: the `visual.*` entries of a whole checkpoint, or a checkpoint
    of the image tower by itself."""
    path = resolve_weights(source, model_name)
    try:
        state = open_clip.factory.load_state_dict(str(path), weights_only=True)
        visual = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
        model.visual.load_state_dict(visual or state, strict=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, safetensors.SafetensorError) as e:
        raise ValueError(f"cannot load image tower weights from {path}: {_first_reason(e)}") from None


def _first_reason(error: Exception) -> str:
    # torch's load_state_dict error is a header line, then one line per kind of mismatch.
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else lines[0]
    return reason if len(reason) <= 300 else reason[:300] + " ..."


def resolve_weights(source: str, model_name: str | None = None) -> Path:
    """The local file of the weights `source` names, fetching nothing while HF_HUB_OFFLINE is set:

    - a file: a state dict (`.safetensors`, or a weights-only pickle);
    - `local-dir:FOLDER`: an open_clip hub folder (`open_clip_model.safetensors`, ...) or our export;
    - `hf-hub:ORG/REPO`: that open_clip repo from the Hugging Face cache (downloaded when online);
    - a pretrained tag of `model_name` (`openai`, `laion2b_s34b_b79k`, ...), which names such a repo.
    """
    if source.startswith(LOCAL_DIR):
        folder = Path(source.removeprefix(LOCAL_DIR))
        if not folder.is_dir():
            raise ValueError(f"pretrained weights {source!r}: no such folder")
        for name in WEIGHT_FILES:
            if (folder / name).is_file():
                return folder / name
        raise ValueError(f"pretrained weights {source!r}: the folder holds none of {', '.join(WEIGHT_FILES)}")
    if source.startswith(HF_HUB):
        return _from_hub(source, source.removeprefix(HF_HUB).strip("/"), None)
    path = Path(source)
    if path.is_file():
        return path
    tag_cfg = open_clip.get_pretrained_cfg(model_name, source) if model_name else None
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name) if model_name else []
        raise ValueError(
            f"pretrained weights {source!r}: no such file, nor a `local-dir:` or `hf-hub:` source, nor a "
            f"pretrained tag of {model_name!r} (its tags: {', '.join(tags) or 'none'})"
        )
    # Every open_clip tag names a hub repo, as 'org/repo/' (the default file) or 'org/repo/file'.
    repo_id, filename = os.path.split(tag_cfg["hf_hub"])
    return _from_hub(f"{model_name} pretrained={source} (hf-hub:{repo_id})", repo_id, filename or None)


def _from_hub(what: str, repo_id: str, filename: str | None) -> Path:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, OfflineModeIsEnabled

    candidates = [filename] if filename else list(WEIGHT_FILES[:3])
    # As huggingface_hub reads the variable, but at call time: it may be set after the import.
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in TRUE_VALUES
    # The cache first, for every candidate: online, a missing first choice must not cost a network round
    # trip when a later one is cached. Offline, nothing else is tried.
    for local_only in (True,) if offline else (True, False):
        for name in candidates:
            try:
                return Path(hf_hub_download(repo_id, name, local_files_only=local_only))
            except (EntryNotFoundError, OfflineModeIsEnabled):  # not cached, or not in the repo
                continue
            except (OSError, ValueError) as e:  # no such repo, a bad repo id, a network failure
                raise ValueError(f"pretrained weights {what}: {_first_reason(e)}") from None
    where = f"the Hugging Face cache ({constants.HF_HUB_CACHE})"
    if offline:
        raise ValueError(
            f"pretrained weights {what}: not in {where}, and HF_HUB_OFFLINE is set, so nothing is downloaded. "
            f"Fetch it where there is a network (`hf download {repo_id}`) and copy the cache, or name a file"
        )
    raise ValueError(
        f"pretrained weights {what}: none of {', '.join(candidates)} found in {where} or on the hub"
    )


def export_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A plain fp32 CPU state dict in open_clip's own layout (0-dim logit_scale and logit_bias)."""
    return to_export(model.state_dict())


def to_export(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (a model's state dict, ours or DeepSpeed's gathered one) as plain fp32 CPU tensors, with
    open_clip's keys only."""
    state = {
        k: v.detach().to("cpu", torch.float32).clone()
        for k, v in state.items()
        if not k.startswith(f"{IMAGE_SSL_HEAD}.")  # training-only: not part of the open_clip model
    }
    for key in ("logit_scale", "logit_bias"):
        if key in state:
            state[key] = state[key].reshape(())
    return state


def save_export(
    model: nn.Module,
    model_cfg: dict,
    out_dir: Path,
    filename: str = "model.safetensors",
    state: dict | None = None,
) -> Path:
    """Write the weights plus `open_clip_config.json` beside them, so the folder describes itself.

    A `.safetensors` file name (the default) writes safetensors, which loads without unpickling
    anything; any other name a `torch.save` pickle. `state`: the weights to write, if not `model`'s own
    (e.g. gathered from ZeRO-3 partitions).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / filename
    tmp = path.with_name(path.name + ".tmp")
    weights = export_state_dict(model) if state is None else state
    # Both writers end in a plain file write, so a full disk is the OSError (ENOSPC) that says so.
    if path.suffix == ".safetensors":
        tmp.write_bytes(safetensors.torch.save(weights, metadata={"format": "pt"}))
    else:
        save_file(weights, tmp)
    tmp.replace(path)  # atomic: a reader never sees half a file
    config = {"model_cfg": model_cfg, "preprocess_cfg": model.visual.preprocess_cfg}
    (out_dir / OPEN_CLIP_CONFIG).write_text(json.dumps(config, indent=2))
    return path


def load_export(path: str | Path) -> DualEncoder:
    """Rebuild a model from weights (`model.safetensors`, `model.pt`) with `open_clip_config.json` beside them."""
    path = Path(path)
    config_path = path.parent / OPEN_CLIP_CONFIG
    if not path.is_file():
        raise ValueError(f"checkpoint not found: {path}")
    if not config_path.is_file():
        raise ValueError(f"{path} has no {OPEN_CLIP_CONFIG} beside it, so its architecture is unknown")
    config = json.loads(config_path.read_text())
    model_cfg = {**config["model_cfg"], "preprocess_cfg": config.get("preprocess_cfg", {})}
    encoder = create(model_cfg)
    load_weights(encoder.model, str(path))
    return encoder
