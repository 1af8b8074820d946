"""Fashion-MNIST (the real IDX files) -> OUT/train image-caption shards + OUT/eval zero-shot eval set."""

import argparse
import os
import time

from clip_pipe.prep.fashion_mnist import DEFAULT_ROOT, build_fashion_mnist


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="output directory; gets train/ and eval/")
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="directory holding the *-ubyte.gz files")
    parser.add_argument("--image-size", type=int, default=28, help="shorter side of the stored JPEG")
    parser.add_argument("--shard-size", type=int, default=5000, help="samples per shard")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count(), help="image processes (output is the same)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="picks each training caption's template and synonym"
    )
    args = parser.parse_args()

    start = time.perf_counter()
    try:
        train, evaluation = build_fashion_mnist(
            args.out,
            root=args.root,
            image_size=args.image_size,
            shard_size=args.shard_size,
            num_workers=args.workers,
            seed=args.seed,
            args=vars(args),
        )
    except ValueError as e:
        parser.error(str(e))
    print(f"train: {train}\neval: {evaluation}\ndone in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
