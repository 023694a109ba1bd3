"""The ``cnn-backend`` command line: ``train``, ``evaluate``, ``predict``, ``summary``, ``download``, ``benchmark``,
``parity``, ``export``.

:func:`main` returns the exit status: 0 on success, 1 when training fails (non-finite loss), a file
cannot be written or memory runs out, 2 for bad usage, an unusable device, or unreadable data or checkpoints, and 130
when interrupted. Known errors are reported as one line, ``cnn-backend: error: <message>``, on
stderr, without a traceback; usage errors too (with the command's ``--help`` to see; under ``mpiexec``, from rank 0 alone). SIGTERM is
handled like Ctrl-C, with exit status 143. Results go to stdout; the progress bar and errors go to stderr.

This package holds the entry point and the parser; :mod:`.train`, :mod:`.evaluate` (also ``predict``)
and :mod:`.utility` (``summary``, ``download``) the commands; :mod:`.settings` and :mod:`.recorder` a
training run's settings and files; :mod:`.arguments` the argument types; :mod:`.runtime` the device
and network a command runs on; :mod:`.console` the exit statuses and one-line messages.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import time

from .. import __version__
# Looked up here by the command modules when called, so that replacing them on this package (as
# the tests do, to stay offline or to put in a stand-in device) takes effect everywhere.
from ..backend import get_backend
from ..data import download
from ..datasets import download_dataset
from ..distributed import DistributedSetupError, abort_job, import_mpi, launcher_rank, launcher_size
from ..runfolder import stop_signals_raise
from .console import EXIT_FAILED, EXIT_OK, EXIT_USAGE, PROG, failure, output_closed, print_error
from .evaluate import add_evaluate_command, add_predict_command
# The steps of setting up a run, which the tests call from here.
from .runtime import build_model, check_environment_variables, open_backend
from .settings import resolve_ranges, resolve_settings
from .train import add_train_command
from .utility import add_download_command, add_summary_command

__all__ = [
    "EXIT_FAILED", "EXIT_USAGE", "build_model", "download", "download_dataset", "get_backend", "main", "open_backend",
    "resolve_ranges", "resolve_settings",
]

#: commands provided by optional modules, loaded only when invoked: name -> (module, help)
OPTIONAL_COMMANDS = {
    "benchmark": ("cnn_backend.benchmark", "measure training speed on a device"),
    "parity": ("cnn_backend.parity", "compare CPU and GPU results"),
    "export": ("cnn_backend.export", "write a checkpoint as an ONNX model"),
}


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if launcher_rank() not in (None, 0) and any(arg in ("-h", "--help", "--version") for arg in argv):
        return EXIT_OK  # under mpiexec, rank 0 alone shows the help or the version, once
    command = _command_name(argv)
    optional_module = None
    if command in OPTIONAL_COMMANDS:
        try:
            optional_module = load_optional_command(command)
        except ImportError as exc:
            print_error(exc)
            return EXIT_USAGE
    parser = build_parser({command: optional_module} if optional_module else {})
    for command_parser in parser.command_parsers.values():
        command_parser.given_arguments = argv
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # said by the command's parser, so the line points at that command's --help
            parser.command_parsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as exc:  # --help, --version, or a usage error already reported in one line
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    if args.command != "train":
        try:
            _refuse_a_job_of_several_processes(args.command)
        except SystemExit as exc:  # refused, in one line from rank 0
            return exc.code
    try:
        if args.command != "train":  # train checks them in every process of a job, where a failure ends the job
            check_environment_variables()
        with stop_signals_raise():
            return args.handler(args)
    except BrokenPipeError:
        return output_closed()
    except BaseException as exc:
        status, message, prefix = failure(exc, args.command)
        print_error(message, prefix)
        return status


def _command_name(argv: list[str]) -> str | None:
    return next((arg for arg in argv if not arg.startswith("-")), None)


class OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line, ``cnn-backend: error: <message>; see <command> --help``, exit 2
    (instead of argparse's usage block before the message)."""

    #: the whole command line, set by main: a stray option can make argparse report its value instead
    given_arguments: list[str] = []

    def error(self, message: str):
        # Only a positional argument takes a stray option's value for its own.
        stray = self._stray_options() if "invalid choice" in message and not message.startswith("argument -") else []
        if stray:  # `download --epochs 2`: the 2 was taken for NAME; the option is the mistake
            message = f"unrecognized arguments: {' '.join(stray)}"
        text = f"{message}; see {self.prog} --help"
        rank = launcher_rank()
        if rank is not None:
            _end_job_for_a_usage_error(text, rank)
        print_error(text)
        raise SystemExit(EXIT_USAGE)

    def _stray_options(self) -> list[str]:
        """The options on the command line that this parser does not know."""
        known = self._option_string_actions  # every option string this parser takes, -h included
        stray = []
        for word in self.given_arguments:
            name = word.split("=")[0]
            if not word.startswith("-") or _is_number(word) or any(option.startswith(name) for option in known):
                continue  # a value, a negative number, or an option (abbreviations count, as argparse takes them)
            stray.append(word)
        return stray


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


#: seconds a process other than rank 0 waits, after a usage error, for rank 0 to end the job
USAGE_ERROR_GRACE_SECONDS = 5.0


def _end_job_for_a_usage_error(text: str, rank: int) -> None:
    """Under mpiexec each process parses its own command line. Where all are wrong alike, rank 0
    says so once and ends the job; where only another rank's is (``mpiexec ... : ...``), rank 0
    waits for it in a collective operation, so that rank says so itself after a grace period and
    ends the job. Returns only when there is no job of several processes to end."""
    try:
        MPI = import_mpi()  # initialises MPI, as every process of the job does
    except (ImportError, DistributedSetupError):
        if rank != 0:
            raise SystemExit(EXIT_USAGE)
        return
    size = MPI.COMM_WORLD.Get_size()
    if size == 1:
        return
    if rank != 0:
        # Ended here by rank 0 if its command line was wrong too; Ctrl-C ends the wait, not the report.
        with contextlib.suppress(KeyboardInterrupt):
            time.sleep(USAGE_ERROR_GRACE_SECONDS)
        text = f"rank {rank} of {size}: {text}"
    print_error(text)
    abort_job(MPI.COMM_WORLD, EXIT_USAGE)
    os._exit(EXIT_USAGE)  # MPI_Abort may return before the launcher ends this process: say nothing more


def _refuse_a_job_of_several_processes(command: str) -> None:
    """Only ``train`` shares its work among the processes of an ``mpiexec`` job; any other command
    would run once per process, each printing (and writing) the same, so a job of several is
    refused in one line by rank 0. Returns when this is not such a job."""
    rank = launcher_rank()
    size = launcher_size()  # from the launcher's environment: no need to start MPI to know it
    if rank is None or size == 1:
        return
    text = f"{command} runs in one process: start it without mpiexec (train alone shares its work among the processes of a job)"
    _end_job_for_a_usage_error(text, rank)  # rank 0 says it once and ends the job (with mpi4py)
    if size is not None:  # several processes but no mpi4py to end them with: rank 0 says it, each stops
        print_error(text)
        raise SystemExit(EXIT_USAGE)


def build_parser(optional_modules: dict | None = None) -> argparse.ArgumentParser:
    """The full parser. ``optional_modules`` maps optional command names to their loaded modules;
    the others are listed in the help only, so their modules are imported just when invoked."""
    parser = OneLineParser(
        prog=PROG, description="Train and evaluate a from-scratch CNN on Fashion-MNIST, other datasets or your own images, on the CPU or a CUDA GPU."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train_command(commands)
    add_evaluate_command(commands)
    add_predict_command(commands)
    add_summary_command(commands)
    add_download_command(commands)
    for name, (_, help_text) in OPTIONAL_COMMANDS.items():
        module = (optional_modules or {}).get(name)
        description = (module.__doc__ or "").strip().split("\n\n")[0] if module is not None else ""
        sub = commands.add_parser(name, help=help_text, description=description or help_text)
        if module is not None:
            module.add_arguments(sub)
            sub.set_defaults(handler=module.run)
    parser.command_parsers = commands.choices
    return parser


def load_optional_command(name: str):
    """The module behind an optional command; ImportError (one line) when it is missing or incomplete."""
    module_name = OPTIONAL_COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"the {name} command is not available: {module_name} cannot be imported ({exc})") from None
    if not (callable(getattr(module, "add_arguments", None)) and callable(getattr(module, "run", None))):
        raise ImportError(f"the {name} command is not available: {module_name} lacks add_arguments(parser) and run(args)")
    return module

