"""The Sequential model, the named architectures, and saving/loading to ``.npz`` (no pickle)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterable

from .backend import Backend, get_backend
from .data import FASHION_MNIST_SHAPE, count_non_finite_samples, count_samples_not_finite_in_dtype, prepare_images
from .init import as_integer, make_rng, positive_sizes
from .inputs import INPUTS_KEY, InputSpec
from .serialization import ModelFileError, json_array, write_npz_atomic
from .layers import LAYER_TYPES, BatchNorm, Convolution, Layer, MaxPool, ReLU, ShapeError
from .layers.base import (
    NOT_BUILT_ADVICE, LayerDefinitionError, buffer_in_dtype, failed_build_path, refuse_integer_input, refuse_non_real_input, training_mode,
    unbuilt_inner_layer, walk_layers,
)
from .parameters import FlatParameters, Parameter

CONFIG_KEY = "__model_config__"
#: prefixes of the parameter and buffer arrays in a model file (``param/<layer>.<name>``)
PARAM_PREFIX, BUFFER_PREFIX = "param/", "buffer/"
#: how NumPy refuses an array larger than any memory (a ValueError, not a MemoryError)
NUMPY_SIZE_ERRORS = ("Maximum allowed dimension exceeded", "array is too big")
#: samples per forward pass when predicting or evaluating: large enough for fast matrix products,
#: small enough that the default model's im2col buffers stay near 60 MiB (1,000 took 230 MiB)
EVALUATION_BATCH_SIZE = 250


class Sequential:
    """Layers applied in order. ``forward``/``backward`` run on the model's backend.

    ``input_shape``: the per-sample input shape, ``(C, H, W)`` or ``(features,)``. When given, every
    layer is built with it (sizes left out are inferred, parameters drawn from ``rng`` in layer
    order) and a shape that cannot work is refused here, naming the layer. Without it the layers
    must come built, and the shape is recorded from the first batch.

    ``forward`` runs some neighbouring layers as one operation, with the same values and gradients:
    a first convolution and the 2x2 max-pool after it where the backend asks for it
    (``Convolution.runs_with_maxpool``), and a BatchNorm and the ReLU after it on every backend
    (``BatchNorm.forward_relu``; ``fuses_batchnorm_relu = False`` runs them apart).
    """

    #: whether a BatchNorm and the ReLU right after it run as one operation
    fuses_batchnorm_relu = True

    def __init__(
        self, layers: Iterable[Layer], backend: Backend | str | None = None, *, input_shape=None, rng=None
    ) -> None:
        self.layers = list(layers)
        if not self.layers:
            raise ValueError("Sequential needs at least one layer")
        if rng is not None and input_shape is None:  # it would seed nothing, silently
            raise ValueError(
                "Sequential: rng seeds the layers as they are built for input_shape, and no input_shape was given; "
                "pass input_shape= too, or seed each layer with its own rng= (Dropout(rate, rng=...) too)"
            )
        for index, layer in enumerate(self.layers):
            if not isinstance(layer, Layer):
                raise ValueError(
                    f"Sequential: item {index} is a {type(layer).__name__} ({layer!r:.40}), not a layer; pass layer "
                    f"objects (cnn_backend.layers), or build the network from a spec (cnn_backend.spec.build_model)"
                )
            if not all(hasattr(layer, name) for name in ("backend", "params", "buffers", "training")):
                raise LayerDefinitionError(
                    f"Sequential: layer {index} ({type(layer).__name__}) was made without Layer.__init__: call "
                    f"super().__init__(backend) in its __init__"
                )
        _refuse_layers_in_two_places(self.layers)
        if backend is None:  # the layers' own: a layer made for another device or dtype is not moved unasked
            first = self.layers[0].backend
            for index, layer in enumerate(self.layers[1:], start=1):
                if (layer.backend.name, layer.backend.dtype) != (first.name, first.dtype):
                    raise ValueError(
                        f"Sequential: layer {index} ({type(layer).__name__}) is on {layer.backend.name} in "
                        f"{layer.backend.dtype.name}, layer 0 on {first.name} in {first.dtype.name}; make the layers "
                        f"with one backend, or pass Sequential(..., backend=...) to move them all to it"
                    )
        self.backend = self.layers[0].backend if backend is None else get_backend(backend)
        for layer in self.layers:
            if layer.backend is not self.backend:
                layer.to(self.backend)
        self.input_shape: tuple | None = None
        self.spec_options: dict = {}
        # What the model expects as input (class names, image size, normalisation): set by
        # Sequential.load from the file, written back by save; None when nothing records it.
        self.input_spec: InputSpec | None = None
        if input_shape is not None:
            self.build(input_shape, rng)
        self.layers[0].needs_input_grad = False
        self.training = True
        self._flat: FlatParameters | None = None
        self.flatten_parameters()
        # What backward checks: the shape of the last forward pass's output, and whether predicting
        # (another forward pass, through the same layer caches) has happened since.
        self._output_shape: tuple | None = None
        self._predicted_since_forward = False

    def build(self, input_shape, rng=None) -> tuple:
        """Build every layer in order for the per-sample ``input_shape``; returns the output shape.

        Raises :class:`~cnn_backend.layers.ShapeError` naming the first layer (index and type) that
        cannot take the shape it receives.
        """
        rng = make_rng(rng)  # every layer draws from it (a layer of one's own need not make its own)
        shape = _sample_shape(input_shape)
        self.input_shape = shape
        for index, layer in enumerate(self.layers):
            top = f"layer {index} ({type(layer).__name__})"
            try:
                shape = layer.build(shape, rng)
            except Exception as exc:
                # Inside a container, the message names the path down to the layer that failed.
                inner = failed_build_path(exc, layer)
                where = f"{top} > {inner}" if inner else top
                if isinstance(exc, ShapeError):
                    raise ShapeError(f"{where}: {exc}") from None
                if isinstance(exc, MemoryError) or (isinstance(exc, ValueError) and str(exc).startswith(NUMPY_SIZE_ERRORS)):
                    # a layer sized by mistake (out_features=10**11): name it
                    raise MemoryError(f"{where}: its parameters cannot be allocated ({exc})") from None
                if isinstance(exc, ValueError):  # a layer of one's own refusing its input
                    raise ShapeError(f"{where}: {exc}") from exc
                raise ShapeError(f"{where}: {type(exc).__name__} in _build: {exc}") from exc  # its own code failing: in one line
            unbuilt = unbuilt_inner_layer(layer, top)
            if unbuilt is not None:  # caught here, not as a None shape deep inside summary or training
                raise ShapeError(f"{unbuilt}: {NOT_BUILT_ADVICE}")
        return shape

    @property
    def output_shape(self) -> tuple | None:
        return self.layers[-1].output_shape

    # -- device and mode ----------------------------------------------------------------------------

    def to(self, backend: Backend | str) -> "Sequential":
        """Move every parameter to ``backend`` (and its dtype); a device name (``"cpu"``,
        ``"cuda"``, ``"auto"``) keeps the model's dtype, as PyTorch's ``module.to(device)`` does."""
        self.backend = get_backend(backend, self.backend.dtype)
        for layer in self.layers:
            layer.to(self.backend)
        self.flatten_parameters()
        return self

    def train(self, mode: bool = True) -> "Sequential":
        """Training mode (Dropout drops, BatchNorm uses batch statistics), or evaluation mode with
        ``mode=False``; for every layer, those inside containers (``Layer.children``) included
        (each layer's :meth:`Layer.train`)."""
        mode = training_mode(mode, "Sequential.train")
        self.training = mode
        for layer in self.layers:
            layer.train(mode)
        return self

    def eval(self) -> "Sequential":
        return self.train(False)

    def set_batch_share(self, share: tuple[int, int] | None) -> None:
        """Tell layers that draw random numbers per sample (Dropout) that the coming batches are
        samples ``start ..`` of global batches of ``total``, ``share = (start, total)``
        (data-parallel training); None: each batch is a whole batch."""
        for _, layer in self.named_layers():
            if hasattr(layer, "batch_share"):
                layer.batch_share = share

    # -- computation ---------------------------------------------------------------------------------

    def forward(self, x):
        """Logits for a batch. ``x`` may be a host array; it is sent to the device in the model's dtype."""
        refuse_integer_input(x, "Sequential")
        x = self.backend.to_device(x)
        self._output_shape = None  # until this pass completes: backward must not use a failed one's caches
        refuse_non_real_input(x, "Sequential")  # a cast would drop imaginary parts, or fail on text deep inside
        if x.ndim == 0 or x.shape[0] == 0:
            raise ShapeError(f"Sequential: expected a batch of at least one sample, got shape {tuple(x.shape)}")
        if x.dtype != self.backend.dtype:
            x = x.astype(self.backend.dtype)
        sample_shape = tuple(x.shape[1:])
        # A batch of another shape than the model was built for is the usual refused one, and a
        # training batch of one sample, which a BatchNorm deep inside refuses after those before it
        # took their statistics: the running statistics it would move on the way to the refusal are
        # kept to be put back (a fully convolutional network takes other sizes, so such a batch is
        # not refused up front).
        kept = None
        if self.training and (self.input_shape not in (None, sample_shape) or x.shape[0] == 1):
            kept = [(value, value.copy()) for _, value in self.named_buffers()]
        try:
            x = self._forward_layers(x, declared=sample_shape == self.input_shape)
        except ShapeError as exc:
            for value, before in kept or ():
                value[...] = before
            if self.input_shape not in (None, sample_shape):  # the usual cause: say it rather than its effect deep inside
                one_sample = "; for a single sample, pass x[None] (a batch of one)" if tuple(x.shape) == self.input_shape else ""
                raise ShapeError(
                    f"{exc}; the model was built for samples of shape {self.input_shape}, this batch's are {sample_shape}{one_sample}"
                ) from None
            raise
        if self.input_shape is None:  # recorded from the first batch that passes, never from a refused one
            self.input_shape = sample_shape
        self._output_shape, self._predicted_since_forward = tuple(x.shape), False
        return x

    __call__ = forward

    def _forward_layers(self, x, declared: bool = False):
        """The layers' forward passes. ``declared``: the samples have the shape the model was built
        for, so each layer's output must have the shape its build declared (a layer of one's own
        that returns another is named here, not by the layer after it). Records each layer's input
        shape for :meth:`backward`'s check of the gradients (a fused pair's stays None)."""
        layers, index, count = self.layers, 0, len(x)
        self._input_shapes = [None] * len(layers)
        while index < len(layers):
            layer, following = layers[index], layers[index + 1] if index + 1 < len(layers) else None
            if _runs_as(layer, Convolution) and _runs_as(following, MaxPool) and layer.runs_with_maxpool(following, x.shape):
                x = layer.forward_maxpool2x2(x)
                following.pooled_by_previous()
                index += 2
            elif self.fuses_batchnorm_relu and _runs_as(layer, BatchNorm) and _runs_as(following, ReLU):
                x = layer.forward_relu(x)
                following.applied_by_previous()
                index += 2
            else:
                self._input_shapes[index] = tuple(x.shape)
                x = layer.forward(x)
                index += 1
            last = layers[index - 1]
            if x is None:
                raise LayerDefinitionError(f"layer {index - 1} ({type(last).__name__}): forward returned None; return its output")
            if declared and last.output_shape is not None and tuple(x.shape) != (count, *last.output_shape):
                raise ShapeError(
                    f"layer {index - 1} ({type(last).__name__}): forward returned shape {tuple(x.shape)}, but its build "
                    f"declared {last.output_shape} per sample, {(count, *last.output_shape)} for this batch"
                )
        return x

    def backward(self, grad):
        """Backpropagate the loss gradient (the shape of the last forward pass's output) through
        every layer, writing each parameter's gradient (replacing the previous one, not adding to
        it); returns the input gradient (None unless the first layer's ``needs_input_grad``).

        A float gradient of another precision is cast to the model's dtype, and a host array sent to
        the model's device, as ``forward`` treats its input; an integer, boolean or complex one is
        refused (ShapeError)."""
        if self._output_shape is None:
            raise RuntimeError(
                "Sequential.backward: no complete forward pass to backpropagate through (none yet, or the last one "
                "failed); call the model on a batch first"
            )
        if self._predicted_since_forward:
            raise RuntimeError(
                "Sequential.backward: predict ran after the forward pass and replaced what backward needs; "
                "call backward before predicting, or run the forward pass again"
            )
        shape = getattr(grad, "shape", None)
        if shape is None or tuple(shape) != self._output_shape:
            got = f"shape {tuple(shape)}" if shape is not None else f"a {type(grad).__name__}"
            raise ShapeError(f"Sequential.backward: the gradient must be an array of the output's shape {self._output_shape}, got {got}")
        dtype = getattr(grad, "dtype", None)
        if dtype != self.backend.dtype:  # as forward casts its input: a float64 dy would make every layer's backward float64
            if getattr(dtype, "kind", None) != "f":
                raise ShapeError(
                    f"Sequential.backward: the gradient holds {dtype} values; pass a float gradient (it is cast to the model's "
                    f"{self.backend.dtype.name})"
                )
            grad = grad.astype(self.backend.dtype)
        if not isinstance(grad, self.backend.xp.ndarray):  # a host array for a device model: sent once, as forward's input
            grad = self.backend.to_device(grad)
        for index in reversed(range(len(self.layers))):
            layer = self.layers[index]
            grad = layer.backward(grad)
            expected = self._input_shapes[index]
            if grad is not None and expected is not None and tuple(grad.shape) != expected:
                raise ShapeError(
                    f"layer {index} ({type(layer).__name__}): backward returned a gradient of shape {tuple(grad.shape)}, "
                    f"its input had shape {expected}"
                )
        return grad

    def check_samples(self, x, who: str):
        """``x`` as an array (host or device) of samples this model can predict; ShapeError, one line
        beginning with ``who``, for a single number, an empty input, an integer one, samples holding
        NaN or infinity, or finite values the cast to the model's dtype would make infinite (1e39
        for float32): their predictions would mean nothing."""
        if not isinstance(x, self.backend.xp.ndarray):
            x = self.backend.to_numpy(x)
        refuse_non_real_input(x, who)  # text first: "abc" is no single number either
        if x.ndim == 0:
            raise ShapeError(f"{who}: expected a batch of samples, got a single number ({x.dtype})")
        if not len(x):
            raise ShapeError(f"{who}: no samples to predict (an empty input)")
        refuse_integer_input(x, who)
        bad = count_samples_not_finite_in_dtype(x, self.backend)  # one device read for input of the model's dtype
        if not bad:
            return x
        non_finite = count_non_finite_samples(x, self.backend)  # which it is, read only when something is wrong
        if non_finite:
            raise ShapeError(f"{who}: {non_finite} of {len(x)} samples contain NaN or infinity; clean the input first")
        # finite here, infinite after forward's cast: the predictions would be NaN
        raise ShapeError(
            f"{who}: {bad} of {len(x)} samples hold values too large for {self.backend.dtype.name}; "
            "scale the input, or use a float64 model (dtype='float64')"
        )

    def predict_logits(self, x, batch_size: int = EVALUATION_BATCH_SIZE):
        """Logits for any number of samples, in evaluation mode, computed in batches (device array).

        Refuses (ShapeError) an empty input, one holding NaN or infinity, and one holding finite values
        that the cast to the model's dtype would make infinite (1e39 for float32): their predictions
        would mean nothing.
        """
        batch_size = as_integer(batch_size, "batch_size", 1)
        x = self.check_samples(x, "Sequential.predict_logits")
        was_training = self.training
        self.eval()
        try:
            chunks = [self.forward(self.backend.to_device(x[start : start + batch_size])) for start in range(0, len(x), batch_size)]
        finally:
            self.train(was_training)
            self._predicted_since_forward = True
        return self.backend.xp.concatenate(chunks) if len(chunks) > 1 else chunks[0]

    def prepare(self, pixels):
        """Host uint8 images, ``(N, H, W)`` or ``(N, C, H, W)``, as this model's float input (host),
        prepared as its training prepared them: divided by 255, then normalised per channel when
        :attr:`input_spec` records a normalisation (a network trained with ``--normalize``).

        ``predict``, ``predict_logits`` and ``forward`` take that input: ``model.predict(model.prepare(pixels))``
        suits every model, and gives what its exported ONNX graph gives for ``pixels / 255``.
        """
        normalization = self.input_spec.normalization if self.input_spec is not None else None
        return prepare_images(pixels, self.backend.dtype, normalization)

    def predict(self, x, batch_size: int = EVALUATION_BATCH_SIZE):
        """Predicted class indices for ``x`` (host NumPy array)."""
        return self.backend.to_numpy(self.predict_logits(x, batch_size).argmax(axis=1))

    # -- parameters ----------------------------------------------------------------------------------

    def named_layers(self) -> list[tuple[str, Layer]]:
        """Every layer with its dotted name (``"3"``, ``"3.layers.0"``, ``"3.projection"``), containers
        before their children."""
        # Its own recursion, not layers.base.walk_layers: set_batch_share runs it every training step,
        # and a generator is measurably slower here (children() are checked by the constructor).
        named = []

        def visit(name: str, layer: Layer) -> None:
            named.append((name, layer))
            for child_name, child in layer.children():
                visit(f"{name}.{child_name}", child)

        for index, layer in enumerate(self.layers):
            visit(str(index), layer)
        return named

    def named_parameters(self) -> list[tuple[str, Parameter]]:
        """``("<layer index>.<name>", Parameter)`` pairs in a fixed order; containers' with dotted
        names (``"3.layers.0.weight"``)."""
        return [pair for i, layer in enumerate(self.layers) for pair in layer.named_parameters(f"{i}.")]

    def parameters(self) -> list[Parameter]:
        """Every parameter in :meth:`named_parameters` order, in the model's flat buffer (built or
        rebuilt first when needed, so an optimiser given this list updates the buffer whole)."""
        self.flatten_parameters()
        return list(self._flat.parameters)

    def flatten_parameters(self) -> None:
        """Make every parameter's data and gradient views of :attr:`flat_data` and :attr:`flat_grad`.

        Called by the constructor, :meth:`to` and :meth:`parameters`; idempotent (nothing happens
        while the current buffer still covers the parameters in order).
        """
        params = [p for _, p in self.named_parameters()]
        flat = getattr(self, "_flat", None)
        if flat is not None and flat.backend is self.backend and flat.covers(params):
            return
        self._flat = FlatParameters(params, self.backend)

    @property
    def flat_data(self):
        """Every parameter's values in one contiguous 1-D device array, in :meth:`parameters` order
        (each starting at an aligned offset: see :mod:`cnn_backend.parameters`)."""
        self.flatten_parameters()
        return self._flat.data

    @property
    def flat_grad(self):
        """Every parameter's gradient in one contiguous 1-D device array, laid out like :attr:`flat_data`."""
        self.flatten_parameters()
        return self._flat.grad

    @property
    def flat_parameters(self) -> FlatParameters:
        """The flat buffer itself (offsets, per-parameter views)."""
        self.flatten_parameters()
        return self._flat

    def named_buffers(self) -> list[tuple[str, object]]:
        """``("<layer index>.<name>", device array)`` for every non-trained buffer (BatchNorm's
        running statistics), in a fixed order."""
        return [pair for i, layer in enumerate(self.layers) for pair in layer.named_buffers(f"{i}.")]

    def state_dict(self) -> dict:
        """Host copies of every parameter, by name (copies even on the CPU: a later step must not
        change a saved state)."""
        return {name: self.backend.to_numpy(p.data).copy() for name, p in self.named_parameters()}

    def buffer_state_dict(self) -> dict:
        """Host copies of every buffer, by name (copies even on the CPU: buffers change in place)."""
        return {name: self.backend.to_numpy(value).copy() for name, value in self.named_buffers()}

    def load_state_dict(self, state: dict, buffers: dict | None = None) -> None:
        """Copy host arrays into the parameters (and, given ``buffers``, into the buffers); names
        and shapes must match exactly. A model with buffers needs them all. Arrays that are not
        real numbers (complex, text, objects), or hold NaN, infinity or values too large for the
        model's dtype, are refused in one line naming them, and then nothing is loaded. One dict
        holding the buffers beside the parameters (PyTorch's ``state_dict`` is such a dict) is taken
        apart by name."""
        own = dict(self.named_parameters())
        own_buffers = dict(self.named_buffers())
        if buffers is None and own_buffers and set(own_buffers) <= set(state):
            buffers = {name: state[name] for name in own_buffers}
            state = {name: value for name, value in state.items() if name not in own_buffers}
        _check_names("parameters", own.keys(), state.keys())
        if own_buffers and buffers is None:  # PyTorch's state_dict holds the buffers; ours are a second dict
            raise ModelFileError(
                f"the model has buffers ({', '.join(sorted(own_buffers)[:3])}{', ...' if len(own_buffers) > 3 else ''}) and none were given: "
                "pass model.buffer_state_dict() as the second argument, load_state_dict(state, buffers)"
            )
        if own_buffers or buffers:
            _check_names("buffers", own_buffers.keys(), (buffers or {}).keys())
        # Every value is checked before any is copied: a refused state leaves the model as it was. Checked and
        # cast on the host (a state read from a file is NumPy), then sent once in the model's dtype: no device
        # reads, and a float64 state for a float32 model never sits on the device in float64.
        values = {name: _host_numbers("parameter", name, state[name], "iuf", self.backend) for name in own}  # lists too
        buffer_values = {name: _host_numbers("buffer", name, buffers[name], "biuf", self.backend) for name in own_buffers}  # flags too
        for name, param in own.items():
            _check_shape("parameter", name, values[name], param.data)
        for name, current in own_buffers.items():
            _check_shape("buffer", name, buffer_values[name], current)
        dtype = self.backend.dtype

        def first_not_finite() -> tuple | None:  # (kind, name) of the first array holding NaN or infinity
            for kind, table in (("parameter", values), ("buffer", buffer_values)):
                for name, value in table.items():
                    if value.dtype.kind == "f" and count_non_finite_samples(value.reshape(1, -1), self.backend):
                        return kind, name
            return None

        found = first_not_finite()
        if found is not None:  # a NaN or infinite weight makes every output NaN
            kind, name = found
            raise ValueError(
                f"{kind} {name} holds NaN or infinite values, so the model's outputs would too; "
                f"use a checkpoint saved before the run diverged, or train again"
            )
        negative = next((name for name, value in buffer_values.items()
                         if name.rpartition(".")[2] == "running_var" and bool((value < 0).any())), None)
        if negative is not None:  # BatchNorm would take the square root of it: NaN outputs
            raise ValueError(
                f"buffer {negative} holds negative variances, which no training writes (the file is damaged), so the "
                f"model's outputs would be NaN; use another checkpoint, or train again"
            )
        with warnings.catch_warnings():  # NumPy's overflow warning for a float64 value beyond float32's range: refused below
            warnings.simplefilter("ignore", RuntimeWarning)
            # Cast in place in the dicts, one array at a time, and only where the dtype differs: the state is
            # not held twice over.
            for name, value in values.items():
                values[name] = value.astype(dtype, copy=False)
            for name, value in buffer_values.items():
                buffer_values[name] = buffer_in_dtype(value, dtype)
        found = first_not_finite()
        if found is not None:
            kind, name = found
            raise ValueError(f"{kind} {name} holds values too large for {dtype.name}: load it into a float64 model (dtype='float64')")
        for name, param in own.items():
            # Copied into the parameter's own array (its view of the flat buffer): one transfer in the model's dtype
            # (none on the CPU), and no array of the caller's is kept, which a later change to the state would reach.
            param.data[...] = self.backend.to_device(values[name])
        for name in own_buffers:
            # Buffers are replaced, not written into, and small: each an array of its own, never the caller's.
            self.set_buffer(name, self.backend.xp.array(buffer_values[name]))

    def set_buffer(self, name: str, value) -> None:
        """Replace the buffer ``name`` (as in :meth:`named_buffers`) with the device array ``value``
        (e.g. running statistics averaged across processes)."""
        index, _, rest = name.partition(".")
        self.layers[int(index)].set_buffer(rest, value)

    def config(self):
        """The architecture as data: ``{"input_shape": [...], "layers": [spec entries]}`` (what
        :mod:`cnn_backend.spec` builds), or, for a model whose input shape is not known yet, the
        older list of ``{"type": ..., "args": ...}`` per layer."""
        if self.input_shape is None:
            return [{"type": type(layer).__name__, "args": layer.config()} for layer in self.layers]
        from .spec import spec_entry  # the spec module is built on this one

        layers = [spec_entry(layer, f"layer {index} ({type(layer).__name__})") for index, layer in enumerate(self.layers)]
        return {"input_shape": list(self.input_shape), "layers": layers, **self.spec_options}

    @classmethod
    def from_config(cls, config, backend: Backend | str = "cpu") -> "Sequential":
        """Rebuild the architecture of :meth:`config` (either form) with fresh parameters."""
        backend = get_backend(backend)
        if isinstance(config, dict):
            from .spec import SpecError, build_model

            if "input_shape" not in config:
                raise ModelFileError("the model config has no input_shape")
            spec = {key: value for key, value in config.items() if key != "input_shape"}
            try:
                return build_model(spec, config["input_shape"], backend=backend, seed=0)
            except (SpecError, ShapeError, ValueError) as exc:
                raise ModelFileError(f"the model config cannot be built: {exc}") from None
        try:
            layers = [LAYER_TYPES[spec["type"]](**spec["args"], backend=backend) for spec in config]
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"unknown or malformed layer in the model config: {exc}") from None
        return cls(layers, backend)

    def summary(self):
        """The layer table (output shapes, parameters, MACs per sample, totals) as data: a
        :class:`cnn_backend.summary.ModelSummary`; ``print(format_summary(model.summary()))`` shows it."""
        from .summary import summarize

        return summarize(self)

    @staticmethod
    def from_spec(spec, input_shape, backend: Backend | str = "cpu", seed: int | None = 0, **options) -> "Sequential":
        """A model built from an architecture spec: see :func:`cnn_backend.spec.build_model`."""
        from .spec import build_model

        return build_model(spec, input_shape, backend, seed, **options)

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def __getitem__(self, index: int) -> Layer:
        """The layer at ``index`` (``model[0]``, ``model[-1]``); a slice is refused, as a new model over
        the same layers would share their parameters."""
        if isinstance(index, slice):
            raise TypeError("model[a:b]: a model is not sliced (the layers would be shared); use model.layers[a:b] for the list")
        return self.layers[index]

    def __deepcopy__(self, memo) -> "Sequential":
        """An independent copy on the same device: rebuilt from :meth:`config`, with this model's
        parameters, buffers, mode, input description and Dropout generator states (``copy.deepcopy``;
        a snapshot of the best weights, say)."""
        from .checkpoint import dropout_rng_states, restore_dropout_rng_states  # built on this module

        try:
            clone = Sequential.from_config(self.config(), self.backend)
        except ModelFileError as exc:
            raise TypeError(f"this model cannot be copied ({exc}); build another one and give it "
                            f"load_state_dict(model.state_dict(), model.buffer_state_dict())") from None
        clone.load_state_dict(self.state_dict(), self.buffer_state_dict())
        restore_dropout_rng_states(clone, dropout_rng_states(self))
        clone.train(self.training)
        clone.input_spec = self.input_spec
        memo[id(self)] = clone
        return clone

    def __reduce_ex__(self, protocol):
        raise TypeError(
            "a Sequential cannot be pickled (it holds its device's modules); write it with model.save(path) and "
            "read it with Sequential.load(path), or pickle model.state_dict(); copy.deepcopy(model) copies it"
        )

    def __repr__(self) -> str:
        inner = "\n".join(f"  ({i}) {layer!r}" for i, layer in enumerate(self.layers))
        return f"Sequential(backend={self.backend.name}, dtype={self.backend.dtype.name}\n{inner}\n)"

    # -- files ---------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, extra: dict | None = None, *, inputs: InputSpec | None = None) -> Path:
        """Write architecture and parameters to ``path`` (.npz), atomically, with ``inputs`` (default:
        :attr:`input_spec`) when there is one (what evaluation and prediction need to prepare images).

        ``extra`` maps names to host arrays stored beside the parameters (e.g. optimiser state);
        names the model's own entries use and arrays of Python objects (which loading, never
        unpickling, would refuse) are refused, as is a model with no parameters built yet.
        """
        if not self.parameters():  # Sequential.load would refuse the file
            if any(layer.inferred_sizes for _, layer in self.named_layers()):
                raise ValueError("Sequential.save: the model is not built (its sizes are inferred from the input): "
                                 "give Sequential input_shape=, or run it on a batch first")
            raise ValueError("Sequential.save: the model has no parameters, so there is nothing to save")
        arrays = {PARAM_PREFIX + name: value for name, value in self.state_dict().items()}
        arrays.update({BUFFER_PREFIX + name: value for name, value in self.buffer_state_dict().items()})
        arrays[CONFIG_KEY] = json_array(self.config())
        inputs = self.input_spec if inputs is None else inputs
        if inputs is not None:
            self._check_input_spec(inputs)
            arrays[INPUTS_KEY] = json_array(inputs.config())
        for name, value in (extra or {}).items():
            if name in arrays or name == INPUTS_KEY or str(name).startswith((PARAM_PREFIX, BUFFER_PREFIX)):
                raise ValueError(f"Sequential.save: extra entry {name!r} would replace the model's own; give it another name")
            if getattr(value, "dtype", None) is not None and value.dtype.kind == "O":
                raise ValueError(f"Sequential.save: extra entry {name!r} holds Python objects, which a model file cannot hold (it is "
                                 "read without unpickling); store numbers or text")
            arrays[name] = value
        return write_npz_atomic(path, arrays)

    def _check_input_spec(self, spec) -> None:
        """Refuse an input description the network cannot serve: its files would fail only when used."""
        if not isinstance(spec, InputSpec):
            raise TypeError(f"model.input_spec must be a cnn_backend.inputs.InputSpec or None, not {type(spec).__name__}")
        built_for = self.input_shape
        if built_for is not None and len(built_for) == 3 and built_for[0] != spec.channels:
            raise ValueError(f"model.input_spec describes {spec.channels}-channel images but the network takes {built_for[0]} channels")
        if built_for is not None and len(built_for) == 3 and tuple(built_for[1:]) != spec.image_size:
            # evaluate, predict and export would resize images to the recorded size, which the network was not built for
            raise ValueError(
                f"model.input_spec describes {spec.image_size[0]}x{spec.image_size[1]} images but the network was built for "
                f"{built_for[1]}x{built_for[2]}: give the InputSpec image_size=({built_for[1]}, {built_for[2]})"
            )
        outputs = self.output_shape
        if outputs is not None and len(outputs) == 1 and outputs[0] != spec.num_classes:
            raise ValueError(f"model.input_spec names {spec.num_classes} classes but the network has {outputs[0]} outputs")

    @classmethod
    def load(cls, path: str | os.PathLike, backend: Backend | str = "cpu") -> "Sequential":
        """Rebuild a model saved with :meth:`save` (or a training checkpoint) on ``backend``; a device
        name (``"cpu"``, ``"cuda"``, ``"auto"``) keeps the dtype it was saved in. The input the file
        records becomes :attr:`input_spec`, so a model loaded and saved again keeps it.

        Raises :class:`ModelFileError` (one line naming the file) for a file that is unreadable, not
        a model, does not fit its architecture, or holds NaN or infinite weights.
        """
        from .checkpoint import load_checkpoint  # the checkpoint module is built on this one

        checkpoint = load_checkpoint(path, require_training_state=False)
        if not isinstance(backend, Backend):
            backend = get_backend(backend, checkpoint.dtype)
        model = checkpoint.build_model(backend)
        model.input_spec = checkpoint.input_spec() if checkpoint.inputs is not None else None
        return model


def _runs_as(layer, cls: type) -> bool:
    """Whether ``layer`` computes as ``cls`` does: an instance whose class keeps ``cls``'s forward and
    backward. Only such layers join a fused pair: the fused pass calls ``cls``'s own code, which a
    subclass that changes either would silently lose."""
    kind = type(layer)
    return isinstance(layer, cls) and kind.forward is cls.forward and kind.backward is cls.backward


def _sample_shape(input_shape) -> tuple:
    """``input_shape`` as a tuple of positive ints; ShapeError (one line) for anything else."""
    shape = positive_sizes(input_shape)  # NumPy integers count (a shape read from an array); bools and floats do not
    if shape is None:
        raise ShapeError(
            f"Sequential: input_shape must be one sample's shape, positive integers without the batch axis "
            f"(such as (1, 28, 28) or (784,)), got {input_shape!r}"
        )
    return shape


def _refuse_layers_in_two_places(layers: list) -> None:
    """One layer object in two places of the network, at the top or inside containers (a layer listed
    twice, a top-level layer used again inside a block, one layer twice in a block): refused in one
    line naming both places. Its caches and gradients would serve both, and building the second
    place rebuilds the first."""
    places: dict[int, str] = {}
    for index, layer in enumerate(layers):
        for place, inner, _ in walk_layers(layer, f"layer {index} ({type(layer).__name__})"):
            first = places.get(id(inner))
            if first is not None:  # refused before the walk goes below it: a block inside itself ends here too
                raise ValueError(
                    f"Sequential: {place} is the same layer object as {first}; a layer takes one place in a network: "
                    f"make another (weights are not shared)"
                )
            places[id(inner)] = place


def _check_names(what: str, expected, found) -> None:
    missing, unexpected = set(expected) - set(found), set(found) - set(expected)
    if missing or unexpected:
        raise ModelFileError(
            f"{what} do not match the model: missing {sorted(missing) or 'none'}, unexpected {sorted(unexpected) or 'none'}"
        )


def _host_numbers(what: str, name: str, value, kinds: str, backend: Backend):
    """``value`` (a host or device array, or a list) as a host array; a one-line ValueError naming it
    unless its dtype kind is one of ``kinds`` (complex would lose its imaginary part in the cast, text
    would be parsed as numbers)."""
    try:
        array = backend.to_numpy(value)  # a host array as it is, a device array copied back
    except (TypeError, ValueError):  # ragged lists, objects no array holds
        array = None
    if array is None or array.dtype.kind not in kinds:
        shown = f"an array of dtype {array.dtype}" if array is not None else f"a {type(value).__name__}"
        raise ValueError(f"{what} {name} must be an array of real numbers (integers or floats), got {shown}; load the arrays state_dict() gives")
    return array


def _check_shape(what: str, name: str, value, current) -> None:
    if tuple(value.shape) != tuple(current.shape):
        raise ModelFileError(f"{what} {name} has shape {tuple(value.shape)} in the state given, the model expects {tuple(current.shape)}")


# -- architectures -----------------------------------------------------------------------------------

def seed_cnn(
    backend: Backend | str = "cpu", seed: int | None = 0, algorithm: str = "auto", input_shape=FASHION_MNIST_SHAPE,
    num_classes: int = 10,
) -> Sequential:
    """The seed article's network: Convolution 1->1 6x6, ReLU, MaxPool 2, Flatten, FullyConnected 121->10
    (built from the packaged ``architectures/seed.toml``; ``input_shape`` and ``num_classes`` adapt it
    to other data)."""
    return _build_builtin(builtin_spec("seed", num_classes), input_shape, backend, seed, algorithm)


def default_cnn(
    backend: Backend | str = "cpu",
    seed: int | None = 0,
    algorithm: str = "auto",
    dropout: float | None = None,
    input_shape=FASHION_MNIST_SHAPE,
    num_classes: int = 10,
) -> Sequential:
    """The default network: two 3x3 conv blocks (16, 48 filters; each convolution, max-pool,
    BatchNorm, ReLU), a 384-unit BatchNorm dense layer, dropout 0.1 and a 10-way output (the
    packaged ``architectures/default.toml``); ``dropout`` sets the rate of its Dropout layer
    instead; ``input_shape`` and ``num_classes`` adapt it to other data."""
    spec = builtin_spec("default", num_classes)
    if dropout is not None:
        spec["layers"] = [{**layer, "rate": float(dropout)} if layer.get("type") == "Dropout" else layer for layer in spec["layers"]]
    return _build_builtin(spec, input_shape, backend, seed, algorithm)


def plain_cnn(
    backend: Backend | str = "cpu",
    seed: int | None = 0,
    algorithm: str = "auto",
    dropout: float = 0.0,
    input_shape=FASHION_MNIST_SHAPE,
    num_classes: int = 10,
) -> Sequential:
    """A classic small CNN without BatchNorm: two 3x3 conv blocks (32, 64 filters), a 128-unit
    dense layer and a 10-way output (the packaged ``architectures/plain.toml``); ``dropout`` > 0 adds a Dropout layer of that rate before the output
    layer; ``input_shape`` and ``num_classes`` adapt it to other data.

    Each block is convolution, max-pool, ReLU: the same function as convolution, ReLU, max-pool
    (max and ReLU are both monotone, so they commute), with ReLU on a quarter of the values.
    """
    spec = builtin_spec("plain", num_classes)
    if dropout:
        spec["layers"].insert(len(spec["layers"]) - 1, {"type": "Dropout", "rate": float(dropout)})
    return _build_builtin(spec, input_shape, backend, seed, algorithm)


def _build_builtin(spec: dict, input_shape, backend, seed, algorithm: str) -> Sequential:
    """A built-in network's spec built for ``input_shape``; ``"auto"`` leaves each layer's choice."""
    from .spec import build_model

    return build_model(spec, input_shape, backend, seed, algorithm=None if algorithm == "auto" else algorithm)


def builtin_spec(name: str, num_classes: int = 10) -> dict:
    """The packaged spec of a built-in network, its output layer resized to ``num_classes``."""
    from .spec import builtin_spec_path, read_spec_file

    spec = read_spec_file(builtin_spec_path(name))
    output = spec["layers"][-1]
    if output.get("type") == "FullyConnected" and output.get("out_features") != num_classes:
        spec["layers"][-1] = {**output, "out_features": int(num_classes)}
    return spec


ARCHITECTURES = {"seed": seed_cnn, "default": default_cnn, "plain": plain_cnn}
