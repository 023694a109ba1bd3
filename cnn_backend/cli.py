"""The ``cnn-backend`` command line: ``train``, ``evaluate``, ``predict``, ``summary``, ``download``, ``benchmark``,
``parity``, ``export``.

:func:`main` returns the exit status: 0 on success, 1 when training fails (non-finite loss) or a file
cannot be written, 2 for bad usage, an unusable device, or unreadable data or checkpoints, and 130
when interrupted. Known errors are reported as one line, ``cnn-backend: error: <message>``, on
stderr, without a traceback; usage errors too (with the command's ``--help`` to see). SIGTERM is
handled like Ctrl-C, with exit status 143. Results go to stdout; the progress bar and errors go to stderr.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy

from . import __version__
from .augment import AUGMENTATIONS, make_augmentation
from .backend import DEVICES, DTYPES, DeviceUnavailableError, get_backend
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .data import BUNDLED_COUNT, BatchLoader, DataError, Normalization, download, stratified_holdout
from .datasets import DATA_DIR_ENV, DATASETS, dataset_dir, download_dataset, load_dataset, source_kind
from .datasets.folder import CHANNEL_CHOICES, parse_image_size
from .distributed import DistributedSetupError, bind_device, communicator_for_backend, world_communicator
from .inputs import InputSpec
from .predict import predict_files
from .functional import CONV_ALGORITHMS
from .layers import Convolution, ShapeError
from .model import EVALUATION_BATCH_SIZE, default_cnn, seed_cnn
from .spec import BUILTIN_NAMES, SpecError, build_model as build_spec_model, normalize_spec, resolve_spec
from .summary import format_summary
from .optim import OPTIMIZERS, make_optimizer
from .report import (
    HistoryWriter,
    classification_report,
    confusion_matrix,
    format_report,
    matplotlib_available,
    plot_confusion_matrix,
    plot_curves,
    plot_filters,
    write_json,
)
from .faults import pause_point
from .runfolder import (
    BEST_CHECKPOINT,
    HISTORY_FILE,
    LAST_CHECKPOINT,
    DeferredInterrupt,
    RunFolder,
    stop_signals_raise,
)
from .serialization import FileWriteError, ModelFileError
from .training import (
    OPTIMIZER_DEFAULTS,
    RECIPES,
    SCHEDULES,
    NonFiniteLossError,
    evaluate,
    fit,
    schedule_for_run,
    schedule_from_config,
)

PROG = "cnn-backend"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

#: errors a user can fix from the command line: reported in one line, exit status 2
USER_ERRORS = (DeviceUnavailableError, DataError, ModelFileError, ShapeError, ValueError, DistributedSetupError)
#: seconds a failing process other than rank 0 waits before ending the job, so that an error every
#: process meets (a bad option) is reported once, by rank 0; and after Ctrl-C, the time rank 0 has to
#: finish writing an epoch's files
FAILURE_GRACE_SECONDS, INTERRUPT_GRACE_SECONDS = 2.0, 10.0

#: commands provided by optional modules, loaded only when invoked: name -> (module, help)
OPTIONAL_COMMANDS = {
    "benchmark": ("cnn_backend.benchmark", "measure training speed on a device"),
    "parity": ("cnn_backend.parity", "compare CPU and GPU results"),
    "export": ("cnn_backend.export", "write a checkpoint as an ONNX model"),
}

DEFAULT_MODEL = "default"
#: the per-sample shape of Fashion-MNIST images, which the built-in networks were designed for
INPUT_SHAPE = (1, 28, 28)
#: the recipe of a network from an architecture file: the default model's, without the dropout
#: that --dropout would add to the default network (a file writes its own Dropout layers)
SPEC_FILE_RECIPE = {**RECIPES["default"], "dropout": 0.0}
#: run settings that are not part of a recipe
GENERAL_DEFAULTS = {
    "seed": 0, "dtype": "float32", "data": "auto",
    "image_size": None, "channels": None, "strict": False, "val_fraction": None, "normalize": False,
}
#: what defines a run (stored in its checkpoints and restored on --resume); device, output folder
#: and display options are chosen afresh by each invocation.
SETTING_NAMES = (
    "model", "epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay", "schedule",
    "dropout", "augment", "seed", "dtype", "data", "train_split", "val_split",
    "image_size", "channels", "strict", "val_fraction", "normalize",
)
#: the training/validation split of a full 60,000-image training set
FULL_DATA_SIZE, FULL_SPLIT = 60_000, (":50000", "50000:")
#: share of a smaller data set (the bundled 10,000 images) used for training; the rest validates
FALLBACK_TRAIN_SHARE = 0.8
#: share of an image folder (ordered by class) held out per class when no split is given
FOLDER_VALIDATION_FRACTION = 0.2
DATA_METAVAR = "|".join(("auto", "bundled") + tuple(DATASETS)) + "|DIR"

CURVES_PLOT, CONFUSION_PLOT, FILTERS_PLOT = "curves.png", "confusion_matrix.png", "filters.png"


# == entry point ====================================================================================


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_name(argv)
    optional_module = None
    if command in OPTIONAL_COMMANDS:
        try:
            optional_module = load_optional_command(command)
        except ImportError as exc:
            _print_error(exc)
            return EXIT_USAGE
    parser = build_parser({command: optional_module} if optional_module else {})
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already reported in one line
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    try:
        with stop_signals_raise():
            return args.handler(args)
    except BaseException as exc:
        status, message, prefix = _failure(exc)
        _print_error(message, prefix)
        return status


def _failure(exc: BaseException) -> tuple[int, str, str]:
    """Exit status, message and prefix of a failed command; exceptions that are not known errors
    propagate (with their traceback)."""
    if isinstance(exc, KeyboardInterrupt):
        return getattr(exc, "exit_status", EXIT_INTERRUPTED), getattr(exc, "description", "interrupted"), ""
    if isinstance(exc, USER_ERRORS):
        return EXIT_USAGE, str(exc), "error: "
    if isinstance(exc, OSError):
        return EXIT_FAILED, str(exc), "error: "
    raise exc


def _print_error(message, prefix: str = "error: ") -> None:
    text = " ".join(str(message).split())  # always one line
    print(f"{PROG}: {prefix}{text}", file=sys.stderr, flush=True)


def _say(*parts) -> None:
    print(*parts, flush=True)


def _silent(*parts, **options) -> None:
    pass


def _command_name(argv: list[str]) -> str | None:
    return next((arg for arg in argv if not arg.startswith("-")), None)


# == argument parsing ===============================================================================


class OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line, ``cnn-backend: error: <message>; see <command> --help``, exit 2
    (instead of argparse's usage block before the message)."""

    def error(self, message: str):
        _print_error(f"{message}; see {self.prog} --help")
        raise SystemExit(EXIT_USAGE)


def build_parser(optional_modules: dict | None = None) -> argparse.ArgumentParser:
    """The full parser. ``optional_modules`` maps optional command names to their loaded modules;
    the others are listed in the help only, so their modules are imported just when invoked."""
    parser = OneLineParser(
        prog=PROG, description="Train and evaluate a from-scratch CNN on Fashion-MNIST, other datasets or your own images, on the CPU or a CUDA GPU."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train_command(commands)
    _add_evaluate_command(commands)
    _add_predict_command(commands)
    _add_summary_command(commands)
    _add_download_command(commands)
    for name, (_, help_text) in OPTIONAL_COMMANDS.items():
        module = (optional_modules or {}).get(name)
        description = (module.__doc__ or "").strip().split("\n\n")[0] if module is not None else ""
        sub = commands.add_parser(name, help=help_text, description=description or help_text)
        if module is not None:
            module.add_arguments(sub)
            sub.set_defaults(handler=module.run)
    return parser


def load_optional_command(name: str):
    """The module behind an optional command; ImportError (one line) when it is missing or incomplete."""
    module_name = OPTIONAL_COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"the {name} command is not available: {module_name} cannot be imported ({exc})") from None
    if not (callable(getattr(module, "add_arguments", None)) and callable(getattr(module, "run", None))):
        raise ImportError(f"the {name} command is not available: {module_name} lacks add_arguments(parser) and run(args)")
    return module


def _add_train_command(commands) -> None:
    def recipe_default(key: str) -> str:
        return ", ".join(f"{model} model {recipe[key]}" for model, recipe in RECIPES.items())

    train = commands.add_parser(
        "train",
        help="train a model; writes history, checkpoints and plots to --out",
        description="Train a model on a dataset (Fashion-MNIST by default). Options left out take the model's recipe "
        "(cnn_backend.training.RECIPES) or, with --resume, the values stored in the checkpoint.",
    )
    model = train.add_argument_group("model and data")
    model.add_argument("--model", type=_model_text, metavar="seed|default|FILE", help="architecture: seed (the seed article's "
                       "one-filter network), default (a two-block CNN, used when --model is left out), or an architecture "
                       "file (.toml or .json, see docs/spec-format.md; trained with the default model's recipe, without its dropout)")
    model.add_argument("--dropout", type=_fraction, metavar="RATE", help="dropout before the output layer, default model only "
                       f"(default: {RECIPES['default']['dropout']}); an architecture file writes its own Dropout layers")
    model.add_argument("--augment", choices=AUGMENTATIONS, help="training-time augmentation on the device: none, or "
                       f"crop-flip (random 2-pixel shifts and left-right flips) (default: {recipe_default('augment')})")
    model.add_argument("--dtype", choices=DTYPES, help="floating-point type of parameters and activations (default: float32)")
    model.add_argument("--conv-algorithm", choices=("auto",) + CONV_ALGORITHMS, help="convolution algorithm (default: auto)")
    model.add_argument("--data", metavar=DATA_METAVAR, help="the data: auto (the default: the downloaded Fashion-MNIST "
                       "if present, else its bundled 10,000-image subset), bundled, a dataset name (fashion-mnist, mnist, "
                       "kmnist, cifar10: fetched by `cnn-backend download NAME`), or a folder: of IDX files, of CIFAR-10 "
                       "binary batches, or of class sub-folders of images (DIR/<class>/<image>, or DIR/train/<class>/...)")
    model.add_argument("--image-size", type=_image_size_text, metavar="N|HxW", help="image folders: resize every image to "
                       "this size (default: the most common size in the folder)")
    model.add_argument("--channels", type=int, choices=CHANNEL_CHOICES, help="image folders: 1 (greyscale) or 3 (RGB) "
                       "(default: 3 if any image is in colour, else 1)")
    model.add_argument("--strict", action="store_true", default=None, help="image folders: refuse files that are not "
                       "usable images instead of skipping them")
    model.add_argument("--normalize", action="store_true", default=None, help="normalise each channel by the mean and "
                       "standard deviation of the training images (recorded in the checkpoint)")
    model.add_argument("--val-fraction", type=_open_fraction, metavar="FRACTION", help="validate on a seeded, stratified "
                       f"hold-out of this share of every class instead of ranges (default for image folders: "
                       f"{FOLDER_VALIDATION_FRACTION:g})")
    model.add_argument("--train-split", type=_range_text, metavar="START:STOP", help="training images, a slice of the "
                       f"training set (default: seed model {RECIPES['seed']['train_split']}; default model "
                       f"{FULL_SPLIT[0]} on the full data, the first {FALLBACK_TRAIN_SHARE * 100:.0f}%% of a smaller set "
                       "such as the bundled one)")
    model.add_argument("--val-split", type=_range_text, metavar="START:STOP", help="validation images (default: "
                       f"seed model {RECIPES['seed']['val_split']}; default model {FULL_SPLIT[1]} on the full data, "
                       f"the last {100 - FALLBACK_TRAIN_SHARE * 100:.0f}%% of a smaller set)")

    optimisation = train.add_argument_group("optimisation")
    optimisation.add_argument("--epochs", type=_positive_int, help=f"last epoch to train (default: {recipe_default('epochs')})")
    optimisation.add_argument("--batch-size", type=_positive_int, help=f"samples per step (default: {recipe_default('batch_size')})")
    optimisation.add_argument("--optimizer", choices=sorted(OPTIMIZERS), help=f"(default: {recipe_default('optimizer')})")
    optimisation.add_argument("--lr", type=_learning_rate, help=f"base learning rate (default: {recipe_default('lr')}; "
                              f"adam {OPTIMIZER_DEFAULTS['adam']['lr']} when chosen against the recipe)")
    optimisation.add_argument("--momentum", type=_fraction, help=f"SGD momentum, or Adam's beta1 (default: {recipe_default('momentum')}; "
                              f"adam {OPTIMIZER_DEFAULTS['adam']['momentum']})")
    optimisation.add_argument("--weight-decay", type=_non_negative_float, help=f"L2 (SGD) or decoupled (Adam) weight decay "
                              f"(default: {recipe_default('weight_decay')})")
    optimisation.add_argument("--schedule", choices=SCHEDULES, help="learning rate over the run: constant; step (x0.1 every "
                              f"ceil(epochs/3) epochs); cosine decay to 0 (default: {recipe_default('schedule')})")
    optimisation.add_argument("--seed", type=_non_negative_int, help="seeds the initial weights, the batch order and dropout (default: 0)")

    run = train.add_argument_group("run")
    run.add_argument("--device", choices=DEVICES, default="auto", help="cpu, cuda, or auto: cuda when usable, else cpu (default: auto)")
    run.add_argument("--out", type=Path, metavar="DIR", help="output folder (default: runs/<date-time>, or the "
                     "checkpoint's folder with --resume)")
    run.add_argument("--resume", type=Path, metavar="CHECKPOINT", help="continue the run saved in CHECKPOINT (last.npz) "
                     "up to --epochs; other options default to the stored ones")
    run.add_argument("--log-every", type=_positive_int, default=50, metavar="STEPS", help="steps between progress updates "
                     "(each reads the loss back from the device once) (default: 50)")
    run.add_argument("--quiet", action="store_true", help="no progress bar: one line per epoch")
    run.add_argument("--no-plots", action="store_true", help="skip the PNG plots written at the end")
    train.set_defaults(handler=run_train)


def _add_evaluate_command(commands) -> None:
    evaluate_parser = commands.add_parser(
        "evaluate",
        help="accuracy, per-class precision/recall/F1 and confusion matrix of a checkpoint",
        description="Evaluate a checkpoint (or model file) on a split: prints a table and writes a JSON report.",
    )
    evaluate_parser.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="a .npz written by train (or Sequential.save)")
    evaluate_parser.add_argument("--data", metavar=DATA_METAVAR, help="the data (default: the one the checkpoint was trained on)")
    evaluate_parser.add_argument("--split", choices=("train", "test"), default="train", help="train (default: the "
                                 "checkpoint's validation images) or test (datasets with a test split; for Fashion-MNIST "
                                 "the full download)")
    evaluate_parser.add_argument("--range", type=_range_text, metavar="START:STOP", help="images of the split to use (default: "
                                 "the checkpoint's validation range on train, all of test)")
    evaluate_parser.add_argument("--device", choices=DEVICES, default="auto", help="(default: auto)")
    evaluate_parser.add_argument("--dtype", choices=DTYPES, help="(default: the checkpoint's)")
    evaluate_parser.add_argument("--batch-size", type=_positive_int, default=EVALUATION_BATCH_SIZE, help="samples per forward pass "
                                 f"(default: {EVALUATION_BATCH_SIZE})")
    evaluate_parser.add_argument("--json", type=Path, metavar="PATH", help="report file (default: <checkpoint>-<split>-evaluation.json beside the checkpoint)")
    evaluate_parser.set_defaults(handler=run_evaluate)


def _add_predict_command(commands) -> None:
    predict_parser = commands.add_parser(
        "predict",
        help="the most likely classes of image files, with a trained checkpoint",
        description="Predict image files (any format Pillow reads, any size): each is converted to the model's "
        "channel count and size and normalised as in training. A file that cannot be used is reported in one "
        "line and the others are still predicted; the exit status is 2 when any failed.",
    )
    predict_parser.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="a .npz written by train (or Sequential.save)")
    predict_parser.add_argument("images", type=Path, nargs="+", metavar="IMAGE", help="image files")
    predict_parser.add_argument("--top", type=_positive_int, default=3, metavar="K", help="classes to show per image (default: 3)")
    predict_parser.add_argument("--json", action="store_true", help="print one JSON document instead of lines")
    predict_parser.add_argument("--device", choices=DEVICES, default="auto", help="(default: auto)")
    predict_parser.add_argument("--batch-size", type=_positive_int, default=256, help="images per forward pass (default: 256)")
    predict_parser.set_defaults(handler=run_predict)
def _add_summary_command(commands) -> None:
    summary_parser = commands.add_parser(
        "summary",
        help="print a network's layers, output shapes, parameter counts and MACs",
        description="Build a network (a built-in name or an architecture file) for an input shape and print its "
        "layers with output shape, parameters and multiply-accumulates per sample, then the totals and the parameter memory.",
    )
    summary_parser.add_argument("--model", type=_model_text, default=DEFAULT_MODEL, metavar="seed|default|FILE",
                                help="a built-in network or a .toml/.json architecture file (default: default)")
    summary_parser.add_argument("--input-shape", type=_input_shape, default=INPUT_SHAPE, metavar="C,H,W",
                                help="per-sample input shape, channels,height,width (or features) (default: 1,28,28, Fashion-MNIST)")
    summary_parser.add_argument("--dtype", choices=DTYPES, default="float32", help="for the parameter memory (default: float32)")
    summary_parser.set_defaults(handler=run_summary)


def _add_download_command(commands) -> None:
    download_parser = commands.add_parser(
        "download",
        help="fetch a dataset (Fashion-MNIST, MNIST, KMNIST, CIFAR-10) and verify it",
        description="Download a dataset's official files and check their published MD5s (CIFAR-10 is then unpacked).",
    )
    download_parser.add_argument("name", nargs="?", default="fashion-mnist", choices=tuple(DATASETS), metavar="NAME",
                                 help=f"one of {', '.join(DATASETS)} (default: fashion-mnist)")
    download_parser.add_argument("--data-dir", type=Path, metavar="DIR", help="target folder (default: "
                                 "$CNN_BACKEND_DATA/NAME, else NAME in the user cache)")
    download_parser.set_defaults(handler=run_download)


# -- argument types: a bad value is a usage error (status 2) ---------------------------------------


def _positive_int(text: str) -> int:
    value = _parse(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    value = _parse(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def _learning_rate(text: str) -> float:
    value = _parse(float, text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    value = _parse(float, text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _open_fraction(text: str) -> float:
    value = _parse(float, text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text!r}")
    return value


def _image_size_text(text: str) -> str:
    try:
        parse_image_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _fraction(text: str) -> float:
    value = _parse(float, text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text!r}")
    return value


def _parse(kind, text: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None


def _model_text(text: str) -> str:
    if text in BUILTIN_NAMES or Path(text).suffix in (".toml", ".json"):
        return text
    raise argparse.ArgumentTypeError(f"choose {', '.join(BUILTIN_NAMES)}, or an architecture file ending in .toml or .json, got {text!r}")


def _input_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) not in (1, 3) or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected C,H,W (e.g. 1,28,28) or a feature count, got {text!r}")
    return shape


def _range_text(text: str) -> str:
    parse_range(text)  # syntax only; bounds are checked against the data
    return text


def parse_range(text: str) -> tuple[int | None, int | None]:
    """``"START:STOP"`` (either end may be empty) as ``(start, stop)``; raises ArgumentTypeError."""
    start, colon, stop = text.partition(":")
    try:
        if not colon:
            raise ValueError
        bounds = tuple(int(part) if part.strip() else None for part in (start, stop))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:STOP (e.g. :5000 or 5000:10000), got {text!r}") from None
    if any(bound is not None and bound < 0 for bound in bounds):
        raise argparse.ArgumentTypeError(f"START and STOP must be >= 0, got {text!r}")
    return bounds


def select_range(text: str, total: int, option: str) -> slice:
    """The slice ``text`` names in a split of ``total`` images; ValueError when empty or out of bounds."""
    start, stop = parse_range(text)
    start = 0 if start is None else start
    stop = total if stop is None else stop
    if stop > total:
        raise DataError(
            f"{option} {text} reaches past the {total:,} images available"
            + ("; run `cnn-backend download` for the full 60,000" if total == BUNDLED_COUNT else "")
        )
    if start >= stop:
        raise ValueError(f"{option} {text} selects no images")
    return slice(start, stop)


def _range_label(window: slice) -> str:
    return f"[{window.start}:{window.stop}] ({window.stop - window.start:,} images)"


# == train ==========================================================================================


def resolve_settings(explicit: dict, checkpoint: Checkpoint | None = None) -> dict:
    """The run settings: explicit options, else (with a checkpoint) the stored ones, else the recipe.

    The model and optimiser of a resumed run are fixed by its checkpoint; asking for others is an
    error. Choosing an optimiser other than the recipe's brings that optimiser's own defaults.
    """
    stored = {key: value for key, value in (checkpoint.settings if checkpoint else {}).items() if key in SETTING_NAMES}
    for key in ("model", "optimizer"):
        if stored.get(key) and explicit.get(key) not in (None, stored[key]):
            raise ValueError(
                f"{checkpoint.path} was trained with --{key} {stored[key]}, so --{key} {explicit[key]} cannot "
                f"resume it (start a new run without --resume instead)"
            )
    model = explicit.get("model") or stored.get("model") or DEFAULT_MODEL
    recipe = RECIPES.get(model, SPEC_FILE_RECIPE)
    optimizer = explicit.get("optimizer") or stored.get("optimizer") or recipe["optimizer"]
    defaults = {**GENERAL_DEFAULTS, **recipe}
    if optimizer != recipe["optimizer"]:
        defaults.update(OPTIMIZER_DEFAULTS[optimizer])
    settings = {**defaults, **stored, **explicit, "model": model, "optimizer": optimizer}
    if settings["dropout"] and model != "default":
        hint = "" if model in BUILTIN_NAMES else "; write a Dropout layer into the architecture file instead"
        raise ValueError(f"--dropout applies to the default model only, not {model}{hint}")
    return {key: settings[key] for key in SETTING_NAMES}


def resolve_ranges(settings: dict, total: int) -> tuple[slice, slice, str]:
    """Training and validation slices of ``total`` images, and one line saying which were chosen.

    Ranges left to the data (None) are decided here and written back into ``settings``, so the
    checkpoints record the ranges actually used.
    """
    train_text, val_text = settings["train_split"], settings["val_split"]
    if train_text is None or val_text is None:
        if total >= FULL_DATA_SIZE:
            defaults, why = FULL_SPLIT, "the full-data split"
        else:
            cut = int(total * FALLBACK_TRAIN_SHARE)
            defaults = (f":{cut}", f"{cut}:{total}")
            why = f"{FALLBACK_TRAIN_SHARE:.0%}/{1 - FALLBACK_TRAIN_SHARE:.0%} of the {total:,} images available"
            if total == BUNDLED_COUNT:
                why += f" (the full-data split {FULL_SPLIT[0]}/{FULL_SPLIT[1]} needs `cnn-backend download`)"
        train_text = train_text or defaults[0]
        val_text = val_text or defaults[1]
    elif (train_text, val_text) == (RECIPES["seed"]["train_split"], RECIPES["seed"]["val_split"]):
        why = "the seed experiment's split"
    else:
        why = "as requested"
    settings["train_split"], settings["val_split"] = train_text, val_text
    train_window = select_range(train_text, total, "--train-split")
    val_window = select_range(val_text, total, "--val-split")
    line = f"split: training on {_range_label(train_window)}, validating on {_range_label(val_window)}: {why}"
    if train_window.start < val_window.stop and val_window.start < train_window.stop:
        line += " (warning: the two ranges overlap, validation accuracy is optimistic)"
    return train_window, val_window, line


def open_backend(device: str, dtype: str):
    """The backend for ``--device`` and one line describing it; DeviceUnavailableError explains itself."""
    if device == "auto":
        backend = get_backend("auto", dtype)
        found = "found a CUDA device" if backend.name == "cuda" else "found no usable CUDA device"
        return backend, f"device: {backend.name} ({backend.dtype.name}; --device auto {found})"
    try:
        backend = get_backend(device, dtype)
    except DeviceUnavailableError as exc:
        raise DeviceUnavailableError(f"{exc}; `--device auto` would fall back to the CPU") from None
    return backend, f"device: {backend.name} ({backend.dtype.name})"


def build_model(settings: dict, backend, conv_algorithm: str, inputs: InputSpec | None = None):
    """A freshly initialised model of ``settings["model"]`` (a built-in name or an architecture
    file) for ``inputs`` (default: Fashion-MNIST's 1x28x28 and ten classes), seeded by
    ``settings["seed"]``. The built-in networks take the data's shape and class count; an
    architecture file must end in as many outputs as the data has classes (SpecError otherwise,
    one line naming the file and the layer)."""
    inputs = inputs or InputSpec.legacy()
    if settings["model"] not in BUILTIN_NAMES:
        return load_spec_model(settings["model"], inputs.input_shape, backend, settings["seed"], inputs.num_classes, conv_algorithm)
    shape = {"input_shape": inputs.input_shape, "num_classes": inputs.num_classes}
    if settings["model"] == "seed":
        return seed_cnn(backend, seed=settings["seed"], algorithm=conv_algorithm, **shape)
    return default_cnn(backend, seed=settings["seed"], algorithm=conv_algorithm, dropout=settings["dropout"], **shape)


def check_spec_file(model: str) -> None:
    """Read and check an architecture file's structure and options (SpecError naming the file)."""
    label, document = resolve_spec(model)
    try:
        normalize_spec(document)
    except SpecError as exc:
        raise SpecError(f"{label}: {exc}") from None


def load_spec_model(model: str, input_shape, backend, seed: int = 0, num_classes: int | None = None, conv_algorithm: str = "auto"):
    """Build the network ``model`` names (built-in or file); errors name the file."""
    label, document = resolve_spec(model)
    try:
        return build_spec_model(
            document, input_shape, backend, seed, num_classes=num_classes, algorithm=None if conv_algorithm == "auto" else conv_algorithm
        )
    except SpecError as exc:
        raise SpecError(f"{label}: {exc}") from None


def load_training_data(settings: dict):
    """The training split of ``settings["data"]``, with the folder options the settings name."""
    folder_options = {"channels": settings["channels"], "image_size": settings["image_size"]}
    if source_kind(settings["data"]) != "image-folder":
        if any(value is not None for value in folder_options.values()):
            raise ValueError(f"--channels and --image-size apply to folders of images only, not to --data {settings['data']}")
        folder_options = {}
    return load_dataset(settings["data"], "train", strict=bool(settings["strict"]), **folder_options)


def resolve_validation(settings: dict, data, explicit: dict) -> tuple:
    """Training and validation selections (slices, or index arrays for a hold-out) and the line
    saying which were chosen. Writes the choice back into ``settings`` for the checkpoints."""
    ranges_given = any(key in explicit for key in ("train_split", "val_split"))
    if "val_fraction" in explicit and ranges_given:
        raise ValueError("--val-fraction and --train-split/--val-split choose the validation images two ways; pass one of them")
    fraction = settings["val_fraction"]
    if fraction is None and not ranges_given and settings["train_split"] is None and source_kind(settings["data"]) == "image-folder":
        fraction, why = FOLDER_VALIDATION_FRACTION, "the default for image folders (ordered by class)"
    else:
        why = "as requested"
    if fraction is None:
        return resolve_ranges(settings, len(data))
    settings["val_fraction"], settings["train_split"], settings["val_split"] = fraction, None, None
    train_index, val_index = stratified_holdout(data.labels, fraction, settings["seed"])
    line = (
        f"split: training on {len(train_index):,} images, validating on a stratified {fraction:g} hold-out of "
        f"every class ({len(val_index):,} images, seed {settings['seed']}): {why}"
    )
    return train_index, val_index, line


def optimizer_config(settings: dict) -> dict:
    """Keyword arguments of the settings' optimiser."""
    if settings["optimizer"] == "adam":
        return {"lr": settings["lr"], "betas": (settings["momentum"], 0.999), "weight_decay": settings["weight_decay"]}
    return {"lr": settings["lr"], "momentum": settings["momentum"], "weight_decay": settings["weight_decay"]}


class EpochProgress:
    """A per-epoch progress bar (loss, accuracy, samples/s) fed from the Trainer's log intervals;
    nothing at all when ``show_bar`` is False (the per-epoch lines are printed either way)."""

    def __init__(self, epochs: int, steps_per_epoch: int, batch_size: int, samples_per_epoch: int, show_bar: bool) -> None:
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        self.batch_size, self.samples_per_epoch = batch_size, samples_per_epoch
        self.show_bar = show_bar
        self.bar = None
        self.epoch = 0

    def start(self, epoch: int) -> None:
        self.epoch = epoch
        self.started = time.perf_counter()
        if self.show_bar:
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.steps_per_epoch, desc=f"epoch {epoch}/{self.epochs}", unit="step",
                leave=False, file=sys.stderr, dynamic_ncols=True,
            )

    def update(self, steps_done: int, loss: float, accuracy: float) -> None:
        pause_point("step")
        if self.bar is None:
            return
        samples = min(steps_done * self.batch_size, self.samples_per_epoch)
        rate = samples / max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix_str(f"loss {loss:.4f}, acc {accuracy:.3f}, {rate:,.0f} samples/s", refresh=False)
        self.bar.update(steps_done - self.bar.n)
        if steps_done == self.steps_per_epoch:
            self.bar.set_description(f"epoch {self.epoch}/{self.epochs} validating")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class RunRecorder:
    """Records each finished epoch in the run folder: ``last.npz`` (the commit), the history row,
    then ``best.npz`` when the validation accuracy improved, as one step that SIGINT and SIGTERM
    cannot split (see :mod:`cnn_backend.runfolder` for the order)."""

    def __init__(self, folder: RunFolder, model, optimizer, schedule, settings: dict, *, history: list[dict], best: dict,
                 resumed: Checkpoint | None = None, inputs: InputSpec | None = None) -> None:
        self.folder, self.out_dir = folder, folder.path
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.inputs = inputs
        self.settings = settings
        self.history = list(history)
        self.best = dict(best)
        self.resumed = resumed
        self.last_saved_epoch = None  # the epoch of this folder's last.npz, once this run wrote one
        self.samples = 0
        self.seconds = 0.0
        self.writer = HistoryWriter(self.out_dir / HISTORY_FILE)
        if resumed is not None and _same_folder(resumed.path.parent, self.out_dir):
            self.last_saved_epoch = resumed.epoch
            if self.best["epoch"] == resumed.epoch and resumed.path.name == LAST_CHECKPOINT:
                folder.link_best()  # repairs a best.npz left one best behind by a kill (cheap: a link)
        # Rewritten from the checkpoint: also repairs a history left one row short by a kill.
        self.writer.start(self.history)

    def record(self, stats) -> bool:
        """Write the files of a finished epoch; returns whether it is the new best."""
        row = stats.as_dict()
        improved = stats.val_accuracy is not None and (self.best["val_accuracy"] is None or stats.val_accuracy > self.best["val_accuracy"])
        best = {"epoch": stats.epoch, "val_accuracy": stats.val_accuracy} if improved else self.best
        with DeferredInterrupt():
            self._save(LAST_CHECKPOINT, stats.epoch, best, self.history + [row])
            self.history.append(row)
            self.best, self.last_saved_epoch = best, stats.epoch
            self.writer.append(row)
            pause_point("history")
            if improved:
                self.folder.link_best()
        self.samples += stats.samples_per_second * stats.seconds
        self.seconds += stats.seconds
        return improved

    def _save(self, name: str, epoch: int, best: dict, history: list[dict]) -> None:
        save_checkpoint(
            self.out_dir / name, self.model, self.optimizer, epoch=epoch, schedule=self.schedule,
            settings=self.settings, loader_seed=self.settings["seed"], best=best, history=history,
            inputs=self.inputs,
        )

    def close(self) -> None:
        self.writer.close()

    def intact_text(self, *, resume_hint: bool) -> str:
        """Which checkpoint is good after a failure (never a file that does not exist), and how to resume."""
        if self.last_saved_epoch is not None:
            path, epoch, out = self.out_dir / LAST_CHECKPOINT, self.last_saved_epoch, None
        elif self.resumed is not None:
            path, epoch, out = self.resumed.path, self.resumed.epoch, self.out_dir
        else:
            return "no epoch finished, so no checkpoint was written"
        text = f"the last good checkpoint is {path} (epoch {epoch})"
        if resume_hint:
            text += f"; resume with: {PROG} train --resume {path}" + (f" --out {out}" if out is not None else "")
        return text


def _same_folder(first: Path, second: Path) -> bool:
    return first.resolve() == second.resolve()


def format_epoch_line(stats, epochs: int, improved: bool) -> str:
    """One line per finished epoch."""
    width = len(str(epochs))
    line = f"epoch {stats.epoch:>{width}}/{epochs}  train loss {stats.train_loss:.4f} acc {stats.train_accuracy:.4f}"
    if stats.val_accuracy is not None:
        line += f"  val loss {stats.val_loss:.4f} acc {stats.val_accuracy:.4f}"
    line += f"  lr {stats.lr:.3g}  {stats.seconds:.1f} s  {stats.samples_per_second:,.0f} samples/s"
    return line + ("  *best" if improved else "")


def _model_and_optimizer(settings: dict, backend, checkpoint: Checkpoint | None, conv_algorithm: str | None, inputs: InputSpec):
    """A fresh model and optimiser, or the checkpoint's; also the first epoch left to train."""
    if checkpoint is None:
        model = build_model(settings, backend, conv_algorithm or "auto", inputs)
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
    try:
        status = _train(args, world)
    except BaseException as exc:
        try:
            status, message, prefix = _failure(exc)
        except BaseException:  # not a known error: still one line, and the job must end
            status, message, prefix = EXIT_FAILED, f"{type(exc).__name__}: {exc}", "error: "
        if isinstance(exc, KeyboardInterrupt):  # every process was interrupted: rank 0 says so
            if world.is_root:
                _print_error(message, prefix)
        else:
            _wait_for_rank_0(world, FAILURE_GRACE_SECONDS)
            _print_error(f"rank {world.rank} of {world.size}: {message}", prefix)
            world.abort(status)
    if status != EXIT_OK:
        # Rank 0 has reported (a non-finite loss, Ctrl-C) and ends the job; the others give it time.
        _wait_for_rank_0(world, FAILURE_GRACE_SECONDS if status == EXIT_FAILED else INTERRUPT_GRACE_SECONDS)
        world.abort(status)
    return status


def _wait_for_rank_0(world, seconds: float) -> None:
    if not world.is_root:
        time.sleep(seconds)


def _train(args, world) -> int:
    """Train in this process; ``world`` is the job's communicator (one process for a plain run).
    Rank 0 alone prints and writes files."""
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

    data = load_training_data(settings)
    images, labels = data.images, data.labels
    if checkpoint is None and source_kind(settings["data"]) in ("cifar10", "cifar10-folder", "image-folder"):
        # A recipe's ranges (the seed experiment's 5,000 + 5,000) are made for the 60,000-image IDX sets.
        for key in ("train_split", "val_split"):
            if key not in explicit:
                settings[key] = None
    train_window, val_window, split_line = resolve_validation(settings, data, explicit)
    if checkpoint is not None:
        inputs = checkpoint.input_spec()
        inputs.check(data, f"--data {settings['data']}")
    else:
        normalization = Normalization.from_images(images[train_window]) if settings["normalize"] else None
        inputs = InputSpec.for_data(data, normalization)
    model, optimizer, start_epoch = _model_and_optimizer(settings, backend, checkpoint, args.conv_algorithm, inputs)

    loader = BatchLoader(
        images[train_window], labels[train_window], backend, settings["batch_size"], seed=settings["seed"],
        num_classes=inputs.num_classes, normalization=inputs.normalization, rank=communicator.rank, size=communicator.size,
    )
    schedule_settings = schedule_for_run(settings["schedule"], settings["lr"], settings["epochs"], len(loader))
    schedule = schedule_from_config(schedule_settings)
    validation = (inputs.prepare(images[val_window], backend.dtype), labels[val_window])
    lines = [device_line, distributed_line, f"data: {data.source}", *(f"note: {note}" for note in data.notes),
             f"input: {inputs.describe()}", split_line]
    del images, labels, data  # the loader and the validation set keep what they use
    pause_point("start")

    # Everything that can be refused has been checked: only now is the output folder touched (by
    # rank 0 alone; the others learn its name).
    folder = RunFolder.open(args.out, checkpoint.path if checkpoint is not None else None) if world.is_root else None
    try:
        out_dir = world.broadcast_object(folder.path if folder is not None else None)
        return _train_in_folder(
            args, folder, out_dir, world, communicator, settings, backend, model, optimizer, start_epoch, checkpoint,
            loader, schedule, schedule_settings, validation, lines, inputs,
        )
    finally:
        if folder is not None:
            folder.close()


def _train_in_folder(args, folder, out_dir, world, communicator, settings, backend, model, optimizer, start_epoch,
                     checkpoint, loader, schedule, schedule_settings, validation, lines, inputs: InputSpec) -> int:
    """The training run; ``folder`` is None on the processes other than rank 0, which neither print
    nor write."""
    say = _say if world.is_root else _silent
    report_error = _print_error if world.is_root else _silent
    history, best = [], {"epoch": None, "val_accuracy": None}
    if checkpoint is not None:
        history = checkpoint.history
        # best.npz of another folder is not carried over: there, best tracking starts afresh.
        if _same_folder(out_dir, checkpoint.path.parent):
            best = checkpoint.best

    say(f"{PROG} train: {_describe_settings(settings)}")
    for line in lines:
        say(line)
    if checkpoint is not None:
        say(f"resuming: {checkpoint.path} (epoch {checkpoint.epoch}), training epochs {start_epoch}-{settings['epochs']}")
        if checkpoint.schedule != schedule_settings:
            say(f"note: the learning-rate schedule changes on resuming, from {checkpoint.schedule} to {schedule_settings}")
    say(f"outputs: {out_dir}")
    say(format_summary(model.summary()))

    recorder = None
    progress = EpochProgress(
        settings["epochs"], len(loader), settings["batch_size"], loader.num_samples,
        show_bar=not args.quiet and sys.stderr.isatty() and world.is_root,
    )

    def epoch_finished(stats) -> None:
        progress.close()
        if recorder is not None:
            improved = recorder.record(stats)
            say(format_epoch_line(stats, settings["epochs"], improved))

    def intact(resume_hint: bool) -> str:
        if recorder is None:
            return "no epoch finished, so no checkpoint was written" if checkpoint is None else \
                f"the last good checkpoint is {checkpoint.path} (epoch {checkpoint.epoch})"
        return recorder.intact_text(resume_hint=resume_hint)

    stage = "training"
    try:
        if folder is not None:
            recorder = RunRecorder(folder, model, optimizer, schedule,
                                   {**settings, "device": backend.name, "processes": communicator.size},
                                   history=history, best=best, resumed=checkpoint, inputs=inputs)
        pause_point("folder")
        started = time.perf_counter()
        # Overflow warnings would only repeat what the non-finite loss check reports in one line.
        with numpy.errstate(over="ignore", invalid="ignore", divide="ignore"):
            fit(
                model, optimizer, loader, settings["epochs"], validation=validation, schedule=schedule,
                augment=make_augmentation(settings["augment"], backend, settings["seed"]),
                start_epoch=start_epoch, on_epoch_start=progress.start, on_interval=progress.update,
                on_epoch_end=epoch_finished, log_every=args.log_every, communicator=communicator,
            )
        training_seconds = time.perf_counter() - started
        if folder is None:
            return EXIT_OK
        stage = "plots"
        pause_point("plots")
        plots = [] if args.no_plots else _write_training_plots(out_dir, model, recorder.history, validation, inputs.class_names)
    except KeyboardInterrupt as exc:
        progress.close()
        what = getattr(exc, "description", "interrupted")
        if stage == "plots":
            report_error(f"{what} while drawing the plots; training finished: {intact(resume_hint=False)}", prefix="")
        else:
            report_error(f"{what} during epoch {progress.epoch or start_epoch}; {intact(resume_hint=True)}", prefix="")
        return getattr(exc, "exit_status", EXIT_INTERRUPTED)
    except NonFiniteLossError as exc:
        progress.close()
        report_error(f"{exc}; {intact(resume_hint=False)}")
        return EXIT_FAILED
    except FileWriteError as exc:
        progress.close()
        report_error(f"{exc}; {intact(resume_hint=False)}; free space or choose another --out")
        return EXIT_FAILED
    finally:
        if recorder is not None:
            recorder.close()

    say(_summary_line(recorder, settings["epochs"] - start_epoch + 1, training_seconds, backend))
    written = [HISTORY_FILE, LAST_CHECKPOINT] + ([BEST_CHECKPOINT] if (out_dir / BEST_CHECKPOINT).exists() else []) + plots
    say(f"outputs in {out_dir}: {', '.join(written)}")
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


def _describe_settings(settings: dict) -> str:
    momentum_name = "beta1" if settings["optimizer"] == "adam" else "momentum"
    text = (
        f"{settings['model']} model, {settings['optimizer']} lr {settings['lr']:g} {momentum_name} {settings['momentum']:g} "
        f"weight decay {settings['weight_decay']:g}, {settings['schedule']} schedule, batch {settings['batch_size']}, "
        f"{settings['epochs']} epochs, seed {settings['seed']}, {settings['dtype']}"
    )
    text += f", dropout {settings['dropout']:g}" if settings["dropout"] else ""
    return text + (f", augment {settings['augment']}" if settings["augment"] != "none" else "")


def _write_training_plots(out_dir: Path, model, history: list[dict], validation, class_names) -> list[str]:
    """Curves, validation confusion matrix and first-layer filters; skipped without matplotlib."""
    if not matplotlib_available():
        _say("plots skipped: matplotlib is not installed (pip install 'cnn-backend[plot]')")
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


# == evaluate =======================================================================================


def run_evaluate(args) -> int:
    """The ``evaluate`` command."""
    checkpoint = load_checkpoint(args.checkpoint, require_training_state=False)
    stored = checkpoint.settings
    inputs = checkpoint.input_spec()
    backend, device_line = open_backend(args.device, args.dtype or stored.get("dtype", "float32"))
    model = checkpoint.build_model(backend)

    source = args.data or stored.get("data", "auto")
    if args.split == "test" and source == "bundled":
        source = "auto"  # the bundled subset has no test split; look for the downloaded one
    data = load_evaluation_data(source, args.split, inputs, bool(stored.get("strict")))
    inputs.check(data, f"--data {source} ({args.split})")
    images, labels = data.images, data.labels
    range_text, why = args.range, "as requested"
    if range_text is None and args.split == "test":
        range_text, why = ":", "the whole test split"
    elif range_text is None and stored.get("val_fraction"):
        why = f"the checkpoint's stratified {stored['val_fraction']:g} hold-out (seed {stored.get('seed', 0)})"
    elif range_text is None:
        range_text, why = stored.get("val_split"), "the checkpoint's validation range"
        if range_text is None:
            raise ValueError(f"{args.checkpoint} stores no validation range; pass --range START:STOP or --split test")
    if range_text is None:
        window = stratified_holdout(labels, stored["val_fraction"], stored.get("seed", 0))[1]
        window_text, label = "hold-out", f"hold-out ({len(window):,} images)"
    else:
        window = select_range(range_text, len(images), "--range")
        window_text, label = f"{window.start}:{window.stop}", _range_label(window)

    _say(f"checkpoint: {checkpoint.path}" + (f" (epoch {checkpoint.epoch}, {stored.get('model')} model)" if checkpoint.is_training_checkpoint else ""))
    _say(device_line)
    _say(f"data: {data.source}")
    for note in data.notes:
        _say(f"note: {note}")
    _say(f"input: {inputs.describe()}")
    _say(f"evaluating on {args.split} {label}: {why}")

    with numpy.errstate(over="ignore", invalid="ignore", divide="ignore"):
        scores = evaluate(model, inputs.prepare(images[window], backend.dtype), labels[window], args.batch_size, with_predictions=True)
    confusion = confusion_matrix(labels[window], scores["predictions"], inputs.num_classes)
    report = classification_report(confusion, inputs.class_names)
    document = {
        "checkpoint": str(checkpoint.path),
        "epoch": checkpoint.epoch,
        "model": stored.get("model"),
        "split": args.split,
        "range": window_text,
        "data": data.source,
        "device": backend.name,
        "loss": scores["loss"],
        **report,
    }
    _say("")
    _say(format_report(report))
    _say(f"loss {scores['loss']:.4f}")
    json_path = args.json or checkpoint.path.with_name(f"{checkpoint.path.stem}-{args.split}-evaluation.json")
    try:
        write_json(json_path, document)
    except FileWriteError as exc:
        raise FileWriteError(exc.path, OSError(exc.errno, f"{exc.strerror}; pass --json PATH to write the report elsewhere")) from None
    _say(f"report written to {json_path}")
    return EXIT_OK


def load_evaluation_data(source, split: str, inputs: InputSpec, strict: bool):
    """``split`` of ``source``; an image folder is decoded to the model's channel count and size."""
    if source_kind(source) == "image-folder":
        return load_dataset(source, split, channels=inputs.channels, image_size=inputs.image_size, strict=strict)
    return load_dataset(source, split)


# == predict ========================================================================================


def run_predict(args) -> int:
    """The ``predict`` command: 0 when every image was predicted, 2 when any could not be used."""
    checkpoint = load_checkpoint(args.checkpoint, require_training_state=False)
    inputs = checkpoint.input_spec()
    backend, device_line = open_backend(args.device, checkpoint.settings.get("dtype", "float32"))
    model = checkpoint.build_model(backend)
    with numpy.errstate(over="ignore", invalid="ignore", divide="ignore"):
        predictions = predict_files(model, inputs, args.images, top=args.top, batch_size=args.batch_size)
    for prediction in predictions:
        if not prediction.ok:
            _print_error(prediction.error)
    if args.json:
        document = {
            "checkpoint": str(checkpoint.path), "input": inputs.config(), "assumed_input": not inputs.recorded,
            "predictions": [prediction.as_dict() for prediction in predictions],
        }
        _say(json.dumps(document, indent=2))
    else:
        if not inputs.recorded:
            print(f"{PROG}: note: {inputs.describe()}", file=sys.stderr, flush=True)
        for prediction in predictions:
            if prediction.ok:
                _say(f"{prediction.path}: " + ", ".join(f"{name} {probability:.1%}" for name, probability in prediction.top))
    return EXIT_OK if all(prediction.ok for prediction in predictions) else EXIT_USAGE
# == summary ========================================================================================


def run_summary(args) -> int:
    """The ``summary`` command."""
    backend = get_backend("cpu", args.dtype)
    model = load_spec_model(args.model, args.input_shape, backend)
    _say(format_summary(model.summary()))
    return EXIT_OK


# == download =======================================================================================


def run_download(args) -> int:
    """The ``download`` command."""
    # The data module reports each file (fetched, or already present and verified) at INFO.
    logging.basicConfig(level=logging.INFO, format=f"{PROG}: %(message)s", stream=sys.stderr)
    info = DATASETS[args.name]
    if args.name == "fashion-mnist":
        directory = download(args.data_dir)
    else:
        directory = download_dataset(args.name, args.data_dir)
    where = ""
    if args.data_dir is not None and directory != dataset_dir(args.name) and args.name != "fashion-mnist":
        where = f"; --data {args.name} reads {dataset_dir(args.name)}: set ${DATA_DIR_ENV} to the folder above one named {args.name}"
    _say(f"{info.title} is ready in {directory} (all files verified){where}")
    return EXIT_OK

