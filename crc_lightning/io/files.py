"""The one way this project writes and hashes files.

Every file the project produces (crop store, metrics.json, predictions.csv, checkpoints exported by
the apps, SimCLR weights, reports, figures, NIfTI/DICOM written by the synthetic cohort) goes
through :func:`write_atomic` or :func:`atomic_path`:

* the bytes go to a temporary sibling (same folder, so the final rename never crosses a file
  system), are flushed and ``fsync``-ed, then ``os.replace``-d onto the final name: a reader sees
  the old file or the whole new one, never half of it, and a killed job leaves no partial output;
* the file gets ordinary permissions, ``0o666 & ~umask`` (0644 under the usual umask 022) unless a
  ``mode`` is given — ``tempfile.mkstemp`` would leave 0600, which other users of a shared results
  folder cannot read;
* on any error the temporary is removed and the exception propagates.

:func:`sha256_file` / :func:`sha256_path` are the content hashes used for crop-store case keys,
weights provenance and checkpoint identity (a DICOM series folder hashes its files' names and bytes).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "TMP_PREFIX",
    "atomic_dir",
    "atomic_path",
    "default_mode",
    "file_lock",
    "series_files",
    "sha256_file",
    "sha256_path",
    "write_atomic",
    "write_json",
]

TMP_PREFIX = ".tmp-"
_CHUNK = 1 << 22


def default_mode() -> int:
    """``0o666 & ~umask``: the mode ``open()`` would give a new file (0644 under umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _tmp_name(path: Path) -> Path:
    # the final name's suffix is kept (.nii.gz, .png, .parquet): writers that pick a format from the
    # file name (nibabel, matplotlib) then write the right one
    return path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{path.name}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit it is fsynced, given ``mode``
    (default :func:`default_mode`) and renamed onto ``path``. For libraries that write to a file
    name (``nib.save``, ``savefig``, ``safetensors.save_file``, ``DataFrame.to_parquet``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        _fsync(tmp)
        os.chmod(tmp, default_mode() if mode is None else mode)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_atomic(
    path: str | Path,
    data: bytes | str | Callable[[BinaryIO], object],
    mode: int | None = None,
) -> Path:
    """Write ``data`` (bytes, text as UTF-8, or a function given the open binary file) to ``path``
    atomically (see the module docstring); returns ``path``."""
    path = Path(path)
    with atomic_path(path, mode) as tmp, open(tmp, "wb") as f:
        if isinstance(data, str):
            f.write(data.encode())
        elif isinstance(data, (bytes, bytearray, memoryview)):
            f.write(data)
        else:
            data(f)
        f.flush()
    return path


def write_json(path: str | Path, obj: object, mode: int | None = None) -> Path:
    """``obj`` as indented JSON (no NaN: JSON has none) with a trailing newline, atomically."""
    return write_atomic(path, json.dumps(obj, indent=2, allow_nan=False) + "\n", mode)


@contextlib.contextmanager
def atomic_dir(folder: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on a clean exit it replaces ``folder`` (which must be
    absent or empty). A failure removes the temporary folder and leaves ``folder`` untouched."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{folder.name}"
    tmp.mkdir()
    try:
        yield tmp
        for child in tmp.iterdir():
            if child.is_file():
                _fsync(child)
        if folder.exists():
            folder.rmdir()  # empty (callers check); os.replace needs the name free or empty
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def sha256_file(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def series_files(folder: str | Path) -> list[Path]:
    """The regular, non-hidden files directly in ``folder``, sorted: what a DICOM series reader
    looks at, and what :func:`sha256_path` hashes."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def sha256_path(path: str | Path) -> str:
    """sha256 of a file, or of a folder's :func:`series_files` (names + bytes).

    Only content counts, never the location, so a moved cohort keeps its hashes (and its crops).
    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` for an empty folder.
    """
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if path.is_dir():
        files = series_files(path)
        if not files:
            raise ValueError(f"{path}: folder holds no files")
        h = hashlib.sha256()
        for f in files:
            h.update(f"{f.name}\0{sha256_file(f)}\n".encode())
        return h.hexdigest()
    raise FileNotFoundError(f"{path}: not found")


@contextlib.contextmanager
def file_lock(lock_path: str | Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created if needed) for the ``with`` block.

    Serialises the processes that would build the same thing at once (sweep jobs under joblib,
    DDP ranks): the first builds, the others wait, then find it built. No-op without ``fcntl``.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    Path(lock_path).parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
