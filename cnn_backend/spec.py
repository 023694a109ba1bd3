"""Architectures as data: parse, validate and build a network described in a TOML (or JSON) file.

A spec is a list of layer tables, each with a ``type`` and its options; sizes that follow from the
input are never written (``out_channels``/``kernel_size``, ``out_features``, never ``in_*``)::

    [[layers]]
    type = "Convolution"
    out_channels = 32
    kernel_size = 3
    padding = 1

    [[layers]]
    type = "Residual"
      [[layers.layers]]
      type = "Convolution"
      ...

The same structure as a dict (``{"layers": [...]}``) or JSON document is accepted. Every problem
is reported before anything is trained, as one :class:`SpecError` line that names the layer
(index and type; ``layer 4 (Residual) > layer 1 (Convolution)`` inside a block) and what is wrong.
See ``docs/spec-format.md``.
"""

from __future__ import annotations

import difflib
import json
import numbers
import os
import sys
import typing
from importlib import resources
from pathlib import Path

from .backend import Backend, get_backend
from .functional import CONV_ALGORITHMS
from .init import INITIALIZERS, as_integer, make_rng, positive_sizes
from .layers import LAYER_TYPES, Layer, ShapeError
from .layers.base import constructor_options
from .model import Sequential

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class SpecError(ValueError):
    """An architecture spec that cannot be built; the message is one line naming the layer."""


REQUIRED = object()
#: option -> (accepted Python types, default or REQUIRED, allowed values or None)
_INT, _NUMBER, _BOOL, _STR, _LAYERS = (int,), (int, float), (bool,), (str,), (list,)
#: the options of the built-in types; those of a registered class are read from its constructor
#: (:func:`layer_options`), so the one registry of types is :data:`cnn_backend.layers.LAYER_TYPES`
BUILTIN_OPTIONS: dict[str, dict[str, tuple]] = {
    "Convolution": {
        "out_channels": (_INT, REQUIRED, None),
        "kernel_size": (_INT, REQUIRED, None),
        "stride": (_INT, 1, None),
        "padding": (_INT, 0, None),
        "bias": (_BOOL, True, None),
        "algorithm": (_STR, "auto", ("auto",) + CONV_ALGORITHMS),
        "init": (_STR, "he", INITIALIZERS),
    },
    "FullyConnected": {"out_features": (_INT, REQUIRED, None), "init": (_STR, "he", INITIALIZERS)},
    "BatchNorm": {"momentum": (_NUMBER, 0.1, None), "eps": (_NUMBER, 1e-5, None)},
    "MaxPool": {"pool_size": (_INT, REQUIRED, None), "stride": (_INT, None, None)},
    "AvgPool": {"pool_size": (_INT, REQUIRED, None), "stride": (_INT, None, None)},
    "GlobalAvgPool": {},
    "Flatten": {},
    "Dropout": {"rate": (_NUMBER, 0.5, None)},
    "ReLU": {},
    "LeakyReLU": {"negative_slope": (_NUMBER, 0.01, None)},
    "Tanh": {},
    "Sigmoid": {},
    "GELU": {},
    "Residual": {"layers": (_LAYERS, REQUIRED, None)},
}
#: the types this library defines: :func:`register_layer` refuses to replace them
BUILTIN_LAYER_TYPES = frozenset(BUILTIN_OPTIONS)
TOP_LEVEL_KEYS = ("layers", "name", "description")
SPEC_SUFFIXES = (".toml", ".json")
ARCHITECTURES_PACKAGE = "cnn_backend.architectures"
BUILTIN_NAMES = ("seed", "default", "plain")

_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list of layer tables"}


def _main_type(accepted: tuple) -> type:
    """The type an option's message names: the last accepted one that is not None's (an option
    annotated ``float | None`` is "a number")."""
    return [kind for kind in accepted if kind is not type(None)][-1]


# -- reading ---------------------------------------------------------------------------------------


def read_spec_file(path: str | os.PathLike) -> dict:
    """The spec document in ``path`` (``.toml`` or ``.json``), checked for syntax only."""
    path = Path(path)
    suffix = path.suffix.lower()  # CONV.TOML too, as Windows tools often write it
    if suffix not in SPEC_SUFFIXES:
        raise SpecError(f"{path}: an architecture file must end in .toml or .json")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: no such architecture file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot be read ({exc})") from None
    return parse_spec_text(text, "json" if suffix == ".json" else "toml", str(path))


def parse_spec_text(text: str, syntax: str = "toml", source: str = "spec") -> dict:
    """Parse TOML or JSON text (a leading BOM ignored); a syntax error is one line with its position."""
    text = text.removeprefix("\ufeff")  # a byte-order mark (Windows editors write one) is not part of the document
    if syntax == "json":
        try:
            document = json.loads(text, object_pairs_hook=_table_without_repeated_keys)
        except json.JSONDecodeError as exc:
            raise SpecError(f"{source}: JSON syntax error at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
        except _RepeatedKey as exc:  # TOML refuses a repeated key as a syntax error; so does this
            raise SpecError(f"{source}: JSON: the key {exc.args[0]!r} appears twice in one table") from None
        except RecursionError:
            raise SpecError(f"{source}: JSON nested too deep to read; a network nests containers {MAX_NESTING} deep at most") from None
    else:
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise SpecError(f"{source}: TOML syntax error: {exc}") from None
        except RecursionError:
            raise SpecError(f"{source}: TOML nested too deep to read; a network nests containers {MAX_NESTING} deep at most") from None
    if not isinstance(document, (dict, list)):
        raise SpecError(f"{source}: a spec is a table with a 'layers' list, got {type(document).__name__}")
    return document


class _RepeatedKey(Exception):
    pass


def _table_without_repeated_keys(pairs: list) -> dict:
    table = {}
    for key, value in pairs:
        if key in table:
            raise _RepeatedKey(key)
        table[key] = value
    return table


def builtin_spec_path(name: str) -> Path:
    """The packaged spec file of a built-in network."""
    return Path(str(resources.files(ARCHITECTURES_PACKAGE).joinpath(f"{name}.toml")))


def resolve_spec(model: str | os.PathLike | dict | list) -> tuple[str, dict]:
    """``(label, spec document)`` for a built-in name, a spec file path, or a spec dict / layer list."""
    if isinstance(model, (dict, list, tuple)):
        return "spec", model
    text = str(model)
    if text in BUILTIN_NAMES:
        return text, read_spec_file(builtin_spec_path(text))
    path = Path(text)
    if path.suffix.lower() in SPEC_SUFFIXES or path.exists():
        return str(path), read_spec_file(path)
    raise SpecError(f"unknown model {text!r}: choose {', '.join(BUILTIN_NAMES)}, or give a .toml or .json architecture file")


# -- validation ------------------------------------------------------------------------------------


def _label(index: int, entry, parents: str) -> str:
    kind = entry.get("type") if isinstance(entry, dict) and isinstance(entry.get("type"), (str, int, float)) else "?"
    return f"{parents}layer {index} ({kind})"


def normalize_spec(document) -> dict:
    """Check a spec document's structure, types and options; returns ``{"layers": [...], ...}`` with
    every option filled in (defaults included; tuples, in a spec built in Python, as lists).
    Shapes are checked by :func:`build_model`."""
    if isinstance(document, (list, tuple)):
        document = {"layers": document}
    if not isinstance(document, dict):
        raise SpecError(f"a spec is a table with a 'layers' list, got {type(document).__name__}")
    unknown = [key for key in document if key not in TOP_LEVEL_KEYS]
    if unknown:
        raise SpecError(f"unknown top-level key {unknown[0]!r} in the spec (allowed: {', '.join(TOP_LEVEL_KEYS)})")
    if "layers" not in document:
        raise SpecError("the spec has no layers: add [[layers]] tables, each with a type")
    normalized = {key: document[key] for key in ("name", "description") if key in document}
    for key, value in normalized.items():
        if not isinstance(value, str):
            raise SpecError(f"the spec's {key} must be a string, got {value!r}")
    # Printed in summaries and run headers: no terminal escapes, and the name on one line.
    if not normalized.get("name", "").isprintable():
        raise SpecError(f"the spec's name must be one line of printable text, got {normalized['name']!r}")
    if not normalized.get("description", "").replace("\n", " ").replace("\t", " ").isprintable():
        raise SpecError(f"the spec's description must be printable text, got {normalized['description']!r}")
    normalized["layers"] = _normalize_layers(document["layers"], "")
    return normalized


#: how deep containers (Residual blocks) may nest: far beyond any real network, well within
#: Python's recursion limit, which building and running the layers also spend
MAX_NESTING = 100


def _normalize_layers(layers, parents: str) -> list[dict]:
    if parents.count(" > ") >= MAX_NESTING:
        raise SpecError(f"{parents.rstrip('> ').strip()}: containers nested more than {MAX_NESTING} deep; flatten the network")
    if isinstance(layers, tuple):  # a spec built in Python: the list a file would hold
        layers = list(layers)
    if not isinstance(layers, list):
        raise SpecError(f"{parents}layers must be a list of layer tables ([[layers]]), got {type(layers).__name__}")
    if not layers:
        where = parents.rstrip("> ").strip()
        raise SpecError(f"{where + ': ' if where else 'the spec has no layers: '}the layer list is empty")
    return [_normalize_layer(index, entry, parents) for index, entry in enumerate(layers)]


#: the names Keras and PyTorch give the built-in types, in lower case: what a hint suggests for them
FRAMEWORK_TYPE_NAMES = {
    "dense": "FullyConnected", "linear": "FullyConnected", "conv2d": "Convolution", "maxpool2d": "MaxPool",
    "maxpooling2d": "MaxPool", "avgpool2d": "AvgPool", "averagepooling2d": "AvgPool", "batchnorm2d": "BatchNorm",
    "batchnorm1d": "BatchNorm", "batchnormalization": "BatchNorm", "globalaveragepooling2d": "GlobalAvgPool",
    "adaptiveavgpool2d": "GlobalAvgPool",
}
#: Keras's and PyTorch's names of the built-in layers' options: what a hint suggests for them
FRAMEWORK_OPTION_NAMES = {
    "units": "out_features", "filters": "out_channels", "kernel": "kernel_size", "strides": "stride",
    "pool": "pool_size", "p": "rate", "dropout": "rate", "kernel_initializer": "init", "use_bias": "bias",
    "alpha": "negative_slope",
}


def _unregistered_layer_class(name: str):
    """A Layer subclass named ``name`` that is defined at the top of an imported module but not
    registered (a class of a module no longer imported, or local to a function, does not count)."""
    registered = set(LAYER_TYPES.values())
    pending, seen = list(Layer.__subclasses__()), set()
    while pending:
        cls = pending.pop()
        if cls in seen:
            continue
        seen.add(cls)
        if cls.__name__ == name and cls not in registered and getattr(sys.modules.get(cls.__module__), name, None) is cls:
            return cls
        pending.extend(cls.__subclasses__())
    return None


def _normalize_layer(index: int, entry, parents: str) -> dict:
    return _normalize_entry(entry, _label(index, entry, parents))


def _normalize_entry(entry, label: str, *, inner_checked: bool = False) -> dict:
    """``entry`` checked and completed with defaults; a container's inner layer tables too, unless
    ``inner_checked`` (entries :func:`spec_entry` wrote, each already checked: kept as they are)."""
    if not isinstance(entry, dict):
        raise SpecError(f"{label}: a layer is a table with a type and options, got {entry!r}")
    if "type" not in entry:
        raise SpecError(f"{label}: missing the layer type (type = \"Convolution\", \"ReLU\", ...)")
    kind = entry["type"]
    known = [*BUILTIN_OPTIONS, *(name for name in LAYER_TYPES if name not in BUILTIN_OPTIONS)]
    if not isinstance(kind, str) or kind not in LAYER_TYPES:
        unregistered = _unregistered_layer_class(str(kind))
        if unregistered is not None:  # imported, but its module forgot the decorator: --import alone cannot help
            raise SpecError(
                f"{label}: unknown layer type {kind!r}: {unregistered.__module__}.{unregistered.__name__} is a layer class, "
                f"but not registered: decorate it with @cnn_backend.register_layer (or call cnn_backend.register_layer on it)"
            )
        lowered = str(kind).lower()
        close = [FRAMEWORK_TYPE_NAMES[lowered]] if lowered in FRAMEWORK_TYPE_NAMES else (
            difflib.get_close_matches(str(kind), known, n=1) or [name for name in known if name.lower() == lowered]
        )
        hint = f"did you mean {close[0]}? " if close else ""
        raise SpecError(
            f"{label}: unknown layer type {kind!r}; {hint}known types: {', '.join(known)} "
            f"(a layer class of your own: cnn_backend.register_layer, or --import MODULE on the command line)"
        )
    options = layer_options(kind)
    normalized = {"type": kind}
    for name, value in entry.items():
        if name == "type":
            continue
        if name not in options:
            alias = FRAMEWORK_OPTION_NAMES.get(name)
            close = [alias] if alias in options else difflib.get_close_matches(name, options, n=1)
            if name.startswith("in_") or name in LAYER_TYPES[kind].inferred_sizes:
                why = "input sizes are inferred from the input shape; leave it out"
            elif close:
                why = f"did you mean {close[0]}?"
            else:
                why = f"{kind} takes {', '.join(options) or 'no options'}"
            raise SpecError(f"{label}: unknown option {name!r} ({why})")
        accepted, _, allowed = options[name]
        if accepted is None:  # an option of a registered class, typed by nothing: its constructor checks it
            normalized[name] = _plain_value(value)
            continue
        if list in accepted and isinstance(value, tuple):  # a container's inner layer tables, given in Python
            value = list(value)
        value = _plain_number(value, accepted)
        if isinstance(value, bool) and bool not in accepted or not isinstance(value, accepted):
            raise SpecError(f"{label}: {name} must be {_TYPE_WORDS[_main_type(accepted)]}, got {value!r}")
        if allowed is not None and value not in allowed:
            raise SpecError(f"{label}: {name} must be one of {', '.join(map(str, allowed))}, got {value!r}")
        normalized[name] = value
    for name, (_, default, _) in options.items():
        if name in normalized:
            continue
        if default is REQUIRED:
            raise SpecError(f"{label}: missing required option {name!r}")
        normalized[name] = _plain_value(default)  # a default of (1, 1) is recorded as a file holds it, [1, 1]
    if "layers" in options and not inner_checked:  # Residual or a container of one's own: its inner layer tables
        normalized["layers"] = _normalize_layers(normalized["layers"], f"{label} > ")
    return normalized


def _plain_number(value, accepted: tuple):
    """A NumPy integer (or, where numbers are taken, a NumPy float) as the Python int or float it
    holds, so that a spec built in Python from arrays passes and the normalised spec stays
    JSON-ready; anything else (bools, a float where an integer is needed) is returned unchanged."""
    if isinstance(value, bool) or type(value) in (int, float) or int not in accepted:
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if float in accepted and isinstance(value, numbers.Real):
        return float(value)
    return value


def _plain_value(value):
    """An untyped option's value as a model file holds it, so that what is built, recorded and
    read back compares equal: tuples as lists (JSON and TOML have only lists), at any depth, and
    NumPy numbers as Python ones; anything else unchanged (refused when written, if it must be)."""
    if isinstance(value, (list, tuple)):
        return [_plain_value(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain_value(item) for key, item in value.items()}
    return _plain_number(value, _NUMBER)


# -- layer classes of your own --------------------------------------------------------------------


def register_layer(cls: type) -> type:
    """Make a :class:`~cnn_backend.layers.Layer` subclass nameable by its class name in architecture
    files, specs and model files (``Sequential.load``, checkpoints); returns the class, so it also
    serves as a decorator (``@register_layer``).

    Its options are the constructor's keyword arguments but ``backend`` and ``rng`` (and ``in_*``
    sizes defaulting to None, which :meth:`Layer.build` infers); one without a default is required.
    Each is typed by its annotation (``int``, ``float``, ``bool``, ``str``; ``T | None`` takes None
    too), else by its default's type, else checked by the constructor alone. The class's
    ``config()`` (else its same-named attributes) must give back those options: see
    :func:`spec_entry`. A container (a class defining ``children()``, as ``Residual``) takes its
    inner layers as the constructor argument ``layers`` and keeps them, in order, in
    ``self.layers``: a spec writes them as inner layer tables. Registering the same class again (a
    module reloaded, a notebook cell run twice) replaces it; a built-in type's name, a name another
    class holds, an option called ``type``, one called ``layers`` on a class without ``children()``,
    and a container without that argument are refused. See ``docs/custom-layers.md``.
    """
    if not (isinstance(cls, type) and issubclass(cls, Layer)) or cls is Layer:
        raise TypeError(f"register_layer takes a subclass of cnn_backend.layers.Layer, got {cls!r}")
    name = cls.__name__
    if name in BUILTIN_LAYER_TYPES:
        raise ValueError(f"{name} is a built-in layer type: give your class another name")
    held = LAYER_TYPES.get(name)
    if held is not None and _qualified_name(held) != _qualified_name(cls):
        raise ValueError(f"the layer type {name} is already registered by {_qualified_name(held)}: rename one of the two classes")
    options = _constructor_options(cls)
    container = _defines_children(cls)
    if container and "layers" not in options:
        raise TypeError(
            f"{name} holds other layers (it defines children()): a spec rebuilds such a layer when its constructor "
            f"takes them as `layers` and keeps them in self.layers; add that argument, or build networks with it in Python"
        )
    if "layers" in options and not container:  # most often a container that forgot children(), rarely a clash of names
        raise ValueError(
            f"{name} takes `layers` but defines no children(): a container lists its inner layers in children() as "
            f"(\"layers.0\", layer) pairs, so that parameters, buffers, eval() and moves between devices reach them; "
            f"define children(), or rename an option `layers` that means something else (a spec entry's 'layers' are inner layer tables)"
        )
    if "type" in options:
        raise ValueError(f"{name}: an option cannot be called 'type' (a spec entry's 'type' means something else): rename it")
    LAYER_TYPES[name] = cls
    return cls


def layer_options(kind: str) -> dict[str, tuple]:
    """The options a spec entry of the registered type ``kind`` takes: option -> (accepted Python
    types or None, default or :data:`REQUIRED`, allowed values or None). A built-in type's are
    :data:`BUILTIN_OPTIONS`; a registered class's are read from its constructor. ``layers`` among
    them marks a container: its value is the list of inner layer tables."""
    options = BUILTIN_OPTIONS.get(kind)
    return _constructor_options(LAYER_TYPES[kind]) if options is None else options


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


_ANNOTATED_TYPES = {int: _INT, float: _NUMBER, bool: _BOOL, str: _STR}


def _accepted_types(hint, default) -> tuple | None:
    """What an option of a registered class takes: its annotation's type (``T | None`` and
    ``Optional[T]`` take None too), else its default's, else None (its constructor checks it)."""
    arguments = typing.get_args(hint)
    if arguments and type(None) in arguments and len(arguments) == 2:  # Optional[T], T | None
        (inner,) = [argument for argument in arguments if argument is not type(None)]
        accepted = _ANNOTATED_TYPES.get(inner)
        return None if accepted is None else accepted + (type(None),)
    accepted = _ANNOTATED_TYPES.get(hint, _ANNOTATED_TYPES.get(type(default)))
    if accepted is not None and default is None:  # `scale: float = None` takes its own default
        accepted += (type(None),)
    return accepted


def _constructor_options(cls: type) -> dict[str, tuple]:
    """The :func:`layer_options` of a registered class, read from its constructor (a container's
    ``layers``, whatever its annotation or default, is a required list of layer tables)."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that does not evaluate: type the options by their defaults
        hints = {}
    # A subclass of a built-in type does not offer what that type keeps out of specs: Residual's
    # projection, which its build makes (an option would take any value, untyped, into a file).
    parent = next((base for base in cls.__mro__[1:] if base.__name__ in BUILTIN_OPTIONS and LAYER_TYPES.get(base.__name__) is base), None)
    withheld = set() if parent is None else set(constructor_options(parent)) - set(BUILTIN_OPTIONS[parent.__name__])
    options = {}
    for name, parameter in constructor_options(cls).items():
        if name in withheld:
            continue
        default = REQUIRED if parameter.default is parameter.empty else parameter.default
        options[name] = (_accepted_types(hints.get(name), default), default, None)
    if "layers" in options and _defines_children(cls):
        options["layers"] = (_LAYERS, REQUIRED, None)
    return options


# -- building --------------------------------------------------------------------------------------


def _make_layer(entry: dict, backend: Backend, label: str, algorithm: str | None) -> Layer:
    options = {key: value for key, value in entry.items() if key != "type"}
    kind = entry["type"]
    if "layers" in options:  # a container: its inner layers first, in order (they draw their parameters first)
        options["layers"] = [
            _make_layer(child, backend, f"{label} > {_label(i, child, '')}", algorithm) for i, child in enumerate(options["layers"])
        ]
    if kind == "Convolution" and algorithm is not None and options["algorithm"] == "auto":
        options["algorithm"] = algorithm
    try:
        layer = LAYER_TYPES[kind](**options, backend=backend)
    except ValueError as exc:
        message = str(exc)
        prefix = f"{kind}: "
        raise SpecError(f"{label}: {message[len(prefix):] if message.startswith(prefix) else message}") from None
    except Exception as exc:
        if kind in BUILTIN_LAYER_TYPES:
            raise
        raise SpecError(f"{label}: {type(exc).__name__}: {exc}") from exc  # a class of one's own: its error, named
    if kind not in BUILTIN_LAYER_TYPES:
        _check_options_kept(layer, entry, label)
    return layer


def _check_options_kept(layer: Layer, entry: dict, label: str) -> None:
    """Refuse a layer of one's own whose ``config()`` would not rebuild it as ``entry`` built it: its
    model files would load another network, or none. A container's inner layers are checked as
    they are built (and recorded from ``self.layers``, which must hold them as given)."""
    recorded = spec_entry(layer, label)
    for name, value in entry.items():
        if name == "layers":
            if len(recorded["layers"]) != len(value):
                raise SpecError(f"{label}: self.layers holds {len(recorded['layers'])} layers for a layer built with {len(value)}: keep the inner layers, as given, in self.layers")
            continue
        if recorded.get(name) != value:
            raise SpecError(
                f"{label}: its config() gives {name}={recorded.get(name)!r} for a layer built with {name}={value!r}: "
                f"return every constructor option, as given, from config()"
            )


def spec_entry(layer: Layer, label: str = "") -> dict:
    """``layer``'s architecture-file entry, as model files and checkpoints record it.

    A built-in layer gives ``layer.spec()``. A registered class of one's own (a subclass of a
    built-in type too) is recorded from its ``config()`` under its own name, input sizes left out
    (``in_*`` sizes that are not options, and the class's ``inferred_sizes``), and checked as a spec
    file's entry would be (its options, their types; NumPy numbers become Python ones, tuples
    lists). A class that is not registered gives ``layer.spec()`` (its ``config()``, by default),
    under its own name: its files load once it is registered. The inner layers of a container
    (Residual, or one of one's own, registered or not) are read from ``layer.layers``, each recorded
    by this function, so by the same rules at any depth; every value must be one a model file holds.
    """
    kind = type(layer).__name__
    label = label or f"layer ({kind})"
    if kind in BUILTIN_LAYER_TYPES:
        entry = layer.spec()
        if kind == "Residual":
            entry["layers"] = _inner_entries(layer, label)
        return entry
    registered = LAYER_TYPES.get(kind)
    if registered is None or _qualified_name(registered) != _qualified_name(type(layer)):
        return _unregistered_entry(layer, label)
    options = layer_options(kind)
    _refuse_unread_options(layer, options, label)
    config = layer.config()
    if not isinstance(config, dict):
        raise SpecError(f"{label}: {kind}.config() returned {type(config).__name__}: return a dict of its constructor's options")
    # config(), what the docs say is recorded: a spec() inherited from a built-in parent or defined
    # for another purpose need not give the class's options. Inferred sizes (a BatchNorm subclass's
    # num_features, in_* sizes that are not options) are left out, as Layer.spec leaves them out.
    inferred = type(layer).inferred_sizes
    entry = {
        "type": kind,
        **{key: value for key, value in config.items() if key != "type" and key not in inferred and (key in options or not key.startswith("in_"))},
    }
    if "layers" in options:
        # Each inner entry is checked by its own spec_entry (an unregistered inner layer is written
        # under its name, as at the top level): only the container's own options are checked here.
        entry["layers"] = _inner_entries(layer, label)
    try:
        normalized = _normalize_entry(entry, label, inner_checked=True)
    except SpecError as exc:
        raise SpecError(f"{exc}; {kind}.config() must return its constructor's options") from None
    _check_storable(normalized, label)
    return normalized


def _refuse_unread_options(layer: Layer, options, label: str) -> None:
    """With the default ``config()``, an option kept under another attribute name would be left out
    of the file, which would then rebuild the layer with the option's default: refused instead."""
    if type(layer).config is Layer.config:
        unread = [option for option in options if option != "layers" and not hasattr(layer, option)]
        if unread:
            kind = type(layer).__name__
            raise SpecError(f"{label}: define config() returning its options ({kind} has no attribute {unread[0]!r} to read that option from)")


def _unregistered_entry(layer: Layer, label: str) -> dict:
    """The entry of a class that is not registered: written so that its files load once it is."""
    _refuse_unread_options(layer, constructor_options(type(layer)), label)
    entry = {key: _plain_value(value) for key, value in layer.spec().items()}
    if _holds_layer_list(layer) and ("layers" in entry or _defines_children(type(layer))):
        entry["layers"] = _inner_entries(layer, label)  # the default config() gives the layer objects themselves
    _check_storable(entry, label)
    return entry


def _defines_children(cls: type) -> bool:
    """Whether ``cls`` is a container: it lists layers inside it (:meth:`Layer.children`)."""
    return cls.children is not Layer.children


def _holds_layer_list(layer: Layer) -> bool:
    """Whether ``layer.layers`` is a non-empty list (or tuple) of layers: what containers record."""
    inner = getattr(layer, "layers", None)
    return isinstance(inner, (list, tuple)) and bool(inner) and all(isinstance(child, Layer) for child in inner)


def _check_storable(entry: dict, label: str) -> None:
    """Refuse, naming the option, a value a model file (JSON) cannot hold: nothing is written."""
    for name, value in entry.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            shown = " ".join(repr(value).split())  # an array's repr spans lines: the message stays one
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            raise SpecError(
                f"{label}: config() gives {name}={shown}, which a model file cannot hold: return numbers, strings, true/false or lists"
            ) from None


def _inner_entries(layer: Layer, label: str) -> list[dict]:
    """The spec entries of a container's inner layers, ``layer.layers`` in order."""
    if not _holds_layer_list(layer):
        raise SpecError(f"{label}: keep the inner layers in self.layers, a list of layers: model files record them from there")
    return [spec_entry(child, f"{label} > layer {i} ({type(child).__name__})") for i, child in enumerate(layer.layers)]


def _check_input_shape(input_shape) -> tuple:
    shape = positive_sizes(input_shape)  # NumPy integers count, as everywhere else (a shape read from an array's .shape)
    if shape is None or len(shape) not in (1, 3):
        raise SpecError(f"the input shape must be (channels, height, width) or (features,) of positive integers, got {input_shape!r}")
    return shape


def build_model(
    spec,
    input_shape,
    backend: Backend | str = "cpu",
    seed: int | None = 0,
    *,
    num_classes: int | None = None,
    algorithm: str | None = None,
) -> Sequential:
    """A :class:`Sequential` built from ``spec`` (dict, layer list, TOML/JSON path or built-in name)
    for per-sample ``input_shape``, its parameters drawn in layer order from ``seed``.

    ``num_classes``: when given, the network must end in that many outputs. ``algorithm``: the
    convolution algorithm for every Convolution whose spec leaves it at ``"auto"``. Raises
    :class:`SpecError` (one line, naming the layer) for any spec that cannot work.
    """
    file_name = None
    if not isinstance(spec, (dict, list, tuple)):
        label, spec = resolve_spec(spec)
        file_name = Path(label).stem  # what a file that names no network is called in summaries
    normalized = normalize_spec(spec)
    shape = _check_input_shape(input_shape)
    if num_classes is not None:
        num_classes = as_integer(num_classes, "num_classes", 1)
    backend = get_backend(backend)
    layers = [_make_layer(entry, backend, _label(i, entry, ""), algorithm) for i, entry in enumerate(normalized["layers"])]
    try:
        model = Sequential(layers, backend, input_shape=shape, rng=make_rng(seed))
    except ShapeError as exc:
        raise SpecError(str(exc)) from None
    except MemoryError as exc:
        raise SpecError(f"{exc}; make the layer smaller") from None
    output = model.output_shape
    last = f"layer {len(layers) - 1} ({type(layers[-1]).__name__})"
    if len(output) != 1:
        raise SpecError(
            f"{last}: the network ends with shape {output}, not a vector of class scores: "
            f"add Flatten (or GlobalAvgPool) and a FullyConnected layer"
        )
    if num_classes is not None and output[0] != num_classes:
        raise SpecError(f"{last}: the network ends with {output[0]} outputs but the data has {num_classes} classes")
    model.spec_options = {key: normalized[key] for key in ("name", "description") if key in normalized}
    if file_name and "name" not in model.spec_options:
        model.spec_options["name"] = file_name
    return model
