"""Host-side parameter initialisation.

Parameters are drawn on the host with a seeded :class:`numpy.random.Generator` and only then sent to
a backend, so a model built from the same seed starts from bit-identical weights on every device
(CuPy's random streams differ from NumPy's).
"""

from __future__ import annotations

import math
import numbers

import numpy


def make_rng(seed: int | numpy.random.Generator | None) -> numpy.random.Generator:
    """A Generator from a seed, an existing Generator (returned as is), or None (fresh entropy)."""
    if isinstance(seed, numpy.random.Generator):
        return seed
    if seed is not None:
        seed = as_integer(seed, "seed", 0)
    return numpy.random.default_rng(seed)


def as_integer(value, name: str, low: int) -> int:
    """``value`` as a Python int (NumPy integers included, booleans not); ValueError naming ``name``
    when it is not an integer or is below ``low``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


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


def initial_weight(rng: numpy.random.Generator, shape: tuple[int, ...], fan_in: int, fan_out: int, scheme: str):
    """Draw a weight tensor with the named scheme (one of ``INITIALIZERS``)."""
    if scheme == "he":
        return he_normal(rng, shape, fan_in)
    if scheme == "glorot":
        return glorot_uniform(rng, shape, fan_in, fan_out)
    if scheme == "fan_in_uniform":
        return fan_in_uniform(rng, shape, fan_in)
    raise ValueError(f"unknown init {scheme!r}; choose one of {', '.join(INITIALIZERS)}")
