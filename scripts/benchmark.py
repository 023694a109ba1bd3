"""Throughput benchmark (the same as ``cnn-backend benchmark``); see ``--help``."""

from cnn_backend.benchmark import main

raise SystemExit(main())
