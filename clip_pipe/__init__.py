"""clip-pipe: CLIP-style image-text pretraining (shards, DeepSpeed training with a global InfoNCE loss, zero-shot eval)."""
