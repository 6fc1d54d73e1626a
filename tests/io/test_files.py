"""The one atomic writer and content hash (crc_lightning.io.files), against hashlib and os.stat."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest

from crc_lightning.io.files import (
    atomic_dir,
    atomic_path,
    sha256_file,
    sha256_path,
    write_atomic,
    write_json,
)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_write_atomic_bytes_text_and_callable_give_0644(tmp_path, umask_022):
    a = write_atomic(tmp_path / "a.bin", b"\x00\x01")
    b = write_atomic(tmp_path / "sub" / "b.txt", "héllo")
    c = write_atomic(tmp_path / "c.bin", lambda f: f.write(b"xyz"))
    assert a.read_bytes() == b"\x00\x01" and b.read_text() == "héllo" and c.read_bytes() == b"xyz"
    assert {_mode(p) for p in (a, b, c)} == {0o644}
    assert _mode(write_atomic(tmp_path / "d", b"", mode=0o600)) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "c.bin", "d", "sub"]


def test_mode_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        assert _mode(write_atomic(tmp_path / "x", b"1")) == 0o640
    finally:
        os.umask(old)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = write_atomic(tmp_path / "keep.json", "old")

    def boom(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(target, boom)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.json"]
    with pytest.raises(ZeroDivisionError), atomic_path(tmp_path / "fig.png") as tmp:
        tmp.write_bytes(b"png")
        assert tmp.name.endswith("-fig.png")  # the suffix is kept for writers that read it
        1 / 0  # noqa: B018
    assert [p.name for p in tmp_path.iterdir()] == ["keep.json"]


def test_write_json_refuses_nan(tmp_path):
    assert write_json(tmp_path / "m.json", {"a": [1, None]}).read_text() == (
        '{\n  "a": [\n    1,\n    null\n  ]\n}\n'
    )
    with pytest.raises(ValueError):
        write_json(tmp_path / "n.json", {"a": float("nan")})
    assert not (tmp_path / "n.json").exists()


def test_atomic_dir_replaces_only_on_success(tmp_path, umask_022):
    with atomic_dir(tmp_path / "series") as tmp:
        (tmp / "0.dcm").write_bytes(b"a")
    assert [p.name for p in (tmp_path / "series").iterdir()] == ["0.dcm"]
    assert _mode(tmp_path / "series") == 0o755
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "other") as tmp:
        (tmp / "0.dcm").write_bytes(b"a")
        raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["series"]


def test_sha256_file_equals_hashlib(tmp_path):
    data = os.urandom(5 << 20)  # more than one 4 MiB chunk
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_folder_hash_is_content_only(tmp_path):
    a = tmp_path / "series_a"
    a.mkdir()
    for i in range(3):
        (a / f"{i}.dcm").write_bytes(bytes([i]) * 100)
    h = sha256_path(a)
    (a / ".DS_Store").write_bytes(b"junk")  # hidden files are not read by the series reader
    assert sha256_path(a) == h
    b = tmp_path / "moved" / "series_b"
    b.parent.mkdir()
    a.rename(b)
    assert sha256_path(b) == h  # location does not count
    (b / "1.dcm").write_bytes(b"\x01" * 99 + b"\x02")
    assert sha256_path(b) != h
    with pytest.raises(FileNotFoundError, match="not found"):
        sha256_path(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no files"):
        sha256_path(tmp_path / "empty")
