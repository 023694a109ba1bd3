"""A training run's output folder: one owner at a time, and files that agree after any failure.

* **One owner.** :meth:`RunFolder.open` takes an exclusive ``flock`` on the folder itself; the
  operating system releases it when the process ends, however it ends, so a crash never leaves a
  stale lock. A second run on the folder is refused naming the holder's PID (kept in ``.owner``
  while the run lasts).
* **Nothing stuck.** A folder holds a run when it has ``last.npz`` or ``best.npz``. What a start
  that died leaves (a history without checkpoints, temporaries of a killed process) is cleared by
  the next owner; a start that fails without being killed removes what it wrote, and the folder
  when it made it.
* **Files agree.** Each epoch is committed by renaming ``last.npz`` into place; then its history row
  is appended (one ``write`` call), then ``best.npz`` becomes a hard link to (or copy of) that
  ``last.npz`` when the epoch is the best. The history never runs ahead of ``last.npz``; only a
  SIGKILL landing in the few system calls between the rename and the history write (the folder's
  flush, the ``write``) leaves it one row short (and
  ``best.npz`` one best behind), which the next start in the folder repairs from ``last.npz``.
  SIGINT and SIGTERM wait until the three writes are done.
* **SIGTERM is Ctrl-C.** :func:`stop_signals_raise` makes both raise :class:`Interrupted`, a
  ``KeyboardInterrupt`` carrying the exit status (130 for SIGINT, 143 for SIGTERM). The first one
  taken decides: later stop signals are ignored while it is reported, and, when the process ends
  with the command, until it exits.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy

from .faults import pause_point
from .serialization import TEMPORARY_SUFFIX, FileWriteError, atomic_path, temporary_name

LAST_CHECKPOINT, BEST_CHECKPOINT, HISTORY_FILE = "last.npz", "best.npz", "history.jsonl"
OWNER_FILE = ".owner"
#: folder that holds the default output folders (runs/<date-time>)
DEFAULT_PARENT = Path("runs")

STOP_SIGNALS = {signal.SIGINT: ("interrupted", 130), signal.SIGTERM: ("terminated by SIGTERM", 143)}


class RunFolderBusyError(ValueError):
    """The output folder is held by another live run."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: ``description`` ("interrupted", "terminated by SIGTERM") and ``exit_status``."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        self.signum = signum
        self.description, self.exit_status = STOP_SIGNALS.get(signum, ("interrupted", 130))
        super().__init__(self.description)


#: within :func:`stop_signals_raise`: whether inside it, and the stop signal taken (None: none yet)
_stop = {"inside": False, "taken": None}


def _raise_interrupted(signum, frame) -> None:
    _ignore_further_stop_signals(signum)
    raise Interrupted(signum)


def _ignore_further_stop_signals(signum: int) -> None:
    """The command ends on the first stop signal: a second one (a SIGTERM after Ctrl-C) would raise
    again while the first is reported, or kill the process as it exits, and end it with its status
    under the first one's message."""
    _stop["taken"] = signum
    for other in STOP_SIGNALS:
        # A function, not SIG_IGN: one already pending when the handler changes would be reported
        # ("Signal 15 ignored due to race condition") instead of ignored.
        signal.signal(other, _ignore)


def _ignore(signum, frame) -> None:
    pass


def _ignore_until_exit() -> None:
    """SIG_IGN for the stop signals: unlike a Python handler, which the interpreter resets to the
    default as it shuts down (the slow part of its exit), it lasts until the process ends. Blocked
    meanwhile, so that none arrives as the handler changes (the race ``_ignore`` avoids)."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, set(STOP_SIGNALS))
    try:
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _the_program_is_the_command_line() -> bool:
    """Whether the program's ``__main__`` runs the command line's ``main`` (``python -m cnn_backend``,
    the ``cnn-backend`` script, a script calling it): the process then ends with the command. Called
    from other code (a test), it must get its signal handlers back."""
    main = getattr(sys.modules.get("__main__"), "main", None)
    return getattr(main, "__module__", None) == "cnn_backend.cli" and getattr(main, "__name__", None) == "main"


@contextlib.contextmanager
def stop_signals_raise():
    """Within the block, SIGINT and SIGTERM raise :class:`Interrupted` (main thread only); the
    previous handlers come back after it.

    Also undoes an ignored SIGINT inherited by a process started in the background: training should
    still stop cleanly, with its checkpoint, when sent one. Once one is taken, further ones are
    ignored; and they stay ignored after the block when the program is the command line, which
    exits next (a SIGTERM during the interpreter's shutdown would otherwise end a Ctrl-C with 143).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    outer = dict(_stop)
    _stop.update(inside=True, taken=None)
    previous = {signum: signal.signal(signum, _raise_interrupted) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        taken = _stop["taken"]
        _stop.update(outer)
        if taken is not None and _the_program_is_the_command_line():
            _ignore_until_exit()
        else:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


class DeferredInterrupt:
    """Hold SIGINT and SIGTERM back while an epoch's files are written, then raise the first one
    received: the history and the checkpoints always describe the same finished epoch."""

    def __enter__(self):
        self.received: int | None = None
        self.previous: dict = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {signum: signal.signal(signum, self._hold) for signum in STOP_SIGNALS}
        return self

    def _hold(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    def __exit__(self, exc_type, exc, traceback) -> bool:
        stopping = self.received is not None and exc_type is None
        if stopping and self.previous and _stop["inside"]:
            # Straight from holding to ignoring: restored first, the raising handlers could take a
            # second signal in place of the first.
            _ignore_further_stop_signals(self.received)
        else:
            for signum, handler in self.previous.items():
                signal.signal(signum, handler)
        if stopping:
            raise Interrupted(self.received)
        return False


class AgreedStops:
    """In a job of several processes, stop together: a SIGINT or SIGTERM is held, and the processes
    agree at their next collective operation (:meth:`agree`, which every one calls at the same
    points) to raise :class:`Interrupted` on all of them at once.

    Raised where it arrives, a signal that reaches one process (or all, a moment apart) makes that
    one leave the collectives while the others wait in one, in C, where no Python signal handler
    runs: rank 0 could neither report nor clean its folder. A second signal to a process raises at
    once, for one held up outside the collectives.
    """

    def __init__(self, world) -> None:
        self.world = world
        self.received: int | None = None
        self.previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {signum: signal.signal(signum, self._hold) for signum in STOP_SIGNALS}
        return self

    def _hold(self, signum, frame) -> None:
        if self.received is not None:
            self._stop(Interrupted(signum))
        self.received = signum

    def _stop(self, stop: Interrupted):
        if _stop["inside"]:  # the command line ends on it: further signals are ignored (see stop_signals_raise)
            _ignore_further_stop_signals(stop.signum)
            self.previous = {}
        raise stop

    def agree(self) -> None:
        """Raise :class:`Interrupted` on every process if a stop signal reached any: the signal of
        the lowest such rank, named on the others ("terminated by SIGTERM on rank 1 of 2")."""
        received = numpy.zeros(self.world.size)
        received[self.world.rank] = self.received or 0
        self.world.allreduce_sum(received)
        stopped = numpy.flatnonzero(received)
        if not stopped.size:
            return
        rank = int(stopped[0])
        stop = Interrupted(self.received or int(received[rank]))
        if not self.received:
            stop.description += f" on rank {rank} of {self.world.size}"
        self._stop(stop)

    def __exit__(self, exc_type, exc, traceback) -> bool:
        # Held past the last collective: rank 0 stops (its plots, its summary); the others have
        # nothing left but to end, as rank 0's job does.
        stopping = exc_type is None and self.received is not None and self.world.is_root
        if not (stopping and _stop["inside"]):  # else straight from holding to ignoring, as DeferredInterrupt
            for signum, handler in self.previous.items():  # none left once a stop was taken in the command line
                signal.signal(signum, handler)
        if stopping:
            self._stop(Interrupted(self.received))
        return False


class RunFolder:
    """An output folder this process owns (see the module docstring); :meth:`close` gives it up."""

    def __init__(self, path: Path, created: bool) -> None:
        self.path, self.created = path, created
        self._descriptor: int | None = None
        self._accepted = False  # whether the folder was found free for this run (its leftovers are ours)
        self.created_parents: list[Path] = []  # folders above it made for it (runs/, or --out's), deepest first

    # -- opening ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, requested: Path | None, resumed_checkpoint: Path | None = None, *, imports=()) -> "RunFolder":
        """Own ``requested`` (default: the resumed checkpoint's folder, else a new ``runs/<date-time>``).

        Refuses a folder that holds another run (unless it is the resumed checkpoint's own), is
        held by a live process, or is a file; ``imports`` (``--import`` as given) go into the
        refusal's resume hint.
        """
        _fcntl()  # before anything is created
        resumed_folder = resumed_checkpoint.parent if resumed_checkpoint is not None else None
        if requested is None and resumed_folder is not None:
            requested = resumed_folder
        if requested is None:
            made_parent = not DEFAULT_PARENT.exists()
            folder = cls(_new_default_folder(), created=True)
            folder.created_parents = [DEFAULT_PARENT] if made_parent else []
        else:
            if requested.exists() and not requested.is_dir():
                raise ValueError(f"--out {requested} is a file, not a folder; choose another --out")
            missing = [path for path in (requested, *requested.parents) if not path.exists()]
            try:
                requested.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise FileWriteError(requested, OSError(exc.errno, f"{exc.strerror or exc}; choose another --out")) from None
            folder = cls(requested, created=bool(missing))
            folder.created_parents = missing[1:]
        try:
            folder._lock()
            resuming_here = resumed_folder is not None and _same_folder(folder.path, resumed_folder)
            folder._refuse_another_run(resuming_here, imports)
            folder._accepted = True
            folder._clear_leftovers()
        except BaseException:
            folder.close()
            raise
        return folder

    def _lock(self) -> None:
        fcntl = _fcntl()
        descriptor = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(descriptor)
            raise RunFolderBusyError(
                f"{self.path} is in use by another training run ({self._holder()}); wait for it to end, "
                "or choose another --out"
            ) from None
        self._descriptor = descriptor
        with atomic_path(self.path / OWNER_FILE) as temporary:
            temporary.write_text(f"{os.getpid()}\n", encoding="ascii")

    def _holder(self) -> str:
        try:
            return f"PID {int((self.path / OWNER_FILE).read_text(encoding='ascii'))}"
        except (OSError, ValueError):
            return "PID unknown"

    def _refuse_another_run(self, resuming_here: bool, imports=()) -> None:
        existing = [name for name in (LAST_CHECKPOINT, BEST_CHECKPOINT) if (self.path / name).exists()]
        if existing and not resuming_here:
            hint = f", or continue it with {resume_arguments(self.path / LAST_CHECKPOINT, imports=imports)}" if LAST_CHECKPOINT in existing else ""
            raise ValueError(f"{self.path} already holds a training run ({', '.join(existing)}); choose another --out{hint}")

    def _clear_leftovers(self) -> None:
        # Only the owner writes here, so every temporary file is a killed process's.
        for entry in self.path.iterdir():
            if entry.name.startswith(".") and entry.name.endswith(TEMPORARY_SUFFIX):
                entry.unlink(missing_ok=True)

    # -- an epoch's files ------------------------------------------------------------------------

    def link_best(self) -> None:
        """Make ``best.npz`` the current ``last.npz`` (a hard link, or a copy where links fail), atomically."""
        last, best = self.path / LAST_CHECKPOINT, self.path / BEST_CHECKPOINT
        temporary = temporary_name(best)
        try:
            try:
                os.link(last, temporary)
            except OSError:
                shutil.copyfile(last, temporary)
            pause_point(f"replace {best.name}")
            os.replace(temporary, best)
        except OSError as exc:
            raise FileWriteError(best, exc) from None
        finally:
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)

    def holds_checkpoint(self) -> bool:
        return (self.path / LAST_CHECKPOINT).exists()

    # -- closing ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Give the folder up. Without a checkpoint in it, what this run wrote goes too (and the
        folder, when this run made it and nothing else is left in it)."""
        if self._descriptor is not None:
            with contextlib.suppress(OSError):
                (self.path / OWNER_FILE).unlink(missing_ok=True)
                if self._accepted and not self.holds_checkpoint():
                    (self.path / HISTORY_FILE).unlink(missing_ok=True)
                    self._clear_leftovers()
                if self.created and not any(self.path.iterdir()):
                    self.path.rmdir()
                    for parent in self.created_parents:  # each only if empty: rmdir refuses otherwise
                        parent.rmdir()
            os.close(self._descriptor)  # releases the lock
            self._descriptor = None


def resume_arguments(checkpoint: Path, *, out: Path | None = None, imports=(), options=()) -> str:
    """``--resume CHECKPOINT [--out DIR] [--import MODULE ...] [OPTIONS]``, quoted for a shell: the
    ``--import`` arguments as given, without which a network with a layer of one's own cannot be
    rebuilt, and ``options`` (words) the checkpoint does not hold yet."""
    words = ["--resume", str(checkpoint), *(["--out", str(out)] if out is not None else [])]
    words += [word for text in imports for word in ("--import", text)]
    words += [str(word) for word in options]
    return " ".join(shlex.quote(word) for word in words)


def _fcntl():
    try:
        import fcntl
    except ImportError:
        raise RunFolderBusyError("this platform has no fcntl module, which locks the output folder; run on Linux or macOS") from None
    return fcntl


def _new_default_folder() -> Path:
    """A new, empty ``runs/<date-time>[-N]``, claimed atomically (two runs started in the same second
    get different folders)."""
    base = DEFAULT_PARENT / time.strftime("%Y%m%d-%H%M%S")
    try:
        DEFAULT_PARENT.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FileWriteError(DEFAULT_PARENT, exc) from None
    candidate, suffix = base, 2
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            candidate, suffix = base.with_name(f"{base.name}-{suffix}"), suffix + 1
        except OSError as exc:
            raise FileWriteError(candidate, exc) from None


def _same_folder(first: Path, second: Path) -> bool:
    try:
        return first.resolve() == second.resolve()
    except OSError:
        return False
