"""Train a CLIP model: `deepspeed --num_gpus N launch/train.py --config configs/NAME.yaml [key.sub=value ...]`.

Also runs under `torchrun`, `srun`, or plain `python launch/train.py ...` (one rank).
"""

import argparse
import sys

from clip_pipe.config import load_config
from clip_pipe.train import train


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("--resume", help="'latest' or a checkpoint tag in RUN/checkpoints/")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. optim.lr=1e-3 run.steps=500")
    args = parser.parse_args()
    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg, resume=args.resume)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
