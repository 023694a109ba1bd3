"""What a command runs on: the device backend, and the network it builds."""

from __future__ import annotations

import contextlib

import numpy

from .. import cli as package  # get_backend is looked up there, so that tests can replace it
from ..backend import DeviceUnavailableError
from ..data import FASHION_MNIST_SHAPE
from ..inputs import InputSpec
from ..model import ARCHITECTURES
from ..spec import BUILTIN_NAMES, SpecError, build_model as build_spec_model, normalize_spec, resolve_spec

DEFAULT_MODEL = "default"


def check_environment_variables() -> None:
    """Refuse a malformed ``CNN_BACKEND_*`` variable in one line before a command prints or writes
    anything: each is otherwise read only when first needed, in the middle of a run's start."""
    from .. import allocator, functional, threads

    threads.count_from_environment()
    functional.get_default_conv_algorithm()
    allocator.requested_by_environment()


def quiet_float_warnings():
    """Overflow warnings would only repeat what the non-finite loss check reports in one line."""
    return numpy.errstate(over="ignore", invalid="ignore", divide="ignore")


def open_backend(device: str, dtype: str):
    """The backend for ``--device`` and one line describing it; DeviceUnavailableError explains itself."""
    if device == "auto":
        backend = package.get_backend("auto", dtype)
        found = "found a CUDA device" if backend.name == "cuda" else "found no usable CUDA device"
        return backend, f"device: {backend.name} ({backend.dtype.name}; --device auto {found})"
    try:
        backend = package.get_backend(device, dtype)
    except DeviceUnavailableError as exc:
        raise DeviceUnavailableError(f"{exc.reason}; `--device auto` would fall back to the CPU", exc.device) from None
    return backend, f"device: {backend.name} ({backend.dtype.name})"


def build_model(settings: dict, backend, conv_algorithm: str, inputs: InputSpec | None = None):
    """A freshly initialised model of ``settings["model"]`` (a built-in name or an architecture
    file) for ``inputs`` (default: Fashion-MNIST's 1x28x28 and ten classes), seeded by
    ``settings["seed"]``. The built-in networks take the data's shape and class count; an
    architecture file must end in as many outputs as the data has classes (SpecError otherwise,
    one line naming the file and the layer)."""
    inputs = inputs or InputSpec.legacy()
    if settings["model"] not in BUILTIN_NAMES:
        return load_spec_model(settings["model"], inputs.input_shape, backend, settings["seed"], inputs.num_classes, conv_algorithm)
    return build_builtin_model(settings, backend, conv_algorithm, inputs.input_shape, inputs.num_classes)


def build_builtin_model(settings: dict, backend, conv_algorithm: str = "auto", input_shape=FASHION_MNIST_SHAPE, num_classes: int = 10):
    """The built-in network ``settings["model"]`` with ``settings["dropout"]`` (the recipe's, unless
    --dropout gave another), as train builds it; errors name the network."""
    options = {"input_shape": input_shape, "num_classes": num_classes}
    if settings["model"] != "seed":  # the seed article's network has no dropout to set
        options["dropout"] = settings["dropout"]
    with _naming(settings["model"]):
        return ARCHITECTURES[settings["model"]](backend, seed=settings["seed"], algorithm=conv_algorithm, **options)


@contextlib.contextmanager
def _naming(label: str):
    """SpecError messages that start with the architecture's name or file."""
    try:
        yield
    except SpecError as exc:
        raise SpecError(f"{label}: {exc}") from None


def check_spec_file(model: str) -> None:
    """Read and check an architecture file's structure and options (SpecError naming the file)."""
    label, document = resolve_spec(model)
    with _naming(label):
        normalize_spec(document)


def load_spec_model(model: str, input_shape, backend, seed: int = 0, num_classes: int | None = None, conv_algorithm: str = "auto"):
    """Build the network ``model`` names (built-in or file); errors name the file."""
    label, _ = resolve_spec(model)  # a missing or unreadable file is refused here, for what it is
    with _naming(label):
        return build_spec_model(
            model, input_shape, backend, seed, num_classes=num_classes, algorithm=None if conv_algorithm == "auto" else conv_algorithm
        )
