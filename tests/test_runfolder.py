"""The run folder around failures: one owner, nothing left by a failed start, SIGTERM, divergence,
write errors; and the one-line errors of the command line and the Python API."""

from __future__ import annotations

import errno
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy
import pytest

import cnn_backend.serialization
import cnn_backend.training
from cnn_backend import Sequential, seed_cnn
from cnn_backend.checkpoint import load_checkpoint
from cnn_backend.cli import main
from cnn_backend.report import read_history

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs POSIX signals (SIGSTOP, SIGKILL)")
SMALL = ["--model", "seed", "--device", "cpu", "--data", "bundled", "--train-split", ":256", "--val-split", "9000:9128", "--quiet", "--no-plots"]
TIMEOUT = 60


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "CNN_BACKEND_DATA": str(REPO / "tests" / "no-such-data-dir")}
    env.pop("CNN_BACKEND_STOP_AT", None)
    return {**env, **extra}


def cli(*args, cwd: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cnn_backend", *map(str, args)], cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=TIMEOUT,
    )


def start_stopped(*args, cwd: Path, at: str) -> subprocess.Popen:
    """A training run that has stopped itself (SIGSTOP) at pause point ``at`` (see cnn_backend.faults)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "cnn_backend", *map(str, args)], cwd=cwd, env=_env(CNN_BACKEND_STOP_AT=at),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + TIMEOUT
    while True:
        pid, status = os.waitpid(process.pid, os.WUNTRACED | os.WNOHANG)
        if pid and os.WIFSTOPPED(status):
            return process
        if pid or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the run did not stop at {at}: {process.communicate()[1]}")
        time.sleep(0.01)


def finish(process: subprocess.Popen, signum: int | None = None) -> subprocess.CompletedProcess:
    if signum is not None:
        process.send_signal(signum)
    if signum != signal.SIGKILL:
        process.send_signal(signal.SIGCONT)
    stdout, stderr = process.communicate(timeout=TIMEOUT)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def hidden_files(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir() if entry.name.startswith("."))


def run_main(capsys, *args) -> tuple[int, str, str]:
    status = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# -- 1: one owner per folder -----------------------------------------------------------------------


def test_a_second_run_on_the_same_folder_is_refused_naming_the_holder(tmp_path):
    first = start_stopped("train", *SMALL, "--epochs", 2, "--out", "run", cwd=tmp_path, at="folder@1")
    try:
        second = cli("train", *SMALL, "--epochs", 2, "--out", "run", cwd=tmp_path)
        line = one_line(second.stderr)
        assert second.returncode == 2 and f"run is in use by another training run (PID {first.pid})" in line, line
        resumed = cli("train", "--resume", tmp_path / "run" / "last.npz", cwd=tmp_path)  # no checkpoint yet: refused on its own
        assert resumed.returncode == 2
    finally:
        killed = finish(first, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    # The OS released the lock with the process: the folder is free again.
    again = cli("train", *SMALL, "--epochs", 1, "--out", "run", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert [row["epoch"] for row in read_history(tmp_path / "run" / "history.jsonl")] == [1]
    assert hidden_files(tmp_path / "run") == []


def test_resume_takes_the_same_lock(tmp_path):
    assert cli("train", *SMALL, "--epochs", 1, "--out", "run", cwd=tmp_path).returncode == 0
    first = start_stopped("train", "--resume", Path("run") / "last.npz", "--epochs", 2, "--device", "cpu", "--quiet", "--no-plots",
                          cwd=tmp_path, at="folder@1")
    try:
        second = cli("train", "--resume", Path("run") / "last.npz", "--epochs", 3, "--device", "cpu", cwd=tmp_path)
        assert second.returncode == 2 and f"(PID {first.pid})" in one_line(second.stderr)
    finally:
        done = finish(first)
    assert done.returncode == 0, done.stderr
    assert load_checkpoint(tmp_path / "run" / "last.npz").epoch == 2


def test_without_fcntl_the_run_says_so_and_creates_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "fcntl", None)  # as on Windows
    status, _, err = run_main(capsys, "train", *SMALL, "--epochs", 1, "--out", tmp_path / "run")
    assert status == 2 and "this platform has no fcntl module" in one_line(err)
    assert not (tmp_path / "run").exists()


# -- 2: a failed start leaves nothing that blocks the next ------------------------------------------


def test_a_failed_start_removes_the_nested_folders_it_made_and_only_those(tmp_path):
    from cnn_backend.runfolder import RunFolder

    (tmp_path / "a").mkdir()
    folder = RunFolder.open(tmp_path / "a" / "b" / "c")
    assert (tmp_path / "a" / "b" / "c").is_dir()
    folder.close()  # no checkpoint written: as after Ctrl-C in the first epoch
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"] and not any((tmp_path / "a").iterdir())


@pytest.mark.parametrize("failure", ["non-finite", "conv-algorithm", "ctrl-c"])
@pytest.mark.parametrize("out", ["given", "default"])
def test_a_failed_start_leaves_nothing_behind(tmp_path, failure, out):
    out_args = ["--out", "run"] if out == "given" else []
    if failure == "non-finite":
        result = cli("train", *SMALL, "--lr", "1e38", "--epochs", 2, *out_args, cwd=tmp_path)
        assert result.returncode == 1 and "no epoch finished, so no checkpoint was written" in one_line(result.stderr)
    elif failure == "conv-algorithm":
        result = cli("train", *SMALL, "--epochs", 2, *out_args, cwd=tmp_path, CNN_BACKEND_CONV_ALGORITHM="fft")
        assert result.returncode == 2 and "CNN_BACKEND_CONV_ALGORITHM" in one_line(result.stderr)
    else:
        result = finish(start_stopped("train", *SMALL, "--epochs", 2, *out_args, cwd=tmp_path, at="step@1"), signal.SIGINT)
        line = one_line(result.stderr)
        assert result.returncode == 130 and "no epoch finished, so no checkpoint was written" in line and "--resume" not in line
    assert sorted(path.name for path in tmp_path.iterdir()) == []  # no run/, no runs/<date-time>
    again = cli("train", *SMALL, "--epochs", 1, *out_args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr


def test_a_folder_with_an_empty_history_is_not_a_run(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "history.jsonl").write_text("")
    (tmp_path / "run" / ".last.npz.999999.0badf00d.tmp").write_bytes(b"half")  # a killed process's temporary
    result = cli("train", *SMALL, "--epochs", 1, "--out", "run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert hidden_files(tmp_path / "run") == []


def test_a_folder_holding_a_run_is_refused_without_naming_missing_files(tmp_path):
    (tmp_path / "run").mkdir()
    seed_cnn("cpu").save(tmp_path / "run" / "best.npz")
    result = cli("train", *SMALL, "--epochs", 1, "--out", "run", cwd=tmp_path)
    line = one_line(result.stderr)
    assert result.returncode == 2 and "already holds a training run (best.npz)" in line and "--resume" not in line


# -- 3: SIGTERM is Ctrl-C --------------------------------------------------------------------------


def test_sigterm_during_a_checkpoint_write_finishes_it_and_says_how_to_resume(tmp_path):
    process = start_stopped("train", *SMALL, "--epochs", 3, "--out", "run", cwd=tmp_path, at="replace last.npz@2")
    result = finish(process, signal.SIGTERM)
    line = one_line(result.stderr)
    assert result.returncode == 143, result.stderr
    assert line.startswith("cnn-backend: terminated by SIGTERM after epoch 2; the last good checkpoint is run")
    assert f"(epoch 2); resume with: cnn-backend train --resume {Path('run') / 'last.npz'}" in line
    assert load_checkpoint(tmp_path / "run" / "last.npz").epoch == 2
    assert [row["epoch"] for row in read_history(tmp_path / "run" / "history.jsonl")] == [1, 2]
    assert load_checkpoint(tmp_path / "run" / "best.npz").epoch <= 2
    assert hidden_files(tmp_path / "run") == []


def test_sigterm_at_any_other_command_exits_143(tmp_path):
    result = finish(start_stopped("train", *SMALL, "--epochs", 2, "--out", "run", cwd=tmp_path, at="start@1"), signal.SIGTERM)
    assert result.returncode == 143 and one_line(result.stderr) == "cnn-backend: terminated by SIGTERM"
    assert not (tmp_path / "run").exists()


def test_a_second_signal_while_the_first_is_handled_keeps_the_first_ones_message_and_status(tmp_path):
    # Both arrive while the run is stopped: SIGINT's handler raises first, and SIGTERM's would raise
    # again as that unwinds, ending the run with 143.
    process = start_stopped("train", *SMALL, "--epochs", 2, "--out", "run", cwd=tmp_path, at="step@1")
    process.send_signal(signal.SIGINT)
    result = finish(process, signal.SIGTERM)
    assert result.returncode == 130, result.stderr
    assert one_line(result.stderr).startswith("cnn-backend: interrupted during epoch 1; no epoch finished")
    assert not (tmp_path / "run").exists()


def train_with_ctrl_c_while_an_epoch_is_saved(tmp_path, epochs: int, at_exit: str = "") -> subprocess.CompletedProcess:
    """A training run sent SIGINT while its first epoch's history is written (held back until the
    epoch's files are whole); ``at_exit``: a statement registered to run as the process exits."""
    script = (
        "import atexit, os, signal, sys\n"
        "import cnn_backend.cli.recorder as recorder\n"
        "def ctrl_c(name):\n"
        "    if name == 'history':\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "recorder.pause_point = ctrl_c\n"
        f"{at_exit}\n"
        "from cnn_backend.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    return subprocess.run([sys.executable, "-c", script, "train", *SMALL, "--epochs", str(epochs), "--out", "run"], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=TIMEOUT)


def test_a_stop_while_the_last_epoch_is_saved_offers_no_resume(tmp_path):
    # The last epoch's files are written whole; --resume of a finished run would be refused.
    result = train_with_ctrl_c_while_an_epoch_is_saved(tmp_path, epochs=1)
    assert result.returncode == 130, result.stderr
    last = Path("run") / "last.npz"
    assert one_line(result.stderr) == f"cnn-backend: interrupted after epoch 1; the last good checkpoint is {last} (epoch 1)"
    assert load_checkpoint(tmp_path / last).epoch == 1


def test_a_second_signal_as_the_stopped_run_exits_keeps_the_first_ones_status(tmp_path):
    # Ctrl-C while an epoch is saved (held back until its files are written), then SIGTERM while the
    # process shuts down, after the command returned: the interpreter's default for SIGTERM would
    # kill it, its status then SIGTERM's under the message of Ctrl-C.
    result = train_with_ctrl_c_while_an_epoch_is_saved(tmp_path, epochs=2, at_exit="atexit.register(os.kill, os.getpid(), signal.SIGTERM)")
    assert result.returncode == 130, result.stderr
    assert one_line(result.stderr).startswith("cnn-backend: interrupted after epoch 1; the last good checkpoint is")


def test_in_process_a_second_stop_signal_is_ignored_and_the_handlers_come_back():
    from cnn_backend.runfolder import Interrupted, stop_signals_raise

    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    with stop_signals_raise():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(TIMEOUT)  # not reached: the handler raises first
        except Interrupted as first:
            stopped = first
            try:
                os.kill(os.getpid(), signal.SIGTERM)  # while the first is handled
                time.sleep(0.01)
            except Interrupted as second:  # a KeyboardInterrupt would end the whole test session
                pytest.fail(f"{second.description} raised in place of {first.description}")
    assert stopped.exit_status == 130
    # Not the command line's own process (pytest's): it gets its handlers back.
    assert {signum: signal.getsignal(signum) for signum in before} == before


def test_a_history_left_one_row_short_is_repaired_on_resume(tmp_path):
    # What a SIGKILL exactly between the rename of last.npz and the history write would leave.
    assert cli("train", *SMALL, "--epochs", 2, "--out", "run", cwd=tmp_path).returncode == 0
    history = tmp_path / "run" / "history.jsonl"
    history.write_text(history.read_text().splitlines(keepends=True)[0])
    result = cli("train", "--resume", Path("run") / "last.npz", "--epochs", 3, "--device", "cpu", "--quiet", "--no-plots", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [row["epoch"] for row in read_history(history)] == [1, 2, 3]


# -- 4: messages name checkpoints that exist -------------------------------------------------------


def test_divergence_after_resuming_elsewhere_names_the_resumed_checkpoint(tmp_path):
    assert cli("train", *SMALL, "--epochs", 1, "--out", "A", cwd=tmp_path).returncode == 0
    result = cli("train", "--resume", Path("A") / "last.npz", "--out", "NEW", "--epochs", 3, "--lr", "1e38", "--device", "cpu", cwd=tmp_path)
    line = one_line(result.stderr)
    assert result.returncode == 1 and f"the last good checkpoint is {Path('A') / 'last.npz'} (epoch 1)" in line, line
    assert not (tmp_path / "NEW").exists()


def test_closing_the_output_stops_a_run_as_sigpipe_does_naming_the_checkpoint_to_resume(tmp_path):
    # `cnn-backend train ... | head`: the reader goes away before epoch 1's line is printed.
    shown = [arg for arg in SMALL if arg != "--quiet"]
    process = start_stopped("train", *shown, "--epochs", 3, "--log-every", 2, "--out", "run", cwd=tmp_path, at="step@3")
    process.stdout.close()
    process.send_signal(signal.SIGCONT)
    stderr = process.stderr.read()
    assert process.wait(timeout=TIMEOUT) == 141  # 128 + SIGPIPE, as a shell reports it
    last = Path("run") / "last.npz"
    assert one_line(stderr) == (
        f"cnn-backend: stopped: its standard output was closed after epoch 1; the last good checkpoint is {last} (epoch 1); "
        f"resume with: cnn-backend train --resume {last}"
    )
    assert [row["epoch"] for row in read_history(tmp_path / "run" / "history.jsonl")] == [1]


def test_other_commands_stop_silently_when_their_output_is_closed(tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "cnn_backend", "summary", "--model", "default"], cwd=tmp_path, env=_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    process.stdout.close()  # gone before the first line
    assert process.wait(timeout=TIMEOUT) == 141 and process.stderr.read() == ""


@pytest.mark.parametrize("args", [["train", "--lr", "-5"], ["summary", "--model", "nosuch.toml"]])
def test_an_error_keeps_its_exit_status_when_nobody_reads_stderr(tmp_path, args):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader of stderr is gone before the command starts
    try:
        result = subprocess.run([sys.executable, "-m", "cnn_backend", *args], cwd=tmp_path, env=_env(), stderr=write_end,
                                stdout=subprocess.PIPE, timeout=TIMEOUT)
    finally:
        os.close(write_end)
    assert result.returncode == 2 and result.stdout == b""


def test_interrupt_after_resuming_elsewhere_says_how_to_resume_into_the_same_folder(tmp_path):
    assert cli("train", *SMALL, "--epochs", 1, "--out", "A", cwd=tmp_path).returncode == 0
    process = start_stopped("train", "--resume", Path("A") / "last.npz", "--out", "NEW", "--epochs", 3, "--device", "cpu", "--quiet",
                            cwd=tmp_path, at="step@1")
    line = one_line(finish(process, signal.SIGINT).stderr)
    # A's checkpoint holds --epochs 1: the hint repeats the --epochs 3 given since, which no checkpoint holds yet.
    assert line.endswith(f"resume with: cnn-backend train --resume {Path('A') / 'last.npz'} --out NEW --epochs 3"), line
    assert not (tmp_path / "NEW").exists()


#: a module of one's own registering a layer class, and an architecture file using it
OWN_LAYER_MODULE = "from cnn_backend import register_layer\nfrom cnn_backend.layers import ReLU\n\n\n@register_layer\nclass OwnReLU(ReLU):\n    pass\n"
OWN_LAYER_NET = "".join(f"[[layers]]\n{layer}\n" for layer in (
    'type = "Convolution"\nout_channels = 4\nkernel_size = 3', 'type = "OwnReLU"', 'type = "Flatten"', 'type = "FullyConnected"\nout_features = 10'))


def test_every_resume_hint_of_a_network_with_an_own_layer_repeats_import_as_given(tmp_path):
    (tmp_path / "layers").mkdir()
    (tmp_path / "layers" / "own relu.py").write_text(OWN_LAYER_MODULE)  # a space: the hint quotes it for the shell
    (tmp_path / "net.toml").write_text(OWN_LAYER_NET)
    run = ["train", "--model", "net.toml", "--import", "layers/own relu.py", *SMALL[2:], "--out", "run"]
    imports = "--import 'layers/own relu.py'"
    result = finish(start_stopped(*run, "--epochs", 3, "--log-every", 2, cwd=tmp_path, at="step@3"), signal.SIGINT)
    line = one_line(result.stderr)
    assert result.returncode == 130 and line.startswith("cnn-backend: interrupted during epoch 2;"), line
    hint = f"cnn-backend train --resume {Path('run') / 'last.npz'} {imports}"
    assert line.endswith(f"resume with: {hint}"), line

    refused = cli(*run, "--epochs", 1, cwd=tmp_path)
    assert refused.returncode == 2
    assert one_line(refused.stderr).endswith(f"or continue it with --resume {Path('run') / 'last.npz'} {imports}"), refused.stderr

    # Stopped on resuming, before its folder's history is started again: the checkpoint resumed is the good one.
    stopped = start_stopped(*shlex.split(hint)[1:], "--epochs", 2, "--no-plots", cwd=tmp_path, at="replace history.jsonl@1")
    line = one_line(finish(stopped, signal.SIGINT).stderr)
    assert line.endswith(f"the last good checkpoint is {Path('run') / 'last.npz'} (epoch 1); resume with: {hint} --epochs 2"), line

    # The hint as it is pasted into a shell works: without --import the network could not be rebuilt.
    words = shlex.split(hint)
    assert words[:1] == ["cnn-backend"]
    resumed = cli(*words[1:], "--epochs", 2, "--no-plots", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(tmp_path / "run" / "last.npz").epoch == 2


def test_another_runs_checkpoint_copied_into_a_run_folder_is_refused_whichever_file_it_replaced(tmp_path):
    resume = ["train", "--resume", Path("A") / "last.npz", "--epochs", 3, "--device", "cpu", "--quiet", "--no-plots"]
    assert cli("train", *SMALL, "--epochs", 1, "--out", "A", cwd=tmp_path).returncode == 0
    epoch_1 = (tmp_path / "A" / "last.npz").read_bytes()
    assert cli(*resume[:3], "--epochs", 2, *resume[5:], cwd=tmp_path).returncode == 0
    assert cli("train", *SMALL, "--seed", 1, "--epochs", 2, "--out", "B", cwd=tmp_path).returncode == 0
    folder = {name: (tmp_path / "A" / name).read_bytes() for name in ("last.npz", "best.npz", "history.jsonl")}

    def refused(*fragments) -> None:
        before = {name: (tmp_path / "A" / name).read_bytes() for name in folder}
        result = cli(*resume, cwd=tmp_path)
        line = one_line(result.stderr)
        assert result.returncode == 2 and all(fragment in line for fragment in fragments), line
        assert {name: (tmp_path / "A" / name).read_bytes() for name in folder} == before  # nothing rewritten
        for name, data in folder.items():  # A's own files back
            (tmp_path / "A" / name).unlink()
            (tmp_path / "A" / name).write_bytes(data)

    a_last, a = Path("A") / "last.npz", Path("A")
    (tmp_path / "A" / "last.npz").write_bytes((tmp_path / "B" / "last.npz").read_bytes())  # B's checkpoint over A's
    refused(f"{a_last} and {a / 'history.jsonl'} are from different runs (their histories differ from epoch 1)", "add --out NEW_FOLDER")
    (tmp_path / "A" / "best.npz").unlink()
    (tmp_path / "A" / "best.npz").write_bytes((tmp_path / "B" / "best.npz").read_bytes())  # B's best.npz alone
    refused(f"{a_last} and {a / 'best.npz'} are from different runs")
    (tmp_path / "A" / "last.npz").write_bytes(epoch_1)  # A's own, older, checkpoint: its later epoch would go
    refused(f"{a / 'history.jsonl'} goes on to epoch 2 but {a_last} holds epoch 1", "add --out NEW_FOLDER to go on from epoch 1 there")

    finished = cli(*resume, cwd=tmp_path)  # the folder's own files: resumed
    assert finished.returncode == 0, finished.stderr
    assert [row["epoch"] for row in read_history(tmp_path / "A" / "history.jsonl")] == [1, 2, 3]


# -- 5: write errors -------------------------------------------------------------------------------


def _fail_nth_npz_write(monkeypatch, failing_call: int) -> None:
    calls = {"n": 0}
    real = numpy.savez

    def savez(stream, **arrays):
        calls["n"] += 1
        if calls["n"] == failing_call:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(stream, **arrays)

    monkeypatch.setattr(cnn_backend.serialization.numpy, "savez", savez)


def test_disk_full_during_a_checkpoint_names_the_file_and_the_intact_epoch(tmp_path, capsys, monkeypatch):
    _fail_nth_npz_write(monkeypatch, failing_call=2)  # epoch 2's last.npz
    status, _, err = run_main(capsys, "train", *SMALL, "--epochs", 3, "--out", tmp_path / "run")
    line = one_line(err)
    run = tmp_path / "run"
    assert status == 1
    assert f"cannot write {run / 'last.npz'}: No space left on device; the last good checkpoint is {run / 'last.npz'} (epoch 1); " \
           "free space or choose another --out" in line, line
    assert load_checkpoint(run / "last.npz").epoch == 1
    assert [row["epoch"] for row in read_history(run / "history.jsonl")] == [1]
    assert hidden_files(run) == []


def test_an_out_folder_that_cannot_be_made_says_to_choose_another(tmp_path, capsys):
    (tmp_path / "afile").write_text("not a folder")
    status, _, err = run_main(capsys, "train", *SMALL, "--epochs", 1, "--out", tmp_path / "afile" / "run")
    assert status == 1 and one_line(err).endswith(f"cannot write {tmp_path / 'afile' / 'run'}: Not a directory; choose another --out")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["afile"]


def test_disk_full_before_any_checkpoint_leaves_nothing(tmp_path, capsys, monkeypatch):
    _fail_nth_npz_write(monkeypatch, failing_call=1)
    status, _, err = run_main(capsys, "train", *SMALL, "--epochs", 2, "--out", tmp_path / "run")
    line = one_line(err)
    assert status == 1 and "cannot write" in line and "no epoch finished, so no checkpoint was written; free space" in line
    assert not (tmp_path / "run").exists()


def test_disk_full_on_the_history_keeps_the_checkpoint_and_no_half_row(tmp_path, capsys, monkeypatch):
    real_write = os.write
    calls = {"n": 0}

    def write(descriptor, data):
        if os.readlink(f"/proc/self/fd/{descriptor}").endswith("history.jsonl"):
            calls["n"] += 1
            if calls["n"] == 2:  # epoch 2's row: half of it lands, then the disk is full
                real_write(descriptor, data[: len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(descriptor, data)

    monkeypatch.setattr(os, "write", write)
    status, _, err = run_main(capsys, "train", *SMALL, "--epochs", 3, "--out", tmp_path / "run")
    monkeypatch.undo()
    run = tmp_path / "run"
    line = one_line(err)
    assert status == 1 and f"cannot write {run / 'history.jsonl'}: No space left on device" in line
    assert f"the last good checkpoint is {run / 'last.npz'} (epoch 2)" in line
    assert [row["epoch"] for row in read_history(run / "history.jsonl")] == [1]  # whole rows only
    status, _, err = run_main(capsys, "train", "--resume", run / "last.npz", "--device", "cpu", "--quiet", "--no-plots")
    assert status == 0, err
    assert [row["epoch"] for row in read_history(run / "history.jsonl")] == [1, 2, 3]


def test_evaluate_suggests_json_path_when_its_report_cannot_be_written(tmp_path, capsys):
    assert cli("train", *SMALL, "--epochs", 1, "--out", "run", cwd=tmp_path).returncode == 0
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    status, out, err = run_main(capsys, "evaluate", tmp_path / "run" / "last.npz", "--device", "cpu", "--json", blocker / "report.json")
    line = one_line(err)
    assert status == 1 and f"cannot write {blocker / 'report.json'}" in line and "pass --json PATH" in line
    assert "accuracy" in out


# -- 6: divergence in validation -------------------------------------------------------------------


@pytest.mark.parametrize("loss", [float("inf"), float("nan")])
def test_a_non_finite_validation_loss_stops_the_run_and_is_never_best(tmp_path, capsys, monkeypatch, loss):
    real = cnn_backend.training.evaluate
    calls = {"n": 0}

    def evaluate(*args, **kwargs):
        calls["n"] += 1
        scores = real(*args, **kwargs)
        return {**scores, "loss": loss} if calls["n"] == 2 else scores

    monkeypatch.setattr(cnn_backend.training, "evaluate", evaluate)
    status, out, err = run_main(capsys, "train", *SMALL, "--epochs", 3, "--out", tmp_path / "run")
    line = one_line(err)
    assert status == 1 and "the validation loss became non-finite after epoch 2" in line
    assert "the last good checkpoint is" in line and "(epoch 1)" in line
    assert out.count("*best") == 1
    assert load_checkpoint(tmp_path / "run" / "best.npz").epoch == 1
    assert load_checkpoint(tmp_path / "run" / "last.npz").epoch == 1


def test_fit_treats_nan_validation_logits_as_divergence():
    from cnn_backend.data import BatchLoader
    from cnn_backend.optim import make_optimizer
    from cnn_backend.training import NonFiniteLossError, fit

    model = seed_cnn("cpu")
    rng = numpy.random.default_rng(0)
    loader = BatchLoader(rng.integers(0, 256, (64, 28, 28), dtype=numpy.uint8), rng.integers(0, 10, 64), model.backend, 32)
    optimizer = make_optimizer("sgd", model.parameters(), model.backend, lr=0.01)
    original = Sequential.predict_logits

    def poisoned(self, x, batch_size=250):
        return original(self, x, batch_size) * numpy.float32("nan")

    images = numpy.zeros((8, 1, 28, 28), numpy.float32)
    Sequential.predict_logits = poisoned
    try:
        with pytest.raises(NonFiniteLossError, match="validation loss became non-finite after epoch 1"):
            fit(model, optimizer, loader, 2, validation=(images, numpy.zeros(8, numpy.int64)))
    finally:
        Sequential.predict_logits = original


# -- 10: help says what runs; start-up imports -----------------------------------------------------


def test_dropout_help_gives_each_models_default(capsys):
    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--dropout RATE dropout before the output layer, default and plain models only (default: default model 0.1, plain model 0.4)" in text


def test_training_on_the_cpu_imports_neither_scipy_signal_nor_plotting_before_the_plots():
    code = (
        "import sys; from cnn_backend.cli import build_model, open_backend; import cnn_backend.data;"
        "backend, _ = open_backend('cpu', 'float32');"
        "model = build_model({'model': 'default', 'seed': 0, 'dropout': 0.4}, backend, 'auto');"
        "model.forward(__import__('numpy').zeros((2, 1, 28, 28), 'float32'));"
        "print(sorted(name for name in ('scipy.signal', 'matplotlib', 'torch', 'cupy', 'tqdm') if name in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
