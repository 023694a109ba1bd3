"""Verified downloads and safe unpacking.

:func:`download_files` fetches files from a list of mirrors into a folder: each file is streamed
into ``<name>.part``, checked against its published checksum and only then renamed into place, so
a loader (which opens only the final names) never sees a partial or unverified file; files already
present and verified are skipped; transient failures are retried with exponential back-off.

:func:`extract_tar` unpacks an archive member by member into a temporary folder that is renamed
into place once complete. A member that would land outside the target (absolute path, ``..``), a
link or any other non-regular member, and a truncated or corrupt archive are refused in one line,
and nothing is left behind.

Every failure raises :class:`DataError` with one line; download failures say which files to put
where for an offline install.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

from .base import DATA_DIR_ENV, DataError, progress_bar

logger = logging.getLogger("cnn_backend.data")

_DOWNLOAD_CHUNK = 1 << 16
_USER_AGENT = "cnn-backend (dataset download)"


class _TransientError(Exception):
    """A failure worth retrying (server error, dropped connection, timeout)."""


def offline_instructions(directory: Path, names: Sequence[str], *, in_data_root: bool = False) -> str:
    """The clause saying how to install ``names`` by hand into ``directory`` (``in_data_root``: the
    dataset's folder under the data root, which the environment variable moves)."""
    text = f"to install without network, place {', '.join(names)} into {directory}"
    if in_data_root:
        text += f" (${DATA_DIR_ENV} chooses the data root, the folder that holds {directory.name}/)"
    return text


def download_files(
    directory: str | os.PathLike,
    files: Mapping[str, str],
    mirrors: Sequence[str],
    *,
    retries: int = 3,
    backoff: float = 1.0,
    timeout: float = 30.0,
    progress: bool = True,
    by_hand: str | None = None,
) -> Path:
    """Fetch every file of ``files`` (name -> hex digest: 32 digits MD5, 64 sha256) into ``directory``.

    ``mirrors`` are base URLs, tried in order for each file until one delivers it. ``by_hand``
    replaces the default offline instructions in error messages. Returns the directory.
    """
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    if not mirrors:
        raise ValueError("at least one mirror URL is needed")
    directory = Path(directory).expanduser()
    by_hand = by_hand or offline_instructions(directory, list(files))
    created = [folder for folder in (directory, *directory.parents) if not folder.exists()]  # deepest first
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        # An OSError, as for any path that cannot be written (exit status 1 on the command line).
        raise OSError(f"cannot create the data directory {directory}: {exc.strerror or exc}") from None
    try:
        _fetch_missing(directory, files, mirrors, retries, backoff, timeout, progress, by_hand)
    except BaseException:
        for folder in created:  # a failed first download leaves no empty folders behind
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return directory


def _fetch_missing(directory: Path, files, mirrors, retries, backoff, timeout, progress, by_hand: str) -> None:
    """Download each file of ``files`` not yet present and verified in ``directory``."""
    for name, expected in files.items():
        algorithm = digest_algorithm(expected)
        final = directory / name
        if final.is_file():
            if file_digest(final, algorithm) == expected:
                logger.info("%s: already present and verified", final)
                continue
            logger.info("%s: checksum does not match, downloading again", final)
        last_error: DataError | None = None
        for number, base_url in enumerate(mirrors, 1):
            url = base_url.rstrip("/") + "/" + name
            try:
                _download_one(url, final, expected, algorithm, retries, backoff, timeout, progress)
                logger.info("%s: downloaded and verified (%s)", final, algorithm)
                last_error = None
                break
            except DataError as exc:
                last_error = exc
                if number < len(mirrors):  # the last mirror's failure is the error itself: said once
                    logger.info("%s; trying the next mirror", exc)
        if last_error is not None:
            raise DataError(f"{last_error}; {by_hand}") from None


def _download_one(url, final: Path, expected, algorithm, retries, backoff, timeout, progress) -> None:
    # A fixed temporary name: a run killed outright leaves at most one stale .part per file, which
    # the next run overwrites. Loaders only ever open the final names.
    partial = final.with_name(final.name + ".part")
    try:
        for attempt in range(retries + 1):
            try:
                digest = _fetch(url, partial, algorithm, timeout=timeout, progress=progress)
                break
            except _TransientError as exc:
                failure = str(exc)
                if attempt < retries:
                    logger.info("%s: %s; retrying", url, failure)
                    time.sleep(backoff * 2**attempt)
        else:
            attempts = f"{retries + 1} attempt{'s' if retries else ''}"
            raise DataError(f"could not download {url} after {attempts} ({failure})")
        if digest != expected:
            raise DataError(
                f"{url}: checksum mismatch ({algorithm} {digest}, expected {expected}); the download was discarded"
            )
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)


def _fetch(url: str, destination: Path, algorithm: str, *, timeout: float, progress: bool) -> str:
    """Stream ``url`` into ``destination``; return its hex digest. Transient failures raise _TransientError."""
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    hasher = hashlib.new(algorithm)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, open(destination, "wb") as stream:
            length = response.headers.get("Content-Length")
            expected_size = int(length) if length and length.isdigit() else None
            received = 0
            with _progress_bar(progress, expected_size, destination.name.removesuffix(".part")) as bar:
                while chunk := response.read(_DOWNLOAD_CHUNK):
                    stream.write(chunk)
                    hasher.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            # http.client may return a short body without complaint when the peer closes early.
            if expected_size is not None and received != expected_size:
                raise _TransientError(f"connection closed after {received} of {expected_size} bytes")
            stream.flush()
            os.fsync(stream.fileno())
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code >= 500 or exc.code in (408, 429):
            raise _TransientError(f"HTTP {exc.code} {exc.reason}") from None
        raise DataError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise _TransientError(f"cannot reach the server: {exc.reason}") from None
    except (OSError, http.client.HTTPException) as exc:  # timeouts, resets, short reads
        raise _TransientError(f"{type(exc).__name__}: {exc}") from None
    return hasher.hexdigest()


def _progress_bar(enabled: bool, total: int | None, description: str):
    return progress_bar(enabled, total, description, unit="B", unit_scale=True, unit_divisor=1024)


def digest_algorithm(digest: str) -> str:
    algorithm = {32: "md5", 64: "sha256"}.get(len(digest))
    if algorithm is None:
        raise ValueError(f"checksum {digest!r} is neither an MD5 (32 hex digits) nor a sha256 (64 hex digits)")
    return algorithm


def file_digest(path: Path, algorithm: str) -> str:
    hasher = hashlib.new(algorithm)
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            hasher.update(chunk)
    return hasher.hexdigest()


# ---------------------------------------------------------------------------------------- archives


def extract_tar(archive: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Unpack the tar archive (any compression tarfile reads) into the folder ``target``.

    Only regular files and folders are unpacked, each checked to stay inside ``target``; the
    folder appears (renamed from a temporary one) only once every member is out. Returns ``target``.
    """
    archive, target = Path(archive), Path(target)
    staging = target.with_name(f".{target.name}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        try:
            with tarfile.open(archive, "r:*") as tar:
                for member in tar:
                    _extract_member(tar, member, staging, archive)
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise DataError(f"{archive}: truncated or corrupt archive ({exc}); delete it and download it again") from None
        except OSError as exc:
            if isinstance(exc, FileNotFoundError) and not archive.exists():
                raise DataError(f"{archive}: no such file") from None
            raise DataError(f"{archive}: cannot unpack ({exc.strerror or exc}); delete it and download it again") from None
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, staging: Path, archive: Path) -> None:
    name = member.name
    parts = PurePosixPath(name).parts
    if name.startswith(("/", "\\")) or PurePosixPath(name).is_absolute() or ".." in parts or (parts and ":" in parts[0]):
        raise DataError(f"{archive}: refused to unpack: member {name!r} would land outside the target folder")
    if member.issym() or member.islnk():
        raise DataError(f"{archive}: refused to unpack: member {name!r} is a link (to {member.linkname!r})")
    if not (member.isfile() or member.isdir()):
        raise DataError(f"{archive}: refused to unpack: member {name!r} is not a regular file or folder")
    destination = staging.joinpath(*parts) if parts else staging
    if not destination.resolve().is_relative_to(staging.resolve()):
        raise DataError(f"{archive}: refused to unpack: member {name!r} would land outside the target folder")
    if member.isdir():
        destination.mkdir(parents=True, exist_ok=True)
        return
    destination.parent.mkdir(parents=True, exist_ok=True)
    source = tar.extractfile(member)
    with source, open(destination, "wb") as stream:
        shutil.copyfileobj(source, stream, 1 << 20)
        written = stream.tell()
    if written != member.size:
        raise tarfile.ReadError(f"member {name!r} ends after {written} of {member.size} bytes")
