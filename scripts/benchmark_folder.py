"""Time the image-folder loader: a generated folder of PNG images, loaded once (decoding every file
and writing the cache) and again (from the memory-mapped cache).

    python scripts/benchmark_folder.py [--images 10000] [--size 32] [--classes 10] [--folder DIR] [--repeats 3]

The folder (and the cache, under a temporary $CNN_BACKEND_DATA) are deleted afterwards unless
--folder is given. Prints one line per run and a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy

REPO_ROOT = Path(__file__).resolve().parents[1]
try:
    from cnn_backend.datasets import load_dataset
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO_ROOT))
    from cnn_backend.datasets import load_dataset


def generate_folder(root: Path, images: int, size: int, classes: int, seed: int = 0) -> None:
    """``images`` random RGB PNGs of ``size`` x ``size``, spread evenly over ``classes`` folders."""
    from PIL import Image

    rng = numpy.random.default_rng(seed)
    for label in range(classes):
        (root / f"class_{label:02d}").mkdir(parents=True, exist_ok=True)
    for index in range(images):
        pixels = rng.integers(0, 256, size=(size, size, 3), dtype=numpy.uint8)
        Image.fromarray(pixels).save(root / f"class_{index % classes:02d}" / f"{index:06d}.png")


def timed_load(root: Path) -> tuple[float, object]:
    started = time.perf_counter()
    data = load_dataset(root)
    int(data.images[-1].sum())  # touch the last image, so a lazy load is not timed as free
    return time.perf_counter() - started, data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="cached loads to time (default: 3)")
    parser.add_argument("--folder", type=Path, help="generate into (and keep) this folder")
    args = parser.parse_args(argv)

    workspace = Path(tempfile.mkdtemp(prefix="cnn-backend-folder-benchmark-"))
    os.environ["CNN_BACKEND_DATA"] = str(workspace / "data-root")
    root = args.folder or workspace / "images"
    try:
        started = time.perf_counter()
        generate_folder(root, args.images, args.size, args.classes)
        generated = time.perf_counter() - started
        print(f"generated {args.images:,} {args.size}x{args.size} RGB PNGs in {args.classes} classes: {generated:.1f} s")
        first, data = timed_load(root)
        print(f"first load (decode {len(data):,} images, write the cache): {first:.2f} s ({len(data) / first:,.0f} images/s)")
        cached = []
        for _ in range(args.repeats):
            seconds, data = timed_load(root)
            cached.append(seconds)
            print(f"cached load: {seconds * 1000:.0f} ms")
        summary = {
            "images": len(data), "shape": list(data.image_shape), "classes": args.classes,
            "generate_s": round(generated, 2), "first_load_s": round(first, 3),
            "cached_load_s": [round(value, 4) for value in cached], "cpus": os.cpu_count(),
        }
        print(json.dumps(summary))
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
