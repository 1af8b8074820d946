"""What the planner knows of a model: its towers' shapes, exact parameter counts, and FLOPs per sample.

Parameters are counted on the real module, built by open_clip on the meta device (no memory, no
weights), so the count is exact for any config open_clip can build. FLOPs and activations are
analytic, and only for the towers whose every op the formulas name: open_clip's own ViT image tower
(patch embedding, default residual attention blocks) and its text transformer. ResNet, timm,
Hugging Face and custom-block towers are refused with a one-line reason rather than guessed at.

FLOPs count multiply-adds as 2, and only matrix products, convolutions and attention (what
`torch.utils.flop_counter.FlopCounterMode` counts; norms, activations and softmax are memory-bound
and left out, as in every MFU figure).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any

import open_clip
import torch

from clip_pipe.config import ModelConfig
from clip_pipe.model import model_cfg_for

# Config keys that switch open_clip to blocks or pooling the formulas do not describe.
_CUSTOM_BLOCK_KEYS = (
    "qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc",
    "attentional_pool", "block_type",
)  # fmt: skip


@dataclass(frozen=True)
class Tower:
    """One transformer tower as the formulas see it. Counts are per sample."""

    name: str  # "image" or "text"
    num_layers: int
    width: int
    num_heads: int
    mlp_width: int
    num_tokens: int  # tokens through the blocks: patches (after dropout) + class token, or the context length
    num_params: int
    num_layer_params: int  # one residual block's
    embed_dim: int  # the projection's output
    quick_gelu: bool = False  # x * sigmoid(1.702 x): one more saved tensor than GELU
    layer_scale: bool = False  # LayerScale after each branch: saves the branch output
    # image tower only
    num_patches: int = 0  # before patch dropout
    patch_pixels: int = 0  # 3 * patch_size²
    num_pixels: int = 0  # 3 * H * W: what the patch convolution saves
    ln_pre: bool = True
    # pooling: "tok" / "avg" (image), "argmax" / "eos" / "first" / "last" (text)
    pool: str = "tok"
    final_ln_after_pool: bool = False

    def with_tokens(self, num_tokens: int) -> Tower:
        return replace(self, num_tokens=num_tokens)


@dataclass(frozen=True)
class Architecture:
    name: str
    image: Tower
    text: Tower
    embed_dim: int
    num_params: int  # everything, logit scale included
    num_token_embedding: int  # vocab × width: the rows a batch uses are few (see engine.py)


def model_cfg(name: str, image_size: int | None = None, context_length: int | None = None) -> dict[str, Any]:
    """The open_clip architecture dict of `name` (open_clip's or clip-pipe's), with overrides."""
    cfg = copy.deepcopy(model_cfg_for(ModelConfig(name=name, context_length=context_length)))
    if image_size is not None:
        cfg["vision_cfg"]["image_size"] = image_size
    return cfg


def architecture(name: str, cfg: dict[str, Any] | None = None) -> Architecture:
    """Towers and exact parameter counts of the model `cfg` describes (default: the config named `name`)."""
    cfg = model_cfg(name) if cfg is None else cfg
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    _check_supported(name, cfg)
    model = _meta_model(cfg)
    visual, transformer = model.visual, model.transformer
    num_params = sum(p.numel() for p in model.parameters())
    num_image = sum(p.numel() for p in visual.parameters())
    embed_dim = cfg["embed_dim"]
    image_size = _pair(vision.get("image_size", 224))
    patch = _pair(vision.get("patch_size", 16))
    grid = (image_size[0] // patch[0], image_size[1] // patch[1])
    quick_gelu = bool(cfg.get("quick_gelu", False))
    image = Tower(
        name="image",
        num_layers=len(visual.transformer.resblocks),
        width=visual.transformer.width,
        num_heads=visual.transformer.resblocks[0].attn.num_heads,
        mlp_width=visual.transformer.resblocks[0].mlp.c_fc.out_features,
        num_tokens=grid[0] * grid[1] + 1,
        num_params=num_image,
        num_layer_params=sum(p.numel() for p in visual.transformer.resblocks[0].parameters()),
        embed_dim=embed_dim,
        quick_gelu=quick_gelu,
        layer_scale=vision.get("ls_init_value") is not None,
        num_patches=grid[0] * grid[1],
        patch_pixels=3 * patch[0] * patch[1],
        num_pixels=3 * image_size[0] * image_size[1],
        ln_pre=not vision.get("no_ln_pre", False),
        pool=vision.get("pool_type", "tok"),
        final_ln_after_pool=vision.get("final_ln_after_pool", False),
    )
    scalars = sum(
        p.numel() for n in ("logit_scale", "logit_bias") if (p := getattr(model, n, None)) is not None
    )
    text_tower = Tower(
        name="text",
        num_layers=len(transformer.resblocks),
        width=transformer.width,
        num_heads=transformer.resblocks[0].attn.num_heads,
        mlp_width=transformer.resblocks[0].mlp.c_fc.out_features,
        num_tokens=text.get("context_length", 77),
        num_params=num_params - num_image - scalars,
        num_layer_params=sum(p.numel() for p in transformer.resblocks[0].parameters()),
        embed_dim=embed_dim,
        quick_gelu=quick_gelu,
        layer_scale=text.get("ls_init_value") is not None,
        pool=text.get("pool_type", "argmax"),
        final_ln_after_pool=text.get("final_ln_after_pool", False),
    )
    return Architecture(
        name=name,
        image=image,
        text=text_tower,
        embed_dim=embed_dim,
        num_params=num_params,
        num_token_embedding=model.token_embedding.weight.numel(),
    )


def _pair(x) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else tuple(x)


def _check_supported(name: str, cfg: dict[str, Any]) -> None:
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    reason = None
    if "multimodal_cfg" in cfg:
        reason = "a CoCa model (captioning decoder)"
    elif vision.get("timm_model_name"):
        reason = f"its image tower is the timm model {vision['timm_model_name']!r}"
    elif isinstance(vision.get("layers"), list | tuple):
        reason = "its image tower is a ResNet"
    elif "hf_model_name" in text or cfg.get("custom_text"):
        reason = "its text tower is a Hugging Face model"
    elif any(vision.get(k) for k in _CUSTOM_BLOCK_KEYS) or any(text.get(k) for k in _CUSTOM_BLOCK_KEYS):
        reason = "it uses open_clip's custom attention blocks (qk_norm, scaled attention, pooler ...)"
    elif text.get("embed_cls"):
        reason = "its text tower appends a class token (CoCa style)"
    if reason:
        raise ValueError(
            f"model {name!r}: the planner models open_clip's ViT image towers and text transformers, "
            f"and {reason}"
        )


def _meta_model(cfg: dict[str, Any]) -> torch.nn.Module:
    """open_clip's CLIP for `cfg`, built on the meta device: shapes and counts without memory."""
    build = {k: v for k, v in cfg.items() if k not in ("custom_text", "preprocess_cfg")}
    with torch.device("meta"):
        return open_clip.CLIP(**build, nonscalar_logit_scale=True)


# --- FLOPs per sample ----------------------------------------------------------------------------


def block_flops(tower: Tower, num_tokens: int | None = None) -> int:
    """Forward FLOPs of one residual block for one sample: QKV, attention (QKᵀ and AV, every pair,
    as a causal mask still computes), output projection, the two MLP matrices."""
    n = tower.num_tokens if num_tokens is None else num_tokens
    d, h = tower.width, tower.mlp_width
    return 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * h


def embed_flops(tower: Tower) -> int:
    """The patch convolution (on every patch: dropout comes after it); 0 for the text tower's lookup."""
    return 2 * tower.num_patches * tower.patch_pixels * tower.width


def head_flops(tower: Tower) -> int:
    """The projection of the pooled token into the shared embedding."""
    return 2 * tower.width * tower.embed_dim


def recompute_flops(tower: Tower) -> int:
    """One checkpointed block's recomputation: its forward pass without the MLP's output product,
    unless LayerScale saves that product's output for its own gradient."""
    if tower.layer_scale:
        return block_flops(tower)
    return block_flops(tower) - 2 * tower.num_tokens * tower.mlp_width * tower.width


def forward_flops(tower: Tower) -> int:
    """Forward FLOPs of the whole tower for one sample."""
    return embed_flops(tower) + tower.num_layers * block_flops(tower) + head_flops(tower)


def train_flops(tower: Tower, num_trainable_layers: int | None = None, recompute: bool = False) -> int:
    """FLOPs one sample costs the tower in a training step: forward, plus backward (2× forward: the
    gradient with respect to the input and to the weights) through the trainable top
    `num_trainable_layers` blocks (default: all, and the patch embedding's weight gradient, which
    needs no input gradient: the images have none). `recompute`: activation checkpointing runs
    the trainable blocks' forward once more in the backward pass, but the last product (torch's
    non-reentrant checkpoint stops once every saved tensor is back; see `recompute_flops`)."""
    trainable_all = num_trainable_layers is None
    num_layers = tower.num_layers if trainable_all else num_trainable_layers
    flops = forward_flops(tower)
    if num_layers == 0 and not trainable_all:
        return flops
    backward = 2 * (num_layers * block_flops(tower) + head_flops(tower))
    if trainable_all:
        backward += embed_flops(tower)  # weight gradient only
    if recompute:
        backward += num_layers * recompute_flops(tower)
    return flops + backward
