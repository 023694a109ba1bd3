"""Tests for cnn_backend.data: IDX files, the bundled subset, the download, the loader and batching.

The download tests talk only to an HTTP server on 127.0.0.1 that each test starts itself.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import re
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy
import pytest

from cnn_backend import data
from cnn_backend.backend import Backend, get_backend
from cnn_backend.data import BatchLoader, DataError, prepare_images

#: a folder of the official Fashion-MNIST training files, for the check of the bundled subset (CI sets it
#: where the machine has them)
OFFICIAL_DATA_ENV = "CNN_BACKEND_OFFICIAL_DATA"
OFFICIAL_NAMES = tuple(data.OFFICIAL_MD5)


def random_images(count: int, seed: int = 0, size: int = 28) -> numpy.ndarray:
    return numpy.random.default_rng(seed).integers(0, 256, size=(count, size, size), dtype=numpy.uint8)


def random_labels(count: int, seed: int = 0) -> numpy.ndarray:
    return numpy.random.default_rng(seed).integers(0, 10, size=count).astype(numpy.uint8)


def write_split(directory: Path, prefix: str, count: int, *, gz: bool = True, seed: int = 0):
    """Write a small `<prefix>-images/labels` pair; return (images, labels)."""
    images, labels = random_images(count, seed), random_labels(count, seed)
    suffix = ".gz" if gz else ""
    data.write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images)
    data.write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return images, labels


def assert_one_line_error(excinfo, path: Path, problem: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    assert str(path) in message, message
    assert re.search(problem, message), message


# ---------------------------------------------------------------------------------------- IDX files


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_idx_round_trip_images_and_labels(tmp_path, suffix):
    images, labels = random_images(7), random_labels(7)
    data.write_idx(tmp_path / f"images{suffix}", images)
    data.write_idx(tmp_path / f"labels{suffix}", labels)

    read_images = data.read_images(tmp_path / f"images{suffix}")
    read_labels = data.read_labels(tmp_path / f"labels{suffix}")

    assert read_images.dtype == numpy.uint8 and read_images.shape == (7, 28, 28)
    numpy.testing.assert_array_equal(read_images, images)
    assert read_labels.dtype == numpy.int64
    numpy.testing.assert_array_equal(read_labels, labels)
    assert read_images.flags.writeable


@pytest.mark.parametrize("dtype", ["int8", "int16", "int32", "float32", "float64"])
def test_idx_round_trip_multibyte_types_are_big_endian_on_disk(tmp_path, dtype):
    array = numpy.arange(-6, 6).reshape(3, 4).astype(dtype)
    data.write_idx(tmp_path / "a.idx", array)
    raw = (tmp_path / "a.idx").read_bytes()
    assert raw[4:12] == bytes([0, 0, 0, 3, 0, 0, 0, 4])
    assert raw[12:] == array.astype(numpy.dtype(dtype).newbyteorder(">")).tobytes()
    result = data.read_idx(tmp_path / "a.idx")
    assert result.dtype == numpy.dtype(dtype)
    numpy.testing.assert_array_equal(result, array)


def test_gz_output_is_deterministic_and_leaves_no_temporary_files(tmp_path):
    images = random_images(5)
    data.write_idx(tmp_path / "a.gz", images)
    first = (tmp_path / "a.gz").read_bytes()
    data.write_idx(tmp_path / "a.gz", images)  # overwrite in place
    assert (tmp_path / "a.gz").read_bytes() == first
    assert first[4:8] == b"\0\0\0\0"  # gzip mtime field
    assert [p.name for p in tmp_path.iterdir()] == ["a.gz"]


def test_write_idx_rejects_types_idx_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="IDX cannot store dtype int64"):
        data.write_idx(tmp_path / "a.idx", numpy.array([0, 2**40], dtype=numpy.int64))
    with pytest.raises(ValueError, match="IDX cannot store dtype complex128"):
        data.write_idx(tmp_path / "a.idx", numpy.zeros(3, dtype=numpy.complex128))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "values, stored", [([0, 9, 255], numpy.uint8), ([-3, 100], numpy.int8), ([-1, 300], numpy.int16), ([0, 70000], numpy.int32)]
)
def test_write_idx_stores_other_integers_in_the_smallest_idx_type_that_holds_them(tmp_path, values, stored):
    # The int64 labels the loaders return write back as the uint8 labels of MNIST's own files.
    data.write_idx(tmp_path / "labels.gz", numpy.array(values, dtype=numpy.int64))
    read = data.read_idx(tmp_path / "labels.gz")
    assert read.dtype == stored
    numpy.testing.assert_array_equal(read, values)


def idx_header(code: int, *dims: int) -> bytes:
    return bytes([0, 0, code, len(dims)]) + numpy.asarray(dims, dtype=">u4").tobytes()


CORRUPT_FILES = {
    "bad magic": (b"\x01\x02\x08\x01" + b"\0\0\0\x02" + b"\x01\x02", "labels", r"bad IDX magic number 0x01020801"),
    "unknown dtype code": (idx_header(0x07, 2) + b"\x01\x02", "labels", r"unknown IDX dtype code 0x07"),
    "empty file": (b"", "labels", r"truncated: 0 bytes, too short for an IDX header"),
    "truncated header": (idx_header(0x08, 3, 28, 28)[:9], "images", r"truncated: the header declares 3 dimensions"),
    "truncated payload": (idx_header(0x08, 3, 28, 28) + bytes(2 * 784), "images", r"truncated: header dims 3x28x28 need 2352 payload bytes, the file has 1568"),
    "count too small": (idx_header(0x08, 3) + bytes(5), "labels", r"size mismatch: header dims 3 need 3 payload bytes, the file has 5 \(2 extra\)"),
    "images read as labels": (idx_header(0x08, 2, 28, 28) + bytes(2 * 784), "labels", r"expected a 1-D uint8 label file, got 3-D uint8"),
    "labels read as images": (idx_header(0x08, 4) + bytes(4), "images", r"expected a 3-D uint8 image file, got 1-D uint8"),
    "float images": (idx_header(0x0D, 1, 28, 28) + bytes(4 * 784), "images", r"expected a 3-D uint8 image file, got 3-D float32"),
    "wrong image size": (idx_header(0x08, 2, 27, 27) + bytes(2 * 729), "images", r"expected 28x28 images, got 27x27; images of another size train from a folder of images \(one sub-folder per class\)$"),
    "label out of range": (idx_header(0x08, 4) + bytes([0, 9, 10, 3]), "labels", r"labels must be class indices 0-9; found 10 at record 2 \(1 out of range\); other classes train from a folder of images"),
}


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("case", list(CORRUPT_FILES))
def test_corrupt_idx_files_raise_one_line_naming_file_and_problem(tmp_path, case, compress):
    content, kind, problem = CORRUPT_FILES[case]
    path = tmp_path / ("broken.idx.gz" if compress else "broken.idx")
    path.write_bytes(gzip.compress(content, mtime=0) if compress else content)
    reader = data.read_images if kind == "images" else data.read_labels
    with pytest.raises(DataError) as excinfo:
        reader(path)
    assert_one_line_error(excinfo, path, problem)


def test_gzip_data_without_gz_in_its_name_says_to_rename_it(tmp_path):
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(gzip.compress(idx_header(0x08, 2) + b"\x01\x02", mtime=0))
    with pytest.raises(DataError) as excinfo:
        data.read_labels(path)
    assert_one_line_error(excinfo, path, r"gzip-compressed IDX data without \.gz in its name; rename it train-labels-idx1-ubyte\.gz")


def test_file_named_gz_that_is_not_gzip(tmp_path):
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(idx_header(0x08, 2) + bytes([1, 2]))
    with pytest.raises(DataError) as excinfo:
        data.read_labels(path)
    assert_one_line_error(excinfo, path, r"not a gzip file, although the name ends in \.gz")


def test_truncated_and_corrupt_gzip_streams(tmp_path):
    compressed = gzip.compress(idx_header(0x08, 50, 28, 28) + random_images(50).tobytes(), mtime=0)
    truncated = tmp_path / "truncated.gz"
    truncated.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(DataError) as excinfo:
        data.read_idx(truncated)
    assert_one_line_error(excinfo, truncated, r"truncated gzip data")

    damaged = bytearray(compressed)
    damaged[-8] ^= 0xFF  # the CRC32 trailer
    corrupt = tmp_path / "corrupt.gz"
    corrupt.write_bytes(bytes(damaged))
    with pytest.raises(DataError) as excinfo:
        data.read_idx(corrupt)
    assert_one_line_error(excinfo, corrupt, r"corrupt gzip data \(CRC check failed")


def test_missing_file(tmp_path):
    with pytest.raises(DataError) as excinfo:
        data.read_idx(tmp_path / "absent.gz")
    assert_one_line_error(excinfo, tmp_path / "absent.gz", "no such file")


# ---------------------------------------------------------------------------------- bundled subset


def test_bundled_subset_loads_with_headers_of_10000():
    images, labels = data.load_fashion_mnist("train", source="bundled")
    assert images.shape == (10_000, 28, 28) and images.dtype == numpy.uint8
    assert labels.shape == (10_000,) and labels.dtype == numpy.int64
    assert labels.min() == 0 and labels.max() == 9
    for name, header in [
        ("train-images-idx3-ubyte.gz", idx_header(0x08, 10_000, 28, 28)),
        ("train-labels-idx1-ubyte.gz", idx_header(0x08, 10_000)),
    ]:
        with gzip.open(data.BUNDLED_DIR / name) as stream:
            assert stream.read(len(header)) == header
    assert (data.BUNDLED_DIR / "LICENSE-fashion-mnist.txt").read_text(encoding="utf-8").count("Zalando SE") >= 2


def test_bundled_subset_is_the_first_10000_official_training_records():
    shared = Path(os.environ.get(OFFICIAL_DATA_ENV, "") or data.default_data_dir())
    if not (shared / "train-labels-idx1-ubyte.gz").is_file():
        pytest.skip(f"no official Fashion-MNIST training files: download them, or set {OFFICIAL_DATA_ENV} to their folder")
    images, labels = data.load_fashion_mnist("train", source="bundled")
    official_images = data.read_images(shared / "train-images-idx3-ubyte.gz")
    official_labels = data.read_labels(shared / "train-labels-idx1-ubyte.gz")
    assert official_images.shape == (60_000, 28, 28)
    numpy.testing.assert_array_equal(images, official_images[:10_000])
    numpy.testing.assert_array_equal(labels, official_labels[:10_000])


def test_bundled_files_are_checked_against_recorded_sha256(monkeypatch):
    monkeypatch.setitem(data.BUNDLED_SHA256, "train-labels-idx1-ubyte.gz", "0" * 64)
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: bundled file corrupt \(sha256 [0-9a-f]{64}, expected 0{64}\)"):
        data.load_fashion_mnist("train", source="bundled")


def test_test_split_is_not_bundled():
    with pytest.raises(DataError, match=r"the test split is not bundled .* run `cnn-backend download`"):
        data.load_fashion_mnist("test", source="bundled")


# ------------------------------------------------------------------------------------------ loader


def test_directory_source_reads_test_split_files(tmp_path):
    images, labels = write_split(tmp_path, "t10k", 6, seed=3)
    loaded_images, loaded_labels = data.load_fashion_mnist("test", source=tmp_path)
    numpy.testing.assert_array_equal(loaded_images, images)
    numpy.testing.assert_array_equal(loaded_labels, labels)
    assert data.describe_source("test", tmp_path) == f"Fashion-MNIST test: files in directory {tmp_path}"


def test_directory_source_reads_raw_files(tmp_path):
    images, labels = write_split(tmp_path, "train", 4, gz=False)
    loaded_images, loaded_labels = data.load_fashion_mnist("train", source=str(tmp_path))
    numpy.testing.assert_array_equal(loaded_images, images)
    numpy.testing.assert_array_equal(loaded_labels, labels)


def test_directory_source_errors(tmp_path):
    with pytest.raises(DataError, match=r"no t10k-images-idx3-ubyte\.gz or t10k-images-idx3-ubyte for the test split"):
        data.load_fashion_mnist("test", source=tmp_path)
    with pytest.raises(DataError, match="not a directory"):
        data.load_fashion_mnist("train", source=tmp_path / "nowhere")
    data.write_idx(tmp_path / "train-images-idx3-ubyte.gz", random_images(5))
    data.write_idx(tmp_path / "train-labels-idx1-ubyte.gz", random_labels(4))
    with pytest.raises(DataError, match="has 5 images but train-labels-idx1-ubyte.gz has 4 labels"):
        data.load_fashion_mnist("train", source=tmp_path)
    with pytest.raises(ValueError, match="split must be one of train, test"):
        data.load_fashion_mnist("validation", source=tmp_path)


def test_auto_falls_back_to_bundled_when_cache_is_empty(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CNN_BACKEND_DATA", str(tmp_path))
    with caplog.at_level(logging.INFO, logger="cnn_backend"):
        images, labels = data.load_fashion_mnist("train")
    assert images.shape == (10_000, 28, 28) and labels.shape == (10_000,)
    assert "bundled subset" in caplog.text
    assert "bundled subset" in data.describe_source("train")
    with pytest.raises(DataError, match="the test split is not bundled"):
        data.load_fashion_mnist("test")


def test_auto_uses_full_files_in_cache(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CNN_BACKEND_DATA", str(tmp_path))
    train_images, _ = write_split(tmp_path, "train", 12, seed=1)
    test_images, test_labels = write_split(tmp_path, "t10k", 5, seed=2)
    with caplog.at_level(logging.INFO, logger="cnn_backend"):
        images, _ = data.load_fashion_mnist("train")
    numpy.testing.assert_array_equal(images, train_images)
    assert f"files in cache {tmp_path}" in caplog.text
    images, labels = data.load_fashion_mnist("test", source="auto")
    numpy.testing.assert_array_equal(images, test_images)
    numpy.testing.assert_array_equal(labels, test_labels)


def test_auto_rejects_half_a_split_in_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CNN_BACKEND_DATA", str(tmp_path))
    data.write_idx(tmp_path / "train-images-idx3-ubyte.gz", random_images(3))
    with pytest.raises(DataError, match=r"incomplete data set, train-labels-idx1-ubyte\.gz .* is missing"):
        data.load_fashion_mnist("train")


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CNN_BACKEND_DATA", str(tmp_path))
    assert data.default_data_dir() == tmp_path / "fashion-mnist"
    # The layout of earlier versions, the Fashion-MNIST files directly in $CNN_BACKEND_DATA, still counts.
    data.write_idx(tmp_path / "train-labels-idx1-ubyte.gz", random_labels(3))
    assert data.default_data_dir() == tmp_path
    monkeypatch.delenv("CNN_BACKEND_DATA")
    import platformdirs

    assert data.default_data_dir() == Path(platformdirs.user_cache_dir("cnn-backend")) / "fashion-mnist"


def test_split_train_validation_conventions():
    images, labels = numpy.arange(10_000), numpy.arange(10_000) % 10
    (train_x, train_y), (val_x, val_y) = data.split_train_validation(images, labels, *data.SEED_SPLIT)
    numpy.testing.assert_array_equal(train_x, numpy.arange(5000))
    numpy.testing.assert_array_equal(val_x, numpy.arange(5000, 10_000))
    numpy.testing.assert_array_equal(val_y, labels[5000:])
    (train_x, _), (val_x, _) = data.split_train_validation(numpy.arange(60_000), numpy.zeros(60_000), 50_000)
    assert (train_x[-1], val_x[0], len(val_x)) == (49_999, 50_000, 10_000)
    with pytest.raises(DataError, match="bundled subset has 10,000 images"):
        data.split_train_validation(images, labels, *data.FULL_SPLIT)


def test_the_recipe_and_command_line_ranges_are_the_splits_as_text():
    from cnn_backend.cli.settings import FULL_DATA_SIZE, FULL_RANGES
    from cnn_backend.training import RECIPES

    assert (RECIPES["seed"]["train_split"], RECIPES["seed"]["val_split"]) == (":5000", "5000:10000")
    assert (FULL_DATA_SIZE, FULL_RANGES) == (60_000, (":50000", "50000:"))


def test_class_names():
    assert len(data.CLASS_NAMES) == 10
    assert data.CLASS_NAMES[0] == "T-shirt/top" and data.CLASS_NAMES[9] == "Ankle boot"


# ---------------------------------------------------------------------------------------- download


class FileServer:
    """Serves `files` on 127.0.0.1; counters make the next requests for a name fail."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.errors_500 = Counter()
        self.truncations = Counter()
        self.requests: list[str] = []
        state = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/")
                state.requests.append(name)
                body = state.files.get(name)
                if state.errors_500[name] > 0:
                    state.errors_500[name] -= 1
                    self.send_error(500)
                elif body is None:
                    self.send_error(404)
                else:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if state.truncations[name] > 0:
                        # Promise the whole body, send half of it, then hang up.
                        state.truncations[name] -= 1
                        self.wfile.write(body[: len(body) // 2])
                        self.close_connection = True
                    else:
                        self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def load_official_names(self, source_dir: Path) -> dict[str, str]:
        """Serve every file of `source_dir`; return checksums (md5 for images, sha256 for labels)."""
        checksums = {}
        for name in OFFICIAL_NAMES:
            body = (source_dir / name).read_bytes()
            self.files[name] = body
            algorithm = hashlib.md5 if "images" in name else hashlib.sha256
            checksums[name] = algorithm(body).hexdigest()
        return checksums


@pytest.fixture
def server(tmp_path):
    file_server = FileServer()
    file_server.thread.start()
    yield file_server
    file_server.server.shutdown()
    file_server.server.server_close()


@pytest.fixture
def served(server, tmp_path):
    """A server holding four small official-named files; returns (server, checksums, arrays)."""
    source = tmp_path / "source"
    source.mkdir()
    arrays = {"train": write_split(source, "train", 20, seed=4), "test": write_split(source, "t10k", 8, seed=5)}
    return server, server.load_official_names(source), arrays


def download(server, checksums, target: Path, **options):
    options.setdefault("backoff", 0.0)
    return data.download(target, base_url=server.base_url, checksums=checksums, progress=False, **options)


def test_download_fetches_verifies_and_loads(served, tmp_path):
    server, checksums, arrays = served
    target = tmp_path / "cache"
    assert download(server, checksums, target) == target
    assert sorted(p.name for p in target.iterdir()) == sorted(OFFICIAL_NAMES)
    images, labels = data.load_fashion_mnist("test", source=target)
    numpy.testing.assert_array_equal(images, arrays["test"][0])
    numpy.testing.assert_array_equal(labels, arrays["test"][1])

    # A second run verifies what is there and fetches nothing.
    server.requests.clear()
    download(server, checksums, target)
    assert server.requests == []


def test_download_replaces_a_corrupt_existing_file(served, tmp_path):
    server, checksums, _ = served
    target = tmp_path / "cache"
    target.mkdir()
    (target / "train-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    download(server, checksums, target)
    assert (target / "train-labels-idx1-ubyte.gz").read_bytes() == server.files["train-labels-idx1-ubyte.gz"]


def test_checksum_mismatch_leaves_nothing_behind(served, tmp_path):
    server, checksums, _ = served
    target = tmp_path / "cache"
    checksums = {"train-images-idx3-ubyte.gz": "0" * 32}
    with pytest.raises(DataError) as excinfo:
        download(server, checksums, target)
    message = str(excinfo.value)
    assert "\n" not in message
    assert re.search(r"train-images-idx3-ubyte\.gz: checksum mismatch \(md5 [0-9a-f]{32}, expected 0{32}\); the download was discarded", message)
    assert not target.exists()  # the folder the failed download made is gone again


def test_server_error_is_retried(served, tmp_path):
    server, checksums, _ = served
    server.errors_500["t10k-labels-idx1-ubyte.gz"] = 1
    target = tmp_path / "cache"
    download(server, checksums, target, retries=1)
    assert server.requests.count("t10k-labels-idx1-ubyte.gz") == 2
    assert sorted(p.name for p in target.iterdir()) == sorted(OFFICIAL_NAMES)


def test_persistent_server_error_gives_up_with_instructions(served, tmp_path):
    server, checksums, _ = served
    server.errors_500["train-images-idx3-ubyte.gz"] = 10
    target = tmp_path / "cache"
    with pytest.raises(DataError, match=r"after 3 attempts \(HTTP 500 .*\); to install without network, place"):
        download(server, checksums, target, retries=2)
    assert not target.exists()  # the folder the failed download made is gone again


def test_missing_file_on_server_is_not_retried(served, tmp_path):
    server, checksums, _ = served
    del server.files["t10k-images-idx3-ubyte.gz"]
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz: HTTP 404"):
        download(server, checksums, tmp_path / "cache", retries=3)
    assert server.requests.count("t10k-images-idx3-ubyte.gz") == 1
    assert not any(p.name.startswith("t10k-images") for p in (tmp_path / "cache").iterdir())


def test_interrupted_transfer_leaves_no_partial_file_and_next_run_completes(served, tmp_path):
    server, checksums, arrays = served
    server.truncations["train-images-idx3-ubyte.gz"] = 1
    target = tmp_path / "cache"
    with pytest.raises(DataError, match=r"could not download .*train-images-idx3-ubyte\.gz after 1 attempt \("):
        download(server, checksums, target, retries=0)
    assert not target.exists()  # neither the final name nor a .part file, nor the folder it made

    download(server, checksums, target, retries=0)
    images, _ = data.load_fashion_mnist("train", source=target)
    numpy.testing.assert_array_equal(images, arrays["train"][0])


def test_interrupted_transfer_is_retried_within_one_run(served, tmp_path):
    server, checksums, _ = served
    server.truncations["train-labels-idx1-ubyte.gz"] = 1
    download(server, checksums, tmp_path / "cache", retries=1)
    assert server.requests.count("train-labels-idx1-ubyte.gz") == 2


def test_stale_partial_file_from_a_killed_run_is_overwritten(served, tmp_path):
    server, checksums, _ = served
    target = tmp_path / "cache"
    target.mkdir()
    (target / "train-images-idx3-ubyte.gz.part").write_bytes(b"half a file")
    download(server, checksums, target)
    assert sorted(p.name for p in target.iterdir()) == sorted(OFFICIAL_NAMES)


def test_offline_explains_how_to_place_files_by_hand(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    target = tmp_path / "cache"
    with pytest.raises(DataError) as excinfo:
        data.download(target, base_url=f"http://127.0.0.1:{port}", retries=1, backoff=0.0, progress=False)
    message = str(excinfo.value)
    assert "\n" not in message
    assert "cannot reach the server" in message
    assert f"place {', '.join(OFFICIAL_NAMES)} into {target}" in message
    assert "--data-dir" not in message  # an option of download alone, no help to train or evaluate
    assert not target.exists()  # the folder the failed download made is gone again


# ---------------------------------------------------------------------------------------- batching


class StrictDeviceArray:
    """A stand-in for a CuPy array: refuses NumPy operands, NumPy index arrays and implicit conversion."""

    __array_ufunc__ = None  # NumPy binary operations with this type raise TypeError

    def __init__(self, host: numpy.ndarray):
        self._host = host

    shape = property(lambda self: self._host.shape)
    dtype = property(lambda self: self._host.dtype)

    def __len__(self):
        return len(self._host)

    def __array__(self, *args, **kwargs):
        raise TypeError("implicit conversion of a device array to NumPy")

    def __getitem__(self, key):
        if isinstance(key, numpy.ndarray):
            raise TypeError("a host index array was used on a device array")
        if isinstance(key, StrictDeviceArray):
            key = key._host
        return StrictDeviceArray(self._host[key])

    def astype(self, dtype):
        return StrictDeviceArray(self._host.astype(dtype))

    def __imul__(self, other):
        if not isinstance(other, (int, float)):
            raise TypeError(f"cannot multiply a device array by {type(other).__name__}")
        self._host *= other
        return self

    def get(self):
        return self._host.copy()


class StrictArrayModule:
    def asarray(self, array, dtype=None):
        if isinstance(array, StrictDeviceArray):
            return array if dtype is None else array.astype(dtype)
        return StrictDeviceArray(numpy.array(array, dtype=dtype))


def strict_backend(dtype="float32") -> Backend:
    return Backend("strict", StrictArrayModule(), None, numpy.dtype(dtype))


def indexed_images(count: int) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Image i is filled with the value i, so a batch tells which samples it holds."""
    images = numpy.broadcast_to(numpy.arange(count, dtype=numpy.uint8)[:, None, None], (count, 28, 28)).copy()
    return images, numpy.arange(count) % 10


def sample_ids(batches, backend) -> list[numpy.ndarray]:
    return [numpy.rint(backend.to_numpy(x)[:, 0, 0, 0] * 255).astype(int) for x, _ in batches]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("max_device_bytes", [data.DEFAULT_MAX_DEVICE_BYTES, 0], ids=["resident", "per-batch"])
def test_batches_shapes_types_range_and_coverage(dtype, max_device_bytes):
    backend = get_backend("cpu", dtype)
    images, labels = indexed_images(103)
    loader = BatchLoader(images, labels, backend, 10, seed=7, max_device_bytes=max_device_bytes)
    assert loader.resident == (max_device_bytes > 0)
    batches = list(loader.epoch(0))
    assert len(batches) == len(loader) == 11
    for x, y in batches[:-1]:
        assert x.shape == (10, 1, 28, 28) and y.shape == (10,)
    assert batches[-1][0].shape == (3, 1, 28, 28)
    for x, y in batches:
        assert x.dtype == numpy.dtype(dtype) and y.dtype == numpy.int64
        assert 0.0 <= x.min() and x.max() <= 1.0
    ids = numpy.concatenate(sample_ids(batches, backend))
    assert sorted(ids) == list(range(103))  # every sample exactly once
    assert ids.tolist() != list(range(103))  # shuffled
    numpy.testing.assert_array_equal(numpy.concatenate([y for _, y in batches]), ids % 10)


def test_batches_live_on_the_backend_device(backend, backend64):
    images, labels = indexed_images(40)
    for be in (backend, backend64):
        loader = BatchLoader(images, labels, be, 16, seed=2)
        batches = list(loader.epoch(0))
        for x, y in batches:
            assert isinstance(x, be.xp.ndarray) and isinstance(y, be.xp.ndarray)
            assert x.dtype == be.dtype and y.dtype == numpy.int64
        ids = numpy.concatenate(sample_ids(batches, be))
        numpy.testing.assert_array_equal(ids, numpy.random.default_rng((2, 0)).permutation(40))
        numpy.testing.assert_array_equal(numpy.concatenate([be.to_numpy(y) for _, y in batches]), ids % 10)


def test_pixel_scaling_is_exact_for_black_and_white():
    backend = get_backend("cpu")
    images = numpy.zeros((2, 28, 28), numpy.uint8)
    images[1] = 255
    (x, _), = BatchLoader(images, numpy.array([0, 1]), backend, 2, shuffle=False).epoch(0)
    assert x[0].max() == 0.0 and x[1].min() == 1.0


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_images_are_scaled_and_normalised_bit_for_bit_as_the_step_by_step_formula(dtype):
    from cnn_backend.testing import standin_backend

    images = numpy.random.default_rng(5).integers(0, 256, (6, 3, 4, 5), dtype=numpy.uint8)
    images[0] = 0
    images[1] = 255

    def formula(normalization):  # the steps written out: scale, then normalise
        x = images.astype(dtype)
        x *= 1.0 / 255.0
        if normalization is not None:
            mean, inverse_std = normalization.shaped(x.dtype)
            x -= mean
            x *= inverse_std
        return x

    for normalization in (None, data.Normalization((0.5, 0.25, 0.125), (0.3, 0.2, 0.7))):
        expected = formula(normalization)
        prepared = prepare_images(images, dtype, normalization)
        assert prepared.dtype == expected.dtype
        numpy.testing.assert_array_equal(prepared, expected)
        for backend in (get_backend("cpu", dtype), standin_backend(dtype)):
            for max_device_bytes in (0, 1 << 30):  # batches sent one by one, or the whole set on the device
                loader = BatchLoader(images, numpy.zeros(6, int), backend, 6, shuffle=False, normalization=normalization,
                                     max_device_bytes=max_device_bytes)
                (x, _), = loader.epoch(0)
                assert x.dtype == expected.dtype
                numpy.testing.assert_array_equal(backend.to_numpy(x), expected)


def test_order_is_reproducible_per_epoch():
    backend = get_backend("cpu")
    images, labels = indexed_images(50)
    loader = BatchLoader(images, labels, backend, 8, seed=3)
    epoch_1 = sample_ids(loader.epoch(1), backend)
    again = sample_ids(BatchLoader(images, labels, backend, 8, seed=3).epoch(1), backend)
    assert all((a == b).all() for a, b in zip(epoch_1, again, strict=True))
    epoch_2 = numpy.concatenate(sample_ids(loader.epoch(2), backend))
    assert not (numpy.concatenate(epoch_1) == epoch_2).all()
    numpy.testing.assert_array_equal(numpy.concatenate(epoch_1), numpy.random.default_rng((3, 1)).permutation(50))
    other_seed = numpy.concatenate(sample_ids(BatchLoader(images, labels, backend, 8, seed=4).epoch(1), backend))
    assert not (numpy.concatenate(epoch_1) == other_seed).all()


def test_drop_last_and_no_shuffle():
    backend = get_backend("cpu")
    images, labels = indexed_images(25)
    loader = BatchLoader(images, labels, backend, 10, shuffle=False, drop_last=True)
    ids = sample_ids(loader.epoch(0), backend)
    assert len(loader) == 2 and [len(batch) for batch in ids] == [10, 10]
    numpy.testing.assert_array_equal(numpy.concatenate(ids), numpy.arange(20))
    assert len(BatchLoader(images, labels, backend, 10, drop_last=False)) == 3
    assert len(BatchLoader(images, labels, backend, 5, drop_last=True)) == 5


@pytest.mark.parametrize("max_device_bytes", [data.DEFAULT_MAX_DEVICE_BYTES, 0], ids=["resident", "per-batch"])
def test_batches_never_mix_host_and_device_arrays(max_device_bytes):
    images, labels = indexed_images(30)
    strict = strict_backend("float64")
    loader = BatchLoader(images, labels, strict, 7, seed=1, max_device_bytes=max_device_bytes)
    reference = BatchLoader(images, labels, get_backend("cpu", "float64"), 7, seed=1)
    for (x, y), (x_ref, y_ref) in zip(loader.epoch(5), reference.epoch(5), strict=True):
        assert isinstance(x, StrictDeviceArray) and isinstance(y, StrictDeviceArray)
        assert x.dtype == numpy.float64 and y.dtype == numpy.int64
        numpy.testing.assert_array_equal(strict.to_numpy(x), x_ref)
        numpy.testing.assert_array_equal(strict.to_numpy(y), y_ref)


def test_batch_loader_rejects_bad_input():
    backend = get_backend("cpu")
    images = numpy.zeros((4, 28, 28), numpy.uint8)
    with pytest.raises(DataError, match=r"labels must be class indices 0-9; found 12 at record 2 \(1 out of range\) "
                                        r"\(num_classes=10: give the data's class count as num_classes\)"):
        BatchLoader(images, numpy.array([0, 1, 12, 3]), backend, 2)
    assert len(BatchLoader(images, numpy.array([0, 1, 12, 3]), "cpu", 2, num_classes=13)) == 2  # a device name will do
    with pytest.raises(DataError, match=r"found -1 at record 0"):
        BatchLoader(images, numpy.array([-1, 1, 2, 3]), backend, 2)
    with pytest.raises(ValueError, match=r"images must be uint8 pixels \(0-255, scaled to \[0, 1\] on the device\) or floats "
                                         r"\(used as they are\), got int32"):
        BatchLoader(images.astype(numpy.int32), numpy.zeros(4, int), backend, 2)
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        BatchLoader(images, numpy.zeros(3, int), backend, 2)
    for wrong in (0, True, 2.0):
        with pytest.raises(ValueError, match=rf"batch_size must be an integer >= 1, got {wrong!r}"):
            BatchLoader(images, numpy.zeros(4, int), backend, wrong)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_batch_loader_takes_float_images_as_they_are_in_the_models_dtype(dtype):
    rng = numpy.random.default_rng(0)
    images = rng.normal(size=(5, 2, 3, 3)).astype(numpy.float64)  # already prepared: negative values too
    labels = rng.integers(0, 10, size=5)
    loader = BatchLoader(images, labels, get_backend("cpu", dtype), 2, shuffle=False)
    batches = list(loader.epoch(1))
    assert [len(y) for _, y in batches] == [2, 2, 1]
    assert all(x.dtype == numpy.dtype(dtype) for x, _ in batches)
    numpy.testing.assert_array_equal(numpy.concatenate([x for x, _ in batches]), images.astype(dtype))
    with pytest.raises(DataError, match=r"^1 of 5 images contain NaN, infinity or values too large for float32; clean them first$"):
        BatchLoader(numpy.where(numpy.arange(5)[:, None, None, None] == 3, numpy.inf, images), labels, "cpu", 2)
    with pytest.raises(DataError, match=r"^2 of 5 images contain NaN, infinity or values too large for float32; "):
        BatchLoader(numpy.where(numpy.arange(5)[:, None, None, None] < 2, 1e39, images), labels, "cpu", 2)
    assert len(BatchLoader(numpy.where(numpy.arange(5)[:, None, None, None] < 2, 1e39, images), labels, get_backend("cpu", "float64"), 2)) == 3
    # Batches are copies: a step that changes one in place does not change the data set.
    stored = images.astype(dtype)
    first, _ = next(iter(BatchLoader(stored, labels, get_backend("cpu", dtype), 2, shuffle=False).epoch(1)))
    first *= 0
    assert stored.any()
    with pytest.raises(ValueError, match=r"^normalization applies to uint8 pixels; normalise float images before"):
        BatchLoader(images, labels, "cpu", 2, normalization=data.Normalization((0.5, 0.5), (0.2, 0.2)))


def test_prepare_images_scales_to_unit_range_with_a_channel_axis():
    images = numpy.array([[[0, 255], [51, 102]]], dtype=numpy.uint8)
    prepared = prepare_images(images, "float64")
    assert prepared.shape == (1, 1, 2, 2) and prepared.dtype == numpy.float64
    numpy.testing.assert_allclose(prepared[0, 0], [[0.0, 1.0], [0.2, 0.4]])


@pytest.mark.parametrize("options, message", [
    ({"shuffle": "no"}, "BatchLoader: shuffle must be true or false, got 'no'"),
    ({"drop_last": "False"}, "BatchLoader: drop_last must be true or false, got 'False'"),
    ({"num_classes": "3"}, "BatchLoader: num_classes must be an integer >= 1, got '3'"),
    ({"num_classes": 3.0}, "BatchLoader: num_classes must be an integer >= 1, got 3.0"),
    ({"num_classes": 0}, "BatchLoader: num_classes must be an integer >= 1, got 0"),
])
def test_batch_loader_options_are_checked_when_made(options, message):
    with pytest.raises(ValueError) as excinfo:
        BatchLoader(numpy.zeros((4, 2, 2), numpy.uint8), numpy.zeros(4, int), "cpu", 2, **options)
    assert str(excinfo.value) == message


def test_a_negative_epoch_index_is_refused_in_one_line():
    loader = BatchLoader(numpy.zeros((4, 2, 2), numpy.uint8), numpy.zeros(4, int), "cpu", 2)
    with pytest.raises(ValueError, match=r"^BatchLoader: the epoch index must be an integer >= 0, got -1$"):
        loader.order(-1)
