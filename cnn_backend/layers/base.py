"""The layer base class, the shape error, and the validators of size arguments."""

from __future__ import annotations

import inspect

from ..backend import Backend, cpu_backend, get_backend
from ..init import as_integer, is_flag, make_rng, positive_sizes
from ..parameters import Parameter


class ShapeError(ValueError):
    """An input whose shape, dtype or values a layer cannot take."""


class LayerDefinitionError(NotImplementedError, TypeError, ValueError):
    """A layer class of one's own that cannot work as written (no forward or backward, no call to
    ``Layer.__init__``, a forward returning nothing): a NotImplementedError or TypeError, as Python
    raises for such code, and a ValueError, so that the command line says it in one line."""


class Layer:
    """Base class. Subclasses set ``self.params`` (name -> Parameter, trained) and, where they keep
    state that is not trained, ``self.buffers`` (name -> device array, e.g. BatchNorm's running
    statistics), and implement forward/backward.

    :meth:`build` tells a layer its per-sample input shape, lets it create the parameters whose sizes
    it infers from that shape (drawn from the host generator handed in, in layer order), and returns
    its per-sample output shape. A layer given every size at construction builds at once.
    """

    #: constructor options that :meth:`build` infers from the input shape (``("in_channels",)``):
    #: never options of a spec, never recorded by :meth:`spec` or a model file
    inferred_sizes: tuple[str, ...] = ()

    def __init__(self, backend: Backend | str | None = None) -> None:
        # Parameters are created directly in the backend's dtype, so float32 and float64 models
        # are both cast from the same float64 host draw.
        if backend is not None and not isinstance(backend, (str, Backend)):  # Flatten(1), as nn.Flatten(1) is written
            name = type(self).__name__
            options = list(constructor_options(type(self)))
            advice = f"{name} takes no other arguments" if not options else f"give {name}'s options by name ({', '.join(options)})"
            raise TypeError(f"{name}: backend must be a device name (cpu, cuda, auto) or a Backend, got {backend!r}; {advice}")
        self.backend: Backend = cpu_backend() if backend is None else get_backend(backend)
        self.params: dict[str, Parameter] = {}
        self.buffers: dict = {}
        self.training = True
        # The first layer of a model never needs dx: skipping it saves a full col2im per step.
        self.needs_input_grad = True
        # Per-sample shapes seen by the last build (None until built with a shape).
        self.input_shape: tuple | None = None
        self.output_shape: tuple | None = None

    # -- shapes ---------------------------------------------------------------------------------

    def build(self, input_shape, rng=None) -> tuple:
        """Check ``input_shape`` (per sample, no batch axis), create missing parameters from the
        host generator ``rng`` (a seed or None is made one), and return the per-sample output shape."""
        input_shape = tuple(int(size) for size in input_shape)
        try:
            output_shape = self._build(input_shape, make_rng(rng))
            if output_shape is None:
                raise ShapeError(f"{type(self).__name__}._build returned None: return the per-sample output shape")
            output_shape = _declared_shape(self, output_shape)
        except Exception as exc:
            # Marked on the way out, so that whoever reports it can name the path down to the
            # inner layer that failed, whatever a container's _build in between is (failed_build_path).
            _mark_failed_build(exc, self)
            raise
        self.input_shape, self.output_shape = input_shape, output_shape
        return output_shape

    def _build(self, input_shape: tuple, rng) -> tuple:
        """Subclasses: the output shape for ``input_shape`` (element-wise layers keep it)."""
        return input_shape

    def macs(self) -> int:
        """Multiply-accumulates per sample at the last built shapes (see :mod:`cnn_backend.summary`
        for what is counted): by default those of the layers inside (:meth:`children`), so 0 for a
        plain layer without weights, and a container's sum without a macs of its own."""
        return sum(child.macs() for _, child in self.children())

    def _expect_built_rank(self, input_shape: tuple, rank: int, layout: str) -> None:
        if len(input_shape) != rank:
            raise ShapeError(f"expected a per-sample input of shape {layout}, got {input_shape}")

    # -- mode -----------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> "Layer":
        """Training mode (Dropout drops, BatchNorm uses batch statistics) for this layer and every
        layer inside it (:meth:`children`, to any depth), or evaluation mode with ``mode=False``;
        returns the layer, as PyTorch's ``Module.train`` does. Setting ``layer.training`` sets this
        layer's own flag only (Residual passes it on; a container of one's own need not)."""
        mode = training_mode(mode, f"{type(self).__name__}.train")
        self.training = mode
        for _, child in self.children():
            child.train(mode)
        return self

    def eval(self) -> "Layer":
        """Evaluation mode for this layer and every layer inside it: ``train(False)``."""
        return self.train(False)

    # -- state ----------------------------------------------------------------------------------

    def children(self) -> list[tuple[str, "Layer"]]:
        """Sub-layers of a container, as ``(name, layer)`` in order (none for plain layers)."""
        return []

    def named_parameters(self, prefix: str = "") -> list[tuple[str, Parameter]]:
        """Own parameters, then those of the children, with dotted names."""
        named = [(prefix + name, param) for name, param in self.params.items()]
        for child_name, child in self.children():
            named += child.named_parameters(f"{prefix}{child_name}.")
        return named

    def named_buffers(self, prefix: str = "") -> list[tuple[str, object]]:
        """Own buffers, then those of the children, with dotted names."""
        named = [(prefix + name, value) for name, value in self.buffers.items()]
        for child_name, child in self.children():
            named += child.named_buffers(f"{prefix}{child_name}.")
        return named

    def set_buffer(self, name: str, value) -> None:
        """Replace the buffer at dotted ``name`` (own or a child's) with the device array ``value``."""
        if "." not in name:
            self.buffers[name] = value
            return
        for child_name, child in self.children():
            if name.startswith(child_name + "."):
                child.set_buffer(name[len(child_name) + 1 :], value)
                return
        raise KeyError(name)

    def to(self, backend: Backend) -> "Layer":
        """Move parameters and buffers to ``backend`` (cast to its dtype) and compute there from now on.

        Parameters leave the model's flat buffer; :meth:`Sequential.to` builds a new one.
        """
        for param in self.params.values():
            param.detach_from_flat()
            host = self.backend.to_numpy(param.data)
            param.data = backend.to_device(host.astype(backend.dtype))
            param.grad = None
        for name, value in self.buffers.items():
            self.buffers[name] = backend.to_device(buffer_in_dtype(self.backend.to_numpy(value), backend.dtype))
        for _, child in self.children():
            child.to(backend)
        self.backend = backend
        return self

    def config(self) -> dict:
        """Constructor arguments that rebuild this layer (parameters excluded). By default, each
        option of the constructor (see :func:`constructor_options`) that the layer keeps as an
        attribute of the same name; layers that keep them otherwise override this."""
        return {name: getattr(self, name) for name in constructor_options(type(self)) if hasattr(self, name)}

    def spec(self) -> dict:
        """This layer as an architecture-file entry: its type and :meth:`config` but the sizes
        inferred from the input shape (:attr:`inferred_sizes`), under the class's own name (a
        subclass's options and name are kept)."""
        entry = {"type": type(self).__name__, **self.config()}
        for name in self.inferred_sizes:
            entry.pop(name, None)
        return entry

    def forward(self, x):
        raise LayerDefinitionError(f"{type(self).__name__} defines no forward(x): a layer implements forward and backward")

    def backward(self, dy):
        raise LayerDefinitionError(f"{type(self).__name__} defines no backward(dy): a layer implements forward and backward")

    def __call__(self, x):
        """``forward(x)`` for a layer used on its own: input of another dtype is checked and cast first
        (:func:`layer_input`), as a model's input is. A model calls ``forward`` itself, on input it
        has already checked and cast."""
        if not isinstance(x, self.backend.xp.ndarray) or x.dtype != self.backend.dtype:  # the whole cost when right
            x = layer_input(x, self.backend, type(self).__name__)
        return self.forward(x)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    def _forward_first(self) -> RuntimeError:
        return RuntimeError(f"{self}: backward needs a forward pass first (call forward, then backward once)")

    def _expect_gradient(self, dy, output_shape) -> None:
        """ShapeError unless ``dy`` has ``output_shape``, that of the last forward pass's output: a
        gradient of another shape would otherwise broadcast into a wrong one (a batch of one against
        a batch of 64), or fail deep inside with NumPy's words. Checked before the cache is
        consumed, so that backward can be called again with the right gradient."""
        shape = getattr(dy, "shape", None)
        if shape is None or tuple(shape) != tuple(output_shape):
            got = f"shape {tuple(shape)}" if shape is not None else f"a {type(dy).__name__}"
            raise ShapeError(f"{self}: backward needs a gradient of the forward pass's output shape {tuple(output_shape)}, got {got}")

    def _expect_rank(self, x, rank: int, layout: str) -> None:
        if x.ndim != rank:
            raise ShapeError(f"{self}: expected a {rank}-D input {layout}, got shape {tuple(x.shape)}")

    def _not_built(self, what: str) -> ShapeError:
        return ShapeError(f"{self}: {what} is not known yet: build the layer with its input shape first (or give {what})")


def _declared_shape(layer: "Layer", shape) -> tuple:
    """What ``_build`` returned, as a tuple of positive ints; LayerDefinitionError otherwise (a
    float, a zero or a string would be blamed on the layer after it)."""
    sizes = positive_sizes(shape)
    if sizes is None:
        raise LayerDefinitionError(
            f"{type(layer).__name__}._build returned {shape!r}: return the per-sample output shape as positive integers"
        )
    return sizes


def refuse_integer_input(x, where: str) -> None:
    """Raw 8-bit pixels would be read as values up to 255: refused, saying how to scale them."""
    kind = getattr(getattr(x, "dtype", None), "kind", "f")
    if kind in "biu":
        raise ShapeError(
            f"{where}: the input holds {x.dtype} values, not floats; pass images scaled to [0, 1] (images / 255), "
            f"or cnn_backend.data.prepare_images(images, dtype, normalization)"
        )


def refuse_non_real_input(x, where: str) -> None:
    """Complex input (a cast would drop the imaginary parts), text or objects (a cast fails deep inside): refused."""
    if x.dtype.kind not in "biuf":
        raise ValueError(f"{where}: expected real numbers, got an array of dtype {x.dtype}; pass the images as numbers")


def layer_input(x, backend: Backend, where: str):
    """``x`` (an array or a list) as input of a layer on ``backend``: integer, boolean, complex and
    other non-float input refused in one line, as :meth:`Sequential.forward` refuses it; float input of
    another precision cast to the backend's dtype (a float64 array into a float32 layer would
    otherwise make its output, and everything after it, float64)."""
    x = backend.to_device(x)  # a list too; no copy of an array already there
    refuse_integer_input(x, where)
    refuse_non_real_input(x, where)
    return x.astype(backend.dtype, copy=False)


def training_mode(mode, where: str) -> bool:
    """``mode`` as a bool; anything else (a string "False" is true) refused in one line."""
    if not is_flag(mode):
        raise TypeError(f"{where}(mode): mode must be True (training) or False (evaluation), got {mode!r}")
    return bool(mode)


def child_label(name: str, layer: "Layer") -> str:
    """How a message names a layer inside a container: ``layer N (Type)`` for the child named
    ``layers.N`` (as the index of a spec's inner layer table), ``name (Type)`` for any other."""
    head, _, index = name.partition(".")
    place = f"layer {index}" if head == "layers" and index.isdigit() else name
    return f"{place} ({type(layer).__name__})"


#: the attribute of an exception listing the layers whose build it ended, innermost first
_FAILED_BUILDS = "_cnn_backend_failed_builds"


def _mark_failed_build(exc: BaseException, layer: "Layer") -> None:
    try:
        getattr(exc, _FAILED_BUILDS).append(layer)
    except AttributeError:
        try:
            setattr(exc, _FAILED_BUILDS, [layer])
        except (AttributeError, TypeError):  # an exception type without attributes: reported without the path
            pass


def failed_build_path(exc: BaseException, layer: "Layer") -> str:
    """The path from ``layer`` down to the inner layer whose build raised ``exc``, as child labels
    joined by ``" > "`` (``"layer 0 (Convolution)"``); empty when ``layer`` itself failed, or when a
    container's _build raised an error of its own (which says what it means)."""
    chain = getattr(exc, _FAILED_BUILDS, None) or []
    if not chain or chain[-1] is not layer:
        return ""
    labels, parent = [], layer
    for inner in reversed(chain[:-1]):
        name = next((child_name for child_name, child in parent.children() if child is inner), None)
        if name is None:  # a layer the container builds but does not list as a child: the path ends above it
            break
        labels.append(child_label(name, inner))
        parent = inner
    return " > ".join(labels)


def walk_layers(layer: "Layer", label: str, *, dotted: bool = False, depth: int = 0):
    """``(label, layer, depth)`` for ``layer`` (depth 0) and then every layer inside it (its
    :meth:`Layer.children`, to any depth), each container before the layers inside it. An inner
    layer's label is its container's and its :func:`child_label`, joined by ``" > "``
    (``"layer 0 (Block) > layer 1 (Convolution)"``), or, ``dotted``, its child name joined by ``"."``
    (``"0.layers.1"``, as parameter names run).

    Lazy: a caller that stops at a layer (met twice, so perhaps inside itself) never walks below it.
    A children() that does not list (name, layer) pairs is refused in one line naming the layer."""
    yield label, layer, depth
    for pair in layer.children():
        try:
            name, child = pair
        except (TypeError, ValueError):
            shown = " ".join(repr(pair).split())
            raise ValueError(f"{label}: children() gives {shown[:60]}, not a (name, layer) pair; {_PAIRS}") from None
        if not (isinstance(child, Layer) and isinstance(name, str)):
            what = f"a {type(child).__name__} as {name!r}, not a layer" if isinstance(name, str) else f"the name {name!r}, not a string"
            raise ValueError(f"{label}: children() gives {what}; {_PAIRS}")
        yield from walk_layers(child, f"{label}.{name}" if dotted else f"{label} > {child_label(name, child)}", dotted=dotted, depth=depth + 1)


_PAIRS = "children() lists (name, layer) pairs of the layers inside"


def unbuilt_inner_layer(layer: "Layer", label: str) -> str | None:
    """The path (``label``, then child labels, joined by ``" > "``) to the first layer inside
    ``layer`` that its build left unbuilt (no output shape), or None when every one was built."""
    for path, inner, depth in walk_layers(layer, label):
        if depth and inner.output_shape is None:
            return path
    return None


#: what a container of one's own forgot when a layer inside it is left unbuilt
NOT_BUILT_ADVICE = "not built: a container's _build must build its inner layers (shape = layer.build(shape, rng))"


def buffer_in_dtype(array, dtype):
    """A float buffer in the model's float dtype; an integer or boolean one (a counter, a flag) keeps its own."""
    return array if array.dtype.kind in "biu" else array.astype(dtype)


#: constructor arguments that are never options: the device, and the generator of the initial weights
NOT_OPTIONS = ("self", "backend", "rng")


def constructor_options(cls: type) -> dict[str, inspect.Parameter]:
    """The options of a layer class, by name: its constructor's arguments but ``backend``, ``rng``,
    ``*args``/``**kwargs``, the class's :attr:`Layer.inferred_sizes` and ``in_*`` sizes that default
    to None (inferred when built)."""
    options = {}
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        if name in NOT_OPTIONS or name in cls.inferred_sizes or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if name.startswith("in_") and parameter.default is None:
            continue
        options[name] = parameter
    return options


def missing_size_after_positional(layer: str, missing: str, given: tuple, names: tuple) -> ValueError:
    """The error for a short positional call (``Convolution(8, 3)``, ``FullyConnected(10)``, written as
    Keras's layers are) whose first size went to the input size: what it set, and what was meant."""
    call = ", ".join(repr(value) for value in given)
    assigned = ", ".join(f"{name}={value!r}" for name, value in zip(names, given))
    meant = ", ".join(f"{name}={value!r}" for name, value in zip(names[1:], given))
    return ValueError(
        f"{layer}: {missing} is missing; {layer}({call}) sets {assigned} (the input size comes first): "
        f"write {layer}({meant}) to leave the input size to the input"
    )


def _size(layer: str, name: str, value, low: int) -> int:
    """A size argument as a Python int; NumPy integers count as integers."""
    try:
        return as_integer(value, name, low)
    except ValueError as exc:
        raise type(exc)(f"{layer}: {exc}") from None  # a wrong type stays a TypeError too


def _optional_size(layer: str, name: str, value, low: int) -> int | None:
    """As :func:`_size`, with None (a size that build infers) passed through."""
    return None if value is None else _size(layer, name, value, low)
