"""crc-lightning: CT-based mutation-family classification of colorectal liver metastases."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("crc-lightning")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
