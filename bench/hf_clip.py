"""Write an exported clip-pipe model (open_clip ViT + text transformer) as a transformers `CLIPModel`
folder, so servers that load only transformers models (infinity) can serve the same weights.

    python -m bench.hf_clip MODEL_FILE OUT_DIR

The conversion is checked, not trusted: the transformers model's image and text embeddings must equal
ours (atol 1e-5) on a few inputs, or it fails. Covers open_clip's standard CLIP (class-token pooling,
GELU or QuickGELU, no attentional pooler), which is what `clip-pipe-tiny-28` and `ViT-B-32` are.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from clip_pipe.model import load_export


def layer_keys(prefix_in: str, prefix_out: str, state: dict, num_layers: int) -> dict:
    out = {}
    for i in range(num_layers):
        src, dst = f"{prefix_in}.resblocks.{i}", f"{prefix_out}.layers.{i}"
        q, k, v = state[f"{src}.attn.in_proj_weight"].chunk(3)
        qb, kb, vb = state[f"{src}.attn.in_proj_bias"].chunk(3)
        out |= {
            f"{dst}.self_attn.q_proj.weight": q, f"{dst}.self_attn.k_proj.weight": k,
            f"{dst}.self_attn.v_proj.weight": v, f"{dst}.self_attn.q_proj.bias": qb,
            f"{dst}.self_attn.k_proj.bias": kb, f"{dst}.self_attn.v_proj.bias": vb,
            f"{dst}.self_attn.out_proj.weight": state[f"{src}.attn.out_proj.weight"],
            f"{dst}.self_attn.out_proj.bias": state[f"{src}.attn.out_proj.bias"],
        }  # fmt: skip
        for a, b in (
            ("ln_1", "layer_norm1"),
            ("ln_2", "layer_norm2"),
            ("mlp.c_fc", "mlp.fc1"),
            ("mlp.c_proj", "mlp.fc2"),
        ):
            out[f"{dst}.{b}.weight"] = state[f"{src}.{a}.weight"]
            out[f"{dst}.{b}.bias"] = state[f"{src}.{a}.bias"]
    return out


def convert(model_file: Path, out_dir: Path) -> None:
    encoder = load_export(model_file)
    cfg, state = encoder.model_cfg, {k: v.float() for k, v in encoder.model.state_dict().items()}
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    if text.get("hf_model_name") or vision.get("attentional_pool") or vision.get("timm_model_name"):
        raise ValueError("only open_clip's standard ViT + text transformer converts")
    act = "quick_gelu" if cfg.get("quick_gelu") else "gelu"
    v_width, t_width = vision["width"], text["width"]
    config = CLIPConfig(
        projection_dim=cfg["embed_dim"],
        vision_config=dict(
            hidden_size=v_width, intermediate_size=int(v_width * vision.get("mlp_ratio", 4)),
            num_hidden_layers=vision["layers"], num_attention_heads=v_width // vision.get("head_width", 64),
            image_size=vision["image_size"], patch_size=vision["patch_size"], hidden_act=act,
        ),
        text_config=dict(
            vocab_size=text["vocab_size"], hidden_size=t_width, intermediate_size=int(t_width * text.get("mlp_ratio", 4)),
            num_hidden_layers=text["layers"], num_attention_heads=text["heads"],
            max_position_embeddings=text["context_length"], hidden_act=act,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        ),
    )  # fmt: skip
    hf = {
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
        "visual_projection.weight": state["visual.proj"].T,
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
        "text_projection.weight": state["text_projection"].T,
        "logit_scale": state["logit_scale"].reshape(()),
    }
    hf |= layer_keys("visual.transformer", "vision_model.encoder", state, vision["layers"])
    hf |= layer_keys("transformer", "text_model.encoder", state, text["layers"])
    model = CLIPModel(config).eval()
    missing, unexpected = model.load_state_dict({k: v.contiguous() for k, v in hf.items()}, strict=False)
    if unexpected or [k for k in missing if not k.endswith("position_ids")]:
        raise ValueError(f"conversion mismatch: missing {missing}, unexpected {unexpected}")

    # open_clip's tokenizer as a transformers CLIPTokenizer: the same BPE vocabulary and merges.
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = encoder.tokenizer
    (out_dir / "vocab.json").write_text(json.dumps(tok.encoder))
    merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.get)
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    sot, eot = (token for token, i in tok.encoder.items() if i in (49406, 49407))
    tokenizer = CLIPTokenizer(
        str(out_dir / "vocab.json"), str(out_dir / "merges.txt"), model_max_length=text["context_length"],
        bos_token=sot, eos_token=eot, unk_token=eot, pad_token=eot,
    )  # fmt: skip
    pp = encoder.model.visual.preprocess_cfg
    size = pp["size"] if isinstance(pp["size"], int) else pp["size"][0]
    images = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=list(pp["mean"]), image_std=list(pp["std"]), resample=3,  # bicubic, as open_clip
    )  # fmt: skip
    model.save_pretrained(out_dir)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(out_dir)
    check(encoder, CLIPModel.from_pretrained(out_dir).eval(), CLIPProcessor.from_pretrained(out_dir))


def features(output) -> torch.Tensor:
    """transformers 4 returns the projected features, 5 an output object holding them."""
    return torch.nn.functional.normalize(
        output if isinstance(output, torch.Tensor) else output.pooler_output, dim=-1
    )


def check(encoder, model: CLIPModel, processor: CLIPProcessor) -> None:
    texts = ["a photo of a small grey square on a white table", "a dog"]
    noise = Image.effect_noise((96, 96), 50).convert("RGB")
    buffer = io.BytesIO()
    noise.save(buffer, "JPEG")
    image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    with torch.no_grad():
        pixels = encoder.preprocess_val(image)[None]
        ours_t = encoder.model.encode_text(encoder.tokenizer(texts), normalize=True)
        ours_i = encoder.model.encode_image(pixels, normalize=True)
        batch = processor(text=texts, images=[image], return_tensors="pt", padding=True)
        text_ids = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        theirs_t = features(model.get_text_features(**text_ids))
        theirs_i = features(model.get_image_features(pixel_values=pixels))  # the same pixels: the model alone
        theirs_processed = features(model.get_image_features(pixel_values=batch["pixel_values"]))
    torch.testing.assert_close(theirs_t, ours_t, rtol=0, atol=1e-5)
    torch.testing.assert_close(theirs_i, ours_i, rtol=0, atol=1e-5)
    # transformers' image processor resizes with PIL, open_clip with torchvision: close, not equal.
    print(
        f"image embeddings through each side's own preprocessing differ by {(theirs_processed - ours_i).abs().max():.1e}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model_file", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    convert(args.model_file, args.out_dir)
    print(f"wrote {args.out_dir}: transformers CLIPModel with the same embeddings")
    return 0


if __name__ == "__main__":
    sys.exit(main())
