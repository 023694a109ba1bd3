"""Tests for cnn_backend.datasets: the registry, IDX/CIFAR-10/image-folder readers, downloads of named
datasets from a local HTTP server, safe unpacking, and the image-folder cache.

Every file is built by the test itself; the HTTP server listens on 127.0.0.1 only.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import re
import tarfile
import threading
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy
import pytest
from PIL import Image

from cnn_backend import datasets
from cnn_backend.datasets import DATASETS, DataError, load_dataset
from cnn_backend.datasets import folder as image_folder
from cnn_backend.datasets.cifar import RECORD_BYTES, read_cifar_batch, write_cifar_batch
from cnn_backend.datasets.download import extract_tar
from cnn_backend.datasets.idx import write_idx

from file_helpers import undecodable


@pytest.fixture(autouse=True)
def data_root(tmp_path, monkeypatch):
    """Every test gets its own data root (downloads and image-folder caches)."""
    root = tmp_path / "data-root"
    monkeypatch.setenv("CNN_BACKEND_DATA", str(root))
    return root


def assert_one_line(excinfo, *patterns: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for pattern in patterns:
        assert re.search(pattern, message), message
    return message


def random_uint8(shape, seed=0):
    return numpy.random.default_rng(seed).integers(0, 256, size=shape, dtype=numpy.uint8)


def write_idx_split(directory: Path, prefix: str, count: int, seed: int = 0):
    images = random_uint8((count, 28, 28), seed)
    labels = numpy.random.default_rng(seed + 100).integers(0, 10, size=count).astype(numpy.uint8)
    directory.mkdir(parents=True, exist_ok=True)
    write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images)
    write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return images, labels


def cifar_arrays(count: int, seed: int):
    images = random_uint8((count, 3, 32, 32), seed)
    labels = numpy.random.default_rng(seed + 100).integers(0, 10, size=count).astype(numpy.uint8)
    return images, labels


def make_cifar_archive(path: Path, per_batch: int = 4):
    """A cifar-10-binary.tar.gz laid out like the official one; returns {split: (images, labels)}."""
    batches = {f"data_batch_{i}.bin": cifar_arrays(per_batch, i) for i in range(1, 6)}
    batches["test_batch.bin"] = cifar_arrays(per_batch + 1, 9)
    with tarfile.open(path, "w:gz") as tar:
        for name, (images, labels) in batches.items():
            records = numpy.concatenate([labels[:, None], images.reshape(len(images), -1)], axis=1)
            add_bytes(tar, f"cifar-10-batches-bin/{name}", records.tobytes())
        add_bytes(tar, "cifar-10-batches-bin/batches.meta.txt", "\n".join(DATASETS["cifar10"].class_names).encode())
    train = [batches[f"data_batch_{i}.bin"] for i in range(1, 6)]
    return {
        "train": (numpy.concatenate([x for x, _ in train]), numpy.concatenate([y for _, y in train])),
        "test": batches["test_batch.bin"],
    }


def add_bytes(tar: tarfile.TarFile, name: str, payload: bytes, **fields) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    for key, value in fields.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(payload))


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


class FileServer:
    """Serves files from a dict on 127.0.0.1 and records the paths asked for."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        state = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                state.requests.append(self.path)
                body = state.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)


@pytest.fixture
def server():
    file_server = FileServer()
    file_server.thread.start()
    yield file_server
    file_server.server.shutdown()
    file_server.server.server_close()


# ------------------------------------------------------------------------------------ registry


def test_registry_rows_are_complete_and_checksums_are_md5s():
    assert set(DATASETS) == {"fashion-mnist", "mnist", "kmnist", "cifar10"}
    for info in DATASETS.values():
        assert info.files and all(re.fullmatch(r"[0-9a-f]{32}", digest) for digest in info.files.values())
        assert info.num_classes == 10 and len(set(info.class_names)) == 10
        assert info.licence and info.citation and info.homepage.startswith("http")
        assert set(info.splits) == {"train", "test"}
    assert DATASETS["mnist"].files["train-images-idx3-ubyte.gz"] == "f68b3c2dcbeaaa9fbdd348bbdeb94873"
    assert DATASETS["kmnist"].class_names[:3] == ("o", "ki", "su")
    assert DATASETS["cifar10"].image_shape == (3, 32, 32)
    assert DATASETS["cifar10"].files == {"cifar-10-binary.tar.gz": "c32a1d4ab5d03f1284b67883e8d87530"}
    with pytest.raises(ValueError, match="unknown dataset 'svhn'; known: fashion-mnist, mnist, kmnist, cifar10"):
        datasets.dataset_info("svhn")


def test_the_docs_dataset_table_gives_the_registry_sizes_shapes_and_classes():
    table = (Path(__file__).resolve().parent.parent / "docs" / "datasets.md").read_text(encoding="utf-8")
    rows = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        name = re.match(r"`([\w-]+)`", cells[0])
        if line.startswith("| `") and name and name[1] in DATASETS:
            rows[name[1]] = cells
    assert set(rows) == set(DATASETS)
    for name, info in DATASETS.items():
        _, _, sizes, shape, classes, download, *_ = rows[name]
        assert sizes == " / ".join(f"{info.split_sizes[split]:,}" for split in ("train", "test")), name
        assert shape == "x".join(map(str, info.image_shape)), name
        assert download.startswith(f"{info.size_text}, "), name
        assert classes == ("0-9" if name == "mnist" else ", ".join(info.class_names)), name


# ------------------------------------------------------------------------------------ IDX sets


@pytest.mark.parametrize("name", ["mnist", "kmnist"])
def test_idx_datasets_load_exact_pixels_labels_and_class_names(data_root, name):
    train = write_idx_split(data_root / name, "train", 7, seed=1)
    test = write_idx_split(data_root / name, "t10k", 3, seed=2)
    for split, (images, labels) in (("train", train), ("test", test)):
        loaded = load_dataset(name, split)
        assert loaded.images.dtype == numpy.uint8 and loaded.images.shape == (len(images), 1, 28, 28)
        assert loaded.labels.dtype == numpy.int64
        numpy.testing.assert_array_equal(loaded.images[:, 0], images)
        numpy.testing.assert_array_equal(loaded.labels, labels)
        assert loaded.class_names == DATASETS[name].class_names
        assert loaded.image_shape == (1, 28, 28)
        assert str(data_root / name) in loaded.source


def test_mnist_with_a_wrong_magic_number_is_refused_in_one_line(data_root):
    write_idx_split(data_root / "mnist", "train", 2)
    path = data_root / "mnist" / "train-images-idx3-ubyte.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[0:4] = b"\x01\x00\x08\x03"
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError) as excinfo:
        load_dataset("mnist")
    assert_one_line(excinfo, re.escape(str(path)), "bad IDX magic number 0x01000803")


def test_a_dataset_not_downloaded_says_how_to_get_it(data_root):
    with pytest.raises(DataError) as excinfo:
        load_dataset("kmnist", "test")
    assert_one_line(
        excinfo, "Kuzushiji-MNIST test split not found", r"run `cnn-backend download kmnist`",
        re.escape(f"place train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
                  f"t10k-labels-idx1-ubyte.gz into {data_root / 'kmnist'} "),
        # The variable names the root that holds the dataset's folder (not the folder itself), and
        # no option that train lacks (--data-dir is download's) is suggested.
        re.escape("($CNN_BACKEND_DATA chooses the data root, the folder that holds kmnist/)"),
    )
    assert "--data-dir" not in str(excinfo.value)


def test_mnist_labels_out_of_range_are_refused(data_root):
    write_idx_split(data_root / "mnist", "train", 3)
    write_idx(data_root / "mnist" / "train-labels-idx1-ubyte.gz", numpy.array([1, 2, 11], dtype=numpy.uint8))
    with pytest.raises(DataError) as excinfo:
        load_dataset("mnist")
    assert_one_line(excinfo, r"labels must be class indices 0-9; found 11 at record 2")


def test_download_mnist_tries_the_next_mirror_and_verifies(server, data_root):
    source = data_root.parent / "mnist-source"
    images, labels = write_idx_split(source, "train", 5, seed=3)
    write_idx_split(source, "t10k", 2, seed=4)
    checksums = {path.name: md5(path) for path in source.iterdir()}
    for path in source.iterdir():
        server.files[f"/second/{path.name}"] = path.read_bytes()
    directory = datasets.download_dataset(
        "mnist", mirrors=[f"{server.url}/first/", f"{server.url}/second/"], checksums=checksums,
        retries=0, backoff=0.0, progress=False,
    )
    assert directory == data_root / "mnist"
    assert "/first/train-images-idx3-ubyte.gz" in server.requests  # 404 there, then the next mirror
    loaded = load_dataset("mnist")
    numpy.testing.assert_array_equal(loaded.images[:, 0], images)
    numpy.testing.assert_array_equal(loaded.labels, labels)
    assert sorted(p.name for p in directory.iterdir()) == sorted(checksums)


def test_when_every_mirror_fails_each_failure_is_said_once(server, data_root, caplog):
    checksums = {name: "0" * 32 for name in ("train-images-idx3-ubyte.gz",)}
    with caplog.at_level(logging.INFO, logger="cnn_backend"), pytest.raises(DataError) as excinfo:
        datasets.download_dataset(
            "mnist", mirrors=[f"{server.url}/first/", f"{server.url}/second/"], checksums=checksums,
            retries=0, backoff=0.0, progress=False,
        )
    # The first mirror's failure is progress (the next is tried); the last one's is the error, with
    # the offline instructions once, and not also logged.
    assert [record.getMessage() for record in caplog.records] == [
        f"{server.url}/first/train-images-idx3-ubyte.gz: HTTP 404 Not Found; trying the next mirror"
    ]
    assert_one_line(excinfo, re.escape(f"{server.url}/second/train-images-idx3-ubyte.gz: HTTP 404 Not Found; to install without network"))
    assert str(excinfo.value).count("to install without network") == 1


# ------------------------------------------------------------------------------------- CIFAR-10


def test_cifar_batch_round_trip_is_exact(tmp_path):
    images, labels = cifar_arrays(6, 0)
    write_cifar_batch(tmp_path / "batch.bin", images, labels)
    assert (tmp_path / "batch.bin").stat().st_size == 6 * RECORD_BYTES
    raw = (tmp_path / "batch.bin").read_bytes()
    # The layout: a label byte, then the red plane row by row, then green, then blue.
    assert raw[0] == labels[0] and raw[1:1025] == images[0, 0].tobytes() and raw[2049:3073] == images[0, 2].tobytes()
    read_images, read_labels = read_cifar_batch(tmp_path / "batch.bin")
    assert read_images.shape == (6, 3, 32, 32) and read_labels.dtype == numpy.int64
    numpy.testing.assert_array_equal(read_images, images)
    numpy.testing.assert_array_equal(read_labels, labels)


def test_cifar_record_of_the_wrong_length_is_refused(tmp_path):
    path = tmp_path / "data_batch_1.bin"
    path.write_bytes(bytes(RECORD_BYTES * 2 + 100))
    with pytest.raises(DataError) as excinfo:
        read_cifar_batch(path)
    assert_one_line(excinfo, re.escape(str(path)), r"6246 bytes is not a whole number of 3073-byte CIFAR-10 records", "100 bytes left over")


def test_cifar_label_out_of_range_is_refused(tmp_path):
    images, labels = cifar_arrays(3, 0)
    labels[1] = 10
    write_cifar_batch(tmp_path / "test_batch.bin", images, labels)
    with pytest.raises(DataError) as excinfo:
        read_cifar_batch(tmp_path / "test_batch.bin")
    assert_one_line(excinfo, r"found 10 at record 1")


def test_cifar_downloads_unpacks_and_loads_exactly(server, data_root, tmp_path):
    archive = tmp_path / "cifar-10-binary.tar.gz"
    expected = make_cifar_archive(archive)
    server.files["/kriz/cifar-10-binary.tar.gz"] = archive.read_bytes()
    datasets.download_dataset(
        "cifar10", mirrors=[f"{server.url}/kriz/"], checksums={archive.name: md5(archive)}, progress=False, backoff=0.0
    )
    for split in ("train", "test"):
        loaded = load_dataset("cifar10", split)
        assert loaded.images.shape == (len(expected[split][0]), 3, 32, 32)
        numpy.testing.assert_array_equal(loaded.images, expected[split][0])
        numpy.testing.assert_array_equal(loaded.labels, expected[split][1])
        assert loaded.class_names[0] == "airplane" and loaded.image_shape == (3, 32, 32)
    assert len(load_dataset("cifar10", "train")) == 20  # five batches of four
    # A second download verifies the archive and fetches nothing.
    server.requests.clear()
    datasets.download_dataset("cifar10", mirrors=[f"{server.url}/kriz/"], checksums={archive.name: md5(archive)}, progress=False)
    assert server.requests == []


def test_cifar_archive_placed_by_hand_is_unpacked_on_first_load(data_root):
    directory = data_root / "cifar10"
    directory.mkdir(parents=True)
    archive = directory / "cifar-10-binary.tar.gz"
    expected = make_cifar_archive(archive)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(DATASETS["cifar10"].files, archive.name, md5(archive))
        loaded = load_dataset("cifar10", "test")
    numpy.testing.assert_array_equal(loaded.images, expected["test"][0])
    assert (directory / "unpacked" / "cifar-10-batches-bin" / "test_batch.bin").is_file()


def test_cifar_folder_given_as_data_directory(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    images, labels = cifar_arrays(5, 1)
    write_cifar_batch(folder / "test_batch.bin", images, labels)
    assert datasets.source_kind(folder) == "cifar10-folder"
    loaded = load_dataset(folder, "test")
    numpy.testing.assert_array_equal(loaded.images, images)
    with pytest.raises(DataError, match=r"data_batch_1\.bin, data_batch_2\.bin, .* missing for the train split"):
        load_dataset(folder, "train")


def test_cifar_checksum_mismatch_leaves_nothing_behind(server, data_root, tmp_path):
    archive = tmp_path / "cifar-10-binary.tar.gz"
    make_cifar_archive(archive)
    server.files["/cifar-10-binary.tar.gz"] = archive.read_bytes()
    with pytest.raises(DataError) as excinfo:
        datasets.download_dataset("cifar10", mirrors=[server.url], progress=False, retries=0)
    assert_one_line(excinfo, r"cifar-10-binary\.tar\.gz: checksum mismatch \(md5 [0-9a-f]{32}, expected c32a1d4ab5d03f1284b67883e8d87530\); the download was discarded")
    assert not (data_root / "cifar10").exists()  # nothing left, not even the folder


# ----------------------------------------------------------------------------- safe unpacking


def hostile_archive(path: Path, build) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        add_bytes(tar, "cifar-10-batches-bin/data_batch_1.bin", bytes(RECORD_BYTES))
        build(tar)
    return path


HOSTILE_MEMBERS = {
    "parent path": (lambda tar: add_bytes(tar, "../evil", b"x"), r"member '\.\./evil' would land outside the target folder"),
    "nested parent path": (lambda tar: add_bytes(tar, "cifar-10-batches-bin/../../evil", b"x"), r"would land outside the target folder"),
    "absolute path": (lambda tar: add_bytes(tar, "/tmp/evil", b"x"), r"member '/tmp/evil' would land outside the target folder"),
    "symbolic link": (lambda tar: add_bytes(tar, "cifar-10-batches-bin/link", b"", type=tarfile.SYMTYPE, linkname="/etc/passwd"), r"member 'cifar-10-batches-bin/link' is a link \(to '/etc/passwd'\)"),
    "hard link": (lambda tar: add_bytes(tar, "cifar-10-batches-bin/hard", b"", type=tarfile.LNKTYPE, linkname="cifar-10-batches-bin/data_batch_1.bin"), r"is a link"),
    "device": (lambda tar: add_bytes(tar, "cifar-10-batches-bin/dev", b"", type=tarfile.CHRTYPE), r"is not a regular file or folder"),
}


@pytest.mark.parametrize("case", list(HOSTILE_MEMBERS))
def test_hostile_archive_members_are_refused_and_nothing_is_unpacked(tmp_path, case):
    build, problem = HOSTILE_MEMBERS[case]
    archive = hostile_archive(tmp_path / "archive.tar.gz", build)
    target = tmp_path / "deep" / "target"
    target.parent.mkdir()
    with pytest.raises(DataError) as excinfo:
        extract_tar(archive, target)
    assert_one_line(excinfo, re.escape(str(archive)), "refused to unpack", problem)
    assert list(target.parent.iterdir()) == []  # neither the target nor a staging folder
    assert not (tmp_path / "evil").exists() and not (tmp_path / "deep" / "evil").exists()


def test_truncated_archive_is_refused_and_nothing_is_unpacked(tmp_path):
    archive = tmp_path / "cifar-10-binary.tar.gz"
    make_cifar_archive(archive)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DataError) as excinfo:
        extract_tar(archive, tmp_path / "out")
    assert_one_line(excinfo, re.escape(str(archive)), r"truncated or corrupt archive", "download it again")
    assert sorted(p.name for p in tmp_path.iterdir()) == [archive.name]


def test_malicious_archive_downloaded_under_its_published_checksum_is_not_unpacked(server, data_root, tmp_path):
    archive = hostile_archive(tmp_path / "cifar-10-binary.tar.gz", lambda tar: add_bytes(tar, "../evil", b"x"))
    server.files["/cifar-10-binary.tar.gz"] = archive.read_bytes()
    with pytest.raises(DataError, match=r"refused to unpack: member '\.\./evil'"):
        datasets.download_dataset("cifar10", mirrors=[server.url], checksums={archive.name: md5(archive)}, progress=False)
    assert not (data_root / "evil").exists()
    assert sorted(p.name for p in (data_root / "cifar10").iterdir()) == [archive.name]


# --------------------------------------------------------------------------------- image folders


def save(path: Path, array, mode=None, **options) -> numpy.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(numpy.asarray(array), mode).save(path, **options) if mode else Image.fromarray(numpy.asarray(array)).save(path, **options)
    return numpy.asarray(array)


def make_folder(root: Path):
    """Two classes of PNGs (RGB and greyscale, 8x6 mostly), one JPEG, one 5x5 image, a corrupt PNG
    and a text file. Returns the exact arrays of the lossless images by relative name."""
    arrays = {
        "cat/a.png": save(root / "cat" / "a.png", random_uint8((8, 6, 3), 1)),
        "cat/b.png": save(root / "cat" / "b.png", random_uint8((8, 6), 2)),
        "dog/c.png": save(root / "dog" / "c.png", random_uint8((8, 6, 3), 3)),
        "dog/deeper/d.png": save(root / "dog" / "deeper" / "d.png", random_uint8((5, 5, 3), 4)),
    }
    save(root / "dog" / "e.jpg", random_uint8((8, 6, 3), 5), quality=95)
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "dog" / ".hidden.png").write_bytes(b"ignored")
    return arrays


def test_image_folder_decodes_exact_pixels_labels_and_summarises_skipped_files(tmp_path):
    root = tmp_path / "pictures"
    arrays = make_folder(root)
    loaded = load_dataset(root)
    assert loaded.class_names == ("cat", "dog")
    # cat/a, cat/b (broken skipped), dog/c, dog/e, dog/deeper/d: each folder's files by name, then its sub-folders
    assert loaded.labels.tolist() == [0, 0, 1, 1, 1]
    assert loaded.images.shape == (5, 3, 8, 6)  # colour present: 3 channels; most common size 8x6
    numpy.testing.assert_array_equal(loaded.images[0], arrays["cat/a.png"].transpose(2, 0, 1))
    grey_as_rgb = numpy.asarray(Image.fromarray(arrays["cat/b.png"]).convert("RGB")).transpose(2, 0, 1)
    numpy.testing.assert_array_equal(loaded.images[1], grey_as_rgb)
    numpy.testing.assert_array_equal(loaded.images[2], arrays["dog/c.png"].transpose(2, 0, 1))
    with Image.open(root / "dog" / "e.jpg") as jpeg:  # lossy: compared with Pillow's own decoding
        numpy.testing.assert_array_equal(loaded.images[3], numpy.asarray(jpeg.convert("RGB")).transpose(2, 0, 1))
    resized = Image.fromarray(arrays["dog/deeper/d.png"]).resize((6, 8), Image.Resampling.BILINEAR)
    numpy.testing.assert_array_equal(loaded.images[4], numpy.asarray(resized).transpose(2, 0, 1))
    (note,) = loaded.notes
    assert "\n" not in note
    assert "skipped 2 of 7 files" in note and "cat/broken.png" in note and "dog/notes.txt (not an image file extension)" in note


def test_image_folder_greyscale_and_explicit_channels_and_size(tmp_path):
    root = tmp_path / "grey"
    a = save(root / "x" / "a.png", random_uint8((4, 4), 1))
    save(root / "y" / "b.png", random_uint8((4, 4), 2))
    loaded = load_dataset(root)
    assert loaded.images.shape == (2, 1, 4, 4)  # no colour image: one channel
    numpy.testing.assert_array_equal(loaded.images[0, 0], a)

    colour = tmp_path / "colour"
    rgb = save(colour / "x" / "a.png", random_uint8((6, 6, 3), 3))
    save(colour / "y" / "b.png", random_uint8((6, 6, 3), 4))
    as_grey = load_dataset(colour, channels=1, image_size="3x2")
    assert as_grey.images.shape == (2, 1, 3, 2)
    expected = Image.fromarray(rgb).convert("L").resize((2, 3), Image.Resampling.BILINEAR)
    numpy.testing.assert_array_equal(as_grey.images[0, 0], numpy.asarray(expected))


def test_16_bit_float_and_transparent_palette_images_keep_their_pixels(tmp_path):
    import warnings

    ramp = numpy.arange(256, dtype=numpy.uint16).reshape(16, 16)
    Image.fromarray(ramp * 257).save(tmp_path / "deep.png")  # 16-bit: Pillow's own conversion clips at 255
    Image.fromarray((ramp / 255).astype(numpy.float32), "F").save(tmp_path / "float.tif")
    colours = numpy.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=numpy.uint8)
    Image.fromarray(colours).convert("P").save(tmp_path / "palette.png", transparency=bytes([0] * 5 + [255] * 251))
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    numpy.testing.assert_array_equal(image_folder.decode_image(tmp_path / "deep.png", 1, None)[0], ramp)
    numpy.testing.assert_array_equal(image_folder.decode_image(tmp_path / "float.tif", 1, None)[0], ramp)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Palette images with Transparency" warning
        expected = numpy.asarray(Image.open(tmp_path / "palette.png").convert("RGBA").convert("RGB")).transpose(2, 0, 1)
        numpy.testing.assert_array_equal(image_folder.decode_image(tmp_path / "palette.png", 3, None), expected)


def test_image_folder_cache_is_used_and_refreshed_when_the_folder_changes(tmp_path, monkeypatch):
    root = tmp_path / "pictures"
    make_folder(root)
    first = load_dataset(root)
    assert "(cached)" not in first.source

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded an image although the cache is valid")

    with monkeypatch.context() as patch:
        patch.setattr(image_folder, "decode_image", no_decoding)
        patch.setattr(image_folder, "read_header", no_decoding)
        second = load_dataset(root)
    assert "(cached)" in second.source and isinstance(second.images, numpy.memmap)
    numpy.testing.assert_array_equal(second.images, first.images)
    numpy.testing.assert_array_equal(second.labels, first.labels)
    assert second.notes == first.notes

    # A new image, then a replaced one (new size and time): both are noticed.
    save(root / "cat" / "z.png", random_uint8((8, 6, 3), 7))
    third = load_dataset(root)
    assert "(cached)" not in third.source and len(third) == len(first) + 1
    replacement = save(root / "cat" / "a.png", random_uint8((8, 6, 3), 8))
    stat = (root / "cat" / "a.png").stat()
    os.utime(root / "cat" / "a.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    fourth = load_dataset(root)
    numpy.testing.assert_array_equal(fourth.images[0], replacement.transpose(2, 0, 1))
    # One cache entry per folder and options: the stale ones were replaced, not piled up.
    assert len(list(image_folder.cache_root().iterdir())) == 1


def test_strict_refuses_unusable_files_in_one_line(tmp_path):
    root = tmp_path / "pictures"
    make_folder(root)
    for attempt in range(2):  # decoding afresh, then from the cache
        with pytest.raises(DataError) as excinfo:
            load_dataset(root, strict=True)
        assert_one_line(excinfo, r": 2 of 7 files are not usable images: ", r"cat/broken\.png", r"refused \(strict\)")
        assert "skipped" not in str(excinfo.value)  # refused, not skipped


def test_a_mode_pillow_cannot_convert_is_skipped_or_refused(tmp_path):
    root = tmp_path / "lab"
    save(root / "x" / "a.png", random_uint8((4, 4), 1))
    save(root / "y" / "b.png", random_uint8((4, 4), 2))
    Image.new("LAB", (4, 4)).save(root / "y" / "lab.tif")
    loaded = load_dataset(root, channels=1)
    assert len(loaded) == 2 and "y/lab.tif (cannot convert Pillow mode LAB to L" in loaded.notes[0]
    with pytest.raises(DataError) as excinfo:
        load_dataset(root, channels=1, strict=True)
    assert_one_line(excinfo, r"cannot convert Pillow mode LAB to L", "refused")


def test_train_and_test_layout(tmp_path):
    root = tmp_path / "split"
    train_a = save(root / "train" / "a" / "1.png", random_uint8((4, 4, 3), 1))
    save(root / "train" / "b" / "2.png", random_uint8((4, 4, 3), 2))
    test_b = save(root / "test" / "b" / "3.png", random_uint8((4, 4, 3), 3))
    train = load_dataset(root, "train")
    test = load_dataset(root, "test")
    assert train.class_names == test.class_names == ("a", "b")
    assert test.labels.tolist() == [1]
    numpy.testing.assert_array_equal(train.images[0], train_a.transpose(2, 0, 1))
    numpy.testing.assert_array_equal(test.images[0], test_b.transpose(2, 0, 1))
    assert datasets.has_test_split(root)

    save(root / "test" / "c" / "4.png", random_uint8((4, 4, 3), 4))
    for split in ("test", "train"):  # found on training too, not first at evaluation
        with pytest.raises(DataError) as excinfo:
            load_dataset(root, split, cache=False)
        assert_one_line(excinfo, r"test: class folders c are not in .*train")


FOLDER_PROBLEMS = {
    "no class folders": (lambda root: (root / "loose.png").write_bytes(b""), "train", r"neither IDX files .* nor class folders"),
    "one class": (lambda root: save(root / "only" / "a.png", random_uint8((2, 2), 0)), "train", r"only one class folder \(only\); a classifier needs at least two"),
    "empty class folder": (
        lambda root: (save(root / "a" / "1.png", random_uint8((2, 2), 0)), (root / "b").mkdir(), (root / "b" / "readme.md").write_text("x")),
        "train", r"b: no image files \(\.jpg, \.jpeg, \.png",
    ),
    "every image corrupt": (
        lambda root: [(root / c).mkdir() or (root / c / "x.png").write_bytes(b"nope") for c in "ab"], "train", r"none of its 2 image files can be read",
    ),
    "one class wholly corrupt": (
        lambda root: (save(root / "a" / "1.png", random_uint8((2, 2), 0)), (root / "b").mkdir(), (root / "b" / "x.jpg").write_bytes(b"\xff\xd8\xff" + b"0" * 50)),
        "train", r"b: none of its image files can be decoded, so the class would have no images",
    ),
    "no test split": (
        lambda root: (save(root / "a" / "1.png", random_uint8((2, 2), 0)), save(root / "b" / "1.png", random_uint8((2, 2), 1))),
        "test", r"no test split .* \(--split train, the default\), or pass --data a folder with train and test sub-folders",
    ),
}


@pytest.mark.parametrize("case", list(FOLDER_PROBLEMS))
def test_unusable_image_folders_are_refused_in_one_line(tmp_path, case):
    build, split, problem = FOLDER_PROBLEMS[case]
    root = tmp_path / "pictures"
    root.mkdir()
    build(root)
    with pytest.raises(DataError) as excinfo:
        load_dataset(root, split)
    assert_one_line(excinfo, problem)


def test_folder_options_are_checked(tmp_path):
    root = tmp_path / "pictures"
    make_folder(root)
    with pytest.raises(ValueError, match=r"channels must be 1 \(greyscale\) or 3 \(RGB\), got 2"):
        load_dataset(root, channels=2)
    with pytest.raises(ValueError, match=r"image size must be N or HxW"):
        load_dataset(root, image_size="big")
    with pytest.raises(ValueError, match="apply to folders of images only"):
        load_dataset("bundled", image_size=32)
    with pytest.raises(DataError, match=r"no such folder, and not a dataset name \(auto, bundled, fashion-mnist"):
        load_dataset(tmp_path / "nowhere")


def test_fashion_mnist_names_keep_working():
    bundled = load_dataset("bundled")
    assert bundled.images.shape == (10_000, 1, 28, 28) and bundled.class_names[0] == "T-shirt/top"
    assert "bundled subset" in load_dataset("fashion-mnist").source


def test_an_image_that_fails_only_when_decoded_is_dropped_from_the_cache_too(tmp_path):
    root = tmp_path / "pictures"
    kept = [save(root / name / "a.png", random_uint8((6, 6, 3), seed)) for seed, name in enumerate(("x", "y"))]
    truncated = root / "x" / "b.png"
    save(truncated, random_uint8((6, 6, 3), 9))
    truncated.write_bytes(truncated.read_bytes()[:80])  # the header reads, the pixels do not
    for attempt in ("decoded", "cached"):
        loaded = load_dataset(root)
        assert len(loaded) == 2 and loaded.labels.tolist() == [0, 1], attempt
        for row, array in enumerate(kept):
            numpy.testing.assert_array_equal(loaded.images[row], array.transpose(2, 0, 1))
        assert "x/b.png (cannot decode" in loaded.notes[0]
    assert "(cached)" in loaded.source


def test_a_link_back_up_the_tree_is_followed_once(tmp_path):
    root = tmp_path / "pictures"
    save(root / "x" / "a.png", random_uint8((4, 4), 1))
    save(root / "y" / "b.png", random_uint8((4, 4), 2))
    (root / "x" / "loop").symlink_to(root / "x", target_is_directory=True)
    assert len(load_dataset(root)) == 2


@pytest.mark.parametrize("target", ["..", "../y", "../y/deeper", "../../pictures"])
def test_a_folder_link_out_of_a_class_folder_does_not_take_another_class_images(tmp_path, target):
    """Links are followed per class; one to a folder holding the class folder (a loop) or into
    another class's folder is not walked, so each image keeps its own class and none is hidden."""
    root = tmp_path / "pictures"
    save(root / "x" / "a.png", random_uint8((4, 4), 1))
    save(root / "y" / "b.png", random_uint8((4, 4), 2))
    save(root / "y" / "deeper" / "c.png", random_uint8((4, 4), 3))
    (root / "x" / "up").symlink_to(target, target_is_directory=True)
    loaded = load_dataset(root)
    assert loaded.labels.tolist() == [0, 1, 1]
    numpy.testing.assert_array_equal(loaded.images[0, 0], random_uint8((4, 4), 1))


def test_a_folder_link_out_of_the_tree_is_followed(tmp_path):
    root, elsewhere = tmp_path / "pictures", tmp_path / "more"
    save(root / "x" / "a.png", random_uint8((4, 4), 1))
    save(root / "y" / "b.png", random_uint8((4, 4), 2))
    save(elsewhere / "c.png", random_uint8((4, 4), 3))
    (root / "x" / "more").symlink_to(elsewhere, target_is_directory=True)
    (root / "x" / "again").symlink_to(elsewhere, target_is_directory=True)  # the same folder twice: walked once
    assert load_dataset(root).labels.tolist() == [0, 0, 1]


def test_a_broken_link_is_skipped_as_a_broken_link(tmp_path):
    root = tmp_path / "pictures"
    save(root / "x" / "a.png", random_uint8((4, 4), 1))
    save(root / "y" / "b.png", random_uint8((4, 4), 2))
    (root / "y" / "broken.png").symlink_to(root / "y" / "gone.png")
    loaded = load_dataset(root)
    assert len(loaded) == 2
    assert "y/broken.png (broken link: its target does not exist)" in loaded.notes[0]
    with pytest.raises(DataError) as excinfo:
        load_dataset(root, strict=True)
    assert_one_line(excinfo, r"y/broken.png \(broken link")


def test_a_file_name_that_is_not_utf8_is_loaded_and_shown_with_a_replacement_character(tmp_path):
    root = tmp_path / "pictures"
    save(root / "x" / "a.png", random_uint8((4, 4), 1))
    save(root / "y" / "b.png", random_uint8((4, 4), 2))
    odd = save(tmp_path / "odd.png", random_uint8((4, 4), 3))
    undecodable(root / "x", b"caf\xe9.png", (tmp_path / "odd.png").read_bytes())
    undecodable(root / "y", b"caf\xe9.txt", b"not an image")
    for attempt in ("decoded", "cached"):
        loaded = load_dataset(root)
        assert loaded.labels.tolist() == [0, 0, 1], attempt
        numpy.testing.assert_array_equal(loaded.images[1, 0], odd)
        (note,) = loaded.notes
        assert "y/caf\ufffd.txt (not an image file extension)" in note and note.encode("utf-8"), attempt
        assert loaded.source.encode("utf-8")  # prints on a strict UTF-8 stream
    assert "(cached)" in loaded.source
    with pytest.raises(DataError) as excinfo:
        load_dataset(root, strict=True)
    assert_one_line(excinfo, "y/caf\ufffd\\.txt", r"refused \(strict\)").encode("utf-8")


def test_a_class_folder_name_that_is_not_utf8_is_refused_in_one_line(tmp_path):
    root = tmp_path / "pictures"
    save(root / "x" / "a.png", random_uint8((4, 4), 1))
    save(undecodable(root, b"caf\xe9") / "b.png", random_uint8((4, 4), 2))
    with pytest.raises(DataError) as excinfo:
        load_dataset(root)
    assert_one_line(excinfo, re.escape(f"{root}/caf\ufffd: the class folder's name is not valid UTF-8; rename it")).encode("utf-8")

    # A test split's class folder too (it would be named as a class the training folder lacks).
    split = tmp_path / "split"
    for name in ("x", "y"):
        save(split / "train" / name / "a.png", random_uint8((4, 4), 1))
    save(split / "test" / "x" / "a.png", random_uint8((4, 4), 1))
    save(undecodable(split / "test", b"caf\xe9") / "b.png", random_uint8((4, 4), 2))
    for which in ("test", "train"):  # the test folder is checked on training too
        with pytest.raises(DataError) as excinfo:
            load_dataset(split, which)
        assert_one_line(excinfo, re.escape(f"{split}/test/caf\ufffd: the class folder's name is not valid UTF-8"), "rename it")


def test_one_cache_entry_serves_loads_that_name_or_leave_out_the_same_channels_and_size(tmp_path, monkeypatch):
    """Entries are keyed on what the images are converted to: train leaves channels and size out,
    evaluate names the recorded ones; both read one entry, without reading any image."""

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded an image although the cache is valid")

    root = tmp_path / "pictures"
    make_folder(root)
    first = load_dataset(root)  # 3x8x6, chosen from the images
    with monkeypatch.context() as patch:
        patch.setattr(image_folder, "decode_image", no_decoding)
        patch.setattr(image_folder, "read_header", no_decoding)
        named = load_dataset(root, channels=3, image_size=(8, 6))
        assert "(cached)" in named.source
        numpy.testing.assert_array_equal(named.images, first.images)
        assert named.notes == first.notes
        assert "(cached)" in load_dataset(root, image_size="8x6").source  # one named, one chosen
    assert len(list(image_folder.cache_root().iterdir())) == 1

    other = tmp_path / "other"  # the other way round: named first, then left out
    make_folder(other)
    load_dataset(other, channels=3, image_size="8x6")
    with monkeypatch.context() as patch:
        patch.setattr(image_folder, "decode_image", no_decoding)
        patch.setattr(image_folder, "read_header", no_decoding)
        assert "(cached)" in load_dataset(other).source
    assert len(list(image_folder.cache_root().iterdir())) == 2

    # Other values are another entry; a change that moves the chosen size drops the stale entries.
    assert load_dataset(root, channels=1).images.shape == (5, 1, 8, 6)
    assert len(list(image_folder.cache_root().iterdir())) == 3
    for index in range(5):  # more 10x10 images than 8x6 ones
        save(root / "cat" / f"big{index}.png", random_uint8((10, 10, 3), 20 + index))
    assert load_dataset(root).images.shape == (10, 3, 10, 10)
    assert len(list(image_folder.cache_root().iterdir())) == 2  # other's, and root's new one


def test_entries_of_the_first_cache_format_are_removed_when_a_folder_is_next_cached(tmp_path):
    old = image_folder.cache_root() / ("0123456789abcdef" * 2)[:24]  # named by 24 hex digits, meta version 1
    old.mkdir(parents=True)
    (old / "meta.json").write_text(json.dumps({"version": 1, "listing": "x"}))
    (old / "images.npy").write_bytes(b"")
    unrelated = image_folder.cache_root() / "notes"  # not an entry of any format: left alone
    unrelated.mkdir()
    root = tmp_path / "pictures"
    make_folder(root)
    load_dataset(root)
    assert not old.exists() and unrelated.exists()


def test_cifar_offline_download_says_which_file_to_put_where(data_root):
    import socket

    with socket.socket() as probe:  # a port nobody listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DataError) as excinfo:
        datasets.download_dataset("cifar10", mirrors=[f"http://127.0.0.1:{port}/"], retries=0, progress=False)
    assert_one_line(excinfo, "cannot reach the server", re.escape(f"place cifar-10-binary.tar.gz into {data_root / 'cifar10'}"))
    assert not (data_root / "cifar10").exists()  # nothing left, not even the folder


def test_a_folder_of_fashion_mnist_pngs_gives_the_idx_pixels_back(tmp_path):
    bundled = load_dataset("bundled")
    root = tmp_path / "fashion"
    for index in range(40):
        label = int(bundled.labels[index])
        folder = root / bundled.class_names[label].replace("/", "-")
        save(folder / f"{index:03d}.png", bundled.images[index, 0])
    loaded = load_dataset(root)
    assert loaded.images.shape == (40, 1, 28, 28)  # greyscale PNGs: one channel
    # Folder order is class by class (sorted names), then file name: map back through the file names.
    order = sorted(range(40), key=lambda i: (bundled.class_names[int(bundled.labels[i])].replace("/", "-"), i))
    numpy.testing.assert_array_equal(loaded.images, bundled.images[order])
    names = [bundled.class_names[int(bundled.labels[i])].replace("/", "-") for i in order]
    assert [loaded.class_names[label] for label in loaded.labels] == names


def test_a_class_folder_named_train_beside_other_classes_is_a_class(tmp_path):
    # bus/car/train, the train class's images in sub-folders by year: three classes, not a split layout.
    root = tmp_path / "vehicles"
    for name, seed in (("bus/1.png", 1), ("car/2.png", 2), ("train/2019/3.png", 3), ("train/2020/4.png", 4)):
        save(root / name, random_uint8((4, 4, 3), seed))
    loaded = load_dataset(root)
    assert loaded.class_names == ("bus", "car", "train")
    assert loaded.labels.tolist() == [0, 1, 2, 2]
    assert not datasets.has_test_split(root)


@pytest.mark.parametrize("splits", [("Testing", "Training"), ("train", "val"), ("test", "train")])
def test_folders_named_as_splits_are_not_taken_for_classes(tmp_path, splits):
    # Training/ and Testing/ of class folders (a Kaggle layout), or split folders holding images
    # directly: a classifier of the splits is refused in one line that says what to do.
    root = tmp_path / "splits"
    for index, split in enumerate(splits):
        save(root / split / f"{index}.png", random_uint8((4, 4, 3), index))
    with pytest.raises(DataError) as excinfo:
        load_dataset(root)
    assert_one_line(excinfo, rf"its folders {', '.join(splits)} look like splits, not classes; use the layout .*train/<class>/<images>",
                    rf"or pass --data .*{splits[0]} to read one split's class folders")


def test_a_validation_folder_beside_train_is_named_as_not_read(tmp_path):
    root = tmp_path / "trainval"
    for name, seed in (("train/a/1.png", 1), ("train/b/2.png", 2), ("val/a/3.png", 3), ("val/b/4.png", 4)):
        save(root / name, random_uint8((4, 4, 3), seed))
    loaded = load_dataset(root)
    assert loaded.class_names == ("a", "b") and len(loaded) == 2
    (note,) = loaded.notes
    assert re.fullmatch(rf"{re.escape(str(root / 'val'))} is not read: the validation images are held out of .*train; "
                        rf"score a model on it with evaluate --data .*val --range :", note), note
    assert load_dataset(root / "val").class_names == ("a", "b")  # what the note advises reads it


def test_a_large_automatic_image_size_gets_a_note_and_a_chosen_one_none(tmp_path):
    root = tmp_path / "photos"
    for name, seed in (("a/1.png", 1), ("b/2.png", 2)):
        save(root / name, random_uint8((300, 260), seed))
    (note,) = load_dataset(root, cache=False).notes
    assert "its most common image size, 300x260, is the network's input size; pass --image-size (e.g. --image-size 64)" in note
    assert load_dataset(root, image_size=32, cache=False).notes == ()


def test_a_disk_too_full_for_the_cache_decodes_without_it_and_leaves_nothing(tmp_path, data_root, monkeypatch, caplog):
    # Reserved up front: without the reservation a full disk is SIGBUS at a write through the map.
    root = tmp_path / "pictures"
    arrays = make_folder(root)

    def disk_full(descriptor, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", disk_full)
    with caplog.at_level(logging.INFO, logger="cnn_backend.data"):
        loaded = load_dataset(root)
    numpy.testing.assert_array_equal(loaded.images[0], arrays["cat/a.png"].transpose(2, 0, 1))
    assert "cannot write the image cache (No space left on device); decoding without it" in caplog.text
    assert list((data_root / image_folder.CACHE_FOLDER).iterdir()) == []


def test_a_full_disk_while_the_entry_is_completed_keeps_the_images_and_leaves_nothing(tmp_path, data_root, monkeypatch):
    root = tmp_path / "pictures"
    arrays = make_folder(root)

    def disk_full(*args, **options):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(image_folder.numpy, "save", disk_full)
    loaded = load_dataset(root)
    numpy.testing.assert_array_equal(loaded.images[0], arrays["cat/a.png"].transpose(2, 0, 1))
    assert list((data_root / image_folder.CACHE_FOLDER).iterdir()) == []


def test_an_entry_left_half_written_by_a_killed_process_is_removed_by_the_next_decode(tmp_path, data_root):
    import subprocess
    import sys

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_pid = int(finished.stdout)
    cache = data_root / image_folder.CACHE_FOLDER
    host = image_folder._HOST
    abandoned = cache / f".0123456789abcdef01234567-3x8x6.{host}.{dead_pid}.partial"
    not_a_staging = cache / f".0123456789abcdef01234567-3x8x6.{host}.{dead_pid}.partial.other"
    live = cache / f".0123456789abcdef01234567-1x8x6.{host}.{os.getpid()}.partial"
    elsewhere = cache / f".0123456789abcdef01234567-1x8x6.another-machine.{dead_pid}.partial"  # a shared cache
    for folder in (abandoned, not_a_staging, live, elsewhere):
        folder.mkdir(parents=True)
        (folder / "images.npy").write_bytes(b"\0" * 64)
    make_folder(tmp_path / "pictures")
    load_dataset(tmp_path / "pictures")
    assert not abandoned.exists()
    # a running process's staging is its own, and another machine's PIDs mean nothing here
    assert not_a_staging.exists() and live.exists() and elsewhere.exists()


def test_undecodable_images_are_named_before_files_that_are_not_images(tmp_path):
    root = tmp_path / "messy"
    save(root / "a" / "1.png", random_uint8((4, 4), 1))
    save(root / "b" / "2.png", random_uint8((4, 4), 2))
    for name in ("a/a.txt", "a/b.txt", "a/c.txt"):
        (root / name).write_text("notes")
    (root / "b" / "z_truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (note,) = load_dataset(root).notes
    assert re.search(r"skipped 4 of 6 files that are not usable images: b/z_truncated\.png \(cannot read .*\); a/a\.txt", note), note


def test_a_cache_entry_whose_meta_lacks_a_field_is_decoded_again(tmp_path, data_root):
    root = tmp_path / "pictures"
    make_folder(root)
    first = load_dataset(root)
    (entry,) = [path for path in (data_root / image_folder.CACHE_FOLDER).iterdir()]
    meta = json.loads((entry / "meta.json").read_text())
    del meta["class_names"]
    (entry / "meta.json").write_text(json.dumps(meta))
    again = load_dataset(root)
    assert "(cached)" not in again.source and again.class_names == first.class_names
    numpy.testing.assert_array_equal(again.images, first.images)


def test_an_image_folder_records_the_file_of_each_image_cached_or_not(tmp_path):
    root = tmp_path / "pictures"
    make_folder(root)
    expected = ("cat/a.png", "cat/b.png", "dog/c.png", "dog/e.jpg", "dog/deeper/d.png")  # broken.png skipped
    assert load_dataset(root).files == expected
    cached = load_dataset(root)
    assert "(cached)" in cached.source and cached.files == expected


def test_a_first_decode_shows_a_progress_bar_on_a_terminal(tmp_path, monkeypatch):
    import sys

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    root = tmp_path / "pictures"
    make_folder(root)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    load_dataset(root, progress=False)
    assert terminal.getvalue() == ""
    load_dataset(root, cache=False)
    assert re.search(r"decoding .*pictures: .*0/5", terminal.getvalue())  # a bar over the 5 readable images


@pytest.mark.parametrize(
    "source, pattern",
    [
        ("", r"^the data is named by an empty string; name a dataset \(.*\) or a folder$"),
        ("arrays.npz", r"arrays\.npz: not a folder \(--data takes a dataset name or a folder\); arrays train from Python \(BatchLoader"),
        ("cifar", r"cifar-10-batches-py: CIFAR-10's Python \(pickle\) version; this library reads its binary version .*cnn-backend download cifar10"),
    ],
)
def test_data_that_is_no_folder_of_a_known_kind_says_what_to_do(tmp_path, monkeypatch, source, pattern):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "arrays.npz").write_bytes(b"PK")
    pickled = tmp_path / "cifar" / "cifar-10-batches-py"
    pickled.mkdir(parents=True)
    for name in ("data_batch_1", "batches.meta", "test_batch"):
        (pickled / name).write_bytes(b"\x80")
    with pytest.raises(DataError) as excinfo:
        datasets.source_kind(source)
    assert_one_line(excinfo, pattern)


#: a fuzzed 136-byte TIFF on which Pillow warns "Truncated File Read" before failing
DAMAGED_TIFF = bytes.fromhex(
    "49492a00080000000a0000010400010000002400000001010400010000002800000002010300030000008600000003010300"
    "010000000100000006010300010000000200000011010400010000008c0000001501030001000000030000001601040001000000"
    "280000001701040001000000e01000001c0103000100000001000000000000000800"
)


def test_pillows_warnings_on_a_damaged_file_stay_off_the_console(tmp_path):
    path = tmp_path / "damaged.tif"
    path.write_bytes(DAMAGED_TIFF)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning would fail the test
        with pytest.raises(DataError):
            image_folder.decode_image(path, 1, (28, 28))


def test_a_folder_of_idx_files_says_its_class_names_are_assumed(tmp_path):
    write_idx_split(tmp_path / "digits", "train", 5)
    loaded = load_dataset(tmp_path / "digits")
    assert loaded.names_assumed
    assert loaded.notes == (f"{tmp_path / 'digits'}: IDX files store no class names, so Fashion-MNIST's are assumed for labels 0-9 "
                            f"(reports and predictions show them)",)


def truncate_after_header(path: Path) -> None:
    """Cut an image file short: Pillow still reads its header, but cannot decode its pixels."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    image_folder.read_header(path)  # still readable
    with pytest.raises(DataError):
        image_folder.decode_image(path, 1, None)


@pytest.mark.parametrize("cache", [True, False])
def test_images_of_undecodable_files_are_left_out_chunk_by_chunk_exactly(tmp_path, monkeypatch, cache):
    # Compacted without a second copy of every image: in chunks, in place or into the entry's new file.
    monkeypatch.setattr(image_folder, "_COMPACTION_BYTES", 2 * 4 * 4)  # two rows at a time
    root = tmp_path / "pictures"
    expected = []
    for index in range(9):
        name = f"{'ab'[index % 2]}/{index}.png"
        if index in (1, 4, 5):  # a header that reads, pixels that do not: found only while decoding
            save(root / name, random_uint8((4, 4), index))
            truncate_after_header(root / name)
        else:
            expected.append((name, save(root / name, random_uint8((4, 4), index))))
    loaded = load_dataset(root, cache=cache)
    order = sorted(expected, key=lambda pair: (pair[0][0], int(pair[0][2:-4])))  # class a's files, then b's
    assert loaded.files == tuple(name for name, _ in order)
    numpy.testing.assert_array_equal(loaded.images[:, 0], numpy.stack([pixels for _, pixels in order]))
    if cache:
        again = load_dataset(root)
        assert "(cached)" in again.source
        numpy.testing.assert_array_equal(again.images, loaded.images)


def test_the_cached_file_is_cut_to_the_images_that_decoded(tmp_path, data_root):
    root = tmp_path / "pictures"
    make_folder(root)
    truncate_after_header(root / "dog" / "c.png")
    loaded = load_dataset(root)
    assert loaded.images.shape == (4, 3, 8, 6)  # c.png left out
    (entry,) = (data_root / image_folder.CACHE_FOLDER).iterdir()
    stored = numpy.load(entry / "images.npy", mmap_mode="r")
    assert stored.shape == (4, 3, 8, 6) and (entry / "images.npy").stat().st_size == stored.offset + stored.nbytes
    numpy.testing.assert_array_equal(load_dataset(root).images, loaded.images)


@pytest.mark.parametrize("beside", ["unlabeled", "__MACOSX", "Test"])
def test_a_split_layout_keeps_its_splits_beside_other_folders(tmp_path, beside):
    root = tmp_path / "split"
    for name, seed in (("train/a/1.png", 1), ("train/b/2.png", 2), ("test/b/3.png", 3), (f"{beside}/x.png", 4)):
        save(root / name, random_uint8((4, 4, 3), seed))
    if beside == "Test":
        (root / "test" / "b" / "3.png").unlink()
        (root / "test" / "b").rmdir()
        (root / "test").rmdir()
        save(root / "Test" / "b" / "3.png", random_uint8((4, 4, 3), 3))
    loaded = load_dataset(root)
    assert loaded.class_names == ("a", "b") and len(loaded) == 2  # train/'s classes, not the root's folders


def test_a_folder_holding_cifars_binary_and_python_versions_is_read_as_the_binary_one(tmp_path):
    folder = tmp_path / "cifar"
    folder.mkdir()
    (folder / "cifar-10-binary.tar.gz").write_bytes(b"placed by hand")
    pickled = folder / "cifar-10-batches-py"
    pickled.mkdir()
    for name in ("data_batch_1", "batches.meta"):
        (pickled / name).write_bytes(b"\x80")
    assert datasets.source_kind(folder) == "cifar10-folder"
