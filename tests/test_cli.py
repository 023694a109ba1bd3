"""The command line end to end: `python -m cnn_backend ...` on the bundled data, a few hundred images
per run so that each takes seconds."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy
import pytest

from cnn_backend import DeviceUnavailableError, OneCycleSchedule, Sequential, get_backend
from cnn_backend.checkpoint import STATE_KEY, load_checkpoint
from cnn_backend.cli import open_backend, resolve_ranges, resolve_settings
from cnn_backend.report import matplotlib_available, read_history
from cnn_backend.training import OPTIMIZER_DEFAULTS, RECIPES

from cli_helpers import run_main

REPO = Path(__file__).resolve().parent.parent
SMALL = ["--model", "seed", "--device", "cpu", "--data", "bundled", "--train-split", ":512", "--val-split", "9000:9256", "--quiet"]


def has_usable_gpu() -> bool:
    try:
        get_backend("cuda")
    except DeviceUnavailableError:
        return False
    return True


def cli(*args, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cnn_backend", *map(str, args)],
        cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout,
    )


def _env() -> dict:
    # The checkout's package, whatever is installed; no downloaded data set from this machine.
    return {**os.environ, "PYTHONPATH": str(REPO), "CNN_BACKEND_DATA": str(REPO / "tests" / "no-such-data-dir")}


def assert_one_error_line(result: subprocess.CompletedProcess, status: int, *fragments: str) -> str:
    assert result.returncode == status, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def parameters(path: Path) -> dict:
    with numpy.load(path) as archive:
        return {key: archive[key] for key in archive.files if key != STATE_KEY and not key.startswith("__")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished two-epoch run of the seed model."""
    root = tmp_path_factory.mktemp("run")
    result = cli("train", *SMALL, "--epochs", 2, "--out", "run", cwd=root)
    assert result.returncode == 0, result.stderr
    (root / "stdout.txt").write_text(result.stdout)
    return root / "run"


def test_train_writes_history_checkpoints_and_plots(trained):
    stdout = (trained.parent / "stdout.txt").read_text()
    assert "split: training on [0:512] (512 images), validating on [9000:9256] (256 images)" in stdout
    assert re.search(r"done: best validation accuracy 0\.\d+ at epoch [12]; 2 epochs in .* samples/s on cpu", stdout)

    history = read_history(trained / "history.jsonl")
    assert [row["epoch"] for row in history] == [1, 2]
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds", "samples_per_second"} <= set(history[0])

    last, best = load_checkpoint(trained / "last.npz"), load_checkpoint(trained / "best.npz")
    assert last.epoch == 2 and last.history == history
    best_row = max(history, key=lambda row: row["val_accuracy"])
    assert best.epoch == best_row["epoch"] and best.best["val_accuracy"] == best_row["val_accuracy"]
    assert last.settings["train_split"] == ":512" and last.settings["val_split"] == "9000:9256"
    assert last.optimizer_name == "sgd" and last.state["optimizer"]["steps"] == 2 * 16
    Sequential.load(trained / "last.npz")  # also a plain model file

    plots = {"curves.png", "confusion_matrix.png", "filters.png"}
    written = {path.name for path in trained.iterdir()}
    if matplotlib_available():
        assert plots <= written
        assert all((trained / name).read_bytes()[:4] == b"\x89PNG" for name in plots)
    assert not [name for name in written if name.endswith(".tmp")]


def test_one_cycle_schedule_is_recorded_and_followed(tmp_path):
    result = cli("train", *SMALL, "--optimizer", "adam", "--lr", "0.004", "--schedule", "one-cycle", "--epochs", 2,
                 "--no-plots", "--out", "run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "one-cycle schedule" in result.stdout
    last = load_checkpoint(tmp_path / "run" / "last.npz")
    expected = OneCycleSchedule(0.004, total_steps=2 * 16)
    assert last.schedule == expected.config()
    # each epoch's logged rate is that of its last step: 16 steps per epoch
    assert [row["lr"] for row in read_history(tmp_path / "run" / "history.jsonl")] == pytest.approx([expected(15), expected(31)])


@pytest.mark.parametrize(
    "optimizer",
    [["--optimizer", "sgd", "--momentum", "0.9"], ["--optimizer", "adam"], ["--optimizer", "sgd", "--augment", "crop-flip"],
     ["--optimizer", "sgd", "--label-smoothing", "0.2"]],
    ids=["sgd-momentum", "adam", "sgd-augmented", "sgd-label-smoothing"],
)
def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, optimizer):
    options = [*SMALL, *optimizer, "--weight-decay", "1e-3", "--no-plots"]
    assert cli("train", *options, "--epochs", 2, "--out", "straight", cwd=tmp_path).returncode == 0
    assert cli("train", *options, "--epochs", 1, "--out", "split", cwd=tmp_path).returncode == 0
    resumed = cli("train", "--resume", tmp_path / "split" / "last.npz", "--epochs", 2, "--device", "cpu", "--quiet", "--no-plots", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming: " in resumed.stdout and "training epoch 2\n" in resumed.stdout

    straight, split = parameters(tmp_path / "straight" / "last.npz"), parameters(tmp_path / "split" / "last.npz")
    assert straight.keys() == split.keys() and any(key.startswith("optim/") for key in straight)
    for key in straight:
        numpy.testing.assert_allclose(split[key], straight[key], rtol=1e-6, atol=1e-7, err_msg=key)
    straight_history = read_history(tmp_path / "straight" / "history.jsonl")
    split_history = read_history(tmp_path / "split" / "history.jsonl")
    assert [row["epoch"] for row in split_history] == [1, 2]
    assert [row["val_accuracy"] for row in split_history] == [row["val_accuracy"] for row in straight_history]


def test_ctrl_c_keeps_a_complete_checkpoint_and_says_how_to_resume(tmp_path):
    # Many epochs of 4,000 images: still training when the signal arrives.
    args = [*SMALL, "--train-split", ":4000", "--epochs", 1000, "--out", "run", "--no-plots"]
    process = subprocess.Popen(
        [sys.executable, "-m", "cnn_backend", "train", *map(str, args)],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    last = tmp_path / "run" / "last.npz"
    deadline = time.monotonic() + 90
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert last.exists(), "no checkpoint appeared"
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)

    assert process.returncode == 130, stderr
    line = assert_one_error_line(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), 130, "interrupted ")
    # The signal lands in the next epoch, or (on a slow machine) while epoch 1's other files are
    # still being written after last.npz: then the run finishes them and says "after epoch 1".
    assert re.search(r"interrupted (during epoch \d+|after epoch \d+)", line), line
    assert f"resume with: cnn-backend train --resume {Path('run') / 'last.npz'}" in line
    checkpoint = load_checkpoint(last)
    assert checkpoint.epoch >= 1
    assert [row["epoch"] for row in read_history(tmp_path / "run" / "history.jsonl")] == list(range(1, checkpoint.epoch + 1))
    assert not [path.name for path in (tmp_path / "run").iterdir() if path.name.endswith(".tmp")]

    resumed = cli("train", "--resume", last, "--epochs", checkpoint.epoch + 1, "--device", "cpu", "--quiet", "--no-plots", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(last).epoch == checkpoint.epoch + 1


@pytest.mark.skipif(has_usable_gpu(), reason="this machine has a usable CUDA device")
def test_device_cuda_without_a_gpu_exits_2_with_one_line(tmp_path):
    result = cli("train", "--device", "cuda", "--model", "seed", "--out", "run", cwd=tmp_path)
    assert_one_error_line(result, 2, "cnn-backend: error: CUDA was requested", "`--device auto` would fall back to the CPU")
    assert not (tmp_path / "run").exists()


def test_non_finite_loss_exits_1_naming_epoch_and_step(tmp_path):
    result = cli("train", *SMALL, "--lr", "1e38", "--epochs", 2, "--out", "run", "--no-plots", cwd=tmp_path)
    line = assert_one_error_line(result, 1, "cnn-backend: error: the loss became non-finite at epoch 1, step ")
    assert re.search(r"epoch 1, step \d+", line) and "no checkpoint was written" in line


def test_evaluate_prints_the_table_and_writes_a_consistent_report(trained, tmp_path):
    report_path = tmp_path / "report.json"
    result = cli("evaluate", trained / "best.npz", "--device", "cpu", "--json", report_path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "the checkpoint's validation range" in result.stdout
    assert "Ankle boot" in result.stdout and "confusion matrix" in result.stdout

    report = json.loads(report_path.read_text())
    assert report["split"] == "train" and report["range"] == "9000:9256" and report["samples"] == 256
    assert report["epoch"] == load_checkpoint(trained / "best.npz").epoch
    confusion = numpy.array(report["confusion_matrix"])
    assert confusion.shape == (10, 10) and confusion.sum() == 256
    assert report["accuracy"] == pytest.approx(numpy.trace(confusion) / 256)
    assert report["accuracy"] == pytest.approx(load_checkpoint(trained / "best.npz").best["val_accuracy"])
    for row in report["per_class"]:
        i = row["index"]
        assert row["support"] == confusion[i].sum()
        expected_precision = confusion[i, i] / confusion[:, i].sum() if confusion[:, i].sum() else 0.0
        assert row["precision"] == pytest.approx(expected_precision)
        assert row["recall"] == pytest.approx(confusion[i, i] / confusion[i].sum())
    assert [row["name"] for row in report["per_class"]][0] == "T-shirt/top"


def test_evaluate_reports_flip_averaging_beside_the_plain_figures(trained, tmp_path):
    report_path = tmp_path / "report.json"
    result = cli("evaluate", trained / "best.npz", "--device", "cpu", "--flip-average", "--json", report_path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    plain = load_checkpoint(trained / "best.npz").best["val_accuracy"]
    assert report["accuracy"] == pytest.approx(plain)  # the headline figure stays the plain one
    flipped = report["flip_average"]
    assert 0.0 <= flipped["accuracy"] <= 1.0 and flipped["loss"] > 0
    assert f"flip-averaged: accuracy {flipped['accuracy']:.4f}, loss {flipped['loss']:.4f} (without: accuracy {plain:.4f}" in result.stdout


def test_scripts_train_is_the_train_command(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), "--help"], env=_env(), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0 and "usage: cnn-backend train" in result.stdout and "--resume CHECKPOINT" in result.stdout


# -- error paths, in-process (same main(), no interpreter start-up) ---------------------------------

def test_a_residual_network_from_a_file_trains_evaluates_and_resumes_exactly(tmp_path):
    spec = REPO / "examples" / "small-resnet.toml"
    # A constant schedule: a cosine one would depend on --epochs, which differs between the runs.
    options = ["--model", spec, "--device", "cpu", "--data", "bundled", "--train-split", ":128",
               "--val-split", "9000:9064", "--batch-size", "32", "--schedule", "constant", "--quiet", "--no-plots"]
    straight = cli("train", *options, "--epochs", 2, "--out", "straight", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    assert "model small-resnet: input 1x28x28 per sample" in straight.stdout and "5.projection" in straight.stdout
    assert cli("train", *options, "--epochs", 1, "--out", "split", cwd=tmp_path).returncode == 0
    resumed = cli("train", "--resume", tmp_path / "split" / "last.npz", "--epochs", 2, "--device", "cpu", "--quiet", "--no-plots", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "training epoch 2\n" in resumed.stdout

    straight_arrays, split_arrays = parameters(tmp_path / "straight" / "last.npz"), parameters(tmp_path / "split" / "last.npz")
    assert straight_arrays.keys() == split_arrays.keys()
    assert {"buffer/1.running_var", "buffer/5.layers.4.running_mean", "param/5.projection.weight"} <= straight_arrays.keys()
    for key in straight_arrays:
        numpy.testing.assert_allclose(split_arrays[key], straight_arrays[key], rtol=1e-6, atol=1e-7, err_msg=key)

    evaluated = cli("evaluate", tmp_path / "split" / "last.npz", "--device", "cpu", "--json", tmp_path / "eval.json", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads((tmp_path / "eval.json").read_text())
    history = read_history(tmp_path / "split" / "history.jsonl")
    assert report["range"] == "9000:9064" and report["accuracy"] == pytest.approx(history[-1]["val_accuracy"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--epochs", "0"], "--epochs: must be a positive integer"),
        (["train", "--train-split", "abc"], "expected START:STOP"),
        (["train", "--lr", "nan"], "--lr: must be a finite number > 0"),
        (["train", "--device", "tpu"], "invalid choice: 'tpu'"),
        (["fly"], "invalid choice: 'fly'"),
        (["train", "--epochz", "3"], "unrecognized arguments: --epochz 3"),
        (["evaluate", "run/best.npz", "--out", "x"], "unrecognized arguments: --out x"),
        (["summary", "--model", "seed", "extra"], "unrecognized arguments: extra"),
        (["download", "--epochs", "2"], "unrecognized arguments: --epochs;"),  # not "invalid choice: '2'" for NAME
        (["download", "nosuch", "--data-d", "x"], "argument NAME: invalid choice: 'nosuch'"),  # --data-d: --data-dir abbreviated
    ],
)
def test_bad_arguments_are_usage_errors(capsys, args, message):
    status, _, err = run_main(capsys, *args)
    help_command = "cnn-backend" if args[0] == "fly" else f"cnn-backend {args[0]}"
    # One line: the message and where to read more, no usage block.
    assert status == 2 and err.count("\n") == 1 and "usage:" not in err, err
    assert err.startswith("cnn-backend: error: ") and message in err and err.rstrip().endswith(f"; see {help_command} --help")


def test_an_empty_range_says_what_a_range_must_be(capsys):
    status, _, err = run_main(capsys, "train", "--data", "bundled", "--train-split", "5:2")
    assert status == 2
    assert err == "cnn-backend: error: --train-split 5:2 selects no images: START must be below STOP, within the 10,000 images available\n"


def test_a_schedule_that_changes_on_resuming_is_described_in_words():
    from cnn_backend.cli.train import _describe_schedule

    cosine = {"name": "cosine", "base_lr": 0.002, "total_steps": 125, "warmup_steps": 12, "min_lr": 0.0}
    assert _describe_schedule(cosine) == "cosine (base lr 0.002, total steps 125, warmup steps 12, min lr 0)"
    assert _describe_schedule({"name": "constant"}) == "constant"


@pytest.mark.parametrize(
    "variable, value, message",
    [
        ("CNN_BACKEND_NUM_THREADS", "abc", "CNN_BACKEND_NUM_THREADS='abc' is not a thread count"),
        ("CNN_BACKEND_CONV_ALGORITHM", "fast", "CNN_BACKEND_CONV_ALGORITHM='fast' is not a convolution algorithm"),
        ("CNN_BACKEND_KEEP_FREED_MEMORY", "maybe", "CNN_BACKEND_KEEP_FREED_MEMORY='maybe' is neither on nor off"),
    ],
)
@pytest.mark.parametrize("command", [["train", "--model", "seed", "--data", "bundled", "--out", "run"], ["summary", "--model", "seed"]])
def test_a_malformed_variable_is_refused_before_anything_is_printed_or_written(tmp_path, capsys, monkeypatch, variable, value, message, command):
    monkeypatch.setenv(variable, value)
    monkeypatch.chdir(tmp_path)
    status, out, err = run_main(capsys, *command)
    assert status == 2 and out == "" and list(tmp_path.iterdir()) == []
    assert err.startswith(f"cnn-backend: error: {message}") and err.count("\n") == 1


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda data: data[: len(data) // 2], "not an .npz archive"),
        (lambda data: numpy.random.default_rng(0).bytes(len(data)), "not an .npz archive"),
    ],
    ids=["truncated", "random-bytes"],
)
@pytest.mark.parametrize("command", ["evaluate", "resume"])
def test_unreadable_checkpoints_are_refused_in_one_line(trained, tmp_path, capsys, corrupt, message, command):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(corrupt((trained / "last.npz").read_bytes()))
    args = ["evaluate", bad, "--device", "cpu"] if command == "evaluate" else ["train", "--resume", bad, "--device", "cpu"]
    status, _, err = run_main(capsys, *args)
    assert status == 2 and err.count("\n") == 1 and f"cnn-backend: error: {bad}: {message}" in err


def test_a_checkpoint_with_missing_keys_is_refused(trained, tmp_path, capsys):
    with numpy.load(trained / "last.npz") as archive:
        arrays = {key: archive[key] for key in archive.files if key != "param/0.weight"}
    numpy.savez(tmp_path / "partial.npz", **arrays)
    status, _, err = run_main(capsys, "train", "--resume", tmp_path / "partial.npz", "--epochs", 3, "--device", "cpu")
    assert status == 2 and err.count("\n") == 1 and "missing ['0.weight']" in err


def test_resume_refuses_another_optimizer_and_a_finished_run(trained, capsys):
    status, _, err = run_main(capsys, "train", "--resume", trained / "last.npz", "--optimizer", "adam", "--device", "cpu")
    assert status == 2 and "was trained with --optimizer sgd, so --optimizer adam cannot resume it" in err
    status, _, err = run_main(capsys, "train", "--resume", trained / "last.npz", "--device", "cpu")
    assert status == 2 and "already finished epoch 2 of 2" in err and "--epochs" in err


def test_evaluate_never_writes_its_report_over_a_checkpoint(trained, capsys):
    before = (trained / "best.npz").read_bytes()
    status, _, err = run_main(capsys, "evaluate", trained / "best.npz", "--device", "cpu", "--json", trained / "best.npz")
    assert status == 2 and err.count("\n") == 1 and "does not end in .json; name the report PATH.json" in err
    status, _, err = run_main(capsys, "evaluate", trained / "best.npz", "--device", "cpu", "--json", trained.parent / "x.json")
    assert status == 0 and json.loads((trained.parent / "x.json").read_text())["accuracy"] >= 0
    assert (trained / "best.npz").read_bytes() == before


def test_resume_refuses_options_the_checkpoint_fixes(trained, tmp_path, capsys):
    """The network's dropout rate and the input normalisation come with the checkpoint: asking for
    others on --resume would be recorded in the settings but not applied, so it is refused."""
    status, _, err = run_main(capsys, "train", "--resume", trained / "last.npz", "--normalize", "--epochs", 3, "--device", "cpu")
    assert status == 2 and err.count("\n") == 1
    assert "was trained without --normalize, so --normalize cannot resume it (leave --normalize out to resume" in err
    run = tmp_path / "plain"
    assert run_main(capsys, "train", *SMALL, "--model", "plain", "--dropout", "0.25", "--epochs", 1, "--out", run, "--quiet")[0] == 0
    status, _, err = run_main(capsys, "train", "--resume", run / "last.npz", "--dropout", "0.5", "--epochs", 2, "--device", "cpu")
    assert status == 2 and "was trained with --dropout 0.25, so --dropout 0.5 cannot resume it" in err
    assert not (run / "history.jsonl").read_text().count("\n") > 1  # nothing was trained


def test_resume_refuses_another_runs_checkpoint_put_in_a_folder_holding_a_run(tmp_path, capsys):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    assert run_main(capsys, "train", *SMALL, "--epochs", 1, "--no-plots", "--out", ours)[0] == 0
    assert run_main(capsys, "train", *SMALL, "--epochs", 2, "--seed", 7, "--no-plots", "--out", theirs)[0] == 0
    (ours / "foreign.npz").write_bytes((theirs / "last.npz").read_bytes())
    before = (ours / "last.npz").read_bytes(), (ours / "history.jsonl").read_text()
    status, _, err = run_main(capsys, "train", "--resume", ours / "foreign.npz", "--epochs", 3, "--device", "cpu", "--quiet")
    assert status == 2 and err.count("\n") == 1, err
    assert (f"{ours / 'foreign.npz'} is not from the run in {ours} (their histories differ from epoch 1): resuming it "
            f"there would overwrite that run; add --out NEW_FOLDER") in err
    assert ((ours / "last.npz").read_bytes(), (ours / "history.jsonl").read_text()) == before


def test_resume_refuses_a_checkpoint_that_would_overwrite_later_epochs_or_changed_while_starting(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert run_main(capsys, "train", *SMALL, "--epochs", 1, "--no-plots", "--out", run)[0] == 0
    (run / "epoch1.npz").write_bytes((run / "last.npz").read_bytes())
    assert run_main(capsys, "train", "--resume", run / "last.npz", "--epochs", 2, "--device", "cpu", "--quiet", "--no-plots")[0] == 0
    before = (run / "last.npz").read_bytes(), (run / "history.jsonl").read_text()

    # An older checkpoint of the same folder (a best.npz the run went on from) would overwrite epoch 2.
    status, _, err = run_main(capsys, "train", "--resume", run / "epoch1.npz", "--epochs", 3, "--device", "cpu", "--quiet")
    assert status == 2 and err.count("\n") == 1, err
    assert (f"{run / 'epoch1.npz'} holds epoch 1 but {run / 'last.npz'} holds epoch 2: resuming it in its own folder would "
            f"overwrite epoch 2; resume {run / 'last.npz'}, or add --out NEW_FOLDER to go on from epoch 1 there") in err
    assert ((run / "last.npz").read_bytes(), (run / "history.jsonl").read_text()) == before

    # Another run commits an epoch between this one reading the checkpoint and locking the folder.
    def another_run_commits(name: str) -> None:
        if name == "start":
            (run / "newer.tmp").write_bytes((run / "last.npz").read_bytes())
            os.replace(run / "newer.tmp", run / "last.npz")

    monkeypatch.setattr("cnn_backend.cli.train.pause_point", another_run_commits)
    status, _, err = run_main(capsys, "train", "--resume", run / "last.npz", "--epochs", 3, "--device", "cpu", "--quiet")
    assert status == 2 and err.count("\n") == 1, err
    assert f"{run / 'last.npz'} changed after this run read it (epoch 2): another run wrote to its folder meanwhile" in err
    assert (run / "history.jsonl").read_text() == before[1] and len(before[1].splitlines()) == 2
    # Into a new folder the checkpoint read goes on from its epoch: nothing there to overwrite.
    status, out, err = run_main(capsys, "train", "--resume", run / "last.npz", "--epochs", 3, "--device", "cpu",
                                "--quiet", "--no-plots", "--out", tmp_path / "branch")
    assert status == 0, err
    assert load_checkpoint(tmp_path / "branch" / "last.npz").epoch == 3


def test_a_last_batch_too_small_to_train_on_is_left_out_with_a_note(tmp_path, capsys):
    from cnn_backend.cli.train import _last_batch_left_out
    from cnn_backend.model import default_cnn, plain_cnn

    default, plain = default_cnn("cpu"), plain_cnn("cpu")
    # 129 = 128 + 1: one image, which the dense layer's BatchNorm cannot take statistics over.
    assert _last_batch_left_out(129, 128, 1, default) == (
        "the last batch of each epoch (129 = 1 x 128 + 1) would hold 1 image, and BatchNorm cannot take statistics "
        "over a single sample: it is left out (another batch size keeps it)")
    assert _last_batch_left_out(129, 128, 1, plain) is None and _last_batch_left_out(130, 128, 1, default) is None
    assert "would hold 1 image, fewer than the 2 processes" in _last_batch_left_out(65, 64, 2, plain)
    assert "so a process would get a single sample" in _last_batch_left_out(66, 64, 2, default)
    assert "so a process would get a single sample" in _last_batch_left_out(67, 64, 2, default)  # shares of 2 and 1
    assert _last_batch_left_out(68, 64, 2, default) is None and _last_batch_left_out(128, 64, 2, default) is None
    with pytest.raises(ValueError, match=r"^the training split holds 1 image, too few to train on: a batch needs at least 2 here"):
        _last_batch_left_out(1, 64, 1, default)
    from cnn_backend.training import refuse_batches_batchnorm_cannot_take

    refuse_batches_batchnorm_cannot_take(1, 1, plain)  # no BatchNorm: one sample a step is fine
    with pytest.raises(ValueError, match=r"^--batch-size 3 gives each of the 2 processes 1 sample, and BatchNorm cannot "
                                         r"take statistics over a single one: choose --batch-size 4 or more$"):
        refuse_batches_batchnorm_cannot_take(3, 2, default)

    status, out, err = run_main(capsys, "train", "--model", "default", "--device", "cpu", "--data", "bundled", "--train-split",
                                ":129", "--val-split", "9000:9100", "--epochs", 1, "--quiet", "--no-plots", "--out", tmp_path / "run")
    assert status == 0, err
    assert "note: the last batch of each epoch (129 = 1 x 128 + 1) would hold 1 image" in out
    assert load_checkpoint(tmp_path / "run" / "last.npz").state["optimizer"]["steps"] == 1


def test_a_folder_given_by_a_relative_path_is_found_from_anywhere_and_named_when_moved(tmp_path, capsys, monkeypatch):
    from PIL import Image

    rng = numpy.random.default_rng(0)
    for name in ("round", "square"):
        (tmp_path / "pictures" / name).mkdir(parents=True)
        for index in range(12):
            Image.fromarray(rng.integers(0, 256, (10, 10), dtype=numpy.uint8)).save(tmp_path / "pictures" / name / f"{index}.png")
    monkeypatch.chdir(tmp_path)
    status, _, err = run_main(capsys, "train", "--data", "pictures", "--model", "seed", "--device", "cpu", "--epochs", 1,
                              "--quiet", "--no-plots", "--out", "run")
    assert status == 0, err
    checkpoint = tmp_path / "run" / "last.npz"
    assert load_checkpoint(checkpoint).settings["data"] == str((tmp_path / "pictures").resolve())
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert run_main(capsys, "evaluate", checkpoint, "--device", "cpu", "--json", "report.json")[0] == 0

    (tmp_path / "pictures").rename(tmp_path / "moved")
    for command in (["train", "--resume", checkpoint, "--epochs", 2], ["evaluate", checkpoint]):
        status, _, err = run_main(capsys, *command, "--device", "cpu")
        assert status == 2 and err.count("\n") == 1
        assert err.rstrip().endswith(f"{checkpoint} was trained on it: pass --data to read it from where it is now"), err
    assert run_main(capsys, "evaluate", checkpoint, "--data", tmp_path / "moved", "--device", "cpu", "--json", "report.json")[0] == 0
    status, _, err = run_main(capsys, "train", "--resume", checkpoint, "--data", tmp_path / "moved", "--epochs", 2,
                              "--device", "cpu", "--quiet", "--no-plots")
    assert status == 0, err


def test_a_recipes_ranges_give_way_on_data_too_small_for_them():
    from cnn_backend.cli.train import _recipe_ranges_fit

    seed = resolve_settings({"model": "seed"})  # train[:5000], validate on train[5000:10000]
    assert _recipe_ranges_fit(seed, {}, 10_000) and not _recipe_ranges_fit(seed, {}, 600)
    # Ranges the user gave are checked where they are used, with their own message.
    assert _recipe_ranges_fit({**seed, "train_split": ":5000"}, {"train_split": ":5000", "val_split": "5000:"}, 600)


def test_a_split_missing_some_classes_is_noted():
    from types import SimpleNamespace

    from cnn_backend.cli.settings import missing_classes_notes

    by_class = SimpleNamespace(labels=numpy.repeat(numpy.arange(3), 10), num_classes=3, class_names=("a", "b", "c"))  # a folder's order
    assert missing_classes_notes(by_class, slice(0, 24), slice(24, 30)) == [
        "the validation images hold 1 of the 3 classes (not a, b: the data is ordered by class?); --val-fraction holds "
        "out part of every class instead of a range"
    ]
    assert missing_classes_notes(by_class, slice(0, 10), slice(5, 30))[0].startswith("the training images hold 1 of the 3 classes (not b, c:")
    assert missing_classes_notes(by_class, numpy.arange(0, 30, 2), numpy.arange(1, 30, 2)) == []
    # A hold-out (index arrays) lacks a class only when it has a single image, kept for training.
    assert missing_classes_notes(by_class, numpy.arange(29), numpy.array([5, 15])) == [
        "the validation images hold 2 of the 3 classes (not c: a class with a single image is kept for training)"
    ]


def test_ctrl_c_while_an_epoch_is_saved_still_prints_that_epoch(tmp_path, capsys, monkeypatch):
    def ctrl_c_while_saving(name: str) -> None:
        if name == "history":  # inside the epoch's writes, where signals are held back
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr("cnn_backend.cli.recorder.pause_point", ctrl_c_while_saving)
    status, out, err = run_main(capsys, "train", *SMALL, "--epochs", 3, "--no-plots", "--out", tmp_path / "run")
    assert status == 130
    assert re.search(r"^epoch 1/3  train loss ", out, re.MULTILINE) and "epoch 2/3" not in out
    assert f"interrupted after epoch 1; the last good checkpoint is {tmp_path / 'run' / 'last.npz'} (epoch 1)" in err


def test_train_refuses_an_output_folder_holding_another_run(trained, capsys):
    status, _, err = run_main(capsys, "train", *SMALL, "--epochs", 1, "--out", trained)
    assert status == 2 and "already holds a training run" in err and "--resume" in err


def test_split_beyond_the_bundled_data_is_refused(tmp_path, capsys):
    status, _, err = run_main(capsys, "train", *SMALL, "--train-split", ":20000", "--out", tmp_path / "run")
    assert status == 2 and "reaches past the 10,000 images" in err and "cnn-backend download" in err


def test_a_float64_model_file_is_evaluated_and_predicted_in_float64(tmp_path, capsys, monkeypatch):
    from cnn_backend import predict as predict_module
    from cnn_backend.model import seed_cnn

    path = seed_cnn(get_backend("cpu", "float64"), seed=1).save(tmp_path / "model64.npz")
    assert load_checkpoint(path, require_training_state=False).dtype == "float64"
    status, out, err = run_main(capsys, "evaluate", path, "--device", "cpu", "--range", "0:20")
    assert status == 0, err
    assert "device: cpu (float64)" in out
    dtypes = []
    monkeypatch.setattr(predict_module, "predict_files", lambda model, *args, **kwargs: dtypes.append(model.backend.dtype) or [])
    predict_module.predict_images(path, [])
    assert dtypes == [numpy.float64]


def test_predict_images_has_the_command_line_defaults():
    import inspect

    from cnn_backend.cli import build_parser
    from cnn_backend.predict import predict_images

    args = build_parser().parse_args(["predict", "model.npz", "image.png"])
    defaults = {name: parameter.default for name, parameter in inspect.signature(predict_images).parameters.items()}
    assert {name: defaults[name] for name in ("top", "device", "batch_size")} == {"top": args.top, "device": args.device, "batch_size": args.batch_size}


def test_evaluate_test_split_needs_the_download(trained, capsys, monkeypatch):
    monkeypatch.setenv("CNN_BACKEND_DATA", str(trained / "no-data-here"))
    status, _, err = run_main(capsys, "evaluate", trained / "last.npz", "--split", "test", "--data", "auto", "--device", "cpu")
    assert status == 2 and "the test split is not bundled" in err


@pytest.mark.parametrize("command", ["benchmark", "parity"])
def test_optional_commands_run_or_say_they_are_missing(capsys, command):
    status, out, err = run_main(capsys, command, "--help")
    if importlib.util.find_spec(f"cnn_backend.{command}") is None:
        assert status == 2 and err.strip() == (
            f"cnn-backend: error: the {command} command is not available: cnn_backend.{command} cannot be imported "
            f"(No module named 'cnn_backend.{command}')"
        )
    else:
        assert status == 0 and f"usage: cnn-backend {command}" in out


def test_help_lists_every_command(capsys):
    status, out, _ = run_main(capsys, "--help")
    assert status == 0
    for command in ("train", "evaluate", "download", "benchmark", "parity"):
        assert command in out


def test_download_fetches_into_the_given_folder(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr("cnn_backend.cli.download", lambda data_dir: calls.append(data_dir) or data_dir)
    status, out, _ = run_main(capsys, "download", "--data-dir", tmp_path)
    assert status == 0 and calls == [tmp_path] and f"ready in {tmp_path}" in out


def test_a_data_folder_that_cannot_be_made_is_one_line_exit_1_as_any_unwritable_path(tmp_path, capsys):
    (tmp_path / "blocker").write_text("a file, not a folder")
    status, out, err = run_main(capsys, "download", "mnist", "--data-dir", tmp_path / "blocker" / "data")
    assert status == 1 and out == ""
    assert err == f"cnn-backend: error: cannot create the data directory {tmp_path / 'blocker' / 'data'}: Not a directory\n"


def test_a_data_folder_named_by_a_file_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "afile").write_text("not a folder")
    status, out, err = run_main(capsys, "download", "mnist", "--data-dir", tmp_path / "afile")
    assert status == 2 and out == ""
    assert err == f"cnn-backend: error: --data-dir {tmp_path / 'afile'} is a file, not a folder; choose another --data-dir\n"


# -- settings and splits ------------------------------------------------------------------------------


def test_settings_come_from_the_recipe_unless_given():
    seed = resolve_settings({"model": "seed"})
    assert {key: seed[key] for key in ("lr", "batch_size", "optimizer")} == {key: RECIPES["seed"][key] for key in ("lr", "batch_size", "optimizer")}
    assert resolve_settings({})["model"] == "default"
    adam = resolve_settings({"model": "seed", "optimizer": "adam"})
    assert (adam["lr"], adam["momentum"]) == (OPTIMIZER_DEFAULTS["adam"]["lr"], OPTIMIZER_DEFAULTS["adam"]["momentum"])
    sgd = resolve_settings({"optimizer": "sgd"})  # against the default network's Adam recipe
    assert (sgd["lr"], sgd["momentum"]) == (0.01, 0.9) == (OPTIMIZER_DEFAULTS["sgd"]["lr"], OPTIMIZER_DEFAULTS["sgd"]["momentum"])
    assert resolve_settings({"model": "seed", "optimizer": "adam", "lr": 0.5})["lr"] == 0.5
    with pytest.raises(ValueError, match="default and plain models only"):
        resolve_settings({"model": "seed", "dropout": 0.5})


def test_the_recipes_flips_are_left_out_for_data_that_mirroring_changes():
    assert resolve_settings({"data": "mnist"})["augment"] == "crop1"  # the default recipe's shifts alone
    assert resolve_settings({"data": "kmnist", "model": "plain"})["augment"] == "none"
    assert resolve_settings({"data": "mnist", "augment": "crop1-flip"})["augment"] == "crop1-flip"  # as asked
    for data in ("auto", "bundled", "fashion-mnist", "cifar10"):
        assert resolve_settings({"data": data})["augment"] == "crop1-flip"


def test_an_architecture_file_trains_with_the_plain_recipe_without_augmentation():
    # flips and shifts do not suit every data set (a mirrored digit is another digit): a file's
    # network gets the recipe of the plain model, which has none
    from_file = resolve_settings({"model": "examples/lenet.toml"})
    assert from_file["augment"] == "none" and from_file["label_smoothing"] == 0.0 and from_file["dropout"] == 0.0
    assert {key: from_file[key] for key in ("lr", "batch_size", "epochs")} == {key: RECIPES["plain"][key] for key in ("lr", "batch_size", "epochs")}
    assert resolve_settings({})["augment"] == RECIPES["default"]["augment"] != "none"


def test_resumed_settings_come_from_the_checkpoint_unless_given(trained):
    checkpoint = load_checkpoint(trained / "last.npz")
    settings = resolve_settings({"epochs": 5}, checkpoint)
    assert settings["epochs"] == 5 and settings["train_split"] == ":512" and settings["model"] == "seed"
    assert {key: settings[key] for key in settings if key != "epochs"} == {
        key: value for key, value in checkpoint.settings.items() if key in settings and key != "epochs"
    }


@pytest.mark.parametrize(
    "model, total, expected",
    [("default", 60_000, ((0, 50_000), (50_000, 60_000))), ("default", 10_000, ((0, 8_000), (8_000, 10_000))),
     ("seed", 10_000, ((0, 5_000), (5_000, 10_000))), ("seed", 60_000, ((0, 5_000), (5_000, 10_000)))],
)
def test_default_splits_follow_the_model_and_the_data(model, total, expected):
    settings = resolve_settings({"model": model})
    train, val, line = resolve_ranges(settings, total)
    assert ((train.start, train.stop), (val.start, val.stop)) == expected
    assert line.startswith("split: training on") and "\n" not in line
    assert settings["train_split"] is not None  # recorded for the checkpoint


@pytest.mark.skipif(has_usable_gpu(), reason="this machine has a usable CUDA device")
def test_device_auto_falls_back_to_the_cpu_and_says_so():
    backend, line = open_backend("auto", "float64")
    assert backend.name == "cpu" and backend.dtype == numpy.float64
    assert line == "device: cpu (float64; --device auto found no usable CUDA device)"


@pytest.mark.parametrize(
    "option, value, said, default",
    [("--augment", "crop-flip", "augment crop-flip", "none"), ("--label-smoothing", "0.1", "label smoothing 0.1", 0.0)],
)
def test_a_training_option_changes_training_and_is_recorded(tmp_path, option, value, said, default):
    options = [*SMALL, "--epochs", 1, "--no-plots"]
    assert cli("train", *options, "--out", "plain", cwd=tmp_path).returncode == 0
    changed = cli("train", *options, option, value, "--out", "changed", cwd=tmp_path)
    assert changed.returncode == 0, changed.stderr
    assert said in changed.stdout
    key = option[2:].replace("-", "_")
    recorded = load_checkpoint(tmp_path / "changed" / "last.npz").settings[key]
    assert recorded == (float(value) if isinstance(default, float) else value)
    assert load_checkpoint(tmp_path / "plain" / "last.npz").settings[key] == default
    plain, trained = parameters(tmp_path / "plain" / "last.npz"), parameters(tmp_path / "changed" / "last.npz")
    assert not numpy.array_equal(plain["param/0.weight"], trained["param/0.weight"])


def test_label_smoothing_outside_0_1_is_a_usage_error(tmp_path):
    result = cli("train", *SMALL, "--label-smoothing", "1", cwd=tmp_path)
    assert result.returncode == 2
    assert "argument --label-smoothing: must be in [0, 1), got '1'" in result.stderr
