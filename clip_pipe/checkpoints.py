"""Find the model file a user means by a run directory, a checkpoint directory or a file."""

from __future__ import annotations

from pathlib import Path

MODEL_FILE = "model.pt"


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The checkpoint DeepSpeed's `latest` file names, if any."""
    latest = checkpoint_dir / "latest"
    if not latest.is_file():
        return None
    return checkpoint_dir / latest.read_text().strip()


def resolve_model_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise ValueError(f"checkpoint not found: {path}")
    candidates = [path / MODEL_FILE]
    if (latest := latest_checkpoint(path / "checkpoints")) is not None:
        candidates.append(latest / MODEL_FILE)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ValueError(
        f"{path} holds no {MODEL_FILE}: give a run directory, a checkpoint directory or a model file"
    )
