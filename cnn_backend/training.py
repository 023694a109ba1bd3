"""Training and evaluation loops, the per-architecture training recipes, and learning-rate schedules
as data.

The step never reads a device value back: per-step losses and correct-prediction counts stay on the
device and are read once per log interval (two small reads), where a non-finite loss is also detected
with the exact step it first appeared at.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy

from .layers import NonFiniteLogitsError, SoftmaxCrossEntropy
from .model import EVALUATION_BATCH_SIZE, Sequential
from .optim import SCHEDULE_TYPES, ConstantSchedule, Optimizer

# -- recipes ----------------------------------------------------------------------------------------

#: Default hyper-parameters of each architecture in :data:`cnn_backend.model.ARCHITECTURES`: the one
#: place the command line (and anything else) takes its defaults from. ``train_split``/``val_split``
#: of None mean "decided by the data available" (see ``cnn_backend.cli``).
RECIPES: dict[str, dict] = {
    # The seed article's experiment (as scripts/seed_experiment.py runs it): SGD on train[:5000],
    # validated on train[5000:10000].
    "seed": {
        "optimizer": "sgd",
        "lr": 0.01,
        "momentum": 0.9,
        "weight_decay": 0.0,
        "schedule": "constant",
        "batch_size": 32,
        "epochs": 20,
        "dropout": 0.0,
        "augment": "none",
        "train_split": ":5000",
        "val_split": "5000:10000",
    },
    "default": {
        # Adam with cosine decay and dropout: over 92% validation accuracy on train[50000:] in under
        # five minutes on a 2-core CPU (see the README). Crop-and-flip augmentation cost about 0.7
        # points within such a short run, so it is off by default.
        "optimizer": "adam",
        "lr": 2e-3,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "schedule": "cosine",
        "batch_size": 64,
        "epochs": 10,
        "dropout": 0.4,
        "augment": "none",
        "train_split": None,
        "val_split": None,
    },
}

#: Learning rate and momentum of an optimiser chosen against its recipe (``--optimizer adam`` on a
#: recipe written for SGD). For Adam, "momentum" is beta1.
OPTIMIZER_DEFAULTS: dict[str, dict] = {
    "sgd": {"lr": 0.01, "momentum": 0.0},
    "adam": {"lr": 1e-3, "momentum": 0.9},
}

# -- schedules as data ------------------------------------------------------------------------------

SCHEDULES = tuple(SCHEDULE_TYPES)
#: the step schedule multiplies the rate by this factor twice per run (see :func:`schedule_for_run`)
STEP_GAMMA = 0.1


def schedule_for_run(name: str, base_lr: float, epochs: int, steps_per_epoch: int) -> dict:
    """The config of schedule ``name`` for a run of ``epochs`` x ``steps_per_epoch`` steps.

    ``constant``: ``base_lr`` throughout; ``step``: multiplied by 0.1 every ``ceil(epochs / 3)``
    epochs; ``cosine``: a linear warm-up over the first epoch (at most a tenth of the run), which
    keeps the first steps of a fresh network stable at a high rate, then cosine decay to 0.
    """
    if name == "constant":
        return {"name": "constant", "base_lr": base_lr}
    if name == "step":
        step_size = steps_per_epoch * max(1, math.ceil(epochs / 3))
        return {"name": "step", "base_lr": base_lr, "step_size": step_size, "gamma": STEP_GAMMA}
    if name == "cosine":
        total_steps = epochs * steps_per_epoch
        warmup_steps = min(steps_per_epoch, total_steps // 10)
        return {"name": "cosine", "base_lr": base_lr, "total_steps": total_steps, "warmup_steps": warmup_steps, "min_lr": 0.0}
    raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")


def schedule_from_config(config: dict) -> ConstantSchedule:
    """Build a schedule from its config (as :func:`schedule_for_run` or a schedule's ``config()`` give it)."""
    kwargs = {key: value for key, value in config.items() if key != "name"}
    try:
        return SCHEDULE_TYPES[config["name"]](**kwargs)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"malformed schedule config {config!r} ({exc})") from None


# -- one step, evaluation ---------------------------------------------------------------------------


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss (``step`` is None when the validation loss did)."""

    def __init__(self, epoch: int, step: int | None) -> None:
        if step is None:
            where, after = f"the validation loss became non-finite after epoch {epoch}", "this epoch"
        else:
            where, after = f"the loss became non-finite at epoch {epoch}, step {step}", "this step"
        super().__init__(
            f"{where}: lower the learning rate (or check the input data); parameters after {after} are not usable"
        )
        self.epoch, self.step = epoch, step


@dataclass
class EpochStats:
    """Metrics of one epoch; ``val_*`` are None without validation data."""

    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float | None
    val_accuracy: float | None
    lr: float
    seconds: float
    samples_per_second: float

    def as_dict(self) -> dict:
        return asdict(self)


def train_step(model: Sequential, loss_fn: SoftmaxCrossEntropy, optimizer: Optimizer, x, y):
    """Forward, backward and one optimiser update; returns ``(loss, n_correct)`` as device scalars."""
    logits = model.forward(x)
    loss = loss_fn.forward(logits, y)
    model.backward(loss_fn.backward())
    optimizer.step()
    n_correct = (logits.argmax(axis=1) == y).sum()
    return loss, n_correct


def evaluate(model: Sequential, images, labels, batch_size: int = EVALUATION_BATCH_SIZE, *, with_predictions: bool = False) -> dict:
    """Mean loss and accuracy of ``model`` on host ``images (N, 1, H, W)`` in [0, 1] and ``labels``.

    ``with_predictions`` adds the predicted classes (host array) under ``"predictions"``.
    """
    be = model.backend
    loss_fn = SoftmaxCrossEntropy(be)
    y = be.to_device(labels)
    logits = model.predict_logits(images, batch_size)
    loss = loss_fn.forward(logits, y)
    predicted = logits.argmax(axis=1)
    correct = (predicted == y).sum()
    result = {"loss": float(be.to_numpy(loss)), "accuracy": float(be.to_numpy(correct)) / len(labels)}
    if with_predictions:
        result["predictions"] = be.to_numpy(predicted)
    return result


# -- the loop ---------------------------------------------------------------------------------------


class Trainer:
    """Runs epochs of ``train_step`` over a batch loader.

    ``loader`` provides ``len(loader)`` batches per epoch and ``loader.epoch(index)`` yielding device
    ``(x, y)`` batches; ``schedule(step)`` gives the learning rate of each global step;
    ``augment(x, epoch, step)``, when given, transforms each training batch on the device.
    """

    def __init__(
        self,
        model: Sequential,
        optimizer: Optimizer,
        loader,
        *,
        schedule: Callable[[int], float] | None = None,
        augment: Callable | None = None,
        log_every: int = 50,
    ) -> None:
        self.model, self.optimizer, self.loader = model, optimizer, loader
        self.schedule = schedule or ConstantSchedule(optimizer.lr)
        self.augment = augment
        self.log_every = max(1, int(log_every))
        # Labels were validated on the host by the loader: skip the per-step device syncs.
        self.loss_fn = SoftmaxCrossEntropy(model.backend, check_inputs=False)

    def run_epoch(self, epoch: int, on_interval: Callable[[int, float, float], None] | None = None) -> tuple[float, float, int]:
        """Train one epoch; returns ``(mean loss, accuracy, samples)``.

        ``on_interval(steps_done, mean_loss_so_far, accuracy_so_far)`` is called once per log interval
        and after the last step.
        """
        be, xp = self.model.backend, self.model.backend.xp
        self.model.train()
        steps_per_epoch = len(self.loader)
        pending_losses, total_loss, total_correct, samples, step = [], 0.0, 0, 0, 0
        correct_acc = None
        for step, (x, y) in enumerate(self.loader.epoch(epoch), start=1):
            # The rate depends only on the global step, so a resumed run follows the same schedule.
            self.optimizer.lr = self.schedule((epoch - 1) * steps_per_epoch + step - 1)
            if self.augment is not None:
                x = self.augment(x, epoch, step)
            loss, n_correct = train_step(self.model, self.loss_fn, self.optimizer, x, y)
            pending_losses.append(loss)
            correct_acc = n_correct if correct_acc is None else correct_acc + n_correct
            samples += len(y)
            if step % self.log_every == 0 or step == steps_per_epoch:
                batch_losses = be.to_numpy(xp.stack(pending_losses))
                first_bad = _first_non_finite(batch_losses)
                if first_bad is not None:
                    raise NonFiniteLossError(epoch, step - len(pending_losses) + 1 + first_bad)
                # Each loss is a batch mean: weight by batch size (all equal but maybe the last).
                total_loss += float(batch_losses.sum())
                total_correct = int(be.to_numpy(correct_acc))
                pending_losses = []
                if on_interval is not None:
                    on_interval(step, total_loss / step, total_correct / samples)
        if step == 0:
            raise ValueError("the training data yields no batch: use a smaller batch size or more data")
        return total_loss / step, total_correct / samples, samples


def _first_non_finite(values) -> int | None:
    bad = numpy.flatnonzero(~numpy.isfinite(values))
    return int(bad[0]) if bad.size else None


def fit(
    model: Sequential,
    optimizer: Optimizer,
    loader,
    epochs: int,
    *,
    validation: tuple | None = None,
    schedule: Callable[[int], float] | None = None,
    augment: Callable | None = None,
    start_epoch: int = 1,
    on_epoch_start: Callable[[int], None] | None = None,
    on_epoch_end: Callable[[EpochStats], None] | None = None,
    on_interval: Callable[[int, float, float], None] | None = None,
    log_every: int = 50,
) -> list[EpochStats]:
    """Train for epochs ``start_epoch .. epochs``; returns one :class:`EpochStats` per epoch.

    ``validation`` is ``(images, labels)`` on the host (images as
    :func:`cnn_backend.data.prepare_images` returns them), evaluated after every epoch. ``on_epoch_start(epoch)`` runs before an epoch's first step,
    ``on_epoch_end(stats)`` after its validation.
    """
    trainer = Trainer(model, optimizer, loader, schedule=schedule, augment=augment, log_every=log_every)
    history: list[EpochStats] = []
    for epoch in range(start_epoch, epochs + 1):
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        started = time.perf_counter()
        train_loss, train_accuracy, samples = trainer.run_epoch(epoch, on_interval)
        model.backend.synchronize()
        seconds = time.perf_counter() - started
        try:
            val = evaluate(model, *validation) if validation is not None else {"loss": None, "accuracy": None}
        except NonFiniteLogitsError:
            val = {"loss": math.nan}
        if val["loss"] is not None and not math.isfinite(val["loss"]):
            # Diverged weights (the last update overflowed): never a result, let alone the best one.
            raise NonFiniteLossError(epoch, None)
        stats = EpochStats(
            epoch, train_loss, train_accuracy, val["loss"], val["accuracy"], optimizer.lr, seconds, samples / seconds
        )
        history.append(stats)
        if on_epoch_end is not None:
            on_epoch_end(stats)
    return history
