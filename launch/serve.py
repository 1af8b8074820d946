"""The HTTP zero-shot API on a trained model; the same as `clip-pipe serve`.

python launch/serve.py --checkpoint RUN_OR_FILE [--host 127.0.0.1] [--port 8000] [--token TOKEN]
"""

import sys

from clip_pipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
