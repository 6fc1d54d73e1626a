"""Algorithm 1 (lesion components, per-slice cleaning, slice selection, square crops) and the crop
store writer. ``lesion_labels`` is imported eagerly (cheap); the writer pulls in pandas."""

from __future__ import annotations

from crc_lightning.preprocessing.algorithm import PreprocessParams, lesion_labels

__all__ = ["PreprocessParams", "build_crop_store", "lesion_labels"]


def __getattr__(name: str):  # lazy: keep `import crc_lightning.preprocessing` light for io/cases
    if name == "build_crop_store":
        from crc_lightning.preprocessing.store import build_crop_store

        return build_crop_store
    raise AttributeError(name)
