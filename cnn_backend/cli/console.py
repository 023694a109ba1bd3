"""How the command line reports an outcome: its exit statuses and its one-line messages.

Results go to stdout; errors go to stderr as ``cnn-backend: error: <message>``, always one line.
"""

from __future__ import annotations

import os
import sys

from ..backend import DeviceUnavailableError
from ..data import DataError
from ..datasets.base import printable
from ..distributed import DistributedSetupError
from ..layers import ShapeError
from ..serialization import ModelFileError

PROG = "cnn-backend"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
#: 128 + SIGPIPE: what a shell reports for a command whose output's reader went away (``| head``)
EXIT_OUTPUT_CLOSED = 141

#: errors a user can fix from the command line: reported in one line, exit status 2
USER_ERRORS = (DeviceUnavailableError, DataError, ModelFileError, ShapeError, ValueError, DistributedSetupError)


#: the option that sets how many images a command holds at once, where it is not --batch-size
BATCH_OPTIONS = {"benchmark": "--train-batch-sizes and --infer-batch-sizes", "summary": None, "download": None, "export": None}


def failure(exc: BaseException, command: str | None = None) -> tuple[int, str, str]:
    """Exit status, message and prefix of a failed ``command``; exceptions that are not known
    errors propagate (with their traceback)."""
    if isinstance(exc, KeyboardInterrupt):
        return getattr(exc, "exit_status", EXIT_INTERRUPTED), getattr(exc, "description", "interrupted"), ""
    if isinstance(exc, USER_ERRORS):
        return EXIT_USAGE, str(exc), "error: "
    if isinstance(exc, OSError):
        return EXIT_FAILED, str(exc), "error: "
    if isinstance(exc, MemoryError):  # NumPy's and CuPy's out-of-memory errors are MemoryErrors
        return EXIT_FAILED, out_of_memory(exc, BATCH_OPTIONS.get(command, "--batch-size")), "error: "
    raise exc


def out_of_memory(exc: MemoryError, batch_option: str | None = "--batch-size") -> str:
    """What ran out, and what to do: a smaller network, or fewer images at once through
    ``batch_option`` where the command has one."""
    what = " ".join(str(exc).split()) or "out of memory"
    if batch_option is None:
        return f"{what}; try a smaller network"
    return f"{what}; try a smaller network, or a smaller {batch_option}"


def output_closed() -> int:
    """Standard output's reader went away (``... | head``): send what is still to be printed
    nowhere, so that the interpreter's last flush does not fail again, and return the status a
    shell gives a command stopped by SIGPIPE. Nothing is said: the reader left on purpose."""
    _send_nowhere("stdout")
    return EXIT_OUTPUT_CLOSED


def _send_nowhere(name: str) -> None:
    """Point ``sys.<name>`` (stdout or stderr) at the null device, file descriptor included."""
    devnull = open(os.devnull, "w")
    try:
        os.dup2(devnull.fileno(), getattr(sys, name).fileno())
    except (AttributeError, OSError, ValueError):  # no file descriptor behind it
        setattr(sys, name, devnull)


def print_error(message, prefix: str = "error: ") -> None:
    text = " ".join(printable(message).split())  # always one line
    try:
        print(f"{PROG}: {prefix}{text}", file=sys.stderr, flush=True)
    except BrokenPipeError:  # nobody reads stderr either: the exit status alone says what happened
        _send_nowhere("stderr")


def say(*parts) -> None:
    """Print a result line on standard output (file names that are not UTF-8 shown with U+FFFD, so
    that a strict UTF-8 console takes them); a full disk or device behind it is said as such."""
    try:
        print(*(printable(part) for part in parts), flush=True)
    except BrokenPipeError:
        raise
    except OSError as exc:
        _send_nowhere("stdout")  # what is still buffered would fail again at exit
        raise OSError(f"cannot write standard output: {exc.strerror or exc}") from None


def silent(*parts, **options) -> None:
    pass
