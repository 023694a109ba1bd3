"""Check a layer's backward pass against central finite differences (float64, on the CPU).

The check every layer of this library passes, offered for layers of your own (PyTorch's
``torch.autograd.gradcheck`` and Chainer's ``gradient_check.check_backward`` play the same part)::

    from cnn_backend.gradcheck import check_layer_gradients
    check_layer_gradients(MyLayer(...), input_shape=(3, 5, 5))   # raises GradientCheckError if wrong

For a random probe ``p`` of the output's shape, the objective ``sum(forward(x) * p)`` has the
gradient ``backward(p)`` with respect to ``x``, and ``param.grad`` (after that backward) with respect
to each parameter. Both are compared with ``(f(v + eps) - f(v - eps)) / (2 eps)`` for every element
``v`` of the input and of every parameter, so keep the shapes small (a few hundred elements): each
element costs two forward passes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy

from .backend import cpu_backend
from .layers import Layer


class GradientCheckError(AssertionError):
    """A gradient that differs from its finite differences (the message names the array and element)."""


@dataclass(frozen=True)
class GradientCheck:
    """What :func:`check_layer_gradients` compared: for the input (``"input"``) and each parameter
    (its dotted name), the largest ``|analytic - numerical| / (atol + rtol * |numerical|)``; every
    value is at most 1 when the check passes."""

    worst: dict


def numerical_gradient(objective, array: numpy.ndarray, eps: float = 1e-6) -> numpy.ndarray:
    """Central differences of the scalar ``objective()`` with respect to every element of ``array``,
    which is changed in place one element at a time and restored."""
    grad = numpy.zeros_like(array)
    for index in numpy.ndindex(array.shape):
        saved = array[index]
        array[index] = saved + eps
        plus = objective()
        array[index] = saved - eps
        minus = objective()
        array[index] = saved
        grad[index] = (plus - minus) / (2 * eps)
    return grad


def check_layer_gradients(
    layer: Layer,
    input_shape: tuple | None = None,
    *,
    x: numpy.ndarray | None = None,
    batch_size: int = 2,
    seed: int = 0,
    rtol: float = 1e-6,
    atol: float = 1e-8,
    eps: float = 1e-6,
) -> GradientCheck:
    """Check ``layer``'s input gradient and parameter gradients against finite differences.

    The check runs on a float64 CPU copy of ``layer`` (the layer itself is left as it was): in
    float32 the rounding of the differences swamps any error worth finding. Give the per-sample
    ``input_shape`` (a random batch of ``batch_size`` is drawn from ``seed``; an unbuilt layer is built
    for it, its weights from the same seed) or the batch ``x`` itself, for layers whose gradient is
    undefined somewhere (ReLU at 0, a max-pool's tie). The layer's mode is kept: check a layer whose
    forward pass draws random numbers (dropout) in evaluation mode, ``layer.training = False``.

    Returns a :class:`GradientCheck`; raises :class:`GradientCheckError` naming the first array
    whose gradient differs, the element and both values.
    """
    if not isinstance(layer, Layer):
        raise TypeError(f"check_layer_gradients takes a cnn_backend Layer, got {type(layer).__name__}")
    if (input_shape is None) == (x is None):
        raise ValueError("give either input_shape (per sample, e.g. (3, 5, 5)) or the batch x, not both or neither")
    rng = numpy.random.default_rng(seed)
    checked = copy.deepcopy(layer).to(cpu_backend("float64", parallel=False))
    checked.needs_input_grad = True  # a model's first layer skips it; the check wants it
    if x is None:
        shape = tuple(int(size) for size in input_shape)
        if checked.output_shape is None or checked.input_shape != shape:
            checked.build(shape, rng)
        x = rng.standard_normal((batch_size, *shape))
    else:
        x = numpy.array(x, dtype=numpy.float64, order="K")  # its memory layout kept: layers take any
        if checked.output_shape is None:
            checked.build(x.shape[1:], rng)
    probe = rng.standard_normal(checked.forward(x).shape)

    def objective() -> float:
        return float((numpy.asarray(checked.forward(x)) * probe).sum())

    checked.forward(x)
    dx = checked.backward(probe)
    worst = {"input": _compare("the input gradient", dx, numerical_gradient(objective, x, eps), rtol, atol)}
    for name, param in checked.named_parameters():
        checked.forward(x)
        checked.backward(probe)
        if param.grad is None:
            raise GradientCheckError(f"backward left the gradient of parameter {name!r} unset: assign param.grad")
        analytic = numpy.array(param.grad)
        worst[name] = _compare(f"the gradient of parameter {name!r}", analytic, numerical_gradient(objective, param.data, eps), rtol, atol)
    return GradientCheck(worst)


def _compare(what: str, analytic, numerical: numpy.ndarray, rtol: float, atol: float) -> float:
    if analytic is None:
        raise GradientCheckError(f"backward returned None for {what}: return the input gradient (dx) from backward")
    analytic = numpy.asarray(analytic)
    if analytic.shape != numerical.shape:
        raise GradientCheckError(f"{what} has shape {analytic.shape}, expected {numerical.shape}")
    ratio = numpy.abs(analytic - numerical) / (atol + rtol * numpy.abs(numerical))
    index = numpy.unravel_index(int(numpy.argmax(ratio)), ratio.shape) if ratio.size else ()
    worst = float(ratio[index]) if ratio.size else 0.0
    if not worst <= 1.0:  # NaN fails too
        raise GradientCheckError(
            f"{what} differs from its finite differences at {tuple(int(i) for i in index)}: "
            f"backward gives {analytic[index]:.9g}, finite differences {numerical[index]:.9g} (rtol {rtol:g}, atol {atol:g})"
        )
    return worst
