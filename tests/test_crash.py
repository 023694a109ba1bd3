"""Crash consistency of a run folder, in the style of database crash testing.

A real `python -m cnn_backend train` subprocess (the seed model on 256 images, 3 epochs of 8 steps)
is stopped at a chosen moment and sent SIGKILL, SIGTERM or SIGINT there. The moments are made exact
by the pause points of :mod:`cnn_backend.faults`: with ``CNN_BACKEND_STOP_AT=<point>@<n>`` the run
sends itself SIGSTOP the n-th time it passes ``<point>``; the test waits for the stop, sends the
signal (and SIGCONT, so that SIGTERM and SIGINT are handled). Moments are drawn from a seeded
generator among: start-up (before and while the folder is taken, while the empty history is
written), every progress update of every epoch, each ``last.npz`` fully written but not yet
renamed, each history row just written, each ``best.npz`` link not yet renamed, and the plots.

After each signal the folder must either hold a loadable ``last.npz`` whose epoch is the history's
last, from which ``--resume`` ends with the weights of an uninterrupted run, or hold nothing that
stops a plain rerun into the same folder from reaching those weights. SIGTERM and SIGINT must also
leave no temporary file, exit 143 / 130, and say what is saved in one line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy
import pytest

from cnn_backend.checkpoint import STATE_KEY, load_checkpoint
from cnn_backend.report import read_history

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs POSIX signals (SIGSTOP, SIGKILL)")
EPOCHS, STEPS_PER_INTERVAL, STEPS_PER_EPOCH = 3, 2, 8
TRAIN = [
    "train", "--model", "seed", "--device", "cpu", "--data", "bundled", "--train-split", ":256", "--val-split", "9000:9128",
    "--epochs", str(EPOCHS), "--log-every", str(STEPS_PER_INTERVAL), "--quiet", "--out", "run",
]
RESUME = ["train", "--resume", str(Path("run") / "last.npz"), "--device", "cpu", "--quiet", "--no-plots"]
SUBPROCESS_TIMEOUT = 60
KILL_MOMENTS, TERM_MOMENTS, INT_MOMENTS = 20, 10, 10


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "CNN_BACKEND_DATA": str(REPO / "tests" / "no-such-data-dir"), **extra}
    env.pop("CNN_BACKEND_STOP_AT", None)
    env.update(extra)
    # One BLAS thread: the two workers below share the cores, and results stay reproducible.
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_cli(args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cnn_backend", *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT,
    )


def weights(path: Path) -> dict:
    with numpy.load(path) as archive:
        return {key: archive[key] for key in archive.files if key != STATE_KEY and not key.startswith("__")}


def leftovers(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir() if entry.name.endswith(".tmp") or entry.name == ".owner") if folder.exists() else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """An uninterrupted run: its final weights, history and best epoch."""
    root = tmp_path_factory.mktemp("reference")
    result = run_cli([*TRAIN, "--no-plots"], root)
    assert result.returncode == 0, result.stderr
    history = read_history(root / "run" / "history.jsonl")
    improvements, best = 0, None
    for row in history:
        if best is None or row["val_accuracy"] > best:
            improvements, best = improvements + 1, row["val_accuracy"]
    return {
        "weights": weights(root / "run" / "last.npz"),
        "history": [(row["epoch"], row["val_accuracy"]) for row in history],
        "best_epoch": load_checkpoint(root / "run" / "best.npz").epoch,
        "improvements": improvements,
    }


def moment_points(reference: dict) -> list[tuple[str, int]]:
    """(pause point, how many times an uninterrupted run passes it)."""
    steps = EPOCHS * STEPS_PER_EPOCH // STEPS_PER_INTERVAL
    return [
        ("start", 1), ("replace .owner", 1), ("replace history.jsonl", 1), ("folder", 1), ("step", steps),
        ("replace last.npz", EPOCHS), ("history", EPOCHS), ("replace best.npz", reference["improvements"]),
        ("plots", 1), ("replace curves.png", 1), ("replace filters.png", 1),
    ]


def draw_moments(reference: dict) -> list[tuple[int, str, int]]:
    rng = numpy.random.default_rng(20261202)
    points = moment_points(reference)
    moments = []
    for signum, count in ((signal.SIGKILL, KILL_MOMENTS), (signal.SIGTERM, TERM_MOMENTS), (signal.SIGINT, INT_MOMENTS)):
        # Every point in a shuffled round before any comes again; a random passage of each.
        order = numpy.concatenate([rng.permutation(len(points)) for _ in range(-(-count // len(points)))])[:count]
        for index in order:
            point, passes = points[index]
            moments.append((signum, point, int(rng.integers(1, passes + 1))))
    return moments


def stop_and_signal(cwd: Path, point: str, occurrence: int, signum: int) -> subprocess.CompletedProcess:
    """Run training until it stops itself at ``point@occurrence``, then deliver ``signum`` there."""
    process = subprocess.Popen(
        [sys.executable, "-m", "cnn_backend", *TRAIN], cwd=cwd, env=_env(CNN_BACKEND_STOP_AT=f"{point}@{occurrence}"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT
        while True:
            pid, status = os.waitpid(process.pid, os.WUNTRACED | os.WNOHANG)
            if pid and os.WIFSTOPPED(status):
                break
            assert not pid, f"the run ended without reaching {point}@{occurrence}: {process.stderr.read()}"
            assert time.monotonic() < deadline, f"the run never reached {point}@{occurrence}"
            time.sleep(0.01)
        process.send_signal(signum)
        if signum != signal.SIGKILL:
            process.send_signal(signal.SIGCONT)
        stdout, stderr = process.communicate(timeout=SUBPROCESS_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def check_moment(root: Path, reference: dict, signum: int, point: str, occurrence: int) -> str:
    """One moment end to end; returns what the folder held afterwards."""
    result = stop_and_signal(root, point, occurrence, signum)
    label = f"{signal.Signals(signum).name} at {point}@{occurrence}"
    run = root / "run"
    if signum == signal.SIGKILL:
        assert result.returncode == -signal.SIGKILL, (label, result.stderr)
    else:
        assert result.returncode == {signal.SIGTERM: 143, signal.SIGINT: 130}[signum], (label, result.stderr)
        lines = result.stderr.strip().splitlines()
        word = "terminated by SIGTERM" if signum == signal.SIGTERM else "interrupted"
        assert len(lines) == 1 and lines[0].startswith(f"cnn-backend: {word}") and "Traceback" not in result.stderr, (label, result.stderr)
        assert leftovers(run) == [], (label, leftovers(run))

    if (run / "last.npz").exists():
        checkpoint = load_checkpoint(run / "last.npz")
        history = read_history(run / "history.jsonl")
        assert [row["epoch"] for row in history] == list(range(1, checkpoint.epoch + 1)), label
        assert checkpoint.history == history, label
        if signum != signal.SIGKILL and checkpoint.epoch < EPOCHS:
            assert f"resume with: cnn-backend train --resume {Path('run') / 'last.npz'}" in result.stderr, (label, result.stderr)
        held = f"last.npz at epoch {checkpoint.epoch}"
        if checkpoint.epoch < EPOCHS:
            finished = run_cli(RESUME, root)
            assert finished.returncode == 0, (label, finished.stderr)
            assert (load_checkpoint(run / "best.npz").epoch) == reference["best_epoch"], label
            held += ", resumed"
        else:
            # A finished run; a SIGKILL between the commit and the best.npz link leaves best.npz one best behind,
            # and a killed plot leaves its hidden temporary (and .owner) for the next run in the folder to clear.
            assert load_checkpoint(run / "best.npz").epoch <= reference["best_epoch"], label
            held += ", finished" + (f" (hidden leftovers {', '.join(leftovers(run))})" if leftovers(run) else "")
            for name in leftovers(run):
                (run / name).unlink()
    else:
        if signum != signal.SIGKILL:
            assert not run.exists(), (label, sorted(path.name for path in run.iterdir()))
        held = "no checkpoint" + (", folder removed" if not run.exists() else ", leftovers only")
        finished = run_cli([*TRAIN, "--no-plots"], root)
        assert finished.returncode == 0, (label, finished.stderr)
        held += ", rerun"
    final = weights(run / "last.npz")
    assert final.keys() == reference["weights"].keys(), label
    for key, value in reference["weights"].items():
        numpy.testing.assert_allclose(final[key], value, rtol=1e-6, atol=1e-7, err_msg=f"{label}: {key}")
    assert [(row["epoch"], row["val_accuracy"]) for row in read_history(run / "history.jsonl")] == reference["history"], label
    assert leftovers(run) == [], (label, leftovers(run))
    return f"{label}: {held}"


def test_any_signal_at_any_moment_leaves_a_resumable_or_clean_folder(reference, tmp_path):
    moments = draw_moments(reference)
    assert len(moments) == KILL_MOMENTS + TERM_MOMENTS + INT_MOMENTS

    def one(index_and_moment):
        index, (signum, point, occurrence) = index_and_moment
        root = tmp_path / f"moment-{index:02d}"
        root.mkdir()
        return check_moment(root, reference, signum, point, occurrence)

    # Two at a time: each run is mostly start-up, and the checks do not depend on timing.
    with ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = list(pool.map(one, enumerate(moments)))
    print(f"\n{len(outcomes)} moments tried ({KILL_MOMENTS} SIGKILL, {TERM_MOMENTS} SIGTERM, {INT_MOMENTS} SIGINT):")
    print("\n".join(outcomes))
    points_hit = {outcome.split(" at ")[1].split("@")[0] for outcome in outcomes}
    assert points_hit == {point for point, _ in moment_points(reference)}, points_hit
