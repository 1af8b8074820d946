"""Evaluate a checkpoint on eval sets of any kind (zero-shot classification, retrieval; see README).

    python launch/zeroshot.py --checkpoint RUN_OR_FILE --eval-set DIR [--eval-set DIR ...] [--out FILE]

The same as `clip-pipe eval`. RUN_OR_FILE: a run directory (its final model, else its latest checkpoint),
a checkpoint directory, an open_clip hub folder, or a model file (model.safetensors, model.pt) with
`open_clip_config.json` beside it.
"""

import sys

from clip_pipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
