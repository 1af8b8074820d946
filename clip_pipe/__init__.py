"""clip-pipe: CLIP-style image-text pretraining (shards, DeepSpeed training with a global InfoNCE loss, zero-shot eval)."""

__all__ = ["ZeroShotClassifier"]


def __getattr__(name: str):
    # Lazy, so `import clip_pipe` (and its data-prep half) does not pull in torch and open_clip.
    if name == "ZeroShotClassifier":
        from clip_pipe.classifier import ZeroShotClassifier

        return ZeroShotClassifier
    raise AttributeError(f"module 'clip_pipe' has no attribute {name!r}")
