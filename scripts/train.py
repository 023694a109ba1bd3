"""Train a model: the same as `cnn-backend train ...` (see `python scripts/train.py --help`).

    python scripts/train.py --model seed --device auto --epochs 20
"""

import sys
from pathlib import Path

# Run from a checkout without installing: the package next to this folder comes first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cnn_backend.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["train", *sys.argv[1:]]))
