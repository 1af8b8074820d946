"""Split a shard folder into a training part and a held-out part (e.g. a retrieval eval set), by image:
all samples of one image (same key.json sha256, or group) land on the same side, so no held-out image
is ever trained on. Samples are copied byte for byte; the split is a fixed function of each image's hash.

    python data_prep/holdout.py data/emoji --train data/emoji_train --heldout data/emoji_heldout --fraction 0.1

Each output folder holds shards and a sizes.json; the held-out one is a retrieval eval set as it is
(`eval.retrieval_sets`). Eval sets are reported by folder name, so give each corpus its own.
"""

import argparse
import hashlib
import json
from pathlib import Path

import webdataset as wds

from clip_pipe.data import list_shards


def image_id(sample: dict) -> str:
    meta = json.loads(sample["json"]) if "json" in sample else {}
    return str(meta.get("group") or meta.get("sha256") or sample["__key__"])


def split(source: str, folders: dict[str, Path], fraction: float, shard_size: int = 1000) -> dict[str, int]:
    """`folders`: {"train": path, "heldout": path}. Returns the number of samples written to each."""
    if not 0 < fraction < 1:
        raise ValueError(f"--fraction must be in (0, 1), got {fraction}")
    writers, counts, sizes = {}, {"train": 0, "heldout": 0}, {"train": {}, "heldout": {}}

    def write(side: str, sample: dict) -> None:
        index = counts[side]
        if index % shard_size == 0:
            if side in writers:
                writers[side].close()
            name = f"shard-{index // shard_size:06d}.tar"
            writers[side] = wds.TarWriter(str(folders[side] / name), mtime=0)
            sizes[side][name] = 0
        writers[side].write(sample)
        sizes[side][next(reversed(sizes[side]))] += 1
        counts[side] += 1

    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
        if any(folder.iterdir()):
            raise ValueError(f"{folder} is not empty")
    urls = [{"url": s.url} for s in list_shards([source])]
    for sample in wds.tariterators.tarfile_samples(urls):
        sample = {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}
        bucket = int.from_bytes(hashlib.sha256(image_id(sample).encode()).digest()[:8], "big") / 2**64
        write("heldout" if bucket < fraction else "train", sample)
    for side, writer in writers.items():
        writer.close()
        (folders[side] / "sizes.json").write_text(json.dumps(sizes[side], indent=1) + "\n")
    return counts


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", help="a shard folder (with sizes.json), e.g. from make_shards.py")
    parser.add_argument("--train", required=True, help="folder for the training part")
    parser.add_argument("--heldout", required=True, help="folder for the held-out part")
    parser.add_argument("--fraction", type=float, default=0.1, help="share of images held out")
    args = parser.parse_args()
    try:
        counts = split(args.source, {"train": Path(args.train), "heldout": Path(args.heldout)}, args.fraction)
    except ValueError as e:
        parser.error(str(e))
    print(f"{counts['train']} samples in {args.train}, {counts['heldout']} held out in {args.heldout}")


if __name__ == "__main__":
    main()
