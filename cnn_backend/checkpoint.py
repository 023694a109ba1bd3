"""Training checkpoints: everything needed to continue a run, in one ``.npz`` file without pickle.

One archive holds:

* ``__model_config__``, ``param/<layer>.<name>`` and ``buffer/<layer>.<name>``: the model exactly
  as :meth:`Sequential.save` writes it (the architecture with its input shape, the parameters and
  the non-trained buffers), so :meth:`Sequential.load` reads a checkpoint as a plain model file too;
* ``optim/<buffer>/<index>``: the optimiser's state buffers (momentum, Adam moments);
* ``__inputs__``: what the model expects as input (class names, channels, image size,
  normalisation; see :class:`cnn_backend.inputs.InputSpec`), absent from files of earlier versions;
* ``__training_state__``: one JSON document with the epoch, the optimiser's name, config and step
  count, the schedule config, the run settings, the RNG state (the data loader's seed and every
  Dropout layer's generator state), the best epoch so far and the metrics history.

Files are written atomically (temporary file + rename): a crash or Ctrl-C never leaves half a
checkpoint behind. Every problem reading one raises :class:`ModelFileError` with one line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy

from .backend import Backend
from .init import as_integer
from .inputs import INPUTS_KEY, InputSpec
from .layers import Dropout
from .model import BUFFER_PREFIX, CONFIG_KEY, PARAM_PREFIX, Sequential
from .optim import OPTIMIZERS, Optimizer, make_optimizer
from .serialization import ModelFileError, json_array, read_npz, stored_float_dtype

STATE_KEY = "__training_state__"
OPTIMIZER_PREFIX = "optim/"
FORMAT_VERSION = 1
_REQUIRED_STATE = ("format", "epoch", "optimizer", "schedule", "settings", "rng", "best", "history")


def save_checkpoint(
    path: str | os.PathLike,
    model: Sequential,
    optimizer: Optimizer,
    *,
    epoch: int,
    schedule,
    settings: dict,
    loader_seed: int,
    best: dict,
    history: list[dict],
    inputs: InputSpec | None = None,
) -> Path:
    """Write the complete training state after ``epoch`` to ``path``, atomically.

    ``settings`` are the run's arguments (JSON-ready); ``best`` is ``{"epoch", "val_accuracy"}``;
    ``history`` the metrics rows of every finished epoch; ``inputs`` what the model expects as input.
    What :func:`load_checkpoint` would refuse is refused here, before anything is written: an epoch
    below 1, an optimiser that does not update this model's parameters.
    """
    epoch = as_integer(epoch, "save_checkpoint: epoch (the number of epochs finished)", 1)
    if {id(parameter) for parameter in optimizer.params} != {id(parameter) for parameter in model.parameters()}:
        raise ValueError("save_checkpoint: the optimizer does not update this model's parameters; "
                         "pass the optimiser made with model.parameters()")
    optimizer_state = optimizer.state_dict()
    steps = int(optimizer_state.pop("steps"))
    state = {
        "format": FORMAT_VERSION,
        "epoch": int(epoch),
        "optimizer": {"name": optimizer.name, "config": optimizer.config(), "steps": steps},
        "schedule": schedule.config(),
        "settings": settings,
        "rng": {"loader_seed": int(loader_seed), "dropout": dropout_rng_states(model)},
        "best": best,
        "history": history,
        "dtype": model.backend.dtype.name,
    }
    extra = {OPTIMIZER_PREFIX + key: value for key, value in optimizer_state.items()}
    extra[STATE_KEY] = json_array(state)
    return model.save(path, extra=extra, inputs=inputs)


@dataclass
class Checkpoint:
    """A checkpoint (or plain model file) read from disk, on the host.

    ``state`` is the decoded training state, or None for a model file written by
    :meth:`Sequential.save` (which can be evaluated but not resumed).
    """

    path: Path
    model_config: list | dict
    parameters: dict
    state: dict | None = None
    optimizer_buffers: dict = field(default_factory=dict)
    buffers: dict = field(default_factory=dict)
    inputs: dict | None = None

    def input_spec(self) -> InputSpec:
        """What the model expects as input: as recorded, or (files of earlier versions, all trained
        on Fashion-MNIST) its 28x28 greyscale input and class names."""
        if self.inputs is not None:
            try:
                return InputSpec.from_config(self.inputs)
            except ValueError as exc:
                raise ModelFileError(f"{self.path}: {exc}") from None
        shape = self.model_config.get("input_shape") if isinstance(self.model_config, dict) else None
        return InputSpec.legacy(_output_count(self.parameters), shape)

    @property
    def is_training_checkpoint(self) -> bool:
        return self.state is not None

    @property
    def epoch(self) -> int | None:
        return self.state["epoch"] if self.state else None

    @property
    def settings(self) -> dict:
        """The run settings stored with the checkpoint (empty for a plain model file)."""
        return dict(self.state["settings"]) if self.state else {}

    @property
    def dtype(self) -> str:
        """The float dtype the model was trained or saved in: the run's ``--dtype``, else the
        training state's, else the stored parameters' (a plain model file), else float32."""
        recorded = self.settings.get("dtype") or (self.state or {}).get("dtype")
        if recorded:
            return str(recorded)
        return stored_float_dtype(self.parameters.values())

    @property
    def history(self) -> list[dict]:
        return list(self.state["history"]) if self.state else []

    @property
    def best(self) -> dict:
        return dict(self.state["best"]) if self.state else {"epoch": None, "val_accuracy": None}

    @property
    def schedule(self) -> dict | None:
        """The learning-rate schedule config the run used."""
        return dict(self.state["schedule"]) if self.state else None

    @property
    def optimizer_name(self) -> str | None:
        return self.state["optimizer"]["name"] if self.state else None

    def build_model(self, backend: Backend) -> Sequential:
        """The model on ``backend``, with its parameters, buffers and its Dropout layers' generator state."""
        try:
            model = Sequential.from_config(self.model_config, backend)
        except ModelFileError as exc:
            raise ModelFileError(f"{self.path}: {_one_line(exc)}") from None
        try:
            model.load_state_dict(self.parameters, self.buffers)
            if self.state:
                restore_dropout_rng_states(model, self.state["rng"]["dropout"])
        except (ModelFileError, ValueError, KeyError, TypeError) as exc:
            raise ModelFileError(f"{self.path}: {_one_line(exc)}") from None  # NaN weights included
        return model

    def build_optimizer(self, model: Sequential, **overrides) -> Optimizer:
        """The optimiser of the run for ``model``, with its state buffers and step count restored.

        ``overrides`` replace stored hyper-parameters (e.g. a new learning rate).
        """
        if not self.state:
            raise ModelFileError(f"{self.path}: a model file without training state; it cannot be resumed")
        stored = self.state["optimizer"]
        config = {**stored["config"], **overrides}
        optimizer = make_optimizer(stored["name"], model.parameters(), model.backend, **config)
        # A kind of state the run did not keep (a velocity, when --momentum is added on resuming)
        # starts from zeros, as a fresh optimiser's does; a kind it kept must be whole.
        kept = {key.split("/")[0] for key in self.optimizer_buffers}
        fresh = {key: value for key, value in optimizer.state_dict().items() if key != "steps" and key.split("/")[0] not in kept}
        try:
            optimizer.load_state_dict({**fresh, **self.optimizer_buffers, "steps": stored["steps"]})
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelFileError(f"{self.path}: {_one_line(exc)}") from None
        return optimizer


def load_checkpoint(path: str | os.PathLike, *, require_training_state: bool = True) -> Checkpoint:
    """Read and check a checkpoint; with ``require_training_state=False`` a plain model file passes too.

    Raises :class:`ModelFileError` (one line, naming the file) when the file is unreadable, is not a
    cnn_backend file, or lacks part of the state.
    """
    path = Path(path)
    arrays = read_npz(path)
    if CONFIG_KEY not in arrays:
        raise ModelFileError(f"{path}: not a cnn_backend model or checkpoint (no model config inside)")
    model_config = _decode_json(arrays[CONFIG_KEY], path, "model config")
    if not isinstance(model_config, (list, dict)):
        raise ModelFileError(f"{path}: the model config is not an architecture (a list of layers or a spec)")
    parameters = {key[len(PARAM_PREFIX) :]: value for key, value in arrays.items() if key.startswith(PARAM_PREFIX)}
    model_buffers = {key[len(BUFFER_PREFIX) :]: value for key, value in arrays.items() if key.startswith(BUFFER_PREFIX)}
    if not parameters:
        raise ModelFileError(f"{path}: the file holds no parameters")
    inputs = _decode_json(arrays[INPUTS_KEY], path, "input description") if INPUTS_KEY in arrays else None
    if inputs is not None and not isinstance(inputs, dict):
        raise ModelFileError(f"{path}: the input description is not a JSON object")
    if STATE_KEY not in arrays:
        if require_training_state:
            raise ModelFileError(f"{path}: a model file without training state (not a checkpoint); it cannot be resumed")
        return Checkpoint(path, model_config, parameters, buffers=model_buffers, inputs=inputs)

    state = _decode_json(arrays[STATE_KEY], path, "training state")
    _check_state(state, path)
    buffers = {key[len(OPTIMIZER_PREFIX) :]: value for key, value in arrays.items() if key.startswith(OPTIMIZER_PREFIX)}
    return Checkpoint(path, model_config, parameters, state, buffers, model_buffers, inputs)


def _output_count(parameters: dict) -> int:
    """Outputs of the last dense layer (the class count), from the parameter shapes alone."""
    dense = [(int(name.split(".")[0]), value.shape[1]) for name, value in parameters.items()
             if name.endswith(".weight") and value.ndim == 2 and name.split(".")[0].isdigit()]
    return max(dense)[1] if dense else 10


def _check_state(state, path: Path) -> None:
    """Refuse a training state this module did not write, in one line."""
    missing = [key for key in _REQUIRED_STATE if not isinstance(state, dict) or key not in state]
    if missing:
        raise ModelFileError(f"{path}: incomplete training state (missing {', '.join(missing)})")
    if not isinstance(state["format"], int) or state["format"] > FORMAT_VERSION:
        raise ModelFileError(f"{path}: checkpoint format {state['format']!r} is not one this cnn_backend reads (up to {FORMAT_VERSION})")
    optimizer = state["optimizer"]
    if not isinstance(optimizer, dict) or optimizer.get("name") not in OPTIMIZERS:
        name = optimizer.get("name") if isinstance(optimizer, dict) else optimizer
        raise ModelFileError(f"{path}: unknown optimizer {name!r} in the training state")
    expected_types = {"epoch": int, "settings": dict, "rng": dict, "best": dict, "history": list, "schedule": dict}
    wrong = [key for key, kind in expected_types.items() if not isinstance(state[key], kind)]
    if wrong or not isinstance(optimizer.get("config"), dict) or not isinstance(optimizer.get("steps"), int):
        raise ModelFileError(f"{path}: malformed training state ({', '.join(wrong) or 'optimizer'})")
    if not isinstance(state["rng"].get("dropout", {}), dict) or state["epoch"] < 1:
        raise ModelFileError(f"{path}: malformed training state (rng or epoch)")


def dropout_rng_states(model: Sequential) -> dict:
    """``{layer name: bit generator state}`` of every Dropout layer (JSON-ready; names as in
    :meth:`Sequential.named_layers`, the index for a top-level layer). A layer drawing from the
    generator of an earlier one (a network's Dropout layers share the model's) is saved as
    ``{"same_as": that layer's name}``, so that they share one again when restored."""
    states, owners = {}, {}
    for name, layer in model.named_layers():
        if isinstance(layer, Dropout):
            owner = owners.setdefault(id(layer.rng), name)
            states[name] = layer.rng.bit_generator.state if owner == name else {"same_as": owner}
    return states


def restore_dropout_rng_states(model: Sequential, states: dict) -> None:
    """Put saved generator states back into the model's Dropout layers (shared where they were)."""
    dropout_layers = [(name, layer) for name, layer in model.named_layers() if isinstance(layer, Dropout)]
    if set(states) != {name for name, _ in dropout_layers}:
        raise ModelFileError(
            f"Dropout generator states for layers {sorted(states) or 'none'}, "
            f"but the model has Dropout at {sorted(name for name, _ in dropout_layers) or 'none'}"
        )
    generators = {}
    for name, layer in dropout_layers:  # in the model's order: a shared generator's owner comes first
        state = states[name]
        if "same_as" in state:
            if state["same_as"] not in generators:
                raise ModelFileError(f"the Dropout state of layer {name} refers to {state['same_as']!r}, no earlier Dropout layer's")
            layer.rng = generators[state["same_as"]]
            continue
        # A generator of the same kind as the saved one, so the state always fits.
        kind = getattr(numpy.random, str(state["bit_generator"]), None)
        if not (isinstance(kind, type) and issubclass(kind, numpy.random.BitGenerator)):
            raise ModelFileError(f"unknown bit generator {state['bit_generator']!r} in a Dropout state")
        bit_generator = kind()
        bit_generator.state = state
        layer.rng = generators[name] = numpy.random.Generator(bit_generator)


def _decode_json(array, path: Path, what: str):
    try:
        return json.loads(str(array))
    except (ValueError, TypeError) as exc:
        raise ModelFileError(f"{path}: the {what} is not valid JSON ({exc})") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
