"""``--import MODULE``: a module registering a layer class of its own, imported while the command line
is parsed, so that architecture files and checkpoints naming the class can be built and loaded."""

from __future__ import annotations

import itertools
import sys
import textwrap

import pytest

from cnn_backend.layers import LAYER_TYPES
from cnn_backend.spec import LAYER_OPTIONS

from cli_helpers import one_error_line, run_main

TINY_RUN = ["--device", "cpu", "--data", "bundled", "--train-split", ":256", "--val-split", "9000:9128", "--epochs", 1,
            "--batch-size", 64, "--quiet", "--no-plots"]  # fmt: skip

#: registrations are process-wide: every test registers a class (and a module) of its own name
_numbers = itertools.count()

#: a module as a user writes it: the layer class (tests/layer_helpers.py's) under a name of its own
LAYER_MODULE = """
from cnn_backend import register_layer
from layer_helpers import ChannelScale


@register_layer
class {name}(ChannelScale):
    pass
"""


class CustomLayer:
    """A module in a test's folder that registers a layer class, and an architecture file using it."""

    def __init__(self, folder):
        number = next(_numbers)
        self.class_name, self.module_name = f"ImportedScale{number}", f"imported_layers_{number}"
        self.file = folder / f"{self.module_name}.py"
        self.file.write_text(LAYER_MODULE.format(name=self.class_name))
        self.spec = folder / "net.toml"
        self.spec.write_text(textwrap.dedent(f"""\
            [[layers]]
            type = "Convolution"
            out_channels = 4
            kernel_size = 3
            [[layers]]
            type = "{self.class_name}"
            initial = 0.5
            [[layers]]
            type = "ReLU"
            [[layers]]
            type = "Flatten"
            [[layers]]
            type = "FullyConnected"
            out_features = 10
            """))

    def forget(self) -> None:
        """As a new process would be: the class unregistered, the module not imported."""
        LAYER_TYPES.pop(self.class_name, None)
        LAYER_OPTIONS.pop(self.class_name, None)
        sys.modules.pop(self.module_name, None)


@pytest.fixture
def custom(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # a dotted --import puts the current folder on it
    layer = CustomLayer(tmp_path)
    yield layer
    layer.forget()


def test_summary_builds_a_spec_with_a_class_from_an_imported_file(custom, capsys):
    status, _, err = run_main(capsys, "summary", "--model", custom.spec)
    one_error_line(err, f"unknown layer type {custom.class_name!r}", "--import MODULE")
    assert status == 2
    status, out, err = run_main(capsys, "summary", "--model", custom.spec, "--import", custom.file)
    assert status == 0, err
    assert custom.class_name in out and "initial=0.5" in out
    assert LAYER_TYPES[custom.class_name].__module__ == custom.module_name  # named by the file's stem
    assert sys.modules[custom.module_name].__file__ == str(custom.file)


def test_a_dotted_module_name_is_found_from_the_current_folder(custom, capsys, monkeypatch):
    monkeypatch.chdir(custom.file.parent)
    status, out, err = run_main(capsys, "summary", "--model", custom.spec.name, "--import", custom.module_name)
    assert status == 0, err
    assert custom.class_name in out
    assert sys.modules[custom.module_name].__file__ == str(custom.file)


def test_a_module_that_cannot_be_imported_is_a_usage_error_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    status, _, err = run_main(capsys, "summary", "--import", "no_such_layers_module")
    one_error_line(err, "argument --import: cannot import 'no_such_layers_module': ModuleNotFoundError", "see cnn-backend summary --help")
    assert status == 2
    status, _, err = run_main(capsys, "summary", "--import", "nope.py")
    one_error_line(err, "argument --import: cannot import 'nope.py': no such file")
    assert status == 2

    (tmp_path / "failing_layers.py").write_text('raise RuntimeError("the weights folder is missing\\nset LAYERS_HOME")\n')
    for given in ("failing_layers.py", "failing_layers"):
        status, _, err = run_main(capsys, "summary", "--import", given)
        one_error_line(err, f"cannot import {given!r}: RuntimeError: the weights folder is missing set LAYERS_HOME")
        assert status == 2
        assert "failing_layers" not in sys.modules  # a failed import leaves nothing half-made behind

    # A file whose stem names a module already imported is refused rather than put in its place.
    monkeypatch.setitem(sys.modules, "cli_helpers", sys.modules["cli_helpers"])
    (tmp_path / "cli_helpers.py").write_text("")
    status, _, err = run_main(capsys, "summary", "--import", tmp_path / "cli_helpers.py")
    one_error_line(err, "the module name 'cli_helpers' is taken by", "rename the file")
    assert status == 2


def test_a_trained_checkpoint_of_a_custom_layer_loads_only_with_its_module(custom, tmp_path, capsys):
    run = tmp_path / "run"
    status, _, err = run_main(capsys, "train", "--model", custom.spec, "--import", custom.file, *TINY_RUN, "--out", run)
    assert status == 0, err
    custom.forget()

    status, _, err = run_main(capsys, "evaluate", run / "last.npz", "--device", "cpu")
    one_error_line(err, "last.npz", f"unknown layer type {custom.class_name!r}", "--import MODULE")
    assert status == 2
    status, out, err = run_main(capsys, "evaluate", run / "last.npz", "--device", "cpu", "--import", custom.file)
    assert status == 0, err
    assert "accuracy" in out


@pytest.mark.parametrize("command", ["train", "evaluate", "predict", "summary", "export", "parity"])
def test_every_command_that_builds_or_loads_a_network_takes_import(command, capsys):
    status, out, _ = run_main(capsys, command, "--help")
    assert status == 0 and "--import MODULE" in out and "cnn_backend.register_layer" in out
