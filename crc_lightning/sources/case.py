"""One preprocessing case: an image, its mask(s), what the lesions are, and how to read them.

A :class:`Case` is what every data source (cohort manifest, LiTS, 3D-IRCADb, TCIA-CRLM, synthetic)
hands to the preprocessing step. It only *describes* the inputs; :meth:`Case.load` reads them and
applies the source's mask rule so that every source ends up as the same thing: a CT in HU and a raw
lesion mask on the same grid. Turning that raw mask into lesion ids (components of a binary mask,
values of an instance mask) is :func:`crc_lightning.io.lesions.lesion_labels`' job — done
there, not here (``crc_lightning.io.lesions``).

Mask rules:

* ``"instance"`` — the single mask as read (binary or instance values);
* ``"lits_tumour"`` — LiTS segmentations hold 1 = liver, 2 = tumour: keep label 2 only (→ 1);
* ``"union_components"`` — several binary masks (IRCADb: one DICOM folder per tumour or group of
  tumours) OR-ed into one binary mask; the components are found later;
* ``"seg_tumour"`` — a DICOM SEG whose segments include organs (TCIA-CRLM: "Liver", "Portal", …):
  only the segments whose label matches :data:`TUMOUR_SEGMENT_RE` are kept, numbered 1..k in
  segment-number order (an instance mask). Organ segments overlap the tumours, so the SEG cannot be
  read whole (overlapping segments are refused by ``read_mask``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crc_lightning.io import InputError, Volume, check_same_grid, read_image, read_mask
from crc_lightning.io.files import series_files

__all__ = ["MASK_RULES", "TUMOUR_SEGMENT_RE", "Case", "read_tumour_segments", "tumour_segments"]

MASK_RULES = ("instance", "lits_tumour", "union_components", "seg_tumour")
TUMOUR_SEGMENT_RE = re.compile(r"tumou?r", re.IGNORECASE)  # "Tumor_1", "tumour 2", …
LITS_TUMOUR_LABEL = 2
_SINGLE_MASK_RULES = ("instance", "lits_tumour", "seg_tumour")


@dataclass
class Case:
    """One image with its lesion mask(s); see the module docstring for ``mask_rule``."""

    case_id: str  # unique within a source, filesystem-safe
    patient_id: str
    image: Path  # NIfTI file or DICOM series folder
    masks: tuple[Path, ...]  # one or more mask files/folders
    lesions: (
        dict[int | None, dict[str, int]] | None
    )  # lesion value (None = every component) → genes
    source: str  # synthetic | cohort | lits | ircadb | crlm
    mask_rule: str = "instance"

    def __post_init__(self) -> None:
        self.image = Path(self.image)
        if isinstance(self.masks, (str, Path)):
            self.masks = (self.masks,)  # type: ignore[assignment]
        self.masks = tuple(Path(m) for m in self.masks)
        if self.mask_rule not in MASK_RULES:
            raise ValueError(f"unknown mask_rule {self.mask_rule!r}; expected one of {MASK_RULES}")
        if not self.masks:
            raise ValueError(f"case {self.case_id}: at least one mask is needed")
        if self.mask_rule in _SINGLE_MASK_RULES and len(self.masks) != 1:
            raise ValueError(
                f"case {self.case_id}: mask_rule {self.mask_rule!r} takes exactly one mask, "
                f"got {len(self.masks)}"
            )

    def load(self) -> tuple[Volume, Volume]:
        """Read ``(image HU float32, raw mask int32)``; the mask is checked against the image grid."""
        image = read_image(self.image)
        mask = self._raw_mask(image)
        check_same_grid(image, mask)
        return image, mask

    def _raw_mask(self, image: Volume) -> Volume:
        if self.mask_rule == "seg_tumour":
            return read_tumour_segments(self.masks[0], image)
        if self.mask_rule == "union_components":
            union = np.zeros(image.shape, dtype=bool)
            for path in self.masks:
                union |= read_mask(path, reference=image).array > 0
            return _like(image, union.astype(np.int32), ";".join(map(str, self.masks)))
        mask = read_mask(self.masks[0], reference=image)
        if self.mask_rule == "lits_tumour":
            tumour = (mask.array == LITS_TUMOUR_LABEL).astype(np.int32)
            return _like(mask, tumour, mask.source)
        return _like(mask, np.asarray(mask.array, dtype=np.int32), mask.source)

    def input_files(self) -> list[Path]:
        """Every file whose bytes define the case: the image's, then each mask's (for hashing).

        A DICOM series folder contributes all its (non-hidden) files, sorted by name — the same
        files its reader looks at.
        """
        files: list[Path] = []
        for path in (self.image, *self.masks):
            files.extend(series_files(path) if path.is_dir() else [path])
        return files


def _like(ref: Volume, array: np.ndarray, source: str) -> Volume:
    """A volume on ``ref``'s grid holding ``array``."""
    return Volume(array, ref.spacing, ref.origin, ref.direction, source=source)


def tumour_segments(segment_labels: dict[int, str]) -> list[int]:
    """Segment numbers (sorted) whose label names a tumour (``tumou?r``, case-insensitive)."""
    return sorted(n for n, label in segment_labels.items() if TUMOUR_SEGMENT_RE.search(label))


def read_tumour_segments(path: Path, reference: Volume) -> Volume:
    """Read only the tumour segments of a DICOM SEG onto ``reference``'s grid (values 1..k).

    Why not ``read_mask``: it combines *all* segments and refuses overlaps, but organ segments
    (Liver, Liver_Remnant, …) contain the tumours.
    """
    import highdicom as hd

    from crc_lightning.io.seg import volume_affine

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "DICOM SEG file not found")
    try:
        seg = hd.seg.segread(path)
    except Exception as exc:
        raise InputError(path, f"not a readable DICOM SEG ({type(exc).__name__}: {exc})") from exc
    labels = {int(s.SegmentNumber): str(s.get("SegmentLabel", "")) for s in seg.SegmentSequence}
    numbers = tumour_segments(labels)
    if not numbers:
        raise InputError(
            path,
            f"no tumour segment (label matching {TUMOUR_SEGMENT_RE.pattern!r}) among "
            f"{sorted(labels.values())}",
        )
    try:
        hvol = seg.get_volume(
            segment_numbers=numbers,
            combine_segments=True,
            relabel=True,
            allow_missing_positions=True,
        )
        grid = hd.VolumeGeometry(volume_affine(reference), reference.shape, "PATIENT")
        hvol = hvol.match_geometry(grid)
    except Exception as exc:  # overlapping tumour segments, frames off the image grid, …
        raise InputError(
            path,
            f"cannot place the tumour segments on the image grid {reference.source or ''} "
            f"({type(exc).__name__}: {exc})",
        ) from exc
    array = np.asarray(hvol.array).astype(np.int32)
    if array.shape != reference.shape:
        raise InputError(path, f"SEG volume shape {array.shape} != image shape {reference.shape}")
    return _like(reference, array, str(path))


def require_dir(root: Path, layout: str) -> Path:
    """``root`` as a Path if it is a folder, else an InputError showing the expected layout."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, f"not a folder; expected the layout {layout}")
    return root
