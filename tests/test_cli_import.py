"""``--import MODULE``: a module registering a layer class of its own, imported while the command line
is parsed, so that architecture files and checkpoints naming the class can be built and loaded."""

from __future__ import annotations

import importlib.util
import itertools
import sys
import textwrap
from pathlib import Path

import pytest

from cnn_backend.layers import LAYER_TYPES

from cli_helpers import one_error_line, run_main
from layer_helpers import forget_layer_type

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
        forget_layer_type(self.class_name)
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


def test_the_refusal_of_a_folder_holding_a_run_repeats_import_as_given(custom, capsys, monkeypatch):
    # Without --import, the command it suggests cannot rebuild the network ("unknown layer type").
    monkeypatch.chdir(custom.file.parent)
    train = ["train", "--model", custom.spec.name, "--import", custom.file.name, "--import", custom.module_name, *TINY_RUN, "--out", "run"]
    status, _, err = run_main(capsys, *train)
    assert status == 0, err
    status, _, err = run_main(capsys, *train)
    one_error_line(err, "run already holds a training run",
                   f"continue it with --resume {Path('run') / 'last.npz'} --import {custom.file.name} --import {custom.module_name}")
    assert status == 2


@pytest.mark.parametrize("command", ["train", "evaluate", "predict", "summary", "export", "parity"])
def test_every_command_that_builds_or_loads_a_network_takes_import(command, capsys):
    status, out, _ = run_main(capsys, command, "--help")
    assert status == 0 and "--import MODULE" in out and "cnn_backend.register_layer" in out


@pytest.fixture
def imports_undone(tmp_path, monkeypatch):
    """The current folder is ``tmp_path``; ``sys.path`` and the modules imported from ``tmp_path``
    are as before the test after it (the layer types they register: see ``registry_restored``)."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    root = str(tmp_path.resolve())
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith((root, str(tmp_path))):
            del sys.modules[name]


def net_using(folder, class_name):
    """An architecture file in ``folder`` with a layer of type ``class_name``."""
    spec = folder / "net.toml"
    layers = [f'type = "{class_name}"', 'type = "Flatten"', 'type = "FullyConnected"\nout_features = 10']
    spec.write_text("".join(f"[[layers]]\n{layer}\n" for layer in layers))
    return spec


def test_a_file_imported_by_path_imports_the_modules_beside_it(imports_undone, registry_restored, capsys):
    number = next(_numbers)
    class_name, helper = f"SiblingScale{number}", f"sibling_helper_{number}"
    folder = imports_undone / "sib"
    folder.mkdir()
    (folder / f"{helper}.py").write_text("from layer_helpers import ChannelScale as Base\n")
    (folder / "uses_sibling.py").write_text(
        f"from cnn_backend import register_layer\nfrom {helper} import Base\n\n\n@register_layer\nclass {class_name}(Base):\n    pass\n"
    )
    status, out, err = run_main(capsys, "summary", "--model", net_using(imports_undone, class_name), "--import", "sib/uses_sibling.py")
    assert status == 0, err
    assert class_name in out
    assert sys.path[-1] == str(folder.resolve())  # last: see the test of a neighbour named like an installed module
    status, _, err = run_main(capsys, "summary", "--model", net_using(imports_undone, class_name), "--import", "sib/uses_sibling.py")
    assert status == 0, err
    assert sys.path.count(str(folder.resolve())) == 1  # not again


@pytest.mark.parametrize("dotted_first", [True, False], ids=["dotted-then-path", "path-then-dotted"])
def test_one_file_named_by_module_and_by_path_is_imported_once(imports_undone, registry_restored, capsys, dotted_first):
    number = next(_numbers)
    class_name, package, stem = f"TwiceNamedScale{number}", f"twice_pkg_{number}", f"twice_layers_{number}"
    (imports_undone / package).mkdir()
    (imports_undone / package / "__init__.py").write_text("")
    (imports_undone / package / f"{stem}.py").write_text(LAYER_MODULE.format(name=class_name))
    names = [f"{package}.{stem}", f"{package}/{stem}.py"]
    imports = [arg for name in (names if dotted_first else names[::-1]) for arg in ("--import", name)]
    status, out, err = run_main(capsys, "summary", "--model", net_using(imports_undone, class_name), *imports)
    assert status == 0, err
    assert class_name in out
    first_name = f"{package}.{stem}" if dotted_first else stem  # a file by path is named by its stem
    # their own names, not hasattr: some modules (torch.ops) answer any attribute
    defining = {name for name, module in list(sys.modules.items()) if class_name in getattr(module, "__dict__", {})}
    assert defining == {first_name}
    assert LAYER_TYPES[class_name].__module__ == first_name


def test_a_dotted_name_taken_by_another_module_than_the_file_in_the_current_folder_is_refused(imports_undone, capsys):
    import email  # noqa: F401  (imported before, as the command line's own modules import the standard library)
    import json

    (imports_undone / "json.py").write_text("raise RuntimeError('never run')\n")
    status, _, err = run_main(capsys, "summary", "--import", "json")
    one_error_line(err, f"argument --import: cannot import 'json': the module name 'json' is taken by {json.__file__}, not ./json.py; rename the file")
    assert status == 2
    (imports_undone / "email").mkdir()
    (imports_undone / "email" / "__init__.py").write_text("")
    (imports_undone / "email" / "my_layers.py").write_text("")
    status, _, err = run_main(capsys, "summary", "--import", "email.my_layers")
    one_error_line(err, "cannot import 'email.my_layers': the module name 'email' is taken by", "email/__init__.py, not ./email/; rename the file")
    assert status == 2
    (imports_undone / "sys.py").write_text("")
    status, _, err = run_main(capsys, "summary", "--import", "sys")
    one_error_line(err, "cannot import 'sys': the module name 'sys' is taken by a built-in module, not ./sys.py; rename the file")
    assert status == 2


def test_a_file_named_after_a_module_not_imported_yet_is_refused_rather_than_put_in_its_place(imports_undone, capsys):
    # A standard module that neither the command line nor the test run imports: were it imported,
    # the check of sys.modules would refuse the file and this test would not reach the one it is for.
    assert "tabnanny" not in sys.modules
    standard = importlib.util.find_spec("tabnanny").origin  # found, not imported
    (imports_undone / "mine").mkdir()
    (imports_undone / "mine" / "tabnanny.py").write_text("raise RuntimeError('never run')\n")
    status, _, err = run_main(capsys, "summary", "--import", "mine/tabnanny.py")
    one_error_line(err, f"argument --import: cannot import 'mine/tabnanny.py': the module name 'tabnanny' is taken by {standard}, not mine/tabnanny.py; rename the file")
    assert status == 2
    assert "tabnanny" not in sys.modules  # neither the file nor the standard module stands for it now


def test_a_file_whose_folder_is_on_the_path_is_found_as_itself_and_imported(imports_undone, registry_restored, capsys):
    number = next(_numbers)
    class_name, stem = f"OnPathScale{number}", f"on_path_layers_{number}"
    folder = imports_undone / "on_path"
    folder.mkdir()
    file = folder / f"{stem}.py"
    file.write_text(LAYER_MODULE.format(name=class_name))
    sys.path.insert(0, str(folder))
    assert Path(importlib.util.find_spec(stem).origin) == file  # the name is found, as the file itself: no clash
    status, out, err = run_main(capsys, "summary", "--model", net_using(imports_undone, class_name), "--import", f"on_path/{stem}.py")
    assert status == 0, err
    assert class_name in out
    assert Path(sys.modules[stem].__file__).resolve() == file.resolve()


def test_a_neighbour_named_like_an_installed_module_does_not_hide_it(imports_undone, registry_restored, capsys):
    number = next(_numbers)
    class_name, stem = f"NeighbourScale{number}", f"neighbour_layers_{number}"
    folder = imports_undone / "with_neighbours"
    folder.mkdir()
    (folder / f"{stem}.py").write_text(LAYER_MODULE.format(name=class_name))
    (folder / "tabnanny.py").write_text("raise RuntimeError('the neighbour was imported')\n")
    status, _, err = run_main(capsys, "summary", "--model", net_using(imports_undone, class_name), "--import", f"with_neighbours/{stem}.py")
    assert status == 0, err
    assert Path(importlib.util.find_spec("tabnanny").origin).parent != folder.resolve()  # the folder goes last on the path


def test_a_neighbour_of_a_dotted_module_in_the_current_folder_does_not_hide_an_installed_module(imports_undone, registry_restored, capsys):
    number = next(_numbers)
    class_name, stem = f"DottedNeighbourScale{number}", f"dotted_neighbour_layers_{number}"
    (imports_undone / f"{stem}.py").write_text(LAYER_MODULE.format(name=class_name))
    (imports_undone / "tabnanny.py").write_text("raise RuntimeError('the neighbour was imported')\n")
    status, _, err = run_main(capsys, "summary", "--model", net_using(imports_undone, class_name), "--import", stem)
    assert status == 0, err
    assert Path(importlib.util.find_spec("tabnanny").origin).parent != imports_undone.resolve()  # the current folder goes last


@pytest.mark.parametrize("call", ["sys.exit(3)", "sys.exit('no GPU here')", "sys.exit()"])
def test_a_module_that_calls_sys_exit_is_a_usage_error_in_one_line(imports_undone, capsys, call):
    name = f"exiting_layers_{next(_numbers)}"
    (imports_undone / f"{name}.py").write_text(f"import sys\n{call}\n")
    for given in (f"{name}.py", name):
        status, _, err = run_main(capsys, "summary", "--import", given)
        one_error_line(err, f"argument --import: cannot import {given!r}: it called {call}")
        assert status == 2
        assert name not in sys.modules


def test_an_interrupt_while_importing_is_not_taken_for_an_error_of_the_module(imports_undone):
    from cnn_backend.cli.arguments import imported_module

    name = f"interrupted_layers_{next(_numbers)}"
    (imports_undone / f"{name}.py").write_text("raise KeyboardInterrupt\n")
    for given in (f"{name}.py", name):
        with pytest.raises(KeyboardInterrupt):
            imported_module(given)
