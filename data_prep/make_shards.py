"""Caption tables (image paths or URLs) -> WebDataset shards; resumable: rerun the same command after a
crash and it finishes the job (see clip_pipe.prep.dataset)."""

import argparse
import os
import re
import sys
from pathlib import Path

from clip_pipe.prep import DEFAULT_MAX_PIXELS, EncodeConfig
from clip_pipe.prep.dataset import DEDUP_MODES, build_dataset
from clip_pipe.prep.fetch import DownloadConfig
from clip_pipe.prep.tables import list_tables, stream_rows


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--captions", required=True, nargs="+",
        help="tables (.csv, .tsv, .parquet, .jsonl/.json lines) or folders of them; rows are numbered across them",
    )  # fmt: skip
    parser.add_argument("--out", required=True, help="output directory for shards, sizes.json, manifest.json")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="directory the image column's paths are relative to")
    source.add_argument("--url-col", help="column of http(s) image URLs to download")
    parser.add_argument("--image-col", default="image")
    parser.add_argument("--caption-col", default="caption")
    parser.add_argument("--label-col", default=None, help="integer class column, written as key.cls")
    parser.add_argument(
        "--group-col", default=None,
        help="column naming each row's image (e.g. image_id), written as key.json's group: rows sharing it are "
        "one image with several captions in a retrieval eval set (default: grouped by identical image bytes)",
    )  # fmt: skip
    parser.add_argument("--shard-size", type=int, default=1000, help="input rows per shard")
    parser.add_argument("--prefix", default="shard", help="shards are named {prefix}-000000.tar ...")
    parser.add_argument("--image-size", type=int, default=224, help="shorter side of the stored JPEG")
    parser.add_argument("--jpeg-quality", type=int, default=95)
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="checked before decoding")
    parser.add_argument("--min-side", type=int, default=1, help="reject images whose shorter side is smaller")
    parser.add_argument(
        "--max-aspect-ratio", type=float, default=None, help="reject longer/shorter above this"
    )
    parser.add_argument("--min-caption-chars", type=int, default=1, help="reject shorter captions")
    parser.add_argument(
        "--dedup", choices=DEDUP_MODES, default="exact",
        help="exact: drop repeated (image sha256, caption) pairs; image: keep one row per image; first wins",
    )  # fmt: skip
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes (output is the same)")
    parser.add_argument("--threads", type=int, default=16, help="download/decode threads per process")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per download attempt")
    parser.add_argument("--retries", type=int, default=2, help="retries after timeouts, 429 and 5xx")
    parser.add_argument("--max-download-mb", type=float, default=32.0, help="larger downloads are rejected")
    parser.add_argument("--retry-failed", action="store_true", help="re-attempt rows whose download failed")
    parser.add_argument("--task", type=int, default=0, help="this task's index, in [0, --num-tasks)")
    parser.add_argument(
        "--num-tasks", type=int, default=1,
        help="split the shards over this many tasks (e.g. a SLURM array); a final run with 1 task finalizes",
    )  # fmt: skip
    args = parser.parse_args()

    if not re.fullmatch(r"[\w.-]+", args.prefix):
        parser.error(f"--prefix {args.prefix!r} must be a plain file name part (letters, digits, _ . -)")
    try:
        cfg = EncodeConfig(
            images_dir=None if args.images is None else Path(args.images),
            image_size=args.image_size,
            jpeg_quality=args.jpeg_quality,
            max_pixels=args.max_pixels,
            labels=args.label_col is not None,
            min_side=args.min_side,
            max_aspect_ratio=args.max_aspect_ratio,
            min_caption_chars=args.min_caption_chars,
        )
        download_cfg = DownloadConfig(
            timeout=args.timeout, num_retries=args.retries, max_bytes=int(args.max_download_mb * 2**20)
        )
        tables = list_tables(args.captions)
        columns = {
            "image_col": None if args.url_col else args.image_col,
            "url_col": args.url_col,
            "caption_col": args.caption_col,
            "label_col": args.label_col,
            **({"group_col": args.group_col} if args.group_col else {}),
        }
        inputs = {
            "tables": [[str(p.resolve()), p.stat().st_size] for p in tables],
            "images": None if args.images is None else str(Path(args.images).resolve()),
            **columns,
        }
        summary = build_dataset(
            stream_rows(tables, **columns),
            args.out,
            cfg,
            shard_size=args.shard_size,
            shard_format=f"{args.prefix}-{{:06d}}.tar",
            dedup=args.dedup,
            num_workers=args.workers,
            num_threads=args.threads,
            download_cfg=download_cfg,
            retry_failed=args.retry_failed,
            task_index=args.task,
            num_tasks=args.num_tasks,
            inputs=inputs,
            args=vars(args),
        )
    except ValueError as e:
        parser.error(str(e))
    except OSError as e:  # a full disk: finished shards stay, the rerun carries on from them
        sys.exit(f"error: {e}; free some space and rerun the same command to finish the job")
    if summary is None:
        print(
            f"task {args.task} of {args.num_tasks}: its shards are done; run with --num-tasks 1 to finalize"
        )
    else:
        print(summary)


if __name__ == "__main__":
    main()
