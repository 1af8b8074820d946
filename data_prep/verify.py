"""Re-read every shard of OUT and check it: tar integrity and sha256, member grouping, unique keys, every
image decodes, counts match sizes.json and manifest.json, every input row accounted for. Exit 1 on any
problem."""

import argparse
import sys

from clip_pipe.prep.verify import verify_dataset


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", help="a folder written by data_prep/make_shards.py (or another builder)")
    args = parser.parse_args()
    report = verify_dataset(args.out)
    print(report)
    sys.exit(1 if report.problems else 0)


if __name__ == "__main__":
    main()
