"""Named pause points, so that crash-consistency tests can stop a run at an exact moment.

With ``CNN_BACKEND_STOP_AT=<point>@<n>`` in the environment, the process stops itself (SIGSTOP)
the n-th time it passes ``<point>``; the test then delivers SIGKILL, SIGTERM or SIGINT (and
SIGCONT) at precisely that moment. Points: ``start`` (settings resolved, nothing written yet),
``folder`` (run folder locked and its history started), ``step`` (after a progress update),
``replace <file name>`` (a file fully written to its temporary name, not yet renamed onto its own),
``history`` (an epoch's history row written), ``plots`` (before the plots are drawn). Without the
variable a pause point costs one comparison.
"""

from __future__ import annotations

import os
import signal

ENVIRONMENT_VARIABLE = "CNN_BACKEND_STOP_AT"


def _parse(text: str | None) -> tuple[str, int] | None:
    if not text:
        return None
    point, _, count = text.rpartition("@")
    try:
        return (point, int(count)) if point else None
    except ValueError:
        return None


_TARGET = _parse(os.environ.get(ENVIRONMENT_VARIABLE))
_passes: dict[str, int] = {}


def pause_point(name: str) -> None:
    """Stop this process here if the environment asks for this passage of ``name``."""
    if _TARGET is None or _TARGET[0] != name:
        return
    _passes[name] = _passes.get(name, 0) + 1
    if _passes[name] == _TARGET[1] and hasattr(signal, "SIGSTOP"):
        os.kill(os.getpid(), signal.SIGSTOP)
