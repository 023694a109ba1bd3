"""Training and evaluation loops, the per-architecture training recipes, and learning-rate schedules
as data.

The step never reads a device value back: per-step losses and correct-prediction counts stay on the
device and are read once per log interval (two small reads), where a non-finite loss is also detected
with the exact step it first appeared at.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy

from .data import SEED_SPLIT, BatchLoader, BatchShare, split_ranges
from .distributed import GradientAverager, SingleProcess, average_buffers, broadcast_parameters
from .functional import cross_entropy_per_sample
from .init import as_integer
from .layers import BatchNorm, NonFiniteLogitsError, ShapeError, SoftmaxCrossEntropy
from .layers.loss import check_label_range
from .model import EVALUATION_BATCH_SIZE, Sequential
from .optim import SCHEDULE_TYPES, ConstantSchedule, OneCycleSchedule, Optimizer

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
        "label_smoothing": 0.0,
        **dict(zip(("train_split", "val_split"), split_ranges(*SEED_SPLIT))),
    },
    "default": {
        # The BatchNorm network with random 1-pixel shifts and flips, label smoothing and a larger
        # batch: over 94% validation accuracy on train[50000:] in the time the plain recipe's ten
        # epochs take on a 2-core CPU (about three and a half minutes; see the README).
        "optimizer": "adam",
        "lr": 4e-3,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "schedule": "cosine",
        "batch_size": 128,
        "epochs": 15,
        "dropout": 0.1,
        "augment": "crop1-flip",
        "label_smoothing": 0.1,
        "train_split": None,
        "val_split": None,
    },
    "plain": {
        # Adam with cosine decay and dropout: about 93% validation accuracy on train[50000:] in
        # about three and a half minutes on a 2-core CPU. Crop-and-flip augmentation cost about
        # 0.7 points within such a short run of this network, so it is off.
        "optimizer": "adam",
        "lr": 2e-3,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "schedule": "cosine",
        "batch_size": 64,
        "epochs": 10,
        "dropout": 0.4,
        "augment": "none",
        "label_smoothing": 0.0,
        "train_split": None,
        "val_split": None,
    },
}

#: Learning rate and momentum of an optimiser chosen against its recipe (``--optimizer adam`` on a
#: recipe written for SGD). For Adam, "momentum" is beta1; SGD's is 0.9, as in the built-in SGD
#: recipes, so that ``--optimizer sgd`` on the default network is not plain gradient descent.
OPTIMIZER_DEFAULTS: dict[str, dict] = {
    "sgd": {"lr": 0.01, "momentum": 0.9},
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
    keeps the first steps of a fresh network stable at a high rate, then cosine decay to 0;
    ``one-cycle``: up from ``base_lr / 25`` to ``base_lr`` over the first 30% of the run, then down
    to ``base_lr / 250,000`` (PyTorch's ``OneCycleLR`` defaults).
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
    if name == "one-cycle":
        return OneCycleSchedule(base_lr, max(2, epochs * steps_per_epoch)).config()
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


def train_step(model: Sequential, loss_fn: SoftmaxCrossEntropy, optimizer: Optimizer, x, y, average_gradients=None):
    """Forward, backward and one optimiser update; returns ``(loss, n_correct)`` as device scalars.

    ``average_gradients()``, when given, runs between backward and the update (the all-reduce of
    data-parallel training).
    """
    logits = model.forward(x)
    loss = loss_fn.forward(logits, y)
    model.backward(loss_fn.backward())
    if average_gradients is not None:
        average_gradients()
    optimizer.step()
    n_correct = (logits.argmax(axis=1) == y).sum()
    return loss, n_correct


def has_batchnorm(model: Sequential) -> bool:
    return any(isinstance(layer, BatchNorm) for _, layer in model.named_layers())


def refuse_batches_batchnorm_cannot_take(batch_size: int, processes: int, model: Sequential) -> None:
    """ValueError (one line, naming ``--batch-size``) when a network with BatchNorm would get a single
    sample a step on a process: its training-mode statistics need two or more."""
    if has_batchnorm(model) and batch_size // processes < 2:
        share = "each step" if processes == 1 else f"each of the {processes} processes"
        raise ValueError(
            f"--batch-size {batch_size} gives {share} {batch_size // processes} sample, and BatchNorm cannot take "
            f"statistics over a single one: choose --batch-size {2 * processes} or more"
        )


def evaluate(
    model: Sequential, images, labels, batch_size: int = EVALUATION_BATCH_SIZE, *, with_predictions: bool = False,
    communicator=None, flip_average: bool = False,
) -> dict:
    """Mean loss and accuracy of ``model`` on host ``images (N, 1, H, W)`` in [0, 1] and ``labels``.

    ``with_predictions`` adds the predicted classes (host array) under ``"predictions"``.
    ``flip_average`` scores the mean of the logits of each image and of its left-right mirror (a
    test-time use of the flips that crop-flip augmentation trains on; it doubles the work).

    The set is evaluated in chunks of ``batch_size``; each chunk's loss sum and correct count are kept
    apart and added on the host in float64, in chunk order. With a ``communicator`` the chunks are
    shared among the processes and the per-chunk sums combined by one all-reduce (each chunk is
    non-zero on one process only), so every process reports exactly the numbers of one process.
    """
    be, xp = model.backend, model.backend.xp
    communicator = communicator or SingleProcess()
    if with_predictions and communicator.size > 1:
        raise ValueError("evaluate: predictions are gathered by a single process only")
    batch_size = as_integer(batch_size, "batch_size", 1)
    labels = _checked_labels(images, labels, "evaluate")
    starts = list(range(0, len(labels), batch_size))
    first, last = _chunk_range(len(starts), communicator.rank, communicator.size)
    stop = starts[last] if last < len(starts) else len(labels)
    begin = starts[first] if first < len(starts) else stop
    sums = xp.zeros((2, len(starts)), dtype=xp.float64)  # loss sum and correct count of each chunk
    predicted = None
    if stop > begin or communicator.size == 1:
        logits = model.predict_logits(images[begin:stop], batch_size)  # refuses empty or non-finite input
        if flip_average:
            mirrored = images[begin:stop][..., ::-1]  # host or device images, mirrored where they are
            mirrored = (xp if isinstance(mirrored, xp.ndarray) else numpy).ascontiguousarray(mirrored)
            logits = (logits + model.predict_logits(mirrored, batch_size)) * 0.5
        check_label_range(labels, logits.shape[1])
        y = be.to_device(labels[begin:stop])
        predicted = logits.argmax(axis=1)
        # Values are checked once the chunks are combined, the same on every process.
        losses = cross_entropy_per_sample(be, logits, y).astype(xp.float64)
        correct = predicted == y
        for chunk in range(first, last):
            window = slice(starts[chunk] - begin, min(starts[chunk] + batch_size, stop) - begin)
            sums[0, chunk] = losses[window].sum()
            sums[1, chunk] = correct[window].sum()
    host = be.to_numpy(communicator.allreduce_sum(sums.reshape(-1))).reshape(2, -1)
    loss_sum = float(host[0].sum())
    if not math.isfinite(loss_sum):
        raise NonFiniteLogitsError("SoftmaxCrossEntropy: logits contain NaN or infinity (diverged training or bad input)")
    result = {"loss": loss_sum / len(labels), "accuracy": float(host[1].sum()) / len(labels)}
    if with_predictions:
        result["predictions"] = be.to_numpy(predicted)
    return result


def _checked_labels(images, labels, where: str):
    """``labels`` as a host array of one integer class index per image, refused in one line otherwise."""
    labels = numpy.asarray(labels)
    if labels.shape != (len(images),):
        raise ValueError(f"{where}: expected labels of shape ({len(images)},), one class index per image, got {labels.shape}")
    if not numpy.issubdtype(labels.dtype, numpy.integer):
        raise ValueError(f"{where}: labels must be integer class indices, got {labels.dtype}")
    return labels


def _check_validation(model: Sequential, validation) -> None:
    """Refuse before the first epoch a validation set that evaluate would refuse only after one."""
    if not isinstance(validation, (tuple, list)) or len(validation) != 2:
        raise TypeError(f"fit: validation must be a pair (images, labels), got {type(validation).__name__}")
    images, labels = validation
    images = model.check_samples(images, "fit: validation")
    taken, given = model.input_shape, tuple(images.shape[1:])
    if taken is not None and given != tuple(taken):
        channels_last = len(given) == 3 and given == (*taken[1:], taken[0])
        raise ShapeError(
            f"fit: validation samples have shape {given}, the model takes {tuple(taken)}"
            + ("; pass images as (N, C, H, W), not (N, H, W, C)" if channels_last else "")
        )
    labels = _checked_labels(images, labels, "fit: validation")
    outputs = _class_count(model)
    if outputs is not None:
        check_label_range(labels, outputs)


def _check_loader_share(loader, communicator) -> None:
    """ValueError when a loader that shares its batches among processes (BatchLoader's ``rank`` and
    ``size``) disagrees with the communicator: without one, each process would train alone on its
    share; with a loader of the whole batch, each would do all the work; with another size, part of
    every batch would go unused."""
    rank, size = getattr(loader, "rank", None), getattr(loader, "size", None)
    if not isinstance(rank, int) or not isinstance(size, int):
        return  # a loader of one's own: its sharing is its own business
    if (rank, size) == (communicator.rank, communicator.size):
        return
    if communicator.size == 1:
        advice = "pass the job's communicator (fit(..., communicator=world_communicator()))"
    else:
        advice = f"make it BatchLoader(..., rank={communicator.rank}, size={communicator.size}), as the communicator's"
    raise ValueError(
        f"the loader takes share {rank} of {size} of each batch, but the communicator is process {communicator.rank} "
        f"of {communicator.size}; {advice}"
    )


def _class_count(model: Sequential) -> int | None:
    """The model's number of outputs (classes), or None while it is not known (an unbuilt model)."""
    shape = model.output_shape
    return int(shape[0]) if shape is not None and len(shape) == 1 else None


def _chunk_range(n_chunks: int, rank: int, size: int) -> tuple[int, int]:
    """The contiguous chunks ``[first, last)`` process ``rank`` of ``size`` evaluates."""
    base, extra = divmod(n_chunks, size)
    first = rank * base + min(rank, extra)
    return first, first + base + (rank < extra)


# -- the loop ---------------------------------------------------------------------------------------


class Trainer:
    """Runs epochs of ``train_step`` over a batch loader.

    ``loader`` provides ``len(loader)`` batches per epoch and ``loader.epoch(index)`` yielding device
    ``(x, y)`` batches; ``schedule(step)`` gives the learning rate of each global step;
    ``augment(x, epoch, step)``, when given, transforms each training batch on the device;
    ``label_smoothing`` is that of the training loss (:class:`SoftmaxCrossEntropy`; validation
    always reports the plain cross-entropy).

    ``communicator`` (:mod:`cnn_backend.distributed`) makes the run data-parallel: the model starts
    from rank 0's parameters, the loader yields this process's share of each global batch
    (``loader.share(index)``), the gradients are averaged over the processes before every update and
    the reported losses and accuracies are those of the global batches. With the default single
    process every one of these steps does nothing.
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
        communicator=None,
        label_smoothing: float = 0.0,
    ) -> None:
        check_labels = _check_trainer_arguments(model, optimizer, loader)
        self.model, self.optimizer, self.loader = model, optimizer, loader
        self.schedule = schedule or ConstantSchedule(optimizer.lr)
        self.augment = augment
        self.log_every = max(1, int(log_every))
        self.communicator = communicator or SingleProcess()
        _check_loader_share(loader, self.communicator)
        self.average_gradients = GradientAverager(model, self.communicator)
        replaced = broadcast_parameters(model, self.communicator)
        if replaced:
            logging.getLogger(__name__).warning(
                "the parameters of process%s %s differed from rank 0's and were replaced by them",
                "es" if len(replaced) > 1 else "", ", ".join(map(str, replaced)),
            )
        # Labels are checked per step (a device read each) unless the loader's are known to fit the model;
        # non-finite logits are left to the loop, which names the step they appeared at.
        self.loss_fn = SoftmaxCrossEntropy(
            model.backend, check_inputs=False, check_labels=check_labels, label_smoothing=label_smoothing
        )
        # Augmentations that draw per sample learn which part of each global batch they get.
        self._share_augment = getattr(augment, "set_batch_share", None)

    def run_epoch(self, epoch: int, on_interval: Callable[[int, float, float], None] | None = None) -> tuple[float, float, int]:
        """Train one epoch; returns ``(mean loss, accuracy, samples)``.

        ``on_interval(steps_done, mean_loss_so_far, accuracy_so_far)`` is called once per log interval
        and after the last step.
        """
        self.model.train()
        try:
            return self._run_epoch(epoch, on_interval)
        finally:
            self._tell_share(None)  # batches outside this loop are whole batches again

    def _run_epoch(self, epoch: int, on_interval) -> tuple[float, float, int]:
        be, xp = self.model.backend, self.model.backend.xp
        steps_per_epoch = len(self.loader)
        pending, total_loss, total_correct, samples, step = [], 0.0, 0, 0, 0
        correct_acc = None
        for step, (x, y) in enumerate(self.loader.epoch(epoch), start=1):
            if step > steps_per_epoch:  # its losses would be left out of the epoch's, and the schedule's steps off
                raise ValueError(_uncounted_batches(self.loader, epoch, f"more than {steps_per_epoch}"))
            share = self._share(step - 1, len(y))
            # The rate depends only on the global step, so a resumed run follows the same schedule.
            self.optimizer.lr = self.schedule((epoch - 1) * steps_per_epoch + step - 1)
            if self.augment is not None:
                x = self.augment(x, epoch, step)
            # This process's part of the global batch mean: count/total of its own mean; the
            # gradient average over processes then weighs it size * count / total (1.0 when even).
            fraction = share.count / share.total
            loss, n_correct = train_step(
                self.model, self.loss_fn, self.optimizer, x, y,
                lambda: self.average_gradients(fraction * self.communicator.size),
            )
            pending.append(loss * share.count)  # this process's loss sum: summed over processes, the batch's
            correct_acc = n_correct if correct_acc is None else correct_acc + n_correct
            samples += share.total
            if step % self.log_every == 0 or step == steps_per_epoch:
                # One read per interval: the global batch losses and the interval's correct count.
                interval = xp.concatenate([xp.stack(pending).astype(xp.float64), correct_acc.astype(xp.float64).reshape(1)])
                interval = be.to_numpy(self.communicator.allreduce_sum(interval))
                batch_losses = interval[:-1]
                first_bad = _first_non_finite(batch_losses)
                if first_bad is not None:
                    raise NonFiniteLossError(epoch, step - len(pending) + 1 + first_bad)
                # Sums over samples: a short last batch weighs by its size, as in the accuracy.
                total_loss += float(batch_losses.sum())
                total_correct += int(round(float(interval[-1])))
                pending, correct_acc = [], None
                if on_interval is not None:
                    on_interval(step, total_loss / samples, total_correct / samples)
        if step == 0:
            raise ValueError("the training data yields no batch: use a smaller batch size or more data")
        if step < steps_per_epoch:
            raise ValueError(_uncounted_batches(self.loader, epoch, str(step)))
        average_buffers(self.model, self.communicator)
        return total_loss / samples, total_correct / samples, samples

    def _share(self, index: int, count: int) -> BatchShare:
        """This process's part of global batch ``index``, told to the layers and the augmentation."""
        share_of = getattr(self.loader, "share", None)
        share = share_of(index) if share_of is not None else BatchShare(0, count, count)
        self._tell_share((share.start, share.total))
        return share

    def _tell_share(self, share: tuple[int, int] | None) -> None:
        self.model.set_batch_share(share)
        if self._share_augment is not None:
            self._share_augment(share)


def _uncounted_batches(loader, epoch: int, yielded: str) -> str:
    return (
        f"the loader's epoch({epoch}) yielded {yielded} batches, but its len() says {len(loader)}: "
        f"make {type(loader).__name__}.__len__ count the batches each epoch yields"
    )


def _check_trainer_arguments(model: Sequential, optimizer, loader) -> bool:
    """Refuse, in one line each, arguments that would fail mid-epoch (or train nothing); returns
    whether each batch's labels must be checked (False when the loader's are known to fit)."""
    if not isinstance(optimizer, Optimizer):
        given = "None" if optimizer is None else f"a {type(optimizer).__name__}"
        raise TypeError(f"the optimizer must be a cnn_backend.optim.Optimizer (e.g. SGD(model.parameters(), lr=0.01)), got {given}")
    if not callable(getattr(loader, "epoch", None)) or not hasattr(loader, "__len__"):
        raise TypeError(
            f"the loader must be a cnn_backend.data.BatchLoader (or an object with epoch(n) and len()), "
            f"got a {type(loader).__name__}"
        )
    updated = {id(param) for param in optimizer.params}
    parameters = model.parameters()
    # A subset is fine (frozen layers); none at all means another model's optimiser.
    if parameters and not any(id(param) in updated for param in parameters):
        raise ValueError("the optimiser updates none of this model's parameters: build it with model.parameters()")
    if not isinstance(loader, BatchLoader):
        return True  # its labels are known only as each batch arrives: each is checked
    _check_last_batch(model, loader)
    outputs = _class_count(model)
    labels = loader.labels  # validated non-negative integers; the largest is what must fit
    if outputs is None or not len(labels):
        return True
    largest = int(labels.max())
    if largest >= outputs:
        raise ValueError(
            f"the loader's labels go up to {largest} but the model has {outputs} outputs: build the model for "
            f"{largest + 1} classes or more, or give the loader the data's labels"
        )
    return False


def _check_last_batch(model: Sequential, loader: BatchLoader) -> None:
    """BatchNorm needs two or more samples per process in every batch, the last (short) one included."""
    if not has_batchnorm(model):
        return
    per_process = "" if loader.size == 1 else f" per process ({loader.size} processes)"
    last = 0 if loader.drop_last else loader.num_samples % loader.batch_size
    if loader.batch_size // loader.size < 2:
        raise ValueError(
            f"batches of {loader.batch_size} give BatchNorm {loader.batch_size // loader.size} sample{per_process}, and it "
            f"cannot take statistics over a single one: choose a batch size of {2 * loader.size} or more"
        )
    if last and last // loader.size < 2:
        raise ValueError(
            f"the last batch of each epoch ({loader.num_samples} images in batches of {loader.batch_size}) gives BatchNorm "
            f"{last // loader.size} sample{per_process}, and it cannot take statistics over a single one: pass "
            f"drop_last=True to the BatchLoader, or another batch size"
        )


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
    communicator=None,
    validation_batch_size: int = EVALUATION_BATCH_SIZE,
    label_smoothing: float = 0.0,
) -> list[EpochStats]:
    """Train for epochs ``start_epoch .. epochs``; returns one :class:`EpochStats` per epoch.

    ``validation`` is ``(images, labels)`` on the host (images as
    :func:`cnn_backend.data.prepare_images` returns them), evaluated after every epoch (sent to the
    device once in a single process). ``on_epoch_start(epoch)`` runs before an epoch's first step,
    ``on_epoch_end(stats)`` after its validation. ``communicator``: see :class:`Trainer`; validation
    is then shared among the processes too, in chunks of ``validation_batch_size`` images (the
    samples per forward pass). ``label_smoothing``: that of the training loss (see :class:`Trainer`).
    """
    epochs = as_integer(epochs, "fit: epochs", 1)
    if isinstance(start_epoch, numbers.Integral) and start_epoch < 1:
        raise ValueError(f"fit: start_epoch counts from 1 (the first epoch is 1), got {start_epoch}")
    start_epoch = as_integer(start_epoch, "fit: start_epoch", 1)
    if start_epoch > epochs:
        raise ValueError(f"fit: start_epoch {start_epoch} is after the last epoch (epochs={epochs}): nothing would be trained")
    if validation is not None:
        _check_validation(model, validation)
        if communicator is None or communicator.size == 1:
            # On the device once, not again at every epoch's evaluation (a GPU would receive the whole
            # set in floats each time). Processes of a job each send only their share, per epoch.
            images, labels = validation
            validation = (model.backend.to_device(images, dtype=model.backend.dtype), labels)
    trainer = Trainer(
        model, optimizer, loader, schedule=schedule, augment=augment, log_every=log_every, communicator=communicator,
        label_smoothing=label_smoothing,
    )
    history: list[EpochStats] = []
    for epoch in range(start_epoch, epochs + 1):
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        started = time.perf_counter()
        train_loss, train_accuracy, samples = trainer.run_epoch(epoch, on_interval)
        model.backend.synchronize()
        seconds = time.perf_counter() - started
        try:
            val = (
                evaluate(model, *validation, validation_batch_size, communicator=trainer.communicator)
                if validation is not None else {"loss": None, "accuracy": None}
            )
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
