"""Fashion-MNIST (the real IDX files) -> OUT/train image-caption shards, a held-out validation slice of
the train split (OUT/val zero-shot eval set, OUT/val_pairs image-caption shards) and OUT/eval (test split)."""

import argparse
import os
import time

from clip_pipe.prep.fashion_mnist import DEFAULT_ROOT, NUM_VAL, build_fashion_mnist


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="output directory; gets train/, val/, val_pairs/, eval/")
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="directory holding the *-ubyte.gz files")
    parser.add_argument("--image-size", type=int, default=28, help="shorter side of the stored JPEG")
    parser.add_argument("--shard-size", type=int, default=5000, help="samples per shard")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count(), help="image processes (output is the same)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="picks each training caption's template and synonym"
    )
    parser.add_argument(
        "--num-val", type=int, default=NUM_VAL, help="train images held out for validation (fixed choice)"
    )
    args = parser.parse_args()

    start = time.perf_counter()
    try:
        summaries = build_fashion_mnist(
            args.out,
            root=args.root,
            image_size=args.image_size,
            shard_size=args.shard_size,
            num_workers=args.workers,
            seed=args.seed,
            num_val=args.num_val,
            args=vars(args),
        )
    except ValueError as e:
        parser.error(str(e))
    for name, summary in summaries.items():
        print(f"{name}: {summary}")
    print(f"done in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
