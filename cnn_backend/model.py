"""The Sequential model, the named architectures, and saving/loading to ``.npz`` (no pickle)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from .backend import Backend, get_backend
from .init import as_integer, make_rng
from .serialization import ModelFileError, json_array, read_npz, write_npz_atomic
from .layers import LAYER_TYPES, Convolution, Dropout, Flatten, FullyConnected, Layer, MaxPool, Parameter, ReLU, ShapeError

CONFIG_KEY = "__model_config__"
#: samples per forward pass when predicting or evaluating: large enough for fast matrix products,
#: small enough that the default model's im2col buffers stay near 60 MiB (1,000 took 230 MiB)
EVALUATION_BATCH_SIZE = 250


class Sequential:
    """Layers applied in order. ``forward``/``backward`` run on the model's backend."""

    def __init__(self, layers: Iterable[Layer], backend: Backend | str | None = None) -> None:
        self.layers = list(layers)
        if not self.layers:
            raise ValueError("Sequential needs at least one layer")
        self.backend = self.layers[0].backend if backend is None else get_backend(backend)
        for layer in self.layers:
            if layer.backend is not self.backend:
                layer.to(self.backend)
        self.layers[0].needs_input_grad = False
        self.training = True

    # -- device and mode ----------------------------------------------------------------------------

    def to(self, backend: Backend | str) -> "Sequential":
        """Move every parameter to ``backend`` (and its dtype)."""
        self.backend = get_backend(backend)
        for layer in self.layers:
            layer.to(self.backend)
        return self

    def train(self, mode: bool = True) -> "Sequential":
        self.training = mode
        for layer in self.layers:
            layer.training = mode
        return self

    def eval(self) -> "Sequential":
        return self.train(False)

    # -- computation ---------------------------------------------------------------------------------

    def forward(self, x):
        """Logits for a batch. ``x`` may be a host array; it is sent to the device in the model's dtype."""
        x = self.backend.to_device(x)
        if x.ndim == 0 or x.shape[0] == 0:
            raise ShapeError(f"Sequential: expected a batch of at least one sample, got shape {tuple(x.shape)}")
        if x.dtype != self.backend.dtype:
            x = x.astype(self.backend.dtype)
        for layer in self.layers:
            x = layer.forward(x)
        return x

    __call__ = forward

    def backward(self, grad):
        """Backpropagate the loss gradient through every layer, filling parameter gradients."""
        for layer in reversed(self.layers):
            grad = layer.backward(grad)
        return grad

    def predict_logits(self, x, batch_size: int = EVALUATION_BATCH_SIZE):
        """Logits for any number of samples, in evaluation mode, computed in batches (device array).

        Refuses (ShapeError) an empty input and one holding NaN or infinity, whose predictions
        would mean nothing.
        """
        batch_size = as_integer(batch_size, "batch_size", 1)
        if not len(x):
            raise ShapeError("Sequential.predict_logits: no samples to predict (an empty input)")
        xp = self.backend.xp
        was_training = self.training
        self.eval()
        chunks, bad = [], 0
        try:
            for start in range(0, len(x), batch_size):
                chunk = self.backend.to_device(x[start : start + batch_size])
                bad += int(self.backend.to_numpy(xp.count_nonzero(~xp.isfinite(chunk.reshape(len(chunk), -1)).all(axis=1))))
                if not bad:  # after a bad sample, only count the others
                    chunks.append(self.forward(chunk))
        finally:
            self.train(was_training)
        if bad:
            raise ShapeError(f"Sequential.predict_logits: {bad} of {len(x)} samples contain NaN or infinity; clean the input first")
        return self.backend.xp.concatenate(chunks) if len(chunks) > 1 else chunks[0]

    def predict(self, x, batch_size: int = EVALUATION_BATCH_SIZE):
        """Predicted class indices for ``x`` (host NumPy array)."""
        return self.backend.to_numpy(self.predict_logits(x, batch_size).argmax(axis=1))

    # -- parameters ----------------------------------------------------------------------------------

    def named_parameters(self) -> list[tuple[str, Parameter]]:
        """``("<layer index>.<name>", Parameter)`` pairs in a fixed order."""
        return [(f"{i}.{name}", p) for i, layer in enumerate(self.layers) for name, p in layer.params.items()]

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def state_dict(self) -> dict:
        """Host copies of every parameter, by name."""
        return {name: self.backend.to_numpy(p.data) for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict) -> None:
        """Copy host arrays into the parameters; names and shapes must match exactly."""
        own = dict(self.named_parameters())
        missing, unexpected = own.keys() - state.keys(), state.keys() - own.keys()
        if missing or unexpected:
            raise ModelFileError(
                f"parameters do not match the model: missing {sorted(missing) or 'none'}, "
                f"unexpected {sorted(unexpected) or 'none'}"
            )
        for name, param in own.items():
            value = state[name]
            if tuple(value.shape) != tuple(param.data.shape):
                raise ModelFileError(
                    f"parameter {name} has shape {tuple(value.shape)} in the file, the model expects {tuple(param.data.shape)}"
                )
            param.data = self.backend.to_device(value.astype(self.backend.dtype))

    def config(self) -> list[dict]:
        """The architecture as data: one ``{"type": ..., "args": ...}`` per layer."""
        return [{"type": type(layer).__name__, "args": layer.config()} for layer in self.layers]

    @classmethod
    def from_config(cls, config: list[dict], backend: Backend | str = "cpu") -> "Sequential":
        backend = get_backend(backend)
        try:
            layers = [LAYER_TYPES[spec["type"]](**spec["args"], backend=backend) for spec in config]
        except (KeyError, TypeError) as exc:
            raise ModelFileError(f"unknown or malformed layer in the model config: {exc}") from None
        return cls(layers, backend)

    def __repr__(self) -> str:
        inner = "\n".join(f"  ({i}) {layer!r}" for i, layer in enumerate(self.layers))
        return f"Sequential(backend={self.backend.name}, dtype={self.backend.dtype.name}\n{inner}\n)"

    # -- files ---------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, extra: dict | None = None) -> Path:
        """Write architecture and parameters to ``path`` (.npz), atomically.

        ``extra`` maps names to host arrays stored beside the parameters (e.g. optimiser state).
        """
        arrays = {f"param/{name}": value for name, value in self.state_dict().items()}
        arrays[CONFIG_KEY] = json_array(self.config())
        for name, value in (extra or {}).items():
            arrays[name] = value
        return write_npz_atomic(path, arrays)

    @classmethod
    def load(cls, path: str | os.PathLike, backend: Backend | str = "cpu") -> "Sequential":
        """Rebuild a model saved with :meth:`save` on ``backend``."""
        arrays = read_npz(path)
        if CONFIG_KEY not in arrays:
            raise ModelFileError(f"{path}: not a cnn_backend model file (no model config inside)")
        try:
            config = json.loads(str(arrays[CONFIG_KEY]))
        except ValueError as exc:
            raise ModelFileError(f"{path}: the model config is not valid JSON ({exc})") from None
        try:
            model = cls.from_config(config, backend)
        except ModelFileError as exc:
            raise ModelFileError(f"{path}: {exc}") from None
        state = {key[len("param/") :]: value for key, value in arrays.items() if key.startswith("param/")}
        try:
            model.load_state_dict(state)
        except ModelFileError as exc:
            raise ModelFileError(f"{path}: {exc}") from None
        return model


# -- architectures -----------------------------------------------------------------------------------


def seed_cnn(backend: Backend | str = "cpu", seed: int | None = 0, algorithm: str = "auto") -> Sequential:
    """The seed article's network: Convolution 1->1 6x6, ReLU, MaxPool 2, Flatten, FullyConnected 121->10."""
    backend = get_backend(backend)
    rng = make_rng(seed)
    return Sequential(
        [
            Convolution(1, 1, 6, algorithm=algorithm, rng=rng, backend=backend),
            ReLU(backend),
            MaxPool(2, backend=backend),
            Flatten(backend),
            FullyConnected(121, 10, init="glorot", rng=rng, backend=backend),
        ],
        backend,
    )


def default_cnn(
    backend: Backend | str = "cpu", seed: int | None = 0, algorithm: str = "auto", dropout: float = 0.0
) -> Sequential:
    """A classic small CNN for 28x28 greyscale images: two 3x3 conv blocks (32, 64 filters), a 128-unit
    dense layer and a 10-way output.

    Each block is convolution, max-pool, ReLU: the same function as convolution, ReLU, max-pool
    (max and ReLU are both monotone, so they commute), with ReLU on a quarter of the values.
    """
    backend = get_backend(backend)
    rng = make_rng(seed)
    layers: list[Layer] = [
        Convolution(1, 32, 3, padding=1, algorithm=algorithm, rng=rng, backend=backend),
        MaxPool(2, backend=backend),
        ReLU(backend),
        Convolution(32, 64, 3, padding=1, algorithm=algorithm, rng=rng, backend=backend),
        MaxPool(2, backend=backend),
        ReLU(backend),
        Flatten(backend),
        FullyConnected(64 * 7 * 7, 128, rng=rng, backend=backend),
        ReLU(backend),
    ]
    if dropout:
        layers.append(Dropout(dropout, rng=rng, backend=backend))
    layers.append(FullyConnected(128, 10, init="glorot", rng=rng, backend=backend))
    return Sequential(layers, backend)


ARCHITECTURES = {"seed": seed_cnn, "default": default_cnn}
