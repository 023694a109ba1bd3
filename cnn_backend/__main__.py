"""``python -m cnn_backend``: the same command line as the ``cnn-backend`` console script."""

from .cli import main

raise SystemExit(main())
