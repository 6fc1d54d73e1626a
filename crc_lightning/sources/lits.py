"""LiTS17 (Bilic et al. 2023) as cases: ``volume-N.nii[.gz]`` + ``segmentation-N.nii[.gz]`` anywhere
under the root (e.g. ``Training Batch 1/``, ``Training Batch 2/``); tumour = segmentation label 2.

Unlabelled (no gene labels): an out-of-distribution source for SimCLR pretraining. Cases are sorted
by volume number, so the order never depends on the file system. Dataset ids of skipped scans are
logged at DEBUG only.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from crc_lightning.io.errors import InputError
from crc_lightning.sources.case import Case, require_dir

__all__ = ["LITS_LAYOUT", "iter_lits"]

log = logging.getLogger(__name__)

LITS_LAYOUT = (
    "<root>/**/volume-N.nii[.gz] with segmentation-N.nii[.gz] (e.g. in 'Training Batch 1/')"
)
_LITS_VOLUME = re.compile(r"^volume-(\d+)\.nii(\.gz)?$", re.IGNORECASE)
_LITS_SEG = re.compile(r"^segmentation-(\d+)\.nii(\.gz)?$", re.IGNORECASE)


def _find_numbered(root: Path, pattern: re.Pattern[str], kind: str) -> dict[int, Path]:
    """``N → file`` for files under ``root`` matching ``pattern``; a number found twice is refused."""
    found: dict[int, Path] = {}
    for path in sorted(root.rglob("*")):
        m = pattern.match(path.name)
        if m and path.is_file():
            n = int(m.group(1))
            if n in found:
                raise InputError(root, f"{kind}-{n} found twice: {found[n]} and {path}")
            found[n] = path
    return found


def iter_lits(root: str | Path) -> list[Case]:
    """LiTS17 cases (tumour = segmentation label 2), ordered by volume number.

    A volume without segmentation (e.g. the LiTS test batch) is skipped with a warning.
    """
    root = require_dir(Path(root), LITS_LAYOUT)
    volumes = _find_numbered(root, _LITS_VOLUME, "volume")
    segs = _find_numbered(root, _LITS_SEG, "segmentation")
    if not volumes:
        raise InputError(
            root, f"no LiTS volume-N.nii[.gz] found; expected the layout {LITS_LAYOUT}"
        )
    unpaired = sorted(set(volumes) - set(segs))
    orphans = sorted(set(segs) - set(volumes))
    if unpaired:
        log.warning("LiTS: %d volume(s) without segmentation skipped", len(unpaired))
        log.debug("LiTS volumes without segmentation: %s", unpaired)
    if orphans:
        log.warning("LiTS: %d segmentation(s) without volume ignored", len(orphans))
        log.debug("LiTS segmentations without volume: %s", orphans)
    paired = sorted(set(volumes) & set(segs))
    if not paired:
        raise InputError(
            root, f"no LiTS volume has its segmentation-N file; expected the layout {LITS_LAYOUT}"
        )
    return [
        Case(
            case_id=f"lits-{n}",
            patient_id=f"lits-{n}",
            image=volumes[n],
            masks=(segs[n],),
            lesions=None,
            source="lits",
            mask_rule="lits_tumour",
            lesion_rule="components",
        )
        for n in paired
    ]
