"""Run-directory records a person can open: metrics.jsonl, a PNG of the curves, a log file, and
(`run.report_to: [tensorboard]`) TensorBoard event files in RUN/tb/."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path


def setup_logging(run_dir: Path | None, is_main: bool) -> None:
    """Rank 0 logs INFO to the console and `run_dir/train.log`; other ranks only warnings."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if is_main and run_dir is not None:
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        handlers=handlers,
        force=True,
    )


class MetricsLog:
    """Append-only JSON lines; a resumed run continues the same file.

    `report_to`: where each record also goes (`tensorboard`: RUN/tb/, beside the JSON lines).
    """

    def __init__(self, path: Path, report_to: list[str] = ()):
        self.path = path
        self.tensorboard = TensorBoardLog(path.parent / "tb") if "tensorboard" in report_to else None

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            self.tensorboard.write(record)

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Drop records past `step`: a run resumed from an older checkpoint redoes those steps."""
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        if self.tensorboard is not None:
            self.tensorboard.purge_step = step + 1


class TensorBoardLog:
    """The same records as TensorBoard scalars: `train/loss`, `train/lr`, ..., `eval/SET/top1`, ...

    The event file is opened on the first record, so only the rank that writes records creates one.
    After a resume, `purge_step` makes TensorBoard drop the old run's points past the checkpoint.
    """

    def __init__(self, log_dir: Path):
        self.log_dir, self.purge_step, self.writer = log_dir, None, None

    def write(self, record: dict) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.log_dir), purge_step=self.purge_step)
        prefix = f"eval/{record['eval_set']}/" if "eval_set" in record else "train/"
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(prefix + key, value, record["step"])
        self.writer.flush()  # records are minutes apart: a crash loses none


def plot_metrics(records: list[dict], path: Path) -> None:
    """Loss, learning rate and throughput against step, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    if not train:
        return
    steps = [r["step"] for r in train]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, title in zip(
        axes,
        ("loss", "lr", "samples_per_s"),
        ("training loss", "learning rate", "samples/s (global)"),
        strict=True,
    ):
        ax.plot(steps, [r.get(key) for r in train])
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for r in records:
        if "zeroshot_top1" in r:
            axes[0].annotate(f"top-1 {100 * r['zeroshot_top1']:.1f}%", (r["step"], train[-1]["loss"]))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
