"""Export a trained model as an open_clip hub folder, which open_clip loads as `local-dir:FOLDER`:

    open_clip_config.json        the architecture and preprocessing (`model_cfg`, `preprocess_cfg`)
    open_clip_model.safetensors  the weights
    README.md                    a model card: how to load it, the training config, the eval results

The same layout `open_clip.push_to_hf_hub` uploads, so the folder can also go to the Hugging Face Hub.
"""

from __future__ import annotations

import json
from pathlib import Path

from clip_pipe.checkpoints import HUB_MODEL_FILE
from clip_pipe.model import OPEN_CLIP_CONFIG, DualEncoder, save_export

# Where the training run keeps what the card shows, relative to the run directory.
RUN_CONFIG = "config.yaml"
EVAL_RESULTS = ("zeroshot.json",)


def find_run_dir(model_file: Path) -> Path | None:
    """The run directory a model file belongs to: RUN/model.*, or RUN/checkpoints/step_*/model.*."""
    for folder in (model_file.parent, *model_file.parents[1:3]):
        if (folder / RUN_CONFIG).is_file():
            return folder
    return None


def export_hub(encoder: DualEncoder, out_dir: Path, model_file: Path) -> Path:
    """Write the hub folder for `encoder` (loaded from `model_file`) into `out_dir`; returns the weights."""
    path = save_export(encoder.model, encoder.model_cfg, out_dir, HUB_MODEL_FILE)
    run_dir = find_run_dir(model_file)
    (out_dir / "README.md").write_text(model_card(encoder.model_cfg, out_dir, run_dir))
    return path


def model_card(model_cfg: dict, out_dir: Path, run_dir: Path | None) -> str:
    name = run_dir.name if run_dir else out_dir.name
    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    text_tower = text.get("hf_model_name") or f"{text.get('layers', '?')}-layer transformer"
    lines = [
        "---",
        "library_name: open_clip",
        "pipeline_tag: zero-shot-image-classification",
        "tags: [clip, clip-pipe, zero-shot-image-classification]",
        "---",
        "",
        f"# {name}",
        "",
        f"A CLIP dual encoder trained with clip-pipe: {model_cfg['embed_dim']}-d embeddings, "
        f"{vision.get('image_size', '?')} px images, text tower: {text_tower}.",
        "",
        "## Usage",
        "",
        "```python",
        "import open_clip",
        "",
        f'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:{out_dir.name}")',
        f'tokenizer = open_clip.get_tokenizer("local-dir:{out_dir.name}")',
        "```",
        "",
        f"Files: `{OPEN_CLIP_CONFIG}` (architecture and preprocessing), `{HUB_MODEL_FILE}` (weights).",
        "",
        "## Evaluation",
        "",
        *eval_table(run_dir),
        "",
        "## Training config",
        "",
    ]
    if run_dir is not None and (run_dir / RUN_CONFIG).is_file():
        lines += ["```yaml", (run_dir / RUN_CONFIG).read_text().rstrip(), "```"]
    else:
        lines.append("This model was exported without its run directory, so its training config is unknown.")
    return "\n".join(lines) + "\n"


def eval_table(run_dir: Path | None) -> list[str]:
    """The run's eval results as a Markdown table: one row per eval set, one column per scalar metric."""
    results: dict[str, dict] = {}
    for name in EVAL_RESULTS:
        path = run_dir / name if run_dir else None
        if path is not None and path.is_file():
            results.update(json.loads(path.read_text()))
    if not results:
        return ["No eval results were found beside this checkpoint."]
    metrics = sorted(
        {
            k
            for r in results.values()
            for k, v in r.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
    )
    rows = ["| eval set | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for set_name, r in results.items():
        rows.append(f"| {set_name} | " + " | ".join(format_value(r.get(m)) for m in metrics) + " |")
    return rows


def format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)
