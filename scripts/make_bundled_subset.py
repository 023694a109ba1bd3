"""Write the bundled Fashion-MNIST subset: the first 10,000 training images and labels as IDX gz.

    python scripts/make_bundled_subset.py [--source DIR] [--output DIR] [--count N]

The source folder (default: where ``cnn-backend download`` puts the full set) must hold the official
``train-images-idx3-ubyte.gz`` and ``train-labels-idx1-ubyte.gz``; they are checked against the
published MD5s before use. The output
is deterministic (IDX header with the new count, gzip level 9, mtime 0, fixed embedded name), so
running the script again reproduces the same bytes given the same zlib. The script prints the
sha256 of each file and says whether it matches ``BUNDLED_SHA256`` in ``cnn_backend/datasets/sources.py``
(written into ``cnn_backend/datasets/bundled/`` by default).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
try:
    from cnn_backend import data
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO_ROOT))
    from cnn_backend import data
from cnn_backend.datasets.sources import default_data_dir

IMAGES, LABELS = "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--source", type=Path, help="folder with the official training files (default: the downloaded full set)")
    parser.add_argument("--output", type=Path, default=data.BUNDLED_DIR, help="where to write (default: %(default)s)")
    parser.add_argument("--count", type=int, default=data.BUNDLED_COUNT, help="records to keep (default: %(default)s)")
    args = parser.parse_args(argv)

    source = args.source or default_data_dir()
    if not (source / IMAGES).is_file():
        parser.error(f"{source} holds no {IMAGES}: run cnn-backend download, or pass --source")
    for name in (IMAGES, LABELS):
        digest = hashlib.md5((source / name).read_bytes()).hexdigest()
        if digest != data.OFFICIAL_MD5[name]:
            parser.error(f"{source / name}: MD5 {digest} is not the official {data.OFFICIAL_MD5[name]}")

    images = data.read_images(source / IMAGES)[: args.count]
    labels = data.read_labels(source / LABELS)[: args.count].astype("uint8")
    args.output.mkdir(parents=True, exist_ok=True)
    data.write_idx(args.output / IMAGES, images)
    data.write_idx(args.output / LABELS, labels)

    all_match = True
    for name in (IMAGES, LABELS):
        path = args.output / name
        digest = sha256(path)
        recorded = data.BUNDLED_SHA256.get(name)
        all_match &= digest == recorded
        status = "matches BUNDLED_SHA256" if digest == recorded else "differs from BUNDLED_SHA256: update cnn_backend/datasets/sources.py"
        print(f"{path}  {path.stat().st_size:,} bytes  sha256 {digest}  ({status})")
    return 0 if all_match else 1


if __name__ == "__main__":
    sys.exit(main())
