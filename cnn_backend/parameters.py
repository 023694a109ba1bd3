"""Trainable parameters, and the flat buffer that holds a model's parameters and gradients in one piece.

A :class:`Parameter` is a trainable array and its gradient. :class:`FlatParameters` lays a list of
parameters end to end in two contiguous 1-D device arrays, ``data`` and ``grad``, and makes every
``Parameter.data`` and ``Parameter.grad`` a view into them, in list order. An optimiser then updates
all parameters in a few whole-array operations (a few GPU kernel launches per step instead of
several per parameter) and a data-parallel step all-reduces every gradient in one call.

Once flattened, a parameter keeps its views: assigning ``param.data = value`` or
``param.grad = value`` copies into the view (same shape required), so the flat arrays always hold
the current values. Only a ``data`` array of another device or dtype (a parameter being moved, as
``Layer.to`` does) takes the parameter out of the buffer, which the model then rebuilds. Gradients that a layer computes straight into ``param.grad_view`` (for example
``xp.matmul(a, b, out=param.grad_view)``) and then assigns are not copied at all.

Each parameter starts at an offset aligned to :data:`ALIGNMENT_BYTES`; the few elements of padding
between parameters are zero in both arrays and stay zero under every optimiser update (their
gradient is zero) and every all-reduce.
"""

from __future__ import annotations

import math
from typing import Sequence

from .backend import Backend

#: byte alignment of each parameter's start in the flat arrays: device allocators align buffers to
#: 256 bytes, and matrix-product kernels run their fast paths on aligned output pointers.
ALIGNMENT_BYTES = 256


class Parameter:
    """A trainable array and its gradient (filled by the owning layer's ``backward``).

    ``grad`` is None until a gradient has been assigned (optimisers skip such parameters).
    """

    __slots__ = ("_data", "_grad", "_grad_view", "_flat")

    def __init__(self, data):
        self._data = data
        self._grad = None
        # Set by FlatParameters: the gradient's view into the flat gradient array, and the owner.
        self._grad_view = None
        self._flat: FlatParameters | None = None

    @property
    def data(self):
        return self._data

    @data.setter
    def data(self, value) -> None:
        if value is self._data:  # ``param.data -= update`` updates in place, then assigns it back
            return
        if self._flat is None:
            self._data = value
            return
        _check_shape("data", value, self._data)
        if type(value) is not type(self._data) or value.dtype != self._data.dtype:
            # An array of another device or dtype: the parameter is moving (as ``Layer.to`` moves
            # it), so it leaves the flat buffer; the model builds a new one (``flatten_parameters``).
            self.detach_from_flat()
            self._data = value
            return
        self._data[...] = value

    @property
    def grad(self):
        return self._grad

    @grad.setter
    def grad(self, value) -> None:
        view = self._grad_view
        if value is None or view is None or value is view:
            self._grad = value
            return
        _check_shape("gradient", value, view)
        view[...] = value
        self._grad = view

    @property
    def grad_view(self):
        """Where a layer may write this parameter's gradient in place (``out=``), or None when the
        parameter is not in a flat buffer (then the layer allocates and assigns as usual)."""
        return self._grad_view

    @property
    def flat(self) -> "FlatParameters | None":
        """The flat buffer this parameter's arrays are views of, if any."""
        return self._flat

    def detach_from_flat(self) -> None:
        """Give the parameter storage of its own again (its flat buffer no longer covers it)."""
        if self._flat is None:
            return
        self._flat.valid = False
        self._flat = None
        self._data = self._data.copy()
        if self._grad is not None:
            self._grad = self._grad.copy()
        self._grad_view = None

    def __repr__(self) -> str:
        shape = tuple(self._data.shape)
        return f"Parameter(shape={shape}, dtype={self._data.dtype}, flat={self._flat is not None})"


def _check_shape(what: str, value, target) -> None:
    if tuple(getattr(value, "shape", ())) != tuple(target.shape):
        raise ValueError(
            f"parameter {what} of shape {tuple(getattr(value, 'shape', ()))} does not fit the parameter's "
            f"shape {tuple(target.shape)}; assign an array of that shape"
        )


class FlatParameters:
    """``parameters`` laid end to end in one data and one gradient array on ``backend``.

    Building it copies the current values in and rebinds every parameter to its views (a parameter
    in another flat buffer leaves it, which invalidates that buffer). Gradients that were None stay
    None (the gradient array is zero there until one is assigned).
    """

    def __init__(self, parameters: Sequence[Parameter], backend: Backend) -> None:
        self.parameters = list(parameters)
        if len({id(p) for p in self.parameters}) != len(self.parameters):
            raise ValueError("a parameter appears twice in the list to flatten; shared parameters are not supported")
        self.backend = backend
        self.dtype = backend.dtype
        self.offsets, self.size = flat_layout([tuple(p.data.shape) for p in self.parameters], self.dtype.itemsize)
        xp = backend.xp
        # Zeroed so that the padding between parameters is zero in both arrays.
        self.data = xp.zeros(self.size, dtype=self.dtype)
        self.grad = xp.zeros(self.size, dtype=self.dtype)
        old_values = [(p.data, p.grad) for p in self.parameters]
        for param in self.parameters:
            if param._flat is not None:
                param._flat.valid = False
        data_views, grad_views = self.views(self.data), self.views(self.grad)
        for param, (data, grad), data_view, grad_view in zip(self.parameters, old_values, data_views, grad_views):
            data_view[...] = backend.to_device(data)
            param._data, param._grad_view, param._flat = data_view, grad_view, self
            param._grad = None
            if grad is not None:
                param.grad = backend.to_device(grad)
        #: False once a parameter has left this buffer (e.g. moved to another device).
        self.valid = True

    def views(self, flat):
        """Per-parameter views (in order, with the parameters' shapes) of a 1-D array laid out like this buffer."""
        return [
            flat[offset : offset + param.data.size].reshape(param.data.shape)
            for param, offset in zip(self.parameters, self.offsets)
        ]

    def covers(self, parameters: Sequence[Parameter]) -> bool:
        """True when ``parameters`` are exactly this buffer's, in its order, and all still in it."""
        return self.valid and len(parameters) == len(self.parameters) and all(
            a is b for a, b in zip(parameters, self.parameters)
        )

    def __repr__(self) -> str:
        return f"FlatParameters({len(self.parameters)} parameters, {self.size} elements, {self.dtype.name})"


def flat_layout(shapes: Sequence[tuple], itemsize: int) -> tuple[list[int], int]:
    """Offsets (in elements) of arrays of ``shapes`` laid end to end, each aligned to
    :data:`ALIGNMENT_BYTES`, and the total length."""
    step = max(1, ALIGNMENT_BYTES // itemsize)
    offsets, end = [], 0
    for shape in shapes:
        start = -(-end // step) * step
        offsets.append(start)
        end = start + math.prod(shape)
    return offsets, end


def shared_flat_buffer(parameters: Sequence[Parameter]) -> FlatParameters | None:
    """The flat buffer that covers exactly ``parameters`` (in order), or None."""
    if not parameters:
        return None
    flat = parameters[0].flat
    return flat if flat is not None and flat.covers(parameters) else None
