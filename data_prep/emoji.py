"""Emoji -> WebDataset shards: Noto Color Emoji glyphs (Debian fonts-noto-color-emoji, SIL OFL 1.1)
rendered with Pillow, captioned with their Unicode names from emoji-test.txt (Debian unicode-data),
e.g. "grinning face". About 1,870 images, skin-tone variants left out. Resumable like make_shards.py."""

import argparse
import os
from pathlib import Path

from clip_pipe.prep.dataset import DEDUP_MODES, build_dataset
from clip_pipe.prep.emoji import DEFAULT_EMOJI_TEST, DEFAULT_FONT, emoji_rows
from clip_pipe.prep.samples import EncodeConfig


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--font", default=str(DEFAULT_FONT))
    parser.add_argument("--emoji-test", default=str(DEFAULT_EMOJI_TEST), help="Unicode's emoji-test.txt")
    parser.add_argument("--image-size", type=int, default=224, help="shorter side of the stored JPEG")
    parser.add_argument("--shard-size", type=int, default=1000, help="emoji per shard")
    parser.add_argument("--dedup", choices=DEDUP_MODES, default="exact")
    parser.add_argument("--limit", type=int, default=None, help="only the first N emoji (for tests)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes (output is the same)")
    args = parser.parse_args()

    try:
        rows, num_rows = emoji_rows(args.font, args.emoji_test, args.limit)
        inputs = {
            p: [str(Path(getattr(args, p)).resolve()), Path(getattr(args, p)).stat().st_size]
            for p in ("font", "emoji_test")
        }
        summary = build_dataset(
            rows,
            args.out,
            EncodeConfig(image_size=args.image_size),
            shard_size=args.shard_size,
            dedup=args.dedup,
            num_workers=args.workers,
            num_rows=num_rows,
            inputs={**inputs, "num_emoji": num_rows},
            args=vars(args),
        )
    except ValueError as e:
        parser.error(str(e))
    print(summary)


if __name__ == "__main__":
    main()
