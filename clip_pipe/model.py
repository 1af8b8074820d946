"""Build the dual encoder: an open_clip model, optionally with a Hugging Face text tower.

The model knows nothing of ranks. Its forward returns L2-normalised image and text features plus
`exp(logit_scale)`; the loss does the rest. Every model is described by an open_clip architecture dict
(`model_cfg`, the `model_cfg` of an `open_clip_config.json`), so what we train, export and reload is
always something open_clip itself can build.
"""

from __future__ import annotations

import copy
import json
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import open_clip
import safetensors.torch
import torch
from open_clip.tokenizer import HFTokenizer, SimpleTokenizer
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from torch import nn

from clip_pipe.checkpoints import save_file
from clip_pipe.config import LossConfig, ModelConfig
from clip_pipe.data.augment import TrainAugment
from clip_pipe.losses.siglip import INIT_LOGIT_BIAS, INIT_LOGIT_SCALE

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)

# The file names open_clip's `local-dir:` loader looks for.
OPEN_CLIP_CONFIG = "open_clip_config.json"


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
    """The model `cfg` names, with what `loss` needs of it (SigLIP: a learnable logit bias)."""
    encoder = create(model_cfg_for(cfg, loss), hf_pretrained=cfg.hf_pretrained)
    if cfg.pretrained:
        load_weights(encoder.model, cfg.pretrained, model_name=cfg.name)
    return encoder


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
    """Load an open_clip state dict file (or an open_clip pretrained tag) into `model`."""
    path = Path(source)
    if not path.is_file():
        tag_cfg = open_clip.get_pretrained_cfg(model_name, source) if model_name else None
        if not tag_cfg:
            raise ValueError(
                f"pretrained weights {source!r}: no such file, nor a pretrained tag of {model_name!r}"
            )
        path = Path(open_clip.download_pretrained(tag_cfg))
    # open_clip's loader reads .safetensors, or pickles with weights_only=True, and reshapes a 0-dim
    # logit_scale to ours.
    try:
        open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
    # truncated, foreign or mismatched
    except (RuntimeError, EOFError, pickle.UnpicklingError, safetensors.SafetensorError) as e:
        raise ValueError(f"cannot load weights from {path}: {str(e).splitlines()[0]}") from None


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
