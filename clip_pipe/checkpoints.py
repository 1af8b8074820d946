"""Find the model file a user means by a run directory, a checkpoint directory or a file."""

from __future__ import annotations

import os
from pathlib import Path

MODEL_FILE = "model.safetensors"
HUB_MODEL_FILE = (
    "open_clip_model.safetensors"  # in an open_clip hub folder (`clip-pipe export --format open_clip-hub`)
)
# Read too: hub folders, and run directories written before exports were safetensors.
MODEL_FILES = (MODEL_FILE, HUB_MODEL_FILE, "model.pt")
LATEST = "latest"  # DeepSpeed's name: its load_checkpoint(tag=None) reads the tag from this file


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The checkpoint DeepSpeed's `latest` file names, if any."""
    latest = checkpoint_dir / LATEST
    if not latest.is_file():
        return None
    return checkpoint_dir / latest.read_text().strip()


def save_file(obj, path: str | Path) -> None:
    """torch.save, but a full disk raises the OSError (ENOSPC) that says so: torch's own writer raises
    an opaque RuntimeError ("unexpected pos ...") over it, from a path or a file alike."""
    import torch

    try:
        with open(path, "wb") as f:
            torch.save(obj, f)
    except RuntimeError as e:
        if isinstance(e.__context__, OSError):
            raise e.__context__ from None
        raise


def set_latest(checkpoint_dir: Path, tag: str) -> None:
    """Point `latest` at `tag` atomically: a crash or a full disk leaves the previous one in place."""
    tmp = checkpoint_dir / f".{LATEST}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, checkpoint_dir / LATEST)


def resolve_model_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise ValueError(f"checkpoint not found: {path}")
    folders = [path]
    if (latest := latest_checkpoint(path / "checkpoints")) is not None:
        folders.append(latest)
    candidates = [folder / name for folder in folders for name in MODEL_FILES]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ValueError(
        f"{path} holds no {' or '.join(MODEL_FILES)}: give a run directory, a checkpoint directory or a model file"
    )
