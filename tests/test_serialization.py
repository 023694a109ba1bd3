"""Atomic file writes: what a path that is not a plain file gets."""

from __future__ import annotations

import os
import stat

import pytest

from cnn_backend.serialization import FileWriteError, write_atomically


def write(path, data=b"new"):
    return write_atomically(path, lambda stream: stream.write(data))


def test_a_symbolic_link_is_written_through_and_the_target_keeps_its_permissions(tmp_path):
    target = tmp_path / "real" / "model.onnx"
    target.parent.mkdir()
    target.write_bytes(b"old")
    target.chmod(0o600)
    link = tmp_path / "link.onnx"
    link.symlink_to(target)
    write(link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_bytes() == b"new" and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.onnx"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_pipe_or_folder_is_refused_and_left_as_it_is(tmp_path):
    pipe = tmp_path / "pipe.onnx"
    os.mkfifo(pipe)
    with pytest.raises(FileWriteError, match=r"pipe\.onnx: it is not a regular file \(a device, pipe or socket\); name a file to write$"):
        write(pipe)
    assert stat.S_ISFIFO(pipe.stat().st_mode)
    with pytest.raises(FileWriteError, match=r"it is a folder; name a file to write$"):
        write(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe.onnx"]


def test_a_file_where_a_folder_is_needed_is_named(tmp_path):
    (tmp_path / "notes.txt").write_text("a file")
    with pytest.raises(FileWriteError, match=r"cannot write .*notes\.txt/sub/m\.onnx: .*notes\.txt is a file, not a folder$"):
        write(tmp_path / "notes.txt" / "sub" / "m.onnx")
