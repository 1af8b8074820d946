"""Train a CLIP model: `deepspeed --num_gpus N launch/train.py --config configs/NAME.yaml [key.sub=value ...]`.

Also runs under `torchrun`, `srun`, or plain `python launch/train.py ...` (one rank).

Exit status: 0 done; 1 the disk or another OS call failed (one line on stderr; the newest whole checkpoint
stays `latest`); 2 a user error (one line on stderr); 3 stopped by SIGUSR1/SIGTERM after saving a
checkpoint, so a requeued job should rerun the same command with `--resume latest`.
"""

import argparse
import sys

from clip_pipe.config import load_config
from clip_pipe.train import Preempted, train

EXIT_PREEMPTED = 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("--resume", help="'latest' or a checkpoint tag in RUN/checkpoints/")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. optim.lr=1e-3 run.steps=500")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg, resume=args.resume)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a lost mount: nothing a traceback would explain better
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Preempted as e:
        print(f"{e}", file=sys.stderr)
        return EXIT_PREEMPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
