"""Image-label table + class names -> a zero-shot eval set in CLIP_benchmark's WebDataset layout."""

import argparse
import os
from pathlib import Path

from clip_pipe.prep import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_TEMPLATES,
    read_lines,
    read_table,
    table_rows,
    write_eval_set,
)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", required=True, help="directory the image column's paths are relative to")
    parser.add_argument("--labels", required=True, help="table: .csv, .tsv, .parquet or .jsonl/.json (lines)")
    parser.add_argument(
        "--classnames", required=True, help="text file, one class name per line (line i = label i)"
    )
    parser.add_argument(
        "--templates", help="text file, one prompt per line with {c}; default: generic prompts"
    )
    parser.add_argument("--out", required=True, help="output directory (CLIP_benchmark wds layout)")
    parser.add_argument("--image-col", default="image")
    parser.add_argument("--label-col", default="label")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--image-size", type=int, default=224, help="shorter side of the stored JPEG")
    parser.add_argument("--jpeg-quality", type=int, default=95)
    parser.add_argument(
        "--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="larger images are rejected"
    )
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count(), help="image processes (output is the same)"
    )
    args = parser.parse_args()

    try:
        classnames = read_lines(args.classnames, "class names")
        templates = DEFAULT_TEMPLATES if args.templates is None else read_lines(args.templates, "templates")
        table = read_table(args.labels, (args.image_col,))
        rows = table_rows(table, image_col=args.image_col, label_col=args.label_col)
        summary = write_eval_set(
            rows,
            args.out,
            classnames,
            templates,
            images_dir=args.images,
            image_size=args.image_size,
            jpeg_quality=args.jpeg_quality,
            max_pixels=args.max_pixels,
            shard_size=args.shard_size,
            num_workers=args.workers,
            inputs={
                "labels": [str(Path(args.labels).resolve()), Path(args.labels).stat().st_size],
                "images": str(Path(args.images).resolve()),
                "image_col": args.image_col,
                "label_col": args.label_col,
            },
            args=vars(args),
        )
    except ValueError as e:
        parser.error(str(e))
    print(summary)


if __name__ == "__main__":
    main()
