"""One preprocessing case: an image, its mask(s), what the lesions are, and how to read them.

A :class:`Case` is what every data source (cohort manifest, LiTS, 3D-IRCADb, TCIA-CRLM, synthetic)
hands to the preprocessing step. It only *describes* the inputs; :meth:`Case.load` reads them (in
the canonical voxel order, mask on the image's grid, :mod:`crc_lightning.io`) and applies the
source's mask rule so that every source ends up as the same thing: a CT in HU and a raw lesion mask
on the same grid. Turning that raw mask into lesion ids is
:func:`crc_lightning.io.lesions.lesion_labels`' job, by the case's ``lesion_rule``:

* ``"components"`` — the 26-connected components of ``mask > 0`` (whatever its values);
* ``"instance"`` — each non-zero value is one lesion, id = value.

Mask rules (how the raw mask is made from the mask file(s)):

* ``"single"`` — the single mask as read (for a DICOM SEG: the segments named by ``segments``);
* ``"lits_tumour"`` — LiTS segmentations hold 1 = liver, 2 = tumour: keep label 2 only (→ 1);
* ``"union"`` — several masks (IRCADb: one DICOM folder per tumour or group of tumours) OR-ed
  into one binary mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crc_lightning.io import InputError, ReadOptions, SegmentSelector, Volume, read_image, read_mask
from crc_lightning.io.files import series_files
from crc_lightning.io.lesions import check_rule

__all__ = ["MASK_RULES", "Case"]

MASK_RULES = ("single", "lits_tumour", "union")
LITS_TUMOUR_LABEL = 2
_SINGLE_MASK_RULES = ("single", "lits_tumour")


@dataclass
class Case:
    """One image with its lesion mask(s); see the module docstring for the rules."""

    case_id: str  # unique within a source, filesystem-safe
    patient_id: str
    image: Path  # NIfTI file, DICOM series folder or Enhanced CT file
    masks: tuple[Path, ...]  # one or more mask files/folders
    lesions: (
        dict[int | None, dict[str, int]] | None
    )  # lesion value (None = every component) → genes
    source: str  # synthetic | cohort | lits | ircadb | crlm
    mask_rule: str = "single"
    lesion_rule: str = "instance"
    segments: SegmentSelector = None  # DICOM SEG masks: which segments are lesions (None = all)

    def __post_init__(self) -> None:
        self.image = Path(self.image)
        if isinstance(self.masks, (str, Path)):
            self.masks = (self.masks,)  # type: ignore[assignment]
        self.masks = tuple(Path(m) for m in self.masks)
        if self.mask_rule not in MASK_RULES:
            raise ValueError(f"unknown mask_rule {self.mask_rule!r}; expected one of {MASK_RULES}")
        check_rule(self.lesion_rule)
        if isinstance(self.segments, (list, tuple)):
            self.segments = tuple(int(n) for n in self.segments)
        if not self.masks:
            raise ValueError(f"case {self.case_id}: at least one mask is needed")
        if self.mask_rule in _SINGLE_MASK_RULES and len(self.masks) != 1:
            raise ValueError(
                f"case {self.case_id}: mask_rule {self.mask_rule!r} takes exactly one mask, "
                f"got {len(self.masks)}"
            )

    def load(self, options: ReadOptions | None = None) -> tuple[Volume, Volume]:
        """Read ``(image HU float32, raw mask int32)``, both canonical, the mask on the image grid."""
        options = options or ReadOptions()
        image = read_image(self.image, options)
        return image, self._raw_mask(image, options)

    def _read(self, path: Path, image: Volume, options: ReadOptions) -> Volume:
        return read_mask(path, reference=image, options=options, segments=self.segments)

    def _raw_mask(self, image: Volume, options: ReadOptions) -> Volume:
        if self.mask_rule == "union":
            union = np.zeros(image.shape, dtype=bool)
            resampled = ""
            for path in self.masks:
                part = self._read(path, image, options)
                union |= part.array > 0
                resampled = resampled or part.resampled
            out = image.with_array(union.astype(np.int32), ";".join(map(str, self.masks)))
            out.resampled = resampled
            return out
        mask = self._read(self.masks[0], image, options)
        if self.mask_rule == "lits_tumour":
            return mask.with_array((mask.array == LITS_TUMOUR_LABEL).astype(np.int32))
        return mask

    def input_files(self) -> list[Path]:
        """Every file whose bytes define the case: the image's, then each mask's (for hashing).

        A DICOM series folder contributes all its (non-hidden) files, sorted by name — the same
        files its reader looks at.
        """
        files: list[Path] = []
        for path in (self.image, *self.masks):
            files.extend(series_files(path) if path.is_dir() else [path])
        return files


def require_dir(root: Path, layout: str) -> Path:
    """``root`` as a Path if it is a folder, else an InputError showing the expected layout."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, f"not a folder; expected the layout {layout}")
    return root
