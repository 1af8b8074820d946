"""The `clip-pipe` command: zero-shot classification, evaluation, serving and export of a trained model.

    clip-pipe classify --checkpoint CKPT --labels "cat,dog,car" IMG [IMG ...] [--json]
    clip-pipe eval     --checkpoint CKPT --eval-set DIR [--eval-set DIR ...] [--out results.json]
                       [--linear-probe-train DIR] [--format clip_benchmark --out '{dataset}_{task}.json']
    clip-pipe report   RUN                 redraw RUN/report/index.html from the run's JSON
    clip-pipe serve    --checkpoint CKPT [--host 127.0.0.1] [--port 8000] [--token T | env CLIP_PIPE_TOKEN]
    clip-pipe export   --checkpoint CKPT [--format open_clip-hub] OUT
    clip-pipe plan     --model NAME --gpus N --batch GLOBAL [--gpu H100-SXM] [--zero 1] [--samples N]
                       [--checkpointing] [--patch-dropout F] [--lock-image] [--loss tiled|clip] [--json]
    clip-pipe count-shards SHARDS [SHARDS ...] [--out counts.json]
                       write sizes.json beside the shards (or a counts file) so that runs start fast

CKPT is a run directory (its final model, else its latest checkpoint), a checkpoint directory, or a
model file (model.safetensors, model.pt) with `open_clip_config.json` beside it. This module only parses
arguments; the work is done by clip_pipe.classifier, clip_pipe.eval, clip_pipe.serve, clip_pipe.model
and clip_pipe.plan.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cmd_classify(args: argparse.Namespace) -> int:
    from clip_pipe.classifier import ImageError, ZeroShotClassifier

    labels = [label.strip() for label in args.labels.split(",")]
    clf = ZeroShotClassifier.from_checkpoint(args.checkpoint, device=args.device or default_device())
    clf.label_weights(labels, args.template)  # a bad label set fails before any image is read
    rows, num_failed = [], 0
    for start in range(0, len(args.images), args.batch_size):
        chunk = args.images[start : start + args.batch_size]
        good, loaded = [], []
        for path in chunk:
            try:
                loaded.append(clf.load_image(path))
                good.append(path)
            except ImageError as e:  # reported with its reason; the other images still get classified
                rows.append({"image": path, "error": str(e)})
                num_failed += 1
        if loaded:
            ranked = clf.classify(loaded, labels, args.template, top_k=args.top_k)
            rows += [
                {"image": path, "labels": [p._asdict() for p in predictions]}
                for path, predictions in zip(good, ranked, strict=True)
            ]
    order = {path: i for i, path in enumerate(args.images)}
    rows.sort(key=lambda row: order[row["image"]])
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows))
    for row in rows:
        if "error" in row:
            print(f"error: {row['image']}: {row['error']}", file=sys.stderr)
    return 1 if num_failed else 0


def format_table(rows: list[dict]) -> str:
    """One row per image: its labels from most to least likely, each with its probability."""
    cells = [
        [row["image"], f"error: {row['error']}"]
        if "error" in row
        else [row["image"], *(f"{p['label']} {p['probability']:.3f}" for p in row["labels"])]
        for row in rows
    ]
    num_ranks = max((len(row.get("labels", [])) for row in rows), default=0)
    cells.insert(0, ["image", *(f"#{i + 1}" for i in range(num_ranks))])
    num_columns = max(len(r) for r in cells)
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(num_columns)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths[: len(r)], strict=True)).rstrip() for r in cells
    )


def cmd_eval(args: argparse.Namespace) -> int:
    from clip_pipe.checkpoints import resolve_model_file
    from clip_pipe.eval import embed, format_results, read_eval_set, score, to_clip_benchmark
    from clip_pipe.model import load_export

    device = args.device or default_device()
    eval_sets = [read_eval_set(path) for path in args.eval_set]  # each set's kind is read from its files
    probe_set = read_eval_set(args.linear_probe_train) if args.linear_probe_train else None
    if args.format == "clip_benchmark" and not args.out:
        raise ValueError("--format clip_benchmark writes files: give --out, e.g. '{dataset}_{task}.json'")
    model_file = resolve_model_file(args.checkpoint)
    encoder = load_export(model_file)
    model = encoder.model.to(device)
    print(f"checkpoint: {model_file}")

    def embed_set(eval_set):
        return embed(
            model, encoder.preprocess_val, encoder.tokenizer, eval_set, args.batch_size, device=device
        )

    probe = embed_set(probe_set) if probe_set else None
    results = {}
    for eval_set in eval_sets:
        own = probe_set is not None and eval_set.shard_urls == probe_set.shard_urls  # no training accuracy
        results[eval_set.name] = r = score(embed_set(eval_set), None if own else probe)
        print(format_results(r))
    if args.format == "clip_benchmark":
        records = to_clip_benchmark(results, args.model_name or _model_name(model_file), str(model_file))
        paths = [Path(args.out.format(dataset=r["dataset"], task=r["task"])) for r in records]
        if len(set(paths)) < len(paths):
            raise ValueError(
                f"--out {args.out}: several results, one file; put {{dataset}} and {{task}} in it"
            )
        for path, record in zip(paths, records, strict=True):
            path.write_text(json.dumps(record))
            print(f"wrote {path}")
    elif args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


def _model_name(model_file: Path) -> str:
    """The model's name from the run's config.yaml (the model may sit in the run or a checkpoint in it)."""
    import yaml

    for folder in (model_file.parent, *model_file.parent.parents[:2]):
        if (folder / "config.yaml").is_file():
            return yaml.safe_load((folder / "config.yaml").read_text())["model"]["name"]
    return model_file.parent.name


def cmd_report(args: argparse.Namespace) -> int:
    from clip_pipe.eval.report import write_report

    print(f"wrote {write_report(args.run_dir)}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from clip_pipe.checkpoints import resolve_model_file
    from clip_pipe.classifier import ZeroShotClassifier
    from clip_pipe.limits import TOKEN_ENV, ServeLimits
    from clip_pipe.serve import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    limits = ServeLimits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeLimits)})
    token = args.token or os.environ.get(TOKEN_ENV) or None
    clf = ZeroShotClassifier.from_checkpoint(args.checkpoint, device=args.device or default_device())
    # The run's name, as OpenAI clients pass it in `model`: runs/colors -> "colors".
    name = args.served_model_name or resolve_model_file(args.checkpoint).parent.name
    auth = "bearer token required" if token else "no auth"
    print(
        f"serving {name!r} on http://{args.host}:{args.port} ({auth}; docs at /docs)",
        file=sys.stderr,
        flush=True,
    )
    serve(clf, args.host, args.port, token, limits, args.max_batch, args.max_wait_ms, args.max_queue, name)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from clip_pipe.checkpoints import resolve_model_file
    from clip_pipe.model import OPEN_CLIP_CONFIG, load_export, save_export

    if not (args.out or args.out_path):
        raise ValueError("say where to write: clip-pipe export --checkpoint CKPT OUT")
    source, out = resolve_model_file(args.checkpoint), Path(args.out or args.out_path)
    encoder = load_export(source)
    if args.format == "open_clip-hub":
        from clip_pipe.hub import export_hub

        if out.resolve() == source.parent.resolve():
            raise ValueError(f"{out} is the checkpoint's own folder; pick another")
        path = export_hub(encoder, out, source)
        print(f"wrote {path}, {out / OPEN_CLIP_CONFIG} and {out / 'README.md'} (from {source})")
        print(f'open_clip: open_clip.create_model_and_transforms("local-dir:{out}")')
        return 0
    if out.resolve() == source.resolve():
        raise ValueError(f"--out {out} is the checkpoint itself; pick another path")
    path = save_export(encoder.model, encoder.model_cfg, out.parent, out.name)
    print(f"wrote {path} and {path.parent / OPEN_CLIP_CONFIG} (from {source})")
    print(f'open_clip: open_clip.create_model("local-dir:{path.parent}") if the file is named')
    print(
        "  open_clip_model.safetensors or open_clip_pytorch_model.bin, "
        "or open_clip.create_model(NAME, pretrained=PATH) for a registered NAME"
    )
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from clip_pipe.plan import Setup, format_plan, plan

    # Options the user left out are absent from `args` (argparse.SUPPRESS): Setup's defaults apply.
    fields = {f.name for f in dataclasses.fields(Setup)}
    result = plan(Setup(**{k: v for k, v in vars(args).items() if k in fields}))
    print(json.dumps(result.to_dict(), indent=2) if getattr(args, "json", False) else format_plan(result))
    return 0


def _count(text: str) -> int:
    """An integer count, also written 1e9 or 12.8e9 (it must be whole)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value != int(value):
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}")
    return int(value)


def cmd_count_shards(args: argparse.Namespace) -> int:
    import logging

    from clip_pipe.data.sources import count_shards, write_counts

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    counts = count_shards(args.shards, num_threads=args.threads)
    for path in write_counts(counts, args.out):
        print(f"wrote {path}")
    print(f"{len(counts)} shards, {sum(counts.values())} samples")
    if args.out:
        print(f"train with data.counts_file={args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from clip_pipe.limits import TOKEN_ENV, ServeLimits

    parser = argparse.ArgumentParser(
        prog="clip-pipe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, fn, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(fn=fn)
        sub.add_argument("--checkpoint", required=True, help="run dir, checkpoint dir, or model file")
        return sub

    sub = command("classify", cmd_classify, "rank labels for each image")
    sub.add_argument("images", nargs="+", metavar="IMG")
    sub.add_argument("--labels", required=True, help='comma-separated, e.g. "cat,dog,car"')
    sub.add_argument(
        "--template",
        action="append",
        help='prompt with {c} for the label, e.g. "a photo of a {c}." (repeatable)',
    )
    sub.add_argument("--top-k", type=int, help="show only the k most likely labels")
    sub.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sub.add_argument("--batch-size", type=int, default=64)
    sub.add_argument("--device", help="default: cuda if available, else cpu")

    sub = command(
        "eval", cmd_eval, "zero-shot classification, retrieval, clustering and geometry on eval sets"
    )
    sub.add_argument(
        "--eval-set", action="append", required=True,
        help="eval set folder (repeatable): CLIP_benchmark layout, or a make_shards.py folder for retrieval",
    )  # fmt: skip
    sub.add_argument(
        "--linear-probe-train", help="labelled set to fit a linear probe on (scored on each set)"
    )
    sub.add_argument("--batch-size", type=int, default=256)
    sub.add_argument("--device", help="default: cuda if available, else cpu")
    sub.add_argument(
        "--out", help="write the results as JSON here ({dataset} and {task} with clip_benchmark)"
    )
    sub.add_argument(
        "--format", choices=("clip-pipe", "clip_benchmark"), default="clip-pipe",
        help="clip_benchmark: one CLIP_benchmark result file per set and task",
    )  # fmt: skip
    sub.add_argument(
        "--model-name", help="the `model` of CLIP_benchmark results (default: the run's model.name)"
    )

    sub = commands.add_parser("report", help="redraw RUN/report/index.html from the run's JSON")
    sub.set_defaults(fn=cmd_report)
    sub.add_argument("run_dir", metavar="RUN")

    sub = command("serve", cmd_serve, "the HTTP zero-shot API (FastAPI + uvicorn)")
    sub.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1: this machine only")
    sub.add_argument("--port", type=int, default=8000)
    sub.add_argument("--token", help=f"require 'Authorization: Bearer TOKEN' (default: ${TOKEN_ENV}, if set)")
    sub.add_argument("--device", help="default: cuda if available, else cpu")
    sub.add_argument("--max-batch", type=int, default=32, help="most images per forward pass")
    sub.add_argument("--max-wait-ms", type=float, default=2.0, help="how long a batch waits to fill")
    sub.add_argument(
        "--max-queue", type=int, default=256, help="images and texts waiting; past it, requests get a 429"
    )
    sub.add_argument("--served-model-name", help="the `model` of /v1/embeddings (default: the run's name)")
    for f in dataclasses.fields(ServeLimits):
        sub.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=f.default)

    sub = command(
        "export", cmd_export, "write an open_clip state dict or hub folder (+ open_clip_config.json)"
    )
    sub.add_argument(
        "out_path", nargs="?", metavar="OUT", help="a file (state_dict) or a folder (open_clip-hub)"
    )
    sub.add_argument("--out", help="the same as OUT")
    sub.add_argument(
        "--format",
        choices=["state_dict", "open_clip-hub"],
        default="state_dict",
        help="state_dict: one file, safetensors if OUT ends in .safetensors, else a torch pickle; "
        "open_clip-hub: a folder open_clip loads as local-dir:OUT, with a model card",
    )

    # The defaults live in clip_pipe.plan.Setup (not imported here: it pulls in torch and open_clip).
    sub = commands.add_parser(
        "plan", help="memory, traffic, time and GPU-days of a training setup, worked out on paper",
        description="Per GPU: memory (parameters, gradients, optimizer state, DeepSpeed buffers, "
        "activations, loss), bytes per step, step time and samples/s at a stated utilisation, the "
        "largest batch that fits; the run's GPU-days; and the data prep's time and storage.",
        argument_default=argparse.SUPPRESS,
    )  # fmt: skip
    sub.set_defaults(fn=cmd_plan)
    sub.add_argument("--model", required=True, help="open_clip or clip-pipe model name, e.g. ViT-B-16")
    sub.add_argument("--gpus", dest="num_gpus", type=_count, required=True, help="number of GPUs (ranks)")
    sub.add_argument(
        "--batch", dest="global_batch", type=_count, required=True, help="global batch (all GPUs)"
    )
    sub.add_argument(
        "--gpu", help="H100-SXM (default), A100-40GB, A100-80GB, A800-80GB, H100-PCIe, H200, B200, or the "
        "name nvidia-smi reports",
    )  # fmt: skip
    sub.add_argument("--zero", dest="zero_stage", type=int, help="ZeRO stage, 0-3 (default 1)")
    sub.add_argument("--precision", help="bf16 (default) or fp32")
    sub.add_argument("--loss", help="tiled (default, clip-pipe's) or clip (open_clip's ClipLoss)")
    sub.add_argument("--tile-size", type=int, help="the tiled loss's block (default 1024)")
    sub.add_argument("--samples", dest="num_samples", type=_count, help="samples seen in the run (e.g. 1e9)")
    sub.add_argument("--patch-dropout", type=float, help="fraction of image patches dropped (FLIP)")
    sub.add_argument(
        "--checkpointing", dest="grad_checkpointing", action="store_true", help="activation checkpointing"
    )
    sub.add_argument("--lock-image", action="store_true", help="freeze the image tower (LiT)")
    sub.add_argument("--unlocked-image-layers", type=int, help="with --lock-image: top blocks left trainable")
    sub.add_argument("--lock-text", action="store_true", help="freeze the text tower")
    sub.add_argument(
        "--utilisation", "--mfu", dest="utilisation", type=float,
        help="fraction of the bf16 peak sustained on the executed FLOPs (default: 0.12, fitted to open_clip's "
        "ViT-B/32 run on A100s; see docs/benchmarks.md)",
    )  # fmt: skip
    sub.add_argument("--image-size", type=int, help="override the model's image size")
    sub.add_argument("--context-length", type=int, help="override the text context length")
    sub.add_argument("--gpu-flops", type=float, help="override the GPU's bf16 peak, FLOP/s (e.g. 989e12)")
    sub.add_argument("--gpu-memory-gib", type=float, help="override the GPU's memory")
    sub.add_argument("--network-gb-s", type=float, help="override the collectives' bandwidth per GPU")
    sub.add_argument("--reserve-gib", type=float, help="GPU memory not for tensors (default 2)")
    sub.add_argument("--prep-cores", type=int, help="CPU cores for data prep (default 64)")
    sub.add_argument("--bytes-per-pair", type=int, help="shard bytes per pair (default 25000)")
    sub.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sub = commands.add_parser(
        "count-shards",
        help="count the samples of shards (from *_stats.json, else by reading them) into a sizes.json",
        description="Reads every shard's count (its sizes.json or img2dataset's *_stats.json, concurrently; "
        "a shard with neither is read and counted) and writes a sizes.json beside the shards of each folder, "
        "so that every rank of every later run reads one file per folder instead of one per shard. "
        "open_clip reads it too. For shards you cannot write beside, --out writes a counts file instead.",
    )
    sub.set_defaults(fn=cmd_count_shards)
    sub.add_argument(
        "shards", nargs="+", metavar="SHARDS", help="as data.train: folders, brace patterns, URLs"
    )
    sub.add_argument("--out", help="write {shard URL: samples} here (train with data.counts_file=FILE)")
    sub.add_argument("--threads", type=int, default=16, help="shards read at once where one must be counted")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, OSError) as e:  # user mistakes: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
