"""Host-side parameter initialisation.

Parameters are drawn on the host with a seeded :class:`numpy.random.Generator` and only then sent to
a backend, so a model built from the same seed starts from bit-identical weights on every device
(CuPy's random streams differ from NumPy's).
"""

from __future__ import annotations

import math
import numbers

import numpy


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (a string where a number belongs): a TypeError, as Python and
    PyTorch raise for one, and a ValueError, so that ``except ValueError`` catches it as it catches
    every other refused argument."""


def make_rng(seed: int | numpy.random.Generator | None) -> numpy.random.Generator:
    """A Generator from a seed, an existing Generator (returned as is), or None (fresh entropy)."""
    if isinstance(seed, numpy.random.Generator):
        return seed
    if seed is not None:
        seed = as_integer(seed, "seed", 0)
    return numpy.random.default_rng(seed)


def as_integer(value, name: str, low: int, *, type_error: type[Exception] = ArgumentTypeError) -> int:
    """``value`` as a Python int (NumPy integers included, booleans not); ValueError naming ``name``
    when it is below ``low``, ``type_error`` when it is not an integer."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise type_error(f"{name} must be an integer >= {low}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def positive_sizes(value) -> tuple[int, ...] | None:
    """``value`` (a shape: a sequence of sizes) as a tuple of positive Python ints, NumPy integers
    included; None when it is empty, not a sequence, or holds anything else (bools, floats, text)."""
    try:
        sizes = tuple(value)
    except TypeError:
        return None
    if not sizes or not all(isinstance(size, numbers.Integral) and not isinstance(size, bool) and size >= 1 for size in sizes):
        return None
    return tuple(int(size) for size in sizes)


def is_flag(value) -> bool:
    """True or False, NumPy's booleans included (not a string such as "no", which is true)."""
    return isinstance(value, (bool, numpy.bool_))


def is_number(value) -> bool:
    """A real number, NumPy scalars included; not a bool (True as a rate or a size is a mistake)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def as_number(value, name: str, requirement: str, holds, *, type_error: type[Exception] = ArgumentTypeError) -> float:
    """``value`` as a float if it is a number (:func:`is_number`) for which ``holds`` (given the float)
    is true (NaN fails every comparison, so ``holds`` refuses it unless it says otherwise).

    A number that fails ``holds`` raises ValueError "``name`` must be ``requirement``, got ...", with
    ``requirement`` such as ``"> 0"`` or ``"in [0, 1)"``; anything else raises ``type_error`` with
    "must be a number ``requirement``". A ``requirement`` that names the kind of number itself
    (``"a finite number > 0"``) gives both the same words.
    """
    wanted = requirement if "number" in requirement else f"a number {requirement}"
    if not is_number(value):
        raise type_error(f"{name} must be {wanted}, got {value!r}")
    if not holds(float(value)):
        raise ValueError(f"{name} must be {requirement}, got {value!r}")
    return float(value)


def he_normal(rng: numpy.random.Generator, shape: tuple[int, ...], fan_in: int) -> numpy.ndarray:
    """He (Kaiming) normal: std ``sqrt(2 / fan_in)``, suited to layers followed by ReLU."""
    return rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)


def glorot_uniform(rng: numpy.random.Generator, shape: tuple[int, ...], fan_in: int, fan_out: int) -> numpy.ndarray:
    """Glorot (Xavier) uniform: ``U(-a, a)`` with ``a = sqrt(6 / (fan_in + fan_out))``."""
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape)


def fan_in_uniform(rng: numpy.random.Generator, shape: tuple[int, ...], fan_in: int) -> numpy.ndarray:
    """``U(-a, a)`` with ``a = 1 / sqrt(fan_in)`` (PyTorch's default for convolution and linear
    weights): a third of He's variance, which with Adam and BatchNorm after the layer means larger
    steps relative to the weights early on."""
    limit = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-limit, limit, size=shape)


INITIALIZERS = ("he", "glorot", "fan_in_uniform")


def check_init(scheme, layer: str) -> str:
    """``scheme`` when it names one of ``INITIALIZERS``; ValueError naming ``layer`` otherwise
    (checked when the layer is made, not when its weights are first drawn)."""
    if scheme not in INITIALIZERS:
        raise ValueError(f"{layer}: init must be one of {', '.join(INITIALIZERS)}, got {scheme!r}")
    return scheme


def initial_weight(rng: numpy.random.Generator, shape: tuple[int, ...], fan_in: int, fan_out: int, scheme: str):
    """Draw a weight tensor with the named scheme (one of ``INITIALIZERS``)."""
    if scheme == "he":
        return he_normal(rng, shape, fan_in)
    if scheme == "glorot":
        return glorot_uniform(rng, shape, fan_in, fan_out)
    if scheme == "fan_in_uniform":
        return fan_in_uniform(rng, shape, fan_in)
    raise ValueError(f"unknown init {scheme!r}; choose one of {', '.join(INITIALIZERS)}")
