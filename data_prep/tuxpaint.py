"""A folder of images with sidecar .txt captions -> WebDataset shards. By default the Tux Paint stamps
(Debian tuxpaint-stamps-default, GPL-2: about 1,000 photo cut-outs and drawings, PNG with alpha and
SVG, each with a hand-written English sentence). Resumable like make_shards.py."""

import argparse
import os
from pathlib import Path

from clip_pipe.prep.dataset import DEDUP_MODES, build_dataset
from clip_pipe.prep.folders import sidecar_rows
from clip_pipe.prep.samples import EncodeConfig

DEFAULT_ROOT = Path("/usr/share/tuxpaint/stamps")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="folder of images + same-name .txt files")
    parser.add_argument("--out", required=True)
    parser.add_argument("--image-size", type=int, default=224, help="shorter side of the stored JPEG")
    parser.add_argument("--shard-size", type=int, default=1000, help="input images per shard")
    parser.add_argument("--dedup", choices=DEDUP_MODES, default="exact")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes (output is the same)")
    args = parser.parse_args()

    try:
        if not Path(args.root).is_dir() and args.root == str(DEFAULT_ROOT):
            raise ValueError(
                f"{DEFAULT_ROOT} not found; `apt-get install tuxpaint-stamps-default`, or pass --root"
            )
        rows = sidecar_rows(args.root)
        summary = build_dataset(
            rows,
            args.out,
            EncodeConfig(images_dir=Path(args.root), image_size=args.image_size),
            shard_size=args.shard_size,
            dedup=args.dedup,
            num_workers=args.workers,
            num_rows=len(rows),
            inputs={"folder": str(Path(args.root).resolve()), "num_images": len(rows)},
            args=vars(args),
        )
    except ValueError as e:
        parser.error(str(e))
    print(summary)


if __name__ == "__main__":
    main()
