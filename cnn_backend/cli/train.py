"""The ``train`` command: one process, or every process of an ``mpiexec`` data-parallel job."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy

from ..augment import AUGMENTATIONS, make_augmentation
from ..backend import DEVICES, DTYPES
from ..checkpoint import Checkpoint, load_checkpoint
from ..data import BatchLoader, Normalization
from ..datasets import source_kind
from ..datasets.folder import CHANNEL_CHOICES
from ..distributed import CheckedCollectives, bind_device, check_processes_agree, communicator_for_backend, world_communicator
from ..faults import pause_point
from ..functional import CONV_ALGORITHMS
from ..inputs import InputSpec
from ..layers import Convolution
from ..optim import OPTIMIZERS, make_optimizer
from ..report import confusion_matrix, matplotlib_available, plot_confusion_matrix, plot_curves, plot_filters
from ..runfolder import BEST_CHECKPOINT, HISTORY_FILE, LAST_CHECKPOINT, AgreedStops, RunFolder
from ..serialization import FileWriteError
from ..spec import BUILTIN_NAMES, SpecError
from ..summary import format_summary
from ..training import (
    OPTIMIZER_DEFAULTS, RECIPES, SCHEDULES, NonFiniteLossError, evaluate, fit, has_batchnorm, refuse_batches_batchnorm_cannot_take,
    schedule_for_run, schedule_from_config,
)
from .arguments import (
    DATA_METAVAR,
    add_command,
    add_import_option,
    fraction,
    image_size_text,
    learning_rate,
    model_text,
    non_negative_float,
    non_negative_int,
    open_fraction,
    positive_int,
    range_text,
    select_range,
)
from .console import (
    EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, PROG, failure, out_of_memory, output_closed, print_error, say, silent,
)
from .recorder import (
    NO_CHECKPOINT,
    EpochProgress,
    RunRecorder,
    format_epoch_line,
    good_checkpoint_text,
    options_not_stored,
    resume_command,
    refuse_files_of_another_run,
    same_folder,
)
from .runtime import build_model, check_environment_variables, check_spec_file, open_backend, quiet_float_warnings
from .settings import (
    DROPOUT_MODELS,
    FALLBACK_TRAIN_SHARE,
    FOLDER_VALIDATION_FRACTION,
    FULL_RANGES,
    SETTING_NAMES,
    array_digest,
    load_training_data,
    missing_classes_notes,
    option_flag,
    optimizer_config,
    refuse_changed_images,
    refuse_other_ranges,
    resolve_settings,
    resolve_validation,
)

#: seconds a failing process other than rank 0 waits before ending the job, so that an error every
#: process meets is reported once, by rank 0; and after Ctrl-C, the time rank 0 has to finish
#: writing an epoch's files. A usage error (a bad option or a batch the processes cannot share) is
#: met by every process from the same settings, so the others wait long enough for a rank 0 that
#: started late on a busy machine: 2 s was sometimes too short, and rank 1 spoke instead.
FAILURE_GRACE_SECONDS, USAGE_GRACE_SECONDS, INTERRUPT_GRACE_SECONDS = 2.0, 30.0, 10.0

CURVES_PLOT, CONFUSION_PLOT, FILTERS_PLOT = "curves.png", "confusion_matrix.png", "filters.png"

#: the image side the built-in networks are made for, suggested to --image-size when an image
#: folder's images are too small for the network
HINTED_IMAGE_SIZE = 28


def add_train_command(commands) -> None:
    def recipe_default(key: str, models=tuple(RECIPES)) -> str:
        return ", ".join(f"{model} model {RECIPES[model][key]}" for model in models)

    train = add_command(
        commands, "train", run_train,
        help="train a model; writes history, checkpoints and plots to --out",
        description="Train a model on a dataset (Fashion-MNIST by default). Options left out take the model's recipe "
        "(cnn_backend.training.RECIPES) or, with --resume, the values stored in the checkpoint.",
    )
    model = train.add_argument_group("model and data")
    model.add_argument("--model", type=model_text, metavar="seed|default|plain|FILE", help="architecture: seed (the seed "
                       "article's one-filter network), default (a two-block BatchNorm CNN, used when --model is left out), plain "
                       "(a two-block CNN without BatchNorm), or an architecture file (.toml or .json, see docs/spec-format.md; "
                       "trained with the plain model's recipe, without its dropout)")
    add_import_option(model)
    model.add_argument("--dropout", type=fraction, metavar="RATE", help="dropout before the output layer, default and plain "
                       f"models only (default: {recipe_default('dropout', DROPOUT_MODELS)}); an architecture file writes its own Dropout layers")
    model.add_argument("--augment", choices=AUGMENTATIONS, help="training-time augmentation on the device: none, "
                       f"flip (random left-right flips), crop1-flip or crop-flip (random shifts of up to 1 or 2 pixels, and left-right flips), "
                       f"crop1 or crop (the shifts alone) (default: {recipe_default('augment')}; without the flips on mnist and kmnist, "
                       "whose classes mirroring changes)")
    model.add_argument("--dtype", choices=DTYPES, help="floating-point type of parameters and activations (default: float32)")
    model.add_argument("--conv-algorithm", choices=("auto",) + CONV_ALGORITHMS, help="convolution algorithm (default: auto)")
    model.add_argument("--data", metavar=DATA_METAVAR, help="the data: auto (the default: the downloaded Fashion-MNIST "
                       "if present, else its bundled 10,000-image subset), bundled, a dataset name (fashion-mnist, mnist, "
                       "kmnist, cifar10: fetched by `cnn-backend download NAME`), or a folder: of IDX files, of CIFAR-10 "
                       "binary batches, or of class sub-folders of images (DIR/<class>/<image>, or DIR/train/<class>/...)")
    model.add_argument("--image-size", type=image_size_text, metavar="N|HxW", help="image folders: resize every image to "
                       "this size (default: the most common size in the folder)")
    model.add_argument("--channels", type=int, choices=CHANNEL_CHOICES, help="image folders: 1 (greyscale) or 3 (RGB) "
                       "(default: 3 if any image is in colour, else 1)")
    model.add_argument("--strict", action="store_true", default=None, help="image folders: refuse files that are not "
                       "usable images instead of skipping them")
    model.add_argument("--normalize", action="store_true", default=None, help="normalise each channel by the mean and "
                       "standard deviation of the training images (recorded in the checkpoint)")
    model.add_argument("--val-fraction", type=open_fraction, metavar="FRACTION", help="validate on a seeded, stratified "
                       f"hold-out of this share of every class instead of ranges (default for image folders: "
                       f"{FOLDER_VALIDATION_FRACTION:g})")
    model.add_argument("--train-split", type=range_text, metavar="START:STOP", help="training images, a slice of the "
                       f"training set (default: seed model {RECIPES['seed']['train_split']}; other models "
                       f"{FULL_RANGES[0]} on the full data, the first {FALLBACK_TRAIN_SHARE * 100:.0f}%% of a smaller set "
                       "such as the bundled one)")
    model.add_argument("--val-split", type=range_text, metavar="START:STOP", help="validation images (default: "
                       f"seed model {RECIPES['seed']['val_split']}; other models {FULL_RANGES[1]} on the full data, "
                       f"the last {100 - FALLBACK_TRAIN_SHARE * 100:.0f}%% of a smaller set; with --train-split alone, "
                       "the larger side it leaves)")

    optimisation = train.add_argument_group("optimisation")
    optimisation.add_argument("--epochs", type=positive_int, help=f"last epoch to train (default: {recipe_default('epochs')})")
    optimisation.add_argument("--batch-size", type=positive_int, help=f"samples per step (default: {recipe_default('batch_size')})")
    optimisation.add_argument("--optimizer", choices=sorted(OPTIMIZERS), help=f"(default: {recipe_default('optimizer')})")
    def against_recipe(key: str) -> str:
        return "an optimizer chosen against its recipe: " + ", ".join(f"{name} {values[key]}" for name, values in OPTIMIZER_DEFAULTS.items())

    optimisation.add_argument("--lr", type=learning_rate,
                              help=f"base learning rate (default: {recipe_default('lr')}; {against_recipe('lr')})")
    optimisation.add_argument("--momentum", type=fraction,
                              help=f"SGD momentum, or Adam's beta1 (default: {recipe_default('momentum')}; {against_recipe('momentum')})")
    optimisation.add_argument("--weight-decay", type=non_negative_float, help=f"L2 (SGD) or decoupled (Adam) weight decay "
                              f"(default: {recipe_default('weight_decay')})")
    optimisation.add_argument("--schedule", choices=SCHEDULES, help="learning rate over the run: constant; step (x0.1 every "
                              f"ceil(epochs/3) epochs); cosine decay to 0; one-cycle (up from lr/25 over 30%% of the run, then down to lr/250,000) "
                              f"(default: {recipe_default('schedule')})")
    optimisation.add_argument("--label-smoothing", type=fraction, metavar="EPSILON", help="train against targets "
                              "(1 - EPSILON) one-hot + EPSILON / classes, in [0, 1); validation reports the plain loss "
                              f"(default: {recipe_default('label_smoothing')})")
    optimisation.add_argument("--seed", type=non_negative_int, help="seeds the initial weights, the batch order and dropout (default: 0)")

    run = train.add_argument_group("run")
    run.add_argument("--device", choices=DEVICES, default="auto", help="cpu, cuda, or auto: cuda when usable, else cpu (default: auto)")
    run.add_argument("--out", type=Path, metavar="DIR", help="output folder (default: runs/<date-time>, or the "
                     "checkpoint's folder with --resume)")
    run.add_argument("--resume", type=Path, metavar="CHECKPOINT", help="continue the run saved in CHECKPOINT (last.npz) "
                     "up to --epochs; other options default to the stored ones")
    run.add_argument("--log-every", type=positive_int, default=50, metavar="STEPS", help="steps between progress updates "
                     "(each reads the loss back from the device once) (default: 50)")
    run.add_argument("--quiet", action="store_true", help="no progress bar: one line per epoch")
    run.add_argument("--no-plots", action="store_true", help="skip the PNG plots written at the end")


def _image_size_hint(settings: dict, backend, inputs: InputSpec) -> str:
    """For a network that cannot take an image folder's images: how to resize them, when the same
    network builds for 28x28 images (the size the built-in networks are made for); else nothing."""
    channels, height, width = inputs.input_shape
    if settings["image_size"] is not None or min(height, width) >= HINTED_IMAGE_SIZE or source_kind(settings["data"]) != "image-folder":
        return ""
    resized = dataclasses.replace(inputs, image_size=(HINTED_IMAGE_SIZE, HINTED_IMAGE_SIZE))
    try:
        build_model(settings, backend, "auto", resized)
    except ValueError:  # SpecError and the like: the size is not what stops it
        return ""
    return f"; the images are {height}x{width}: pass --image-size {HINTED_IMAGE_SIZE} to resize them to a size this network takes"


def _model_and_optimizer(settings: dict, backend, checkpoint: Checkpoint | None, conv_algorithm: str | None, inputs: InputSpec):
    """A fresh model and optimiser, or the checkpoint's; also the first epoch left to train."""
    if checkpoint is None:
        try:
            model = build_model(settings, backend, conv_algorithm or "auto", inputs)
        except SpecError as exc:
            raise SpecError(f"{exc}{_image_size_hint(settings, backend, inputs)}") from None
        optimizer = make_optimizer(settings["optimizer"], model.parameters(), backend, **optimizer_config(settings))
        return model, optimizer, 1
    if checkpoint.epoch >= settings["epochs"]:
        raise ValueError(
            f"{checkpoint.path} already finished epoch {checkpoint.epoch} of {settings['epochs']}: "
            f"nothing to resume; pass --epochs N (N > {checkpoint.epoch}) to train further"
        )
    model = checkpoint.build_model(backend)
    if model.input_shape is not None and tuple(model.input_shape) != inputs.input_shape:
        raise ValueError(f"{checkpoint.path} holds a model for inputs of shape {tuple(model.input_shape)}, the data has {inputs.input_shape}")
    if conv_algorithm:
        for _, layer in model.named_layers():
            if isinstance(layer, Convolution):
                layer.algorithm = conv_algorithm
    optimizer = checkpoint.build_optimizer(model, **optimizer_config(settings))
    return model, optimizer, checkpoint.epoch + 1


def run_train(args) -> int:
    """The ``train`` command: in this process, or in every process of an ``mpiexec`` job."""
    world = world_communicator()
    if world.size == 1:
        return _train(args, world)
    return _train_in_job(args, world)


def _train_in_job(args, world) -> int:
    """One process of a data-parallel job. A failure anywhere ends the whole job (``MPI_Abort``)
    within seconds, with one line naming the process and the reason, instead of leaving the
    others waiting in a collective operation."""
    held: list = []
    try:
        status = _train(args, world, held)
    except BaseException as exc:
        try:
            status, message, prefix = failure(exc)
        except BaseException:  # not a known error: still one line, and the job must end
            status, message, prefix = EXIT_FAILED, f"{type(exc).__name__}: {exc}", "error: "
        if isinstance(exc, KeyboardInterrupt):  # every process was interrupted: rank 0 says so
            if world.is_root:
                print_error(message, prefix)
            else:  # said below if rank 0 was not (a signal to this process alone, before training)
                held.append((message, prefix))
        else:
            _wait_for_rank_0(world, USAGE_GRACE_SECONDS if status == EXIT_USAGE else FAILURE_GRACE_SECONDS)
            print_error(f"rank {world.rank} of {world.size}: {message}", prefix)
            world.abort(status)
    if status == EXIT_OK:
        # Rank 0 alone finishes the run (the plots, the summary): the others wait for it here, where
        # their signal handlers stay in place, instead of in MPI_Finalize, where a Ctrl-C or SIGTERM
        # would kill them and MPI the job without a word. A stop signal rank 0 meets meanwhile ends
        # the job from there (MPI_Abort); one held here after the run finished changes nothing.
        with contextlib.suppress(KeyboardInterrupt):
            world.barrier()
        return status
    # Rank 0 has reported (a non-finite loss, Ctrl-C) and ends the job; the others give it time.
    _wait_for_rank_0(world, FAILURE_GRACE_SECONDS if status == EXIT_FAILED else INTERRUPT_GRACE_SECONDS)
    if held:  # still running: rank 0 did not meet this (a signal sent to this process alone)
        message, prefix = held[-1]
        print_error(f"rank {world.rank} of {world.size}: {message}", prefix)
    world.abort(status)
    return status


def _wait_for_rank_0(world, seconds: float) -> None:
    """Give rank 0 ``seconds`` to report and end the job first. Ctrl-C or SIGTERM ends the wait,
    not the process: it goes on to report and end the job itself, where exiting would leave the
    others waiting in a collective operation (and this one in ``MPI_Finalize``) forever."""
    if not world.is_root:
        with contextlib.suppress(KeyboardInterrupt):
            time.sleep(seconds)


def _train(args, world, held: list | None = None) -> int:
    """Train in this process; ``world`` is the job's communicator (one process for a plain run).
    Rank 0 alone prints and writes files; the other processes put the ``(message, prefix)`` of
    their failure report in ``held``, said only if rank 0 does not end the job first."""
    check_environment_variables()
    # The file's identity before it is read: once the folder is locked, a change means another run
    # committed an epoch in between.
    resumed_identity = _file_identity(args.resume) if args.resume else None
    checkpoint = load_checkpoint(args.resume) if args.resume else None
    explicit = {key: getattr(args, key) for key in SETTING_NAMES if getattr(args, key) is not None}
    settings = resolve_settings(explicit, checkpoint)
    if checkpoint is None and settings["model"] not in BUILTIN_NAMES:
        check_spec_file(settings["model"])  # refused before the data is read; shapes are checked once it is
    backend, device_line = open_backend(args.device, settings["dtype"])
    gpu = bind_device(backend, world.local_rank)
    if gpu is not None and world.size > 1:
        device_line += f"; rank {world.rank} on GPU {gpu}"
    communicator, distributed_line = communicator_for_backend(world, backend)

    data = load_training_data(settings, checkpoint if "data" not in explicit else None, progress=not args.quiet and world.is_root)
    images, labels = data.images, data.labels
    pairing_note = None
    if checkpoint is not None:  # first: other images (--image-size, --channels) also change a hold-out's digest
        inputs = checkpoint.input_spec()
        pairing_note = inputs.check(data, f"--data {settings['data']}")
        refuse_other_ranges(checkpoint, explicit, len(labels))
    if checkpoint is None and (source_kind(settings["data"]) in ("cifar10", "cifar10-folder", "image-folder")
                               or not _recipe_ranges_fit(settings, explicit, len(labels))
                               or ("train_split" in explicit) != ("val_split" in explicit)):
        # A recipe's ranges (the seed experiment's 5,000 + 5,000) are made for the 60,000-image IDX
        # sets: other data, or an IDX folder of fewer images, is split by the general rule; so is a
        # run given one range, whose other range is then the rest (no overlap with the recipe's).
        for key in ("train_split", "val_split"):
            if key not in explicit:
                settings[key] = None
    train_window, val_window, split_line = resolve_validation(settings, data, explicit, resumed=checkpoint is not None)
    for digest, selection, windows in (("holdout_of", "its hold-out", ()), ("ranges_of", "its ranges", (train_window, val_window))):
        if checkpoint is not None:
            refuse_changed_images(
                settings["data"], checkpoint.path, checkpoint.settings.get(digest), settings.get(digest), data,
                f"{selection} would now mix training and validation images", "resume on the same files, or start a new run",
                windows=windows, trained_on=checkpoint.settings.get("data"),
            )
    split_notes = missing_classes_notes(data, train_window, val_window)
    if checkpoint is None:
        normalization = Normalization.from_images(images[train_window]) if settings["normalize"] else None
        inputs = InputSpec.for_data(data, normalization)
    model, optimizer, start_epoch = _model_and_optimizer(settings, backend, checkpoint, args.conv_algorithm, inputs)
    check_processes_agree(world, _run_facts(settings, args.log_every, checkpoint, images, labels, train_window, val_window, model))

    refuse_batches_batchnorm_cannot_take(settings["batch_size"], communicator.size, model)
    last_batch_note = _last_batch_left_out(len(labels[train_window]), settings["batch_size"], communicator.size, model)
    loader = BatchLoader(
        images[train_window], labels[train_window], backend, settings["batch_size"], seed=settings["seed"],
        num_classes=inputs.num_classes, normalization=inputs.normalization, rank=communicator.rank, size=communicator.size,
        drop_last=last_batch_note is not None,
    )
    schedule_settings = schedule_for_run(settings["schedule"], settings["lr"], settings["epochs"], len(loader))
    schedule = schedule_from_config(schedule_settings)
    validation = (inputs.prepare(images[val_window], backend.dtype), labels[val_window])
    lines = [device_line, distributed_line, f"data: {data.source}", *(f"note: {note}" for note in [*data.notes, pairing_note] if note),
             f"input: {inputs.describe()}", split_line,
             *(f"note: {note}" for note in [*split_notes, last_batch_note] if note)]
    del images, labels, data  # the loader and the validation set keep what they use
    pause_point("start")

    # Everything that can be refused has been checked: only now is the output folder touched (by
    # rank 0 alone; the others learn its name).
    folder = RunFolder.open(args.out, checkpoint.path if checkpoint is not None else None, imports=args.imports_given) if world.is_root else None
    try:
        if folder is not None and checkpoint is not None:
            _refuse_an_outdated_resume(folder.path, checkpoint, resumed_identity)
        out_dir = world.broadcast_object(folder.path if folder is not None else None)
        return _train_in_folder(
            args, folder, out_dir, world=world, communicator=communicator, settings=settings, backend=backend, model=model,
            optimizer=optimizer, start_epoch=start_epoch, checkpoint=checkpoint, loader=loader, schedule=schedule,
            schedule_settings=schedule_settings, validation=validation, lines=lines, inputs=inputs, held=held,
            # Until this run saves an epoch, a resume hint names the checkpoint it resumed, which holds
            # the settings of before: the hint repeats the ones given now.
            pending_options=options_not_stored(explicit, checkpoint) if checkpoint is not None else (),
        )
    finally:
        if folder is not None:
            folder.close()


def _last_batch_left_out(samples: int, batch_size: int, processes: int, model) -> str | None:
    """Why an epoch's last, partial batch is left out (None: it is used): when some process would get
    no sample of it, or a BatchNorm network a single one (whose statistics it cannot take). A
    different image is left out each epoch, as the order is shuffled."""
    last = samples % batch_size
    smallest = 2 if has_batchnorm(model) else 1
    if last == 0 or last // processes >= smallest:
        return None
    if samples < batch_size:
        raise ValueError(
            f"the training split holds {samples} image{'s' if samples > 1 else ''}, too few to train on: a batch needs "
            f"at least {smallest * processes} here; give --train-split more images"
        )
    images = f"{last} image{'s' if last > 1 else ''}"
    why = f"fewer than the {processes} processes" if last < processes else (
        "and BatchNorm cannot take statistics over a single sample" if processes == 1 else
        "so a process would get a single sample, and BatchNorm cannot take statistics over it")
    return (f"the last batch of each epoch ({samples:,} = {samples // batch_size:,} x {batch_size} + {last}) would hold "
            f"{images}, {why}: it is left out (another batch size keeps it)")


def _recipe_ranges_fit(settings: dict, explicit: dict, total: int) -> bool:
    """Whether the ranges the recipe gave (not the options) lie within ``total`` images."""
    for key in ("train_split", "val_split"):
        if key in explicit or not settings[key]:
            continue
        try:
            select_range(settings[key], total, key)
        except ValueError:  # DataError too: past the end
            return False
    return True


def _file_identity(path) -> tuple | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_ino, status.st_size, status.st_mtime_ns


def _refuse_an_outdated_resume(out_dir: Path, checkpoint: Checkpoint, identity_when_read) -> None:
    """With the output folder locked: refuse a checkpoint that another run replaced after this one
    read it, one older than its own folder's last.npz, whose later epochs resuming there would
    overwrite (``best.npz`` of a run that went on), and one of another run than the folder's
    last.npz, history.jsonl or best.npz."""
    if not same_folder(out_dir, checkpoint.path.parent):
        return  # a new folder: nothing there to overwrite, and the file read was whole
    if _file_identity(checkpoint.path) != identity_when_read:
        raise ValueError(
            f"{checkpoint.path} changed after this run read it (epoch {checkpoint.epoch}): another run wrote to its "
            f"folder meanwhile; resume again to continue from its last epoch"
        )
    last = out_dir / LAST_CHECKPOINT
    if not last.exists() or os.path.samefile(last, checkpoint.path):
        # Copied over last.npz, another run's checkpoint is told by the folder's other files.
        refuse_files_of_another_run(out_dir, checkpoint)
        return
    folder_run = load_checkpoint(last)
    # A checkpoint of another run put in this folder: the runs' histories part, so resuming here
    # would replace this folder's run with that one.
    epoch = next((row for row, (ours, theirs) in enumerate(zip(folder_run.history, checkpoint.history), 1) if ours != theirs), None)
    if epoch is not None:
        raise ValueError(
            f"{checkpoint.path} is not from the run in {out_dir} (their histories differ from epoch {epoch}): resuming "
            f"it there would overwrite that run; add --out NEW_FOLDER"
        )
    latest = folder_run.epoch
    if latest > checkpoint.epoch:
        later = f"epoch {latest}" if latest == checkpoint.epoch + 1 else f"epochs {checkpoint.epoch + 1}-{latest}"
        raise ValueError(
            f"{checkpoint.path} holds epoch {checkpoint.epoch} but {last} holds epoch {latest}: resuming it in its own "
            f"folder would overwrite {later}; resume {last}, or add --out NEW_FOLDER to go on from epoch "
            f"{checkpoint.epoch} there"
        )
    refuse_files_of_another_run(out_dir, checkpoint)


def _run_facts(settings: dict, log_every: int, checkpoint, images, labels, train_window, val_window, model) -> dict:
    """What every process of a job must share: the settings, the log interval (when the losses are
    all-reduced), the resumed epoch, the data (sizes, the labels' digest and a sample of the
    images') and the parameter count."""
    training = numpy.arange(len(labels))[train_window]  # positions only: the images are not copied
    return {
        # The data by content, not by name: a folder's absolute path may differ from machine to machine.
        **{option_flag(key): value for key, value in settings.items() if key in SETTING_NAMES and key != "data"},
        "--log-every": log_every,
        "the resumed epoch": None if checkpoint is None else checkpoint.epoch,
        "training images": len(training), "validation images": len(labels[val_window]),
        "an image shape": tuple(images.shape[1:]),
        "training labels (digest)": array_digest(labels[train_window]),
        "validation labels (digest)": array_digest(labels[val_window]),
        "training images (digest of a sample)": array_digest(images[training[:: max(1, len(training) // 64)]]),
        "parameters": sum(param.data.size for param in model.parameters()),
    }


def _train_in_folder(args, folder, out_dir, *, world, communicator, settings, backend, model, optimizer, start_epoch,
                     checkpoint, loader, schedule, schedule_settings, validation, lines, inputs: InputSpec,
                     held: list | None = None, pending_options=()) -> int:
    """The training run; ``folder`` is None on the processes other than rank 0, which neither print
    nor write (their failure report goes into ``held``, see :func:`_train`). ``pending_options``:
    what a resume hint naming ``checkpoint`` repeats."""
    announce = say if world.is_root else silent

    def report_error(message, prefix: str = "error: ") -> None:
        if world.is_root:
            print_error(message, prefix)
        elif held is not None:
            held.append((message, prefix))
    history, best = [], {"epoch": None, "val_accuracy": None}
    if checkpoint is not None:
        history = checkpoint.history
        # best.npz of another folder is not carried over: there, best tracking starts afresh.
        if same_folder(out_dir, checkpoint.path.parent):
            best = checkpoint.best

    announce(f"{PROG} train: {_describe_settings(settings)}")
    for line in lines:
        announce(line)
    if checkpoint is not None:
        epochs = f"epoch {start_epoch}" if start_epoch == settings["epochs"] else f"epochs {start_epoch}-{settings['epochs']}"
        announce(f"resuming: {checkpoint.path} (epoch {checkpoint.epoch}), training {epochs}")
        if checkpoint.schedule != schedule_settings:
            announce(f"note: the learning-rate schedule changes on resuming, from {_describe_schedule(checkpoint.schedule)} "
                     f"to {_describe_schedule(schedule_settings)}")
    announce(f"outputs: {out_dir}")
    announce(format_summary(model.summary()))

    recorder = None
    progress = EpochProgress(
        settings["epochs"], len(loader), settings["batch_size"], loader.num_samples,
        show_bar=not args.quiet and sys.stderr.isatty() and world.is_root,
    )

    def epoch_finished(stats) -> None:
        progress.close()
        if recorder is not None:
            recorder.record(stats, committed=lambda improved: announce(format_epoch_line(stats, settings["epochs"], improved)))

    def intact(resume_hint: bool) -> str:
        if folder is None and progress.epoch is not None and progress.epoch > start_epoch:
            # Not rank 0: an epoch finished here, and rank 0 commits each one before the next step.
            last = out_dir / LAST_CHECKPOINT
            return f"rank 0 keeps the last epoch it committed in {last}" + (
                f"; resume with: {resume_command(last, None, args.imports_given, world.size)}" if resume_hint else "")
        if recorder is None:
            if checkpoint is None:
                return NO_CHECKPOINT
            out = None if same_folder(out_dir, checkpoint.path.parent) else out_dir
            return good_checkpoint_text(checkpoint.path, checkpoint.epoch, out, args.imports_given, resume_hint, world.size,
                                        pending_options)
        return recorder.intact_text(resume_hint=resume_hint)

    stage = "training"
    try:
        if folder is not None:
            recorder = RunRecorder(folder, model, optimizer, schedule,
                                   {**settings, "device": backend.name, "processes": communicator.size},
                                   history=history, best=best, resumed=checkpoint, inputs=inputs, imports=args.imports_given,
                                   resume_options=pending_options)
        pause_point("folder")
        started = time.perf_counter()
        # In a job, a stop signal is held until the processes' next collective, where all agree to stop.
        with quiet_float_warnings(), AgreedStops(world) if world.size > 1 else contextlib.nullcontext() as stops:
            fit(
                model, optimizer, loader, settings["epochs"], validation=validation, schedule=schedule,
                augment=make_augmentation(settings["augment"], backend, settings["seed"], inputs.normalization),
                start_epoch=start_epoch, on_epoch_start=progress.start, on_interval=progress.update,
                on_epoch_end=epoch_finished, log_every=args.log_every,
                communicator=communicator if stops is None else CheckedCollectives(communicator, stops.agree),
                label_smoothing=settings["label_smoothing"],
            )
        training_seconds = time.perf_counter() - started
        if folder is None:
            return EXIT_OK
        stage = "plots"
        pause_point("plots")
        plots = [] if args.no_plots else _write_training_plots(out_dir, model, recorder.history, validation, inputs.class_names)
    except (KeyboardInterrupt, BrokenPipeError) as exc:
        progress.close()
        if isinstance(exc, BrokenPipeError):  # `train ... | head`: stopped as by SIGPIPE, with the checkpoint named
            what, status = "stopped: its standard output was closed", output_closed()
        else:
            what, status = getattr(exc, "description", "interrupted"), getattr(exc, "exit_status", EXIT_INTERRUPTED)
        if stage == "plots":
            report_error(f"{what} while drawing the plots; training finished: {intact(resume_hint=False)}", prefix="")
        else:
            epoch = progress.epoch or start_epoch
            saved = recorder is not None and recorder.last_saved_epoch == epoch  # stopped while writing its files
            # After the last epoch's files there is nothing left to resume (--resume would refuse it).
            finished = saved and epoch == settings["epochs"]
            report_error(f"{what} {'after' if saved else 'during'} epoch {epoch}; {intact(resume_hint=not finished)}", prefix="")
        return status
    except NonFiniteLossError as exc:
        progress.close()
        report_error(f"{exc}; {intact(resume_hint=False)}")
        return EXIT_FAILED
    except FileWriteError as exc:
        progress.close()
        report_error(f"{exc}; {intact(resume_hint=False)}; free space or choose another --out")
        return EXIT_FAILED
    except MemoryError as exc:
        progress.close()
        report_error(f"{out_of_memory(exc)}; {intact(resume_hint=True)}")
        return EXIT_FAILED
    finally:
        if recorder is not None:
            recorder.close()

    announce(_summary_line(recorder, settings["epochs"] - start_epoch + 1, training_seconds, backend))
    written = [HISTORY_FILE, LAST_CHECKPOINT] + ([BEST_CHECKPOINT] if (out_dir / BEST_CHECKPOINT).exists() else []) + plots
    announce(f"outputs in {out_dir}: {', '.join(written)}")
    return EXIT_OK


def _summary_line(recorder: RunRecorder, epochs_run: int, seconds: float, backend) -> str:
    if recorder.best["epoch"] is not None:
        best = f"best validation accuracy {recorder.best['val_accuracy']:.4f} at epoch {recorder.best['epoch']}"
    else:
        best = "no validation accuracy recorded"
    throughput = recorder.samples / recorder.seconds if recorder.seconds else 0.0
    return (
        f"done: {best}; {epochs_run} epoch{'s' if epochs_run != 1 else ''} in {seconds:.1f} s, "
        f"{throughput:,.0f} training samples/s on {backend.name} ({backend.dtype.name})"
    )


def _describe_schedule(schedule: dict | None) -> str:
    """``cosine (base lr 0.002, total steps 125, warmup steps 12, min lr 0)`` for a schedule's settings."""
    if not schedule:
        return "none"
    details = ", ".join(
        f"{key.replace('_', ' ')} {value:g}" if isinstance(value, (int, float)) else f"{key.replace('_', ' ')} {value}"
        for key, value in schedule.items() if key != "name"
    )
    return f"{schedule.get('name', 'schedule')} ({details})" if details else str(schedule.get("name"))


def _describe_settings(settings: dict) -> str:
    momentum_name = "beta1" if settings["optimizer"] == "adam" else "momentum"
    text = (
        f"{settings['model']} model, {settings['optimizer']} lr {settings['lr']:g} {momentum_name} {settings['momentum']:g} "
        f"weight decay {settings['weight_decay']:g}, {settings['schedule']} schedule, batch {settings['batch_size']}, "
        f"{settings['epochs']} epoch{'s' if settings['epochs'] != 1 else ''}, seed {settings['seed']}, {settings['dtype']}"
    )
    text += f", dropout {settings['dropout']:g}" if settings["dropout"] else ""
    text += f", label smoothing {settings['label_smoothing']:g}" if settings["label_smoothing"] else ""
    return text + (f", augment {settings['augment']}" if settings["augment"] != "none" else "")


def _write_training_plots(out_dir: Path, model, history: list[dict], validation, class_names) -> list[str]:
    """Curves, validation confusion matrix and first-layer filters; skipped without matplotlib."""
    if not matplotlib_available():
        say("plots skipped: matplotlib is not installed (pip install 'cnn-backend[plot]')")
        return []
    images, labels = validation
    predictions = evaluate(model, images, labels, with_predictions=True)["predictions"]
    confusion = confusion_matrix(labels, predictions, len(class_names))
    plot_curves(history, out_dir / CURVES_PLOT)
    epoch = history[-1]["epoch"]
    plot_confusion_matrix(confusion, class_names, out_dir / CONFUSION_PLOT, title=f"validation confusion matrix, epoch {epoch}")
    written = [CURVES_PLOT, CONFUSION_PLOT]
    first_conv = next((layer for _, layer in model.named_layers() if isinstance(layer, Convolution)), None)
    if first_conv is not None:
        plot_filters(model.backend.to_numpy(first_conv.params["weight"].data), out_dir / FILTERS_PLOT,
                     title=f"first convolution layer filters, epoch {epoch}")
        written.append(FILTERS_PLOT)
    return written
