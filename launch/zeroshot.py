"""Zero-shot classification of a checkpoint on an eval set (CLIP_benchmark WebDataset layout).

    python launch/zeroshot.py --checkpoint RUN_OR_FILE --eval-set DIR [--eval-set DIR ...]

RUN_OR_FILE: a run directory (its final model, else its latest checkpoint), a checkpoint directory,
or a `model.pt` with `open_clip_config.json` beside it.
"""

import argparse
import json
import sys

import torch

from clip_pipe.checkpoints import resolve_model_file
from clip_pipe.model import load_export
from clip_pipe.zeroshot import evaluate, format_results, read_eval_set


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--eval-set", action="append", required=True, help="eval set folder (repeatable)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    try:
        eval_sets = [read_eval_set(path) for path in args.eval_set]
        model_file = resolve_model_file(args.checkpoint)
        encoder = load_export(model_file)
        model = encoder.model.to(args.device)
        print(f"checkpoint: {model_file}")
        results = {}
        for eval_set in eval_sets:
            r = evaluate(
                model,
                encoder.preprocess_val,
                encoder.tokenizer,
                eval_set,
                args.batch_size,
                device=args.device,
            )
            results[eval_set.name] = r
            print(format_results(r))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
