"""Helpers for the tests that run the command line, or a script of scripts/, in this process."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from cnn_backend import cli


def load_script(path: Path):
    """The script at ``path`` (scripts/NAME.py) as a module, its functions callable from a test."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(capsys, *args) -> tuple[int, str, str]:
    """``cnn-backend ARGS`` in this process: its exit status, stdout and stderr."""
    status = cli.main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def one_error_line(err: str, *fragments: str) -> str:
    """The single ``cnn-backend: error:`` line that ``err`` must be, holding every fragment."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("cnn-backend: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
