"""Argument types of the command line (a bad value is a usage error, status 2), image ranges
``START:STOP``, the sub-parser of a command, and ``--import`` (modules registering layer classes)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import os
import sys
from pathlib import Path

from ..data import BUNDLED_COUNT, DataError
from ..datasets import DATASETS
from ..datasets.folder import parse_image_size
from ..spec import BUILTIN_NAMES, SPEC_SUFFIXES

DATA_METAVAR = "|".join(("auto", "bundled") + tuple(DATASETS)) + "|DIR"


def add_command(commands, name: str, handler, *, help: str, description: str) -> argparse.ArgumentParser:
    """The sub-parser of command ``name``, which runs ``handler(args)``."""
    parser = commands.add_parser(name, help=help, description=description)
    parser.set_defaults(handler=handler)
    return parser


IMPORT_HELP = (
    "a module that registers your own layer classes with cnn_backend.register_layer, imported before the network "
    "is built or loaded: a dotted module name importable from the current folder, or a path to a .py file (repeatable)"
)


def add_import_option(parser) -> None:
    """``--import MODULE``, repeatable: each module is imported while the command line is parsed,
    so the layer classes it registers are known before the command reads a spec or a checkpoint.
    ``imports`` holds the modules, ``imports_given`` the texts as given (repeated in resume hints)."""
    parser.add_argument("--import", dest="imports", action=_ImportAction, metavar="MODULE", help=IMPORT_HELP)
    parser.set_defaults(imports_given=[])


class _ImportAction(argparse.Action):
    """Appends the module :func:`imported_module` imports to ``imports`` and the text to
    ``imports_given``: a resume hint must repeat ``--import`` as typed, which the module alone does
    not tell (named by path or dotted name, relative or not)."""

    def __call__(self, parser, namespace, text, option_string=None):
        try:
            module = imported_module(text)
        except argparse.ArgumentTypeError as exc:  # reported as argparse reports a type's error
            raise argparse.ArgumentError(self, str(exc)) from None
        namespace.imports = [*(getattr(namespace, "imports", None) or []), module]
        namespace.imports_given = [*(getattr(namespace, "imports_given", None) or []), text]


def imported_module(text: str):
    """An argument type: the module ``text`` names, imported (its registrations are what counts).

    A file already imported under any name (given once by path, once dotted) is not run again: a
    second run would define its classes again under another module name, and registering them
    would be refused as a clash with the first."""
    try:
        if text.lower().endswith(".py") or os.path.isfile(text):
            return _import_file(text)
        if os.getcwd() not in sys.path:  # found from the current folder; last, so that a neighbour
            sys.path.append(os.getcwd())  # named like an installed package (./onnx.py) never hides it
        importlib.invalidate_caches()  # a file written since the interpreter started is found too
        top = text.partition(".")[0]
        if top.isidentifier():
            _refuse_a_shadowed_name(text, top, importlib.import_module(top))
        if text not in sys.modules:
            spec = importlib.util.find_spec(text)
            loaded = _module_of_file(spec.origin) if spec is not None and spec.has_location else None
            if loaded is not None:
                return loaded
        return importlib.import_module(text)
    except argparse.ArgumentTypeError:
        raise
    except SystemExit as exc:  # would end the command silently with the module's status
        code = "" if exc.code is None else repr(exc.code)
        raise argparse.ArgumentTypeError(f"cannot import {text!r}: it called sys.exit({code})") from None
    except Exception as exc:  # the user's code: any error is theirs to fix, reported in one line
        raise argparse.ArgumentTypeError(f"cannot import {text!r}: {type(exc).__name__}: {' '.join(str(exc).split())}") from None


def _refuse_a_shadowed_name(text: str, top: str, module) -> None:
    """Refuse ``module``, imported for the top-level name ``top``, when it is not the ``./top.py`` (or
    ``./top/`` package) in the current folder: a standard or installed module of that name (already
    imported, or earlier on ``sys.path``) would be used instead of the user's file without a word."""
    local = [candidate for candidate in (Path(f"{top}.py"), Path(top) / "__init__.py") if candidate.is_file()]
    if not local:
        return
    where = getattr(module, "__file__", None)
    if where is not None and any(Path(where).resolve() == candidate.resolve() for candidate in local):
        return
    shown = f"./{top}.py" if local[0].name != "__init__.py" else f"./{top}/"
    _refuse_a_taken_name(text, top, where or ("a namespace package" if hasattr(module, "__path__") else None), shown)


def _module_of_file(path) -> object | None:
    """The module already imported (under any name) from the file ``path``, or None."""
    path = Path(path)
    for module in list(sys.modules.values()):
        where = getattr(module, "__file__", None)
        # The names first: resolving the path of every imported module would cost a system call each.
        if isinstance(where, str) and os.path.basename(where) == path.name and Path(where).resolve() == path.resolve():
            return module
    return None


def _import_file(text: str):
    """The module of the file ``text``, named by its stem and put in ``sys.modules`` before it runs,
    so that its classes have a proper ``__module__`` (registration compares it). Its folder goes
    on ``sys.path`` unless already there, so that it can import the modules beside it: last, so
    that a neighbour named like an installed package (an ``onnx.py``) never hides that package."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"cannot import {text!r}: no such file")
    loaded = _module_of_file(path)
    if loaded is not None:
        return loaded  # given twice, under a dotted name too, or already imported by another module
    name = path.stem
    taken = sys.modules.get(name)
    if taken is not None:
        _refuse_a_taken_name(text, name, getattr(taken, "__file__", None), text)
    _refuse_an_importable_name(text, name, path)
    folder = path.resolve().parent
    if not any(Path(entry or os.curdir).resolve() == folder for entry in sys.path if isinstance(entry, str)):
        sys.path.append(str(folder))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)  # as the import system does with a module that fails
        raise
    return module


def _refuse_an_importable_name(text: str, name: str, path: Path) -> None:
    """Refuse the file ``path`` when another module is importable as ``name`` (a standard or installed
    one not imported yet): put in ``sys.modules`` under that name, the file would stand in for it for
    the rest of the process, and whatever imports it later (onnx for export, matplotlib for the plots)
    would get the user's file. The file itself, found where its folder is on ``sys.path``, is no clash."""
    if "." in name:  # find_spec would import the parent package, and `import a.b` never finds ./a.b.py
        return
    spec = importlib.util.find_spec(name)
    if spec is None:
        return
    if spec.has_location:
        where = spec.origin
        if Path(where).resolve() == path.resolve():
            return
    elif spec.submodule_search_locations:  # a namespace package: named by its first folder
        where = next(iter(spec.submodule_search_locations))
    else:
        where = None
    _refuse_a_taken_name(text, name, where, text)


def _refuse_a_taken_name(text: str, name: str, taker: str | None, mine: str) -> None:
    """The one refusal of a module name that another module (``taker``: its file, or None for a
    built-in one) holds instead of the user's ``mine``."""
    raise argparse.ArgumentTypeError(
        f"cannot import {text!r}: the module name {name!r} is taken by {taker or 'a built-in module'}, not {mine}; rename the file"
    )


def _number(kind, accept, requirement: str):
    """An argument type: the text as ``kind``, refused unless ``accept(value)`` holds."""

    def parse(text: str):
        value = _parse(kind, text)
        if not accept(value):
            raise argparse.ArgumentTypeError(f"{requirement}, got {text!r}")
        return value

    return parse


positive_int = _number(int, lambda value: value >= 1, "must be a positive integer")
non_negative_int = _number(int, lambda value: value >= 0, "must be an integer >= 0")
positive_float = _number(float, lambda value: math.isfinite(value) and value > 0, "must be a finite number > 0")
learning_rate = positive_float
non_negative_float = _number(float, lambda value: math.isfinite(value) and value >= 0, "must be a finite number >= 0")
open_fraction = _number(float, lambda value: 0.0 < value < 1.0, "must be between 0 and 1 (exclusive)")
fraction = _number(float, lambda value: 0.0 <= value < 1.0, "must be in [0, 1)")


def image_size_text(text: str) -> str:
    try:
        parse_image_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def json_report_path(text: str) -> Path:
    """Where a command writes its JSON report: a name ending in ``.json`` (so that a checkpoint
    given by mistake is never replaced by a report), and not a folder."""
    path = Path(text)
    if path.suffix.lower() != ".json":
        raise argparse.ArgumentTypeError(f"{text!r} does not end in .json; name the report PATH.json (a report never replaces another kind of file)")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; name a file such as {str(path / 'report.json')!r}")
    return path


def _parse(kind, text: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None


def model_text(text: str) -> str:
    if text in BUILTIN_NAMES or Path(text).suffix.lower() in SPEC_SUFFIXES:
        return text
    raise argparse.ArgumentTypeError(f"choose {', '.join(BUILTIN_NAMES)}, or an architecture file ending in .toml or .json, got {text!r}")


def input_shape_text(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) not in (1, 3) or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected C,H,W (e.g. 1,28,28) or a feature count, got {text!r}")
    if max(shape) > LARGEST_INPUT_SIZE:
        raise argparse.ArgumentTypeError(f"{text!r} has a size above {LARGEST_INPUT_SIZE:,}; give the shape of one sample, e.g. 1,28,28")
    return shape


#: the largest size of one axis of a sample's shape that --input-shape takes (a typo's guard)
LARGEST_INPUT_SIZE = 1 << 24


def range_text(text: str) -> str:
    parse_range(text)  # syntax only; bounds are checked against the data
    return text


def parse_range(text: str) -> tuple[int | None, int | None]:
    """``"START:STOP"`` (either end may be empty) as ``(start, stop)``; raises ArgumentTypeError."""
    start, colon, stop = text.partition(":")
    try:
        if not colon:
            raise ValueError
        bounds = tuple(int(part) if part.strip() else None for part in (start, stop))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:STOP (e.g. :5000 or 5000:10000), got {text!r}") from None
    if any(bound is not None and bound < 0 for bound in bounds):
        raise argparse.ArgumentTypeError(f"START and STOP must be >= 0, got {text!r}")
    return bounds


def select_range(text: str, total: int, option: str) -> slice:
    """The slice ``text`` names in a split of ``total`` images; ValueError when empty or out of bounds."""
    start, stop = parse_range(text)
    start = 0 if start is None else start
    stop = total if stop is None else stop
    if stop > total:
        raise DataError(
            f"{option} {text} reaches past the {total:,} images available"
            + ("; run `cnn-backend download` for the full 60,000" if total == BUNDLED_COUNT else "")
        )
    if start >= stop:
        raise ValueError(f"{option} {text} selects no images: START must be below STOP, within the {total:,} images available")
    return slice(start, stop)


def range_label(window: slice) -> str:
    return f"[{window.start}:{window.stop}] ({window.stop - window.start:,} images)"
