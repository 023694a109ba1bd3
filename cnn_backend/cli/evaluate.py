"""The ``evaluate`` and ``predict`` commands: a trained checkpoint on a split, or on image files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy

from ..backend import DEVICES, DTYPES
from ..checkpoint import load_checkpoint
from ..data import DataError, stratified_holdout
from ..datasets import has_test_split, load_dataset, source_kind
from ..inputs import InputSpec
from ..model import EVALUATION_BATCH_SIZE
from ..predict import DEFAULT_TOP, predict_files
from ..report import classification_report, confusion_matrix, format_report, write_json
from ..serialization import FileWriteError
from ..training import evaluate
from .arguments import DATA_METAVAR, add_command, add_import_option, json_report_path, positive_int, range_label, range_text, select_range
from .console import EXIT_OK, EXIT_USAGE, PROG, print_error, say
from .runtime import open_backend, quiet_float_warnings
from .settings import data_digest, data_not_found, digest_matches, ranges_digest, refuse_changed_images, same_data

CHECKPOINT_HELP = "a .npz written by train (or Sequential.save)"


def add_evaluate_command(commands) -> None:
    evaluate_parser = add_command(
        commands, "evaluate", run_evaluate,
        help="accuracy, per-class precision/recall/F1 and confusion matrix of a checkpoint",
        description="Evaluate a checkpoint (or model file) on a split: prints a table and writes a JSON report.",
    )
    evaluate_parser.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help=CHECKPOINT_HELP)
    add_import_option(evaluate_parser)
    evaluate_parser.add_argument("--data", metavar=DATA_METAVAR, help="the data (default: the one the checkpoint was trained on)")
    evaluate_parser.add_argument("--split", choices=("train", "test"), default="train", help="train (default: the "
                                 "checkpoint's validation images) or test (datasets with a test split; for Fashion-MNIST "
                                 "the full download)")
    evaluate_parser.add_argument("--range", type=range_text, metavar="START:STOP", help="images of the split to use (default: "
                                 "the checkpoint's validation range on train, all of test)")
    evaluate_parser.add_argument("--device", choices=DEVICES, default="auto", help="(default: auto)")
    evaluate_parser.add_argument("--dtype", choices=DTYPES, help="(default: the checkpoint's)")
    evaluate_parser.add_argument("--batch-size", type=positive_int, default=EVALUATION_BATCH_SIZE, help="samples per forward pass "
                                 f"(default: {EVALUATION_BATCH_SIZE})")
    evaluate_parser.add_argument("--flip-average", action="store_true", help="also score the mean of the logits of each "
                                 "image and its left-right mirror, reported beside the plain figures (twice the work)")
    evaluate_parser.add_argument("--json", type=json_report_path, metavar="PATH.json", help="report file (default: <checkpoint>-<split>-evaluation.json beside the checkpoint)")


def add_predict_command(commands) -> None:
    predict_parser = add_command(
        commands, "predict", run_predict,
        help="the most likely classes of image files, with a trained checkpoint",
        description="Predict image files (any format Pillow reads, any size): each is converted to the model's "
        "channel count and size and normalised as in training. A file that cannot be used is reported in one "
        "line and the others are still predicted; the exit status is 2 when any failed.",
    )
    predict_parser.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help=CHECKPOINT_HELP)
    predict_parser.add_argument("images", type=Path, nargs="+", metavar="IMAGE", help="image files")
    add_import_option(predict_parser)
    predict_parser.add_argument("--top", type=positive_int, default=DEFAULT_TOP, metavar="K",
                                help=f"classes to show per image (default: {DEFAULT_TOP})")
    predict_parser.add_argument("--json", action="store_true", help="print one JSON document instead of lines")
    predict_parser.add_argument("--device", choices=DEVICES, default="auto", help="(default: auto)")
    predict_parser.add_argument("--batch-size", type=positive_int, default=EVALUATION_BATCH_SIZE, help="images per forward pass "
                                f"(default: {EVALUATION_BATCH_SIZE})")


def _other_images_advice(source) -> str:
    """What to do when the checkpoint's own validation images can no longer be told apart."""
    return "pass --range START:STOP" + (", or evaluate --split test" if has_test_split(source) else "")


def _refuse_changed_ranges(stored: dict, data, source, path) -> None:
    """The checkpoint's own validation range indexes the data's order: refused once its images (or
    the training range's) are others, where a file added before them shifted every index."""
    recorded = stored.get("ranges_of")  # checkpoints from before it was recorded have none
    if recorded is None or stored.get("train_split") is None:
        return
    train_window = select_range(stored["train_split"], len(data), "--train-split")
    val_window = select_range(stored["val_split"], len(data), "--range")
    refuse_changed_images(
        source, path, recorded, ranges_digest(data, train_window, val_window), data,
        "its validation range would now hold other images, some it may have trained on", _other_images_advice(source),
        windows=(train_window, val_window), trained_on=stored.get("data"),
    )


def _trained_on_note(stored: dict, data, source, window: slice, args) -> str | None:
    """A note when an explicit ``--range`` of the data the checkpoint was trained on holds images
    it trained on (its accuracy is then optimistic), as train notes overlapping ranges."""
    if args.split != "train" or not stored.get("data") or not same_data(source, stored["data"]):
        return None
    selected = numpy.arange(len(data))[window]
    try:
        recorded = stored.get("holdout_of")
        if stored.get("val_fraction") and recorded is not None and digest_matches(recorded, data_digest(data), data):
            trained = stratified_holdout(data.labels, stored["val_fraction"], stored.get("seed", 0))[0]
        elif stored.get("train_split") is not None and stored.get("val_split") is not None:
            windows = (select_range(stored["train_split"], len(data), "--train-split"), select_range(stored["val_split"], len(data), "--range"))
            if not digest_matches(stored.get("ranges_of"), ranges_digest(data, *windows), data, windows):
                return None
            trained = numpy.arange(len(data))[windows[0]]
        else:
            return None
    except ValueError:  # the data changed since (fewer images than the ranges): which were trained on is not known
        return None
    count = int(numpy.isin(selected, trained, assume_unique=True).sum())
    if not count:
        return None
    return f"{count:,} of the {len(selected):,} images in --range {args.range} are ones the model trained on: its accuracy on them is optimistic"


def run_evaluate(args) -> int:
    """The ``evaluate`` command."""
    checkpoint = load_checkpoint(args.checkpoint, require_training_state=False)
    stored = checkpoint.settings
    inputs = checkpoint.input_spec()
    backend, device_line = open_backend(args.device, args.dtype or checkpoint.dtype)
    model = checkpoint.build_model(backend)

    source = args.data or stored.get("data", "auto")
    if args.split == "test" and source == "bundled":
        source = "auto"  # the bundled subset has no test split; look for the downloaded one
    if args.data is None:
        try:
            source_kind(source)
        except DataError as exc:  # the training data's folder has moved
            raise data_not_found(exc, checkpoint) from None
    data = load_evaluation_data(source, args.split, inputs, bool(stored.get("strict")))
    pairing_note = inputs.check(data, f"--data {source} ({args.split})")
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
        _refuse_changed_ranges(stored, data, source, checkpoint.path)
    if range_text is None:
        refuse_changed_images(  # checkpoints from before the digest was recorded have none
            source, checkpoint.path, stored.get("holdout_of"), data_digest(data), data,
            "its hold-out would now take images it trained on", _other_images_advice(source), trained_on=stored.get("data"),
        )
        window = stratified_holdout(labels, stored["val_fraction"], stored.get("seed", 0))[1]
        window_text, label = "hold-out", f"hold-out ({len(window):,} images)"
    else:
        window = select_range(range_text, len(images), "--range")
        window_text, label = f"{window.start}:{window.stop}", range_label(window)
    overlap_note = _trained_on_note(stored, data, source, window, args) if args.range is not None else None

    say(f"checkpoint: {checkpoint.path}" + (f" (epoch {checkpoint.epoch}, {stored.get('model')} model)" if checkpoint.is_training_checkpoint else ""))
    say(device_line)
    say(f"data: {data.source}")
    for note in [*data.notes, pairing_note, overlap_note]:
        if note:
            say(f"note: {note}")
    say(f"input: {inputs.describe()}")
    say(f"evaluating on {args.split} {label}: {why}")

    with quiet_float_warnings():
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
    if args.flip_average:
        with quiet_float_warnings():
            flipped = evaluate(model, inputs.prepare(images[window], backend.dtype), labels[window], args.batch_size, flip_average=True)
        document["flip_average"] = {"accuracy": flipped["accuracy"], "loss": flipped["loss"]}
    say("")
    say(format_report(report))
    say(f"loss {scores['loss']:.4f}")
    if args.flip_average:
        say(f"flip-averaged: accuracy {flipped['accuracy']:.4f}, loss {flipped['loss']:.4f} "
            f"(without: accuracy {scores['accuracy']:.4f}, loss {scores['loss']:.4f})")
    json_path = args.json or checkpoint.path.with_name(f"{checkpoint.path.stem}-{args.split}-evaluation.json")
    try:
        write_json(json_path, document)
    except FileWriteError as exc:
        raise FileWriteError(exc.path, OSError(exc.errno, f"{exc.strerror}; pass --json PATH to write the report elsewhere")) from None
    say(f"report written to {json_path}")
    return EXIT_OK


def load_evaluation_data(source, split: str, inputs: InputSpec, strict: bool):
    """``split`` of ``source``; an image folder is decoded to the model's channel count and size."""
    if source_kind(source) == "image-folder":
        return load_dataset(source, split, channels=inputs.channels, image_size=inputs.image_size, strict=strict)
    return load_dataset(source, split)


def run_predict(args) -> int:
    """The ``predict`` command: 0 when every image was predicted, 2 when any could not be used."""
    checkpoint = load_checkpoint(args.checkpoint, require_training_state=False)
    inputs = checkpoint.input_spec()
    backend, device_line = open_backend(args.device, checkpoint.dtype)
    model = checkpoint.build_model(backend)
    with quiet_float_warnings():
        predictions = predict_files(model, inputs, args.images, top=args.top, batch_size=args.batch_size)
    for prediction in predictions:
        if not prediction.ok:
            print_error(prediction.error)
    if args.json:
        document = {
            "checkpoint": str(checkpoint.path), "input": inputs.config(), "assumed_input": not inputs.recorded,
            "predictions": [prediction.as_dict() for prediction in predictions],
        }
        say(json.dumps(document, indent=2))
    else:
        if not inputs.recorded:
            print(f"{PROG}: note: {inputs.describe()}", file=sys.stderr, flush=True)
        for prediction in predictions:
            if prediction.ok:
                say(f"{prediction.path}: " + ", ".join(f"{name} {probability:.1%}" for name, probability in prediction.top))
    return EXIT_OK if all(prediction.ok for prediction in predictions) else EXIT_USAGE
