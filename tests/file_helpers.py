"""Files with names a file system may refuse, shared by the tests of the data loaders and the command line."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest


def undecodable(parent, name: bytes, payload: bytes | None = None) -> Path:
    """``parent/name`` created (a folder when ``payload`` is None) for a ``name`` that is not UTF-8,
    as Python sees it (surrogate escapes); skips the test where the file system refuses such names."""
    if sys.getfilesystemencoding().lower() not in ("utf-8", "utf8"):
        pytest.skip(f"file names are decoded as {sys.getfilesystemencoding()}, not UTF-8")
    target = os.path.join(os.fsencode(parent), name)
    try:
        if payload is None:
            os.makedirs(target)
        else:
            with open(target, "wb") as file:
                file.write(payload)
    except OSError as exc:
        pytest.skip(f"the file system refuses a name that is not UTF-8 ({exc.strerror or exc})")
    return Path(os.fsdecode(target))
