"""What a training run shows and keeps as it goes: the progress bar, one line per epoch, and the
run folder's files after every epoch."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy

from ..checkpoint import STATE_KEY, Checkpoint, save_checkpoint
from ..faults import pause_point
from ..inputs import InputSpec
from ..report import HistoryWriter, read_history
from ..runfolder import BEST_CHECKPOINT, HISTORY_FILE, LAST_CHECKPOINT, DeferredInterrupt, RunFolder, resume_arguments
from .console import PROG
from .settings import option_words


class EpochProgress:
    """A per-epoch progress bar (loss, accuracy, samples/s) fed from the Trainer's log intervals;
    nothing at all when ``show_bar`` is False (the per-epoch lines are printed either way)."""

    def __init__(self, epochs: int, steps_per_epoch: int, batch_size: int, samples_per_epoch: int, show_bar: bool) -> None:
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        self.batch_size, self.samples_per_epoch = batch_size, samples_per_epoch
        self.show_bar = show_bar
        self.bar = None
        self.epoch = 0

    def start(self, epoch: int) -> None:
        self.epoch = epoch
        self.started = time.perf_counter()
        if self.show_bar:
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.steps_per_epoch, desc=f"epoch {epoch}/{self.epochs}", unit="step",
                leave=False, file=sys.stderr, dynamic_ncols=True,
            )

    def update(self, steps_done: int, loss: float, accuracy: float) -> None:
        pause_point("step")
        if self.bar is None:
            return
        samples = min(steps_done * self.batch_size, self.samples_per_epoch)
        rate = samples / max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix_str(f"loss {loss:.4f}, acc {accuracy:.3f}, {rate:,.0f} samples/s", refresh=False)
        self.bar.update(steps_done - self.bar.n)
        if steps_done == self.steps_per_epoch:
            self.bar.set_description(f"epoch {self.epoch}/{self.epochs} validating")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class RunRecorder:
    """Records each finished epoch in the run folder: ``last.npz`` (the commit), the history row,
    then ``best.npz`` when the validation accuracy improved, as one step that SIGINT and SIGTERM
    cannot split (see :mod:`cnn_backend.runfolder` for the order)."""

    def __init__(self, folder: RunFolder, model, optimizer, schedule, settings: dict, *, history: list[dict], best: dict,
                 resumed: Checkpoint | None = None, inputs: InputSpec | None = None, imports=(),
                 resume_options=()) -> None:
        self.folder, self.out_dir = folder, folder.path
        self.imports = tuple(imports)  # --import as given, repeated in the resume hint
        self.resume_options = tuple(resume_options)  # what a hint naming ``resumed`` repeats
        self.processes = int(settings.get("processes", 1))  # an mpiexec job's, repeated there too
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.inputs = inputs
        self.settings = settings
        self.history = list(history)
        self.best = dict(best)
        self.resumed = resumed
        self.last_saved_epoch = None  # the epoch of this folder's last.npz, once this run wrote one
        self.samples = 0
        self.seconds = 0.0
        self.writer = HistoryWriter(self.out_dir / HISTORY_FILE)
        if resumed is not None and same_folder(resumed.path.parent, self.out_dir):
            self.last_saved_epoch = resumed.epoch
            if self.best["epoch"] == resumed.epoch and resumed.path.name == LAST_CHECKPOINT:
                folder.link_best()  # repairs a best.npz left one best behind by a kill (cheap: a link)
        # Rewritten from the checkpoint: also repairs a history left one row short by a kill.
        self.writer.start(self.history)

    def record(self, stats, committed=None) -> bool:
        """Write the files of a finished epoch; returns whether it is the new best. ``committed(improved)``
        runs once they are written, before a signal held back meanwhile stops the run: the epoch's
        line is printed even then."""
        row = stats.as_dict()
        improved = stats.val_accuracy is not None and (self.best["val_accuracy"] is None or stats.val_accuracy > self.best["val_accuracy"])
        best = {"epoch": stats.epoch, "val_accuracy": stats.val_accuracy} if improved else self.best
        self.samples += stats.samples_per_second * stats.seconds
        self.seconds += stats.seconds
        with DeferredInterrupt():
            self._save(LAST_CHECKPOINT, stats.epoch, best, self.history + [row])
            self.history.append(row)
            self.best, self.last_saved_epoch = best, stats.epoch
            self.writer.append(row)
            pause_point("history")
            if improved:
                self.folder.link_best()
            if committed is not None:
                committed(improved)
        return improved

    def _save(self, name: str, epoch: int, best: dict, history: list[dict]) -> None:
        save_checkpoint(
            self.out_dir / name, self.model, self.optimizer, epoch=epoch, schedule=self.schedule,
            settings=self.settings, loader_seed=self.settings["seed"], best=best, history=history,
            inputs=self.inputs,
        )

    def close(self) -> None:
        self.writer.close()

    def intact_text(self, *, resume_hint: bool) -> str:
        """Which checkpoint is good after a failure (never a file that does not exist), and how to resume."""
        if self.last_saved_epoch is not None:
            return good_checkpoint_text(self.out_dir / LAST_CHECKPOINT, self.last_saved_epoch, None, self.imports, resume_hint, self.processes)
        if self.resumed is not None:
            return good_checkpoint_text(self.resumed.path, self.resumed.epoch, self.out_dir, self.imports, resume_hint,
                                        self.processes, self.resume_options)
        return NO_CHECKPOINT


#: what a run stopped before its first epoch's commit keeps
NO_CHECKPOINT = "no epoch finished, so no checkpoint was written"


def good_checkpoint_text(path: Path, epoch: int, out: Path | None, imports, resume_hint: bool, processes: int = 1,
                         options=()) -> str:
    """Which checkpoint is good after a failure and, with ``resume_hint``, the command that resumes
    it (into ``out`` when that is not the checkpoint's own folder; ``--import`` as given; the
    setting ``options`` the checkpoint does not hold yet)."""
    text = f"the last good checkpoint is {path} (epoch {epoch})"
    if resume_hint:
        text += f"; resume with: {resume_command(path, out, imports, processes, options)}"
    return text


def resume_command(path: Path, out: Path | None, imports, processes: int = 1, options=()) -> str:
    """The command that resumes ``path`` (into ``out``, with ``--import`` as given, and
    ``options``), under ``mpiexec -n K`` for a job of K processes: resumed alike, the run
    continues step for step."""
    launcher = f"mpiexec -n {processes} " if processes > 1 else ""
    return f"{launcher}{PROG} train {resume_arguments(path, out=out, imports=imports, options=options)}"


def options_not_stored(explicit: dict, checkpoint: Checkpoint) -> list[str]:
    """The setting options given on this command line whose values ``checkpoint`` does not hold
    (``--epochs 12`` on resuming a finished 10-epoch run), as words: a resume hint that names that
    checkpoint repeats them, or the pasted hint would train to the stored settings instead."""
    stored = checkpoint.settings
    return [word for key, value in explicit.items() if stored.get(key) != value for word in option_words(key, value)]


def same_folder(first: Path, second: Path) -> bool:
    return first.resolve() == second.resolve()


def refuse_files_of_another_run(out_dir: Path, checkpoint: Checkpoint) -> None:
    """Refuse to resume ``checkpoint`` in its own folder ``out_dir`` when the folder's history.jsonl or
    best.npz are not of its run (another run's last.npz copied over this one's): the run would go on
    beside another run's history and best.npz.

    A run is known by its history, whose rows hold each epoch's losses and timings. The files must
    hold the checkpoint's rows or fewer (one fewer after a SIGKILL between the commit and the
    history write; best.npz is an earlier epoch's last.npz). A file that cannot be read says nothing.
    """
    rows = checkpoint.history
    for name, stored in ((HISTORY_FILE, _history_file_rows(out_dir / HISTORY_FILE)),
                         (BEST_CHECKPOINT, _stored_history(out_dir / BEST_CHECKPOINT, checkpoint.path))):
        if stored is None:
            continue
        epoch = next((row for row, (ours, theirs) in enumerate(zip(rows, stored), 1) if ours != theirs), None)
        if epoch is not None:
            raise ValueError(
                f"{checkpoint.path} and {out_dir / name} are from different runs (their histories differ from epoch {epoch}): "
                f"resuming it there would mix two runs' files; put back the files of one run, or add "
                f"--out NEW_FOLDER to go on from this checkpoint there"
            )
        if len(stored) > len(rows):
            raise ValueError(
                f"{out_dir / name} goes on to epoch {len(stored)} but {checkpoint.path} holds epoch {checkpoint.epoch}: "
                f"resuming it in its own folder would overwrite the later epochs; put the run's own {checkpoint.path.name} "
                f"back, or add --out NEW_FOLDER to go on from epoch {checkpoint.epoch} there"
            )


def _history_file_rows(path: Path) -> list | None:
    try:
        return read_history(path)
    except (OSError, ValueError):
        return None


def _stored_history(path: Path, resumed: Path) -> list | None:
    """The history kept in the checkpoint ``path`` (its training state alone is read), or None."""
    try:
        if os.path.samefile(path, resumed):
            return None  # best.npz linked to the checkpoint resumed: the same file
        with numpy.load(path, allow_pickle=False) as archive:
            history = json.loads(str(archive[STATE_KEY]))["history"]
    except Exception:  # noqa: BLE001 - absent, unreadable or not a checkpoint: no evidence either way
        return None
    return history if isinstance(history, list) else None


def format_epoch_line(stats, epochs: int, improved: bool) -> str:
    """One line per finished epoch."""
    width = len(str(epochs))
    line = f"epoch {stats.epoch:>{width}}/{epochs}  train loss {stats.train_loss:.4f} acc {stats.train_accuracy:.4f}"
    if stats.val_accuracy is not None:
        line += f"  val loss {stats.val_loss:.4f} acc {stats.val_accuracy:.4f}"
    line += f"  lr {stats.lr:.3g}  {stats.seconds:.1f} s  {stats.samples_per_second:,.0f} samples/s"
    return line + ("  *best" if improved else "")
