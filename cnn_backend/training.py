"""Training and evaluation loops.

The step never reads a device value back: per-step losses and correct-prediction counts stay on the
device and are read once per log interval (one transfer), where a non-finite loss is also detected
with the exact step it first appeared at.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

from .layers import SoftmaxCrossEntropy
from .model import Sequential
from .optim import ConstantSchedule, Optimizer


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss."""

    def __init__(self, epoch: int, step: int) -> None:
        super().__init__(
            f"the loss became non-finite at epoch {epoch}, step {step}: lower the learning rate "
            "(or check the input data); parameters after this step are not usable"
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


def evaluate(model: Sequential, images, labels, batch_size: int = 1000) -> dict:
    """Mean loss and accuracy of ``model`` on host ``images (N, 1, H, W)`` in [0, 1] and ``labels``."""
    be = model.backend
    loss_fn = SoftmaxCrossEntropy(be)
    y = be.to_device(labels)
    logits = model.predict_logits(images, batch_size)
    loss = loss_fn.forward(logits, y)
    correct = (logits.argmax(axis=1) == y).sum()
    return {"loss": float(be.to_numpy(loss)), "accuracy": float(be.to_numpy(correct)) / len(labels)}


class Trainer:
    """Runs epochs of ``train_step`` over a batch loader.

    ``loader`` provides ``len(loader)`` batches per epoch and ``loader.epoch(index)`` yielding device
    ``(x, y)`` batches; ``schedule(step)`` gives the learning rate of each global step.
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

        ``on_interval(steps_done, mean_loss_so_far, accuracy_so_far)`` is called once per log interval.
        """
        be, xp = self.model.backend, self.model.backend.xp
        self.model.train()
        steps_per_epoch = len(self.loader)
        pending_losses, total_loss, total_correct, samples, step = [], 0.0, 0, 0, 0
        correct_acc = None
        for step, (x, y) in enumerate(self.loader.epoch(epoch), start=1):
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
    for index, value in enumerate(values.tolist()):
        if value != value or value in (float("inf"), float("-inf")):
            return index
    return None


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
    on_epoch_end: Callable[[EpochStats], None] | None = None,
    on_interval: Callable[[int, float, float], None] | None = None,
    log_every: int = 50,
) -> list[EpochStats]:
    """Train for epochs ``start_epoch .. epochs``; returns one :class:`EpochStats` per epoch.

    ``validation`` is ``(images, labels)`` on the host, evaluated after every epoch.
    """
    trainer = Trainer(model, optimizer, loader, schedule=schedule, augment=augment, log_every=log_every)
    history: list[EpochStats] = []
    for epoch in range(start_epoch, epochs + 1):
        started = time.perf_counter()
        train_loss, train_accuracy, samples = trainer.run_epoch(epoch, on_interval)
        model.backend.synchronize()
        seconds = time.perf_counter() - started
        val = evaluate(model, *validation) if validation is not None else {"loss": None, "accuracy": None}
        stats = EpochStats(
            epoch, train_loss, train_accuracy, val["loss"], val["accuracy"], optimizer.lr, seconds, samples / seconds
        )
        history.append(stats)
        if on_epoch_end is not None:
            on_epoch_end(stats)
    return history

