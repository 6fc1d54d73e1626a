"""3D-IRCADb-01 as cases: ``3Dircadb1.N/PATIENT_DICOM/`` (a DICOM series) with the union of the tumour
folders of ``3Dircadb1.N/MASKS_DICOM/`` (``livertumor*``, ``tumor*``; DICOM mask series).

Unlabelled: an out-of-distribution source for SimCLR pretraining. Patients are sorted by number.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from crc_lightning.io.errors import InputError
from crc_lightning.sources.case import Case, require_dir

__all__ = ["IRCADB_LAYOUT", "iter_ircadb"]

log = logging.getLogger(__name__)

IRCADB_LAYOUT = (
    "<root>/3Dircadb1.N/PATIENT_DICOM/ (DICOM series) and <root>/3Dircadb1.N/MASKS_DICOM/<organ>/ "
    "(DICOM mask series, tumours named livertumor*/tumor*)"
)
_IRCADB_PATIENT = re.compile(r"^3Dircadb1\.(\d+)$", re.IGNORECASE)
_IRCADB_TUMOUR = re.compile(r"^(liver)?tumou?r", re.IGNORECASE)  # livertumor01, livertumors, tumor1


def _ircadb_patients(root: Path) -> dict[int, Path]:
    """``N → 3Dircadb1.N`` folder: children of ``root``, or ``root`` itself if it is one."""
    patients: dict[int, Path] = {}
    for folder in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        m = _IRCADB_PATIENT.match(folder.name)
        if m and folder.is_dir():
            n = int(m.group(1))
            if n in patients and patients[n] != folder:
                raise InputError(root, f"3Dircadb1.{n} found twice: {patients[n]} and {folder}")
            patients[n] = folder
    return patients


def _child(folder: Path, name: str) -> Path | None:
    """The child of ``folder`` called ``name`` (case-insensitive), or None."""
    for p in sorted(folder.iterdir()):
        if p.name.lower() == name.lower():
            return p
    return None


def iter_ircadb(root: str | Path) -> list[Case]:
    """3D-IRCADb-01 cases: each patient's CT with the union of its tumour mask folders.

    Cysts (``liverkyst``, ``livercyst``) and organs are not tumours. A patient without a tumour
    folder is skipped (logged). Only zip files (``PATIENT_DICOM.zip``) → error asking to unzip.
    """
    root = require_dir(Path(root), IRCADB_LAYOUT)
    patients = _ircadb_patients(root)
    if not patients:
        raise InputError(
            root, f"no 3Dircadb1.N patient folder found; expected the layout {IRCADB_LAYOUT}"
        )
    zipped: list[str] = []
    no_tumour: list[int] = []
    cases: list[Case] = []
    for n in sorted(patients):
        folder = patients[n]
        image = _child(folder, "PATIENT_DICOM")
        masks_dir = _child(folder, "MASKS_DICOM")
        if image is None or not image.is_dir() or masks_dir is None or not masks_dir.is_dir():
            zips = [
                z
                for z in ("PATIENT_DICOM.zip", "MASKS_DICOM.zip")
                if (c := _child(folder, z)) is not None and c.is_file()
            ]
            if zips:
                zipped.append(f"{folder.name} ({', '.join(zips)})")
                continue
            raise InputError(
                folder, f"PATIENT_DICOM/ or MASKS_DICOM/ folder missing; expected {IRCADB_LAYOUT}"
            )
        tumours = sorted(
            (p for p in masks_dir.iterdir() if p.is_dir() and _IRCADB_TUMOUR.match(p.name)),
            key=lambda p: p.name.lower(),
        )
        if not tumours:
            no_tumour.append(n)
            continue
        cases.append(
            Case(
                case_id=f"ircadb-{n}",
                patient_id=f"ircadb-{n}",
                image=image,
                masks=tuple(tumours),
                lesions=None,
                source="ircadb",
                mask_rule="union",
                lesion_rule="components",
            )
        )
    if zipped:
        raise InputError(
            root,
            "3D-IRCADb folders are still zipped: "
            + "; ".join(zipped)
            + ". Unzip them in place first (e.g. `cd 3Dircadb1.1 && unzip PATIENT_DICOM.zip && "
            "unzip MASKS_DICOM.zip`), giving PATIENT_DICOM/ and MASKS_DICOM/<organ>/ folders",
        )
    if no_tumour:
        log.warning("3D-IRCADb: %d patient(s) without a tumour mask folder skipped", len(no_tumour))
        log.debug("3D-IRCADb patients without tumour folder: %s", no_tumour)
    if not cases:
        raise InputError(root, f"no 3D-IRCADb patient has a tumour mask folder ({IRCADB_LAYOUT})")
    return cases
