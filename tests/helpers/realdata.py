"""Where the real CT test files are, and a clear skip when they are not there.

``shared/realdata/`` (TotalSegmentator example CTs and label maps, highdicom's SEG test files; see
its README) sits beside the project checkout (``<checkout>/../shared``); ``CRC_REALDATA`` points
elsewhere. pydicom's own test files ship with pydicom; the compressed and Enhanced CT ones come
with the ``pydicom-data`` package (the ``dev`` extra). Nothing is ever copied into the repository.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_CANDIDATES = (
    os.environ.get("CRC_REALDATA", ""),
    str(ROOT.parent / "shared" / "realdata"),
    "/work/shared/realdata",
)


def realdata(*parts: str) -> Path:
    """A path under shared/realdata, or skip the test saying what is missing."""
    for base in filter(None, _CANDIDATES):
        path = Path(base, *parts)
        if path.exists():
            return path
    pytest.skip(
        f"real CT test file {'/'.join(parts)} not found: shared/realdata/ is absent (set "
        "CRC_REALDATA=<folder> or place it beside the checkout)"
    )


def pydicom_file(name: str) -> Path:
    """A file of pydicom's bundled test data or of the ``pydicom-data`` package, or skip."""
    from pydicom.data import get_testdata_file

    try:
        path = get_testdata_file(name, download=False)
    except Exception:  # pydicom may try a download when the file is not local: never here
        path = None
    if path is None:
        pytest.skip(
            f"pydicom test file {name!r} not available: install the 'pydicom-data' package "
            "(pip install -e '.[dev]')"
        )
    return Path(path)
