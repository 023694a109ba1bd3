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
import math
import numbers
from dataclasses import dataclass

import numpy

from .backend import cpu_backend
from .init import as_integer, as_number, positive_sizes
from .layers import Layer, ShapeError
from .layers.base import NOT_BUILT_ADVICE, failed_build_path, unbuilt_inner_layer, walk_layers


#: the multiple of float64's rounding of the objective (its terms' size over 2 eps) that the
#: absolute tolerance is raised to at least
ROUNDING_ALLOWANCE = 4


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
    ``input_shape`` (a random batch of ``batch_size`` is drawn from ``seed``) or the batch ``x`` itself,
    for layers whose gradient is undefined somewhere (ReLU at 0, a max-pool's tie). The copy is built
    for that per-sample shape unless already built for it (an unbuilt layer's weights are drawn from
    the same seed); a layer that cannot take the shape raises ShapeError in one line naming it. The
    mode of the layer and of every layer inside it is kept: check a layer whose forward pass draws
    random numbers (dropout) in evaluation mode, ``layer.eval()`` (which sets it on the layers inside
    a container too).

    Returns a :class:`GradientCheck`; raises :class:`GradientCheckError` naming the first array
    whose gradient differs, the element and both values.
    """
    if not isinstance(layer, Layer):
        raise TypeError(f"check_layer_gradients takes a cnn_backend Layer, got {type(layer).__name__}")
    if (input_shape is None) == (x is None):
        raise ValueError("give either input_shape (per sample, e.g. (3, 5, 5)) or the batch x, not both or neither")
    shape = None if input_shape is None else _sample_shape(input_shape)
    # A wrong type raises TypeError, as a layer that is not a Layer does above; a bad value ValueError.
    batch_size = as_integer(batch_size, "batch_size", 1, type_error=TypeError)
    eps = as_number(eps, "eps", "a finite number > 0", lambda value: 0 < value < math.inf, type_error=TypeError)
    rtol = as_number(rtol, "rtol", "a finite number >= 0", lambda value: 0 <= value < math.inf, type_error=TypeError)
    atol = as_number(atol, "atol", "a finite number >= 0", lambda value: 0 <= value < math.inf, type_error=TypeError)
    if rtol == 0 and atol == 0:
        raise ValueError("rtol and atol are both 0, a tolerance finite differences never meet; give rtol > 0 or atol > 0")
    if x is not None:
        x = numpy.array(x, dtype=numpy.float64, order="K")  # its memory layout kept: layers take any
        if x.ndim < 2 or x.shape[0] < 1:
            raise ValueError(f"x must be a batch of at least one sample, of shape (batch, *sample shape), got shape {x.shape}")
        if not numpy.isfinite(x).all():
            raise ValueError("x holds NaN or infinite values; give finite numbers")
    for _ in walk_layers(layer, type(layer).__name__):  # a children() listing no (name, layer) pairs: one line, before .to walks it
        pass
    rng = numpy.random.default_rng(seed)
    checked = copy.deepcopy(layer).to(cpu_backend("float64", parallel=False))
    checked.needs_input_grad = True  # a model's first layer skips it; the check wants it
    if x is not None:
        shape = tuple(x.shape[1:])
    # A layer built for another per-sample shape keeps shape-dependent state (a weight sized for it):
    # the copy is built for the checked shape, as training would build it.
    if checked.output_shape is None or checked.input_shape != shape:
        _build_for(checked, shape, rng)
    if x is None:
        x = rng.standard_normal((batch_size, *shape))
    first = numpy.array(checked.forward(x))
    # Finite differences of a forward pass that changes between calls measure that change, not the
    # gradient (a dropout mask redrawn gives differences in the hundreds of thousands).
    if not numpy.array_equal(first, numpy.asarray(checked.forward(x)), equal_nan=True):
        training = _training_layers(checked)
        if not training:
            advice = " in evaluation mode too: make its forward give the same output for the same input when not training"
        elif checked.children():  # a container's own flag set alone leaves those inside training: name them
            advice = f": check the layer in evaluation mode, layer.eval(), which sets the layers inside too (in training mode: {training})"
        else:
            advice = ": check the layer in evaluation mode, layer.eval()"
        raise GradientCheckError(
            f"forward gives different outputs for the same input (it draws random numbers or updates state){advice}"
        )
    probe = rng.standard_normal(first.shape)
    # Each objective value is a float64 sum, rounded in proportion to its terms' size; a central
    # difference divides that rounding by 2 eps. The absolute tolerance grows with it, so that a
    # correct layer at a modest size (16 channels of 12x12) is not called wrong for rounding.
    atol = max(atol, ROUNDING_ALLOWANCE * numpy.finfo(numpy.float64).eps * float(numpy.abs(first * probe).sum()) / eps)

    def objective() -> float:
        return float((numpy.asarray(checked.forward(x)) * probe).sum())

    def backward():
        # A copy each time: a backward that writes into dy (dy[mask] = 0) would otherwise change
        # the probe the finite differences use too, and agree with them on the wrong gradient.
        given = probe.copy()
        gradient = checked.backward(given)
        if not numpy.array_equal(given, probe):
            raise GradientCheckError(
                "backward changed its argument dy in place; a layer before it in a model (a Residual's shortcut) reads "
                "the same array: compute into a new array (dy * mask, not dy[mask] = 0)"
            )
        return gradient

    checked.forward(x)
    dx = backward()
    worst = {"input": _compare("the input gradient", dx, numerical_gradient(objective, x, eps), rtol, atol)}
    for name, param in checked.named_parameters():
        checked.forward(x)
        backward()
        if param.grad is None:
            raise GradientCheckError(f"backward left the gradient of parameter {name!r} unset: assign param.grad")
        analytic = numpy.array(param.grad)
        worst[name] = _compare(f"the gradient of parameter {name!r}", analytic, numerical_gradient(objective, param.data, eps), rtol, atol)
    return GradientCheck(worst)


def _training_layers(layer: Layer) -> str:
    """The layers in training mode, this one or those inside it (a container's flag set alone), named."""
    names = [label for label, inner, _ in walk_layers(layer, type(layer).__name__) if inner.training]
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(names[:3]) + more


def _build_for(layer: Layer, shape: tuple, rng) -> None:
    built = f" (it was built for {layer.input_shape})" if layer.input_shape is not None else ""
    try:
        layer.build(shape, rng)
    except ValueError as exc:  # ShapeError, or a ValueError of a layer of one's own: its words for the shape
        inner = failed_build_path(exc, layer)  # inside a container: the layer that refused it
        raise ShapeError(
            f"{type(layer).__name__} cannot take a per-sample input of shape {shape}{built}: {inner + ': ' if inner else ''}"
            f"{' '.join(str(exc).split())}; check it with an input of a shape it takes"
        ) from exc
    unbuilt = unbuilt_inner_layer(layer, type(layer).__name__)
    if unbuilt is not None:  # a container whose _build forgot one: its forward would fail unhelpfully
        raise ShapeError(f"{unbuilt}: {NOT_BUILT_ADVICE}")


def _compare(what: str, analytic, numerical: numpy.ndarray, rtol: float, atol: float) -> float:
    if analytic is None:
        raise GradientCheckError(f"backward returned None for {what}: return the input gradient (dx) from backward")
    analytic = numpy.asarray(analytic)
    if analytic.shape != numerical.shape:
        raise GradientCheckError(f"{what} has shape {analytic.shape}, expected {numerical.shape}")
    with numpy.errstate(all="ignore"):  # inf - inf, or 0 / 0 at a zero tolerance: NaN, which fails below
        ratio = numpy.abs(analytic - numerical) / (atol + rtol * numpy.abs(numerical))
    index = numpy.unravel_index(int(numpy.argmax(ratio)), ratio.shape) if ratio.size else ()
    worst = float(ratio[index]) if ratio.size else 0.0
    if not worst <= 1.0:  # NaN fails too
        raise GradientCheckError(
            f"{what} differs from its finite differences at {tuple(int(i) for i in index)}: "
            f"backward gives {analytic[index]:.9g}, finite differences {numerical[index]:.9g} (rtol {rtol:g}, atol {atol:g})"
        )
    return worst


def _sample_shape(input_shape) -> tuple[int, ...]:
    """``input_shape`` as a tuple of positive ints; a lone int is the shape of a vector."""
    shape = positive_sizes((input_shape,) if isinstance(input_shape, numbers.Integral) else input_shape)
    if shape is None:
        raise ValueError(f"input_shape must be the shape of one sample, positive integers such as (3, 5, 5) or 5, got {input_shape!r}")
    return shape


