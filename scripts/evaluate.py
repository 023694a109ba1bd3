"""Evaluate a checkpoint: the same as `cnn-backend evaluate ...` (see `python scripts/evaluate.py --help`).

    python scripts/evaluate.py runs/<date-time>/best.npz --split test
"""

import sys
from pathlib import Path

# Run from a checkout without installing: the package next to this folder comes first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cnn_backend.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["evaluate", *sys.argv[1:]]))
