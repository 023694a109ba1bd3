"""The utility commands: ``summary`` (a network's layers and sizes) and ``download`` (a dataset)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from .. import cli as package  # get_backend, download and download_dataset are looked up there, so that tests can replace them
from ..backend import DTYPES
from ..data import FASHION_MNIST_SHAPE
from ..datasets import DATA_DIR_ENV, DATASETS, dataset_dir
from ..spec import BUILTIN_NAMES
from ..summary import format_summary
from .arguments import add_command, add_import_option, input_shape_text, model_text
from .console import EXIT_OK, PROG, say
from .runtime import DEFAULT_MODEL, build_builtin_model, load_spec_model
from .settings import resolve_settings


def add_summary_command(commands) -> None:
    summary_parser = add_command(
        commands, "summary", run_summary,
        help="print a network's layers, output shapes, parameter counts and MACs",
        description="Build a network (a built-in name or an architecture file) for an input shape and print its "
        "layers with output shape, parameters and multiply-accumulates per sample, then the totals and the parameter memory.",
    )
    summary_parser.add_argument("--model", type=model_text, default=DEFAULT_MODEL, metavar="seed|default|plain|FILE",
                                help="a built-in network or a .toml/.json architecture file (default: default)")
    add_import_option(summary_parser)
    summary_parser.add_argument("--input-shape", type=input_shape_text, default=FASHION_MNIST_SHAPE, metavar="C,H,W",
                                help="per-sample input shape, channels,height,width (or features) (default: 1,28,28, Fashion-MNIST)")
    summary_parser.add_argument("--dtype", choices=DTYPES, default="float32", help="for the parameter memory (default: float32)")


def add_download_command(commands) -> None:
    download_parser = add_command(
        commands, "download", run_download,
        help="fetch a dataset (Fashion-MNIST, MNIST, KMNIST, CIFAR-10) and verify it",
        description="Download a dataset's official files and check their published MD5s (CIFAR-10 is then unpacked).",
    )
    download_parser.add_argument("name", nargs="?", default="fashion-mnist", choices=tuple(DATASETS), metavar="NAME",
                                 help=f"one of {', '.join(f'{name} ({info.size_text})' for name, info in DATASETS.items())} "
                                 "(default: fashion-mnist)")
    download_parser.add_argument("--data-dir", type=Path, metavar="DIR", help="target folder (default: "
                                 "$CNN_BACKEND_DATA/NAME, else NAME in the user cache)")


def run_summary(args) -> int:
    """The ``summary`` command."""
    backend = package.get_backend("cpu", args.dtype)
    if args.model in BUILTIN_NAMES:
        # Built as train builds it, with the recipe's dropout, so that both print the same table.
        model = build_builtin_model(resolve_settings({"model": args.model}), backend, input_shape=args.input_shape)
    else:
        model = load_spec_model(args.model, args.input_shape, backend)
    say(format_summary(model.summary()))
    return EXIT_OK


def run_download(args) -> int:
    """The ``download`` command."""
    # The data module reports each file (fetched, or already present and verified) at INFO.
    logging.basicConfig(level=logging.INFO, format=f"{PROG}: %(message)s", stream=sys.stderr)
    info = DATASETS[args.name]
    if args.data_dir is not None and args.data_dir.exists() and not args.data_dir.is_dir():
        raise ValueError(f"--data-dir {args.data_dir} is a file, not a folder; choose another --data-dir")
    if args.name == "fashion-mnist":
        directory = package.download(args.data_dir)
    else:
        directory = package.download_dataset(args.name, args.data_dir)
    where = ""
    if args.data_dir is not None and directory != dataset_dir(args.name) and args.name != "fashion-mnist":
        where = f"; --data {args.name} reads {dataset_dir(args.name)}: set ${DATA_DIR_ENV} to the folder above one named {args.name}"
    sizes = ", ".join(f"{count:,} {split}" for split, count in info.split_sizes.items())
    say(f"{info.title} ({sizes} images) is ready in {directory} (all files verified){where}")
    return EXIT_OK
