"""The settings of a training run (options, else a resumed checkpoint's, else the model's recipe),
its data and its training/validation split."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy

from ..augment import WITHOUT_FLIPS
from ..checkpoint import Checkpoint
from ..data import BUNDLED_COUNT, FULL_SPLIT, DataError, split_ranges, stratified_holdout
from ..datasets import DATASETS, load_dataset, source_kind
from ..datasets.folder import parse_image_size
from ..spec import BUILTIN_NAMES
from ..training import OPTIMIZER_DEFAULTS, RECIPES
from .arguments import parse_range, range_label, select_range
from .runtime import DEFAULT_MODEL

#: the recipe of a network from an architecture file: the plain model's, without the dropout that
#: --dropout would add to it (a file writes its own Dropout layers), and without augmentation: flips
#: and shifts suit some data and not other (a mirrored digit is another digit)
SPEC_FILE_RECIPE = {**RECIPES["plain"], "dropout": 0.0}
#: the built-in models whose dropout --dropout sets
DROPOUT_MODELS = ("default", "plain")
#: run settings that are not part of a recipe
GENERAL_DEFAULTS = {
    "seed": 0, "dtype": "float32", "data": "auto",
    "image_size": None, "channels": None, "strict": False, "val_fraction": None, "normalize": False,
}
#: what defines a run (stored in its checkpoints and restored on --resume); device, output folder
#: and display options are chosen afresh by each invocation.
SETTING_NAMES = (
    "model", "epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay", "schedule",
    "dropout", "augment", "label_smoothing", "seed", "dtype", "data", "train_split", "val_split",
    "image_size", "channels", "strict", "val_fraction", "normalize",
)
#: settings the checkpoint's network and optimiser state embody: a resumed run cannot change them
FIXED_BY_CHECKPOINT = ("model", "optimizer", "dropout", "normalize", "image_size", "channels")
#: what ``source_kind`` calls a folder given by its path (not a dataset name)
FOLDER_KINDS = ("idx-folder", "cifar10-folder", "image-folder")
#: the training/validation ranges of a full 60,000-image training set (validation to the end)
FULL_DATA_SIZE, FULL_RANGES = sum(FULL_SPLIT), split_ranges(FULL_SPLIT[0])
#: share of a smaller data set (the bundled 10,000 images) used for training; the rest validates
FALLBACK_TRAIN_SHARE = 0.8
#: share of an image folder (ordered by class) held out per class when no split is given
FOLDER_VALIDATION_FRACTION = 0.2


def resolve_settings(explicit: dict, checkpoint: Checkpoint | None = None) -> dict:
    """The run settings: explicit options, else (with a checkpoint) the stored ones, else the recipe.

    The network, optimiser and input of a resumed run are fixed by its checkpoint
    (``FIXED_BY_CHECKPOINT``), and so is a hold-out's validation set; asking for others is an
    error. Choosing an optimiser other than the recipe's brings that optimiser's own defaults.
    """
    stored = {key: value for key, value in (checkpoint.settings if checkpoint else {}).items() if key in SETTING_NAMES}
    # (--dropout on a network without the option is refused below, for what it is)
    fixed = [key for key in FIXED_BY_CHECKPOINT if key != "dropout" or stored.get("model") in DROPOUT_MODELS]
    for key in fixed:
        if stored.get(key) is not None and key in explicit and not _same_setting(key, explicit[key], stored[key]):
            raise ValueError(
                f"{checkpoint.path} was trained {_as_trained(key, stored[key])}, so {_as_option(key, explicit[key])} cannot "
                f"resume it (leave {_as_option(key)} out to resume, or start a new run without --resume)"
            )
    if stored.get("val_fraction") is not None:
        _refuse_another_holdout(checkpoint.path, stored, explicit)
    model = explicit.get("model") or stored.get("model") or DEFAULT_MODEL
    recipe = RECIPES.get(model, SPEC_FILE_RECIPE)
    optimizer = explicit.get("optimizer") or stored.get("optimizer") or recipe["optimizer"]
    defaults = {**GENERAL_DEFAULTS, **recipe}
    if optimizer != recipe["optimizer"]:
        defaults.update(OPTIMIZER_DEFAULTS[optimizer])
    settings = {**defaults, **stored, **explicit, "model": model, "optimizer": optimizer}
    if "augment" not in explicit and "augment" not in stored:
        settings["augment"] = recipe_augmentation(settings["augment"], settings["data"])
    if settings["dropout"] and model not in DROPOUT_MODELS:
        hint = "" if model in BUILTIN_NAMES else "; write a Dropout layer into the architecture file instead"
        raise ValueError(f"--dropout applies to the {' and '.join(DROPOUT_MODELS)} models only, not {model}{hint}")
    return {key: settings[key] for key in SETTING_NAMES}


def _same_setting(key: str, first, second) -> bool:
    if key == "image_size":  # "28" and "28x28" are the same size
        return parse_image_size(first) == parse_image_size(second)
    if key == "model" and first != second and not {first, second} & set(BUILTIN_NAMES):
        # one architecture file named two ways (net.toml, ./net.toml, its absolute path), from the same folder
        return Path(first).expanduser().resolve() == Path(second).expanduser().resolve()
    return first == second


def _refuse_another_holdout(path, stored: dict, explicit: dict) -> None:
    """A hold-out run validates on images drawn by --val-fraction and --seed: ranges, another fraction
    or another seed on resume would validate on images it has trained on."""
    changed = [key for key in ("val_fraction", "seed") if explicit.get(key) not in (None, stored.get(key))]
    changed += [key for key in ("train_split", "val_split") if key in explicit]
    _refuse_changes(
        f"{path} validates on a {stored['val_fraction']:g} hold-out drawn with --seed {stored['seed']}", changed, explicit,
        "the validation images would include ones it has trained on",
    )


def refuse_other_ranges(checkpoint: Checkpoint, explicit: dict, total: int) -> None:
    """A run validated on a range keeps its ranges: a hold-out drawn now, or other ranges, would
    validate on images it has trained on and compare its best epoch across two validation sets.
    Checked once the data is read: ``total`` images resolve an open end (``8000:`` is ``8000:10000``
    of 10,000)."""
    stored = checkpoint.settings
    if stored.get("val_fraction") is not None or stored.get("val_split") is None:
        return  # a hold-out run: refused in resolve_settings; no range recorded: nothing to keep
    changed = [key for key in ("train_split", "val_split") if key in explicit and not _same_range(explicit[key], stored.get(key), total)]
    changed += ["val_fraction"] if explicit.get("val_fraction") is not None else []
    _refuse_changes(
        f"{checkpoint.path} trains on {stored.get('train_split')} and validates on {stored['val_split']}", changed, explicit,
        "its images would change, and the validation ones could include images it has trained on",
    )


def _refuse_changes(run: str, changed: list[str], explicit: dict, why: str) -> None:
    """The one-line refusal of the options ``changed`` on resume: ``run`` says what the checkpoint
    uses, ``why`` what the options would break."""
    if changed:
        asked = " and ".join(_as_option(key, explicit[key]) for key in changed)
        leave = " and ".join(_as_option(key) for key in changed)
        raise ValueError(f"{run}, so {asked} cannot resume it: {why} (leave {leave} out to resume, or start a new run)")


def _same_range(first: str, second: str | None, total: int) -> bool:
    """Whether two ranges name the same of ``total`` images (``:512`` and ``0:512``; ``8000:`` and ``8000:10000`` of 10,000)."""
    if second is None:
        return False
    (start, stop), (other_start, other_stop) = parse_range(first), parse_range(second)
    return (start or 0, total if stop is None else stop) == (other_start or 0, total if other_stop is None else other_stop)


def option_flag(key: str) -> str:
    """The command-line option of a setting: ``train_split`` -> ``--train-split``."""
    return "--" + key.replace("_", "-")


def option_words(key: str, value=True) -> list[str]:
    """A setting as the words that give it on the command line: the flag alone for a flag (a
    boolean value), else the flag and the value."""
    return [option_flag(key)] if isinstance(value, bool) else [option_flag(key), str(value)]


def _as_option(key: str, value=True) -> str:
    return " ".join(option_words(key, value))


def _as_trained(key: str, value) -> str:
    return f"without {_as_option(key)}" if value is False else f"with {_as_option(key, value)}"


def recipe_augmentation(augment: str, data) -> str:
    """A recipe's augmentation for ``data``: without its flips for a named dataset whose classes
    mirroring changes (MNIST's digits, KMNIST's characters); as it is otherwise. An explicit
    ``--augment`` is never changed, and a folder of images cannot be told apart: docs/cli.md."""
    info = DATASETS.get(data) if isinstance(data, str) else None
    if info is not None and not info.mirror_symmetric:
        return WITHOUT_FLIPS.get(augment, augment)
    return augment


def resolve_ranges(settings: dict, total: int, given_why: str = "as requested") -> tuple[slice, slice, str]:
    """Training and validation slices of ``total`` images, and one line saying which were chosen.

    Ranges left to the data (None) are decided here and written back into ``settings``, so the
    checkpoints record the ranges actually used.
    """
    train_text, val_text = settings["train_split"], settings["val_split"]
    given = None if (train_text is None) == (val_text is None) else "--train-split" if val_text is None else "--val-split"
    rest, unused = _rest_of(train_text if val_text is None else val_text, total) if given else (None, None)
    if rest is not None:  # one range given: the other is the larger side left over, so they do not overlap
        train_text, val_text = (train_text, rest) if val_text is None else (rest, val_text)
        why = f"{given} as given, the other range the larger side it leaves of the {total:,} images available"
        why += f" ([{unused}] unused)" if unused else ""
    elif train_text is None or val_text is None:
        if total >= FULL_DATA_SIZE:
            defaults, why = FULL_RANGES, "the full-data split"
        else:
            cut = int(total * FALLBACK_TRAIN_SHARE)
            defaults = (f":{cut}", f"{cut}:{total}")
            why = f"{FALLBACK_TRAIN_SHARE:.0%}/{1 - FALLBACK_TRAIN_SHARE:.0%} of the {total:,} images available"
            if total == BUNDLED_COUNT:
                why += f" (the full-data split {FULL_RANGES[0]}/{FULL_RANGES[1]} needs `cnn-backend download`)"
        if given:  # it leaves no images over
            why = f"{given} as given, the other range by default ({why})"
        train_text = train_text or defaults[0]
        val_text = val_text or defaults[1]
    elif (train_text, val_text) == (RECIPES["seed"]["train_split"], RECIPES["seed"]["val_split"]):
        why = "the seed experiment's split"
    else:
        why = given_why
    settings["train_split"], settings["val_split"] = train_text, val_text
    train_window = select_range(train_text, total, "--train-split")
    val_window = select_range(val_text, total, "--val-split")
    line = f"split: training on {range_label(train_window)}, validating on {range_label(val_window)}: {why}"
    if train_window.start < val_window.stop and val_window.start < train_window.stop:
        line += " (warning: the two ranges overlap, validation accuracy is optimistic)"
    return train_window, val_window, line


def _rest_of(text: str, total: int) -> tuple[str | None, str | None]:
    """The longer of the two ranges that ``text`` leaves of ``total`` images, and the shorter one
    when it is not empty (left unused); ``(None, None)`` when it leaves none, or ``text`` is not a
    range of them (which :func:`select_range` then reports)."""
    start, stop = parse_range(text)
    start, stop = start or 0, total if stop is None else stop
    if not 0 <= start < stop <= total:
        return None, None
    before, after = f"0:{start}" if start else None, f"{stop}:{total}" if stop < total else None
    if before is None and after is None:
        return None, None
    longer_before = start >= total - stop
    return (before, after) if longer_before else (after, before)


def load_training_data(settings: dict, checkpoint: Checkpoint | None = None, progress: bool = True):
    """The training split of ``settings["data"]``, with the folder options the settings name. A
    folder is written back as an absolute path, so that the checkpoints find it from anywhere.
    ``progress``: a bar on a terminal while a folder's images are first decoded."""
    try:
        kind = source_kind(settings["data"])
    except DataError as exc:
        raise data_not_found(exc, checkpoint) from None
    folder_options = {"channels": settings["channels"], "image_size": settings["image_size"]}
    if kind != "image-folder":
        if any(value is not None for value in folder_options.values()):
            raise ValueError(f"--channels and --image-size apply to folders of images only, not to --data {settings['data']}")
        folder_options = {}
    data = load_dataset(settings["data"], "train", strict=bool(settings["strict"]), progress=progress, **folder_options)
    if kind in FOLDER_KINDS:
        settings["data"] = str(Path(settings["data"]).expanduser().resolve())
    return data


def data_not_found(exc: DataError, checkpoint: Checkpoint | None) -> DataError:
    """``exc``, saying where to point ``--data`` when the data named came from ``checkpoint``."""
    if checkpoint is None:
        return exc
    return DataError(f"{exc}; {checkpoint.path} was trained on it: pass --data to read it from where it is now")


def resolve_validation(settings: dict, data, explicit: dict, resumed: bool = False) -> tuple:
    """Training and validation selections (slices, or index arrays for a hold-out) and the line
    saying which were chosen. Writes the choice back into ``settings`` for the checkpoints."""
    ranges_given = any(key in explicit for key in ("train_split", "val_split"))
    chosen_here = ranges_given or "val_fraction" in explicit or not resumed
    given_why = "as requested" if chosen_here else "as the checkpoint records"
    if "val_fraction" in explicit and ranges_given:
        raise ValueError("--val-fraction and --train-split/--val-split choose the validation images two ways; pass one of them")
    fraction = settings["val_fraction"]
    if fraction is None and not ranges_given and settings["train_split"] is None and source_kind(settings["data"]) == "image-folder":
        fraction, why = FOLDER_VALIDATION_FRACTION, "the default for image folders (ordered by class)"
    else:
        why = given_why
    if fraction is None:
        train_window, val_window, line = resolve_ranges(settings, len(data), given_why)
        # Ranges index the data's order: evaluate and --resume check that they still hold the same images.
        settings["ranges_of"] = ranges_digest(data, train_window, val_window)
        return train_window, val_window, line
    settings["val_fraction"], settings["train_split"], settings["val_split"] = fraction, None, None
    # The hold-out is drawn from the data's order: evaluate checks the data is still the same.
    settings["holdout_of"] = data_digest(data)
    train_index, val_index = stratified_holdout(data.labels, fraction, settings["seed"])
    line = (
        f"split: training on {len(train_index):,} images, validating on a stratified {fraction:g} hold-out of "
        f"every class ({len(val_index):,} images, seed {settings['seed']}): {why}"
    )
    return train_index, val_index, line


def array_digest(*arrays) -> str:
    """A short digest of the arrays' values, in order (host arrays)."""
    hasher = hashlib.sha256()
    for array in arrays:
        hasher.update(numpy.ascontiguousarray(array).tobytes())
    return hasher.hexdigest()[:32]


def ranges_digest(data, train_window: slice, val_window: slice, *, by_pixels: bool = False) -> str:
    """A digest of the images and labels a range run trains and validates on: the same while those
    images are (a folder's file added before them shifts every index after it). An image folder's
    images are identified by their file names, which no decoder changes; ``by_pixels`` digests
    the pixels instead, as checkpoints recorded before the names were."""
    return array_digest(*_identity(data, train_window, by_pixels), *_identity(data, val_window, by_pixels))


def data_digest(data, *, by_pixels: bool = False) -> str:
    """A digest of every image and label, in order: the same only for the same files (see
    :func:`ranges_digest` for ``by_pixels``)."""
    return array_digest(*_identity(data, slice(None), by_pixels))


def _identity(data, window: slice, by_pixels: bool) -> tuple:
    """The labels of ``window`` and what identifies its images: file names, else pixels."""
    if data.files and not by_pixels:
        names = "\0".join(data.files[window]).encode("utf-8", "surrogateescape")
        return data.labels[window], numpy.frombuffer(names, dtype=numpy.uint8)
    return data.labels[window], data.images[window]


def digest_matches(recorded: str | None, current: str | None, data, windows: tuple = ()) -> bool:
    """Whether the digest a checkpoint ``recorded`` (None: it recorded none) is that of ``data``:
    ``current`` (:func:`data_digest`, or :func:`ranges_digest` of ``windows``, the training and
    validation windows of a range run), or, for an image folder, its digest by pixels, which
    checkpoints recorded before image folders were identified by file names."""
    if recorded is None or recorded == current:
        return True
    if not data.files:  # identified by its pixels already
        return False
    return recorded == (ranges_digest(data, *windows, by_pixels=True) if windows else data_digest(data, by_pixels=True))


def refuse_changed_images(source, path, recorded: str | None, current: str | None, data, consequence: str, advice: str,
                          *, windows: tuple = (), trained_on=None) -> None:
    """Refuse data whose digest differs from the one ``path`` recorded when it was trained (see
    :func:`digest_matches`): its hold-out or ranges, which index the data's order, would now
    select other images. ``trained_on``: the data the checkpoint was trained on, named when
    ``source`` is another folder."""
    if digest_matches(recorded, current, data, windows):
        return
    if trained_on is not None and not same_data(source, trained_on):
        raise ValueError(f"{source} is not the data {path} was trained on ({trained_on}), so {consequence}; {advice}")
    raise ValueError(
        f"{source}: the images changed since {path} was trained (files added, removed, renamed or replaced), "
        f"so {consequence}; {advice}"
    )


def same_data(source, trained_on) -> bool:
    """Whether two ``--data`` values name the same data (a folder by its real path)."""
    if str(source) == str(trained_on):
        return True
    try:
        return Path(source).expanduser().resolve() == Path(trained_on).expanduser().resolve()
    except (OSError, RuntimeError):
        return False


def missing_classes_notes(data, train_window, val_window) -> list[str]:
    """A note for each split that lacks some of the data's classes (a range of a folder ordered by
    class, say): validating on classes never trained on, or training without them."""
    notes = []
    for name, window in (("training", train_window), ("validation", val_window)):
        missing = sorted(set(range(data.num_classes)) - set(numpy.unique(data.labels[window]).tolist()))
        if not missing:
            continue
        named = ", ".join(str(data.class_names[index]) for index in missing[:3]) + (", ..." if len(missing) > 3 else "")
        why = ("the data is ordered by class?); --val-fraction holds out part of every class instead of a range"
               if isinstance(window, slice) else "a class with a single image is kept for training)")
        notes.append(f"the {name} images hold {data.num_classes - len(missing)} of the {data.num_classes} classes (not {named}: {why}")
    return notes


def optimizer_config(settings: dict) -> dict:
    """Keyword arguments of the settings' optimiser."""
    if settings["optimizer"] == "adam":
        return {"lr": settings["lr"], "betas": (settings["momentum"], 0.999), "weight_decay": settings["weight_decay"]}
    return {"lr": settings["lr"], "momentum": settings["momentum"], "weight_decay": settings["weight_decay"]}
