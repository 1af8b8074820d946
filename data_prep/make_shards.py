"""Image-caption table + image directory -> WebDataset shards (see clip_pipe.prep.write_shards)."""

import argparse
import os
import re
from pathlib import Path

from clip_pipe.prep import DEFAULT_MAX_PIXELS, EncodeConfig, read_table, table_rows, write_shards


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", required=True, help="directory the image column's paths are relative to")
    parser.add_argument(
        "--captions", required=True, help="table: .csv, .tsv, .parquet or .jsonl/.json (lines)"
    )
    parser.add_argument("--out", required=True, help="output directory for shards, sizes.json, manifest.json")
    parser.add_argument("--image-col", default="image")
    parser.add_argument("--caption-col", default="caption")
    parser.add_argument("--label-col", default=None, help="integer class column, written as key.cls")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--image-size", type=int, default=224, help="shorter side of the stored JPEG")
    parser.add_argument("--jpeg-quality", type=int, default=95)
    parser.add_argument(
        "--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="larger images are rejected"
    )
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count(), help="image processes (output is the same)"
    )
    parser.add_argument("--prefix", default="shard", help="shards are named {prefix}-000000.tar ...")
    args = parser.parse_args()

    if not re.fullmatch(r"[\w.-]+", args.prefix):
        parser.error(f"--prefix {args.prefix!r} must be a plain file name part (letters, digits, _ . -)")
    try:
        cfg = EncodeConfig(
            images_dir=Path(args.images),
            image_size=args.image_size,
            jpeg_quality=args.jpeg_quality,
            max_pixels=args.max_pixels,
            labels=args.label_col is not None,
        )
        text_columns = (args.image_col, args.caption_col)
        table = read_table(args.captions, text_columns)
        rows = table_rows(
            table, image_col=args.image_col, caption_col=args.caption_col, label_col=args.label_col
        )
        summary = write_shards(
            rows,
            args.out,
            cfg,
            shard_size=args.shard_size,
            shard_format=f"{args.prefix}-{{:06d}}.tar",
            num_workers=args.workers,
            args=vars(args),
            input_file=args.captions,
        )
    except ValueError as e:
        parser.error(str(e))
    print(summary)


if __name__ == "__main__":
    main()
