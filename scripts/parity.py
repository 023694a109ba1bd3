"""Compare training on the CPU and on a device side by side; see ``cnn_backend/parity.py``.

    python scripts/parity.py [--device cuda|standin] [--model seed|default|plain|FILE] [--steps 20]
                             [--batch-size 32] [--dtype float32|float64] [--conv-algorithm auto|gemm|signal]

The same as ``cnn-backend parity``. Exit status: 0 within tolerance, 1 beyond it, 2 without the device.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from cnn_backend.parity import main
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from cnn_backend.parity import main

if __name__ == "__main__":
    raise SystemExit(main())
