"""TCIA Colorectal-Liver-Metastases as cases, in the layout the NBIA retriever downloads:
``<root>/CRLM-CT-XXXX/<study>/<series>/*.dcm`` — per patient a CT series and a DICOM SEG whose
``Tumor_*`` segments are the lesions (Liver, Liver_Remnant, Hepatic, Portal are not).

Unlabelled here (its clinical table is not read): an out-of-distribution source for SimCLR.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from crc_lightning.io import InputError, SegmentSelector
from crc_lightning.io.seg import select_segments
from crc_lightning.sources.case import Case, require_dir

__all__ = ["CRLM_LAYOUT", "CRLM_TUMOUR_SEGMENTS", "iter_crlm"]

CRLM_TUMOUR_SEGMENTS = "tumou?r"  # "Tumor_1", "tumour 2", … (conf/data/crlm.yaml: data.segments)

log = logging.getLogger(__name__)

CRLM_LAYOUT = (
    "<root>/CRLM-CT-XXXX/<study>/<series>/*.dcm with, per patient, a CT series (Modality CT) and a "
    "DICOM SEG (Modality SEG) with 'Tumor_*' segments"
)


@dataclass(frozen=True)
class _Series:
    folder: Path
    file: Path  # the SEG file, or the first readable file of a CT series
    modality: str
    patient_id: str
    study_uid: str
    series_uid: str
    referenced_series: tuple[str, ...] = ()
    segment_labels: tuple[tuple[int, str], ...] = ()


def _header(path: Path):  # -> pydicom.Dataset | None
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError):
        return None


def _top_folder(root: Path, folder: Path) -> str:
    """The first folder below ``root`` on the way to ``folder`` (the NBIA patient folder)."""
    parts = folder.relative_to(root).parts
    return parts[0] if parts else root.name


def _referenced_series(ds) -> tuple[str, ...]:
    """SeriesInstanceUIDs a SEG points to (ReferencedSeriesSequence, or via its source images)."""
    uids = [str(item.SeriesInstanceUID) for item in ds.get("ReferencedSeriesSequence", [])]
    for item in ds.get("SharedFunctionalGroupsSequence", []):
        for der in item.get("DerivationImageSequence", []):
            for src in der.get("SourceImageSequence", []):
                if "SeriesInstanceUID" in src:
                    uids.append(str(src.SeriesInstanceUID))
    return tuple(dict.fromkeys(uids))


def _scan_series(root: Path) -> list[_Series]:
    """Every CT series folder and SEG file under ``root`` (headers only, no pixel data)."""
    found: list[_Series] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        files = sorted(f for f in filenames if not f.startswith("."))
        for name in files:
            path = Path(dirpath) / name
            ds = _header(path)
            if ds is None or "Modality" not in ds:
                continue
            common = dict(
                folder=Path(dirpath),
                file=path,
                modality=str(ds.Modality).upper(),
                patient_id=str(ds.get("PatientID", "")) or _top_folder(root, Path(dirpath)),
                study_uid=str(ds.get("StudyInstanceUID", "")),
                series_uid=str(ds.get("SeriesInstanceUID", "")),
            )
            if common["modality"] == "SEG":
                labels = tuple(
                    (int(s.SegmentNumber), str(s.get("SegmentLabel", "")))
                    for s in ds.get("SegmentSequence", [])
                )
                found.append(
                    _Series(
                        **common, referenced_series=_referenced_series(ds), segment_labels=labels
                    )
                )
                continue  # a SEG folder may hold several SEG files: look at each
            if common["modality"] == "CT":
                found.append(_Series(**common))
            break  # one header tells what an image series folder is
    return found


def _pair_ct(seg: _Series, cts: Sequence[_Series]) -> _Series | None:
    """The CT series a SEG annotates: by referenced SeriesInstanceUID, else the study's only CT."""
    by_uid = [ct for ct in cts if ct.series_uid in seg.referenced_series]
    if by_uid:
        return by_uid[0]
    same_study = [ct for ct in cts if ct.study_uid == seg.study_uid]
    return same_study[0] if len(same_study) == 1 else None


def _crlm_case_id(patient_id: str) -> str:
    short = re.sub(r"^CRLM-CT-", "", patient_id, flags=re.IGNORECASE)
    return "crlm-" + (re.sub(r"[^A-Za-z0-9._-]+", "_", short).strip("_") or "case")


def _names_lesions(seg: _Series, segments: SegmentSelector) -> bool:
    try:
        select_segments(dict(seg.segment_labels), segments, seg.file)
    except InputError:
        return False
    return True


def iter_crlm(root: str | Path, segments: SegmentSelector = CRLM_TUMOUR_SEGMENTS) -> list[Case]:
    """TCIA-CRLM cases: each SEG with tumour segments, paired with the CT series it annotates.

    Only the segments ``segments`` names are lesions (default: labels like ``Tumor_1``; the Liver,
    Liver_Remnant, Hepatic and Portal segments overlap them and are left out), each segment one
    lesion (lesion rule ``instance``, id = segment number). SEGs naming no such segment, or whose
    CT is not found, are skipped with a warning.
    """
    root = require_dir(Path(root), CRLM_LAYOUT)
    series = _scan_series(root)
    segs = [s for s in series if s.modality == "SEG"]
    cts = [s for s in series if s.modality == "CT"]
    if not segs or not cts:
        raise InputError(
            root,
            f"found {len(cts)} CT series and {len(segs)} DICOM SEG file(s); expected the layout "
            f"{CRLM_LAYOUT}",
        )
    no_tumour, no_ct = 0, 0
    pairs: list[tuple[_Series, _Series]] = []
    for seg in segs:
        if not _names_lesions(seg, segments):
            no_tumour += 1
            log.debug("CRLM SEG without tumour segment: %s", seg.file)
            continue
        ct = _pair_ct(seg, [c for c in cts if c.patient_id == seg.patient_id] or cts)
        if ct is None:
            no_ct += 1
            log.debug("CRLM SEG without its CT series: %s", seg.file)
            continue
        pairs.append((seg, ct))
    if no_tumour:
        log.warning("CRLM: %d SEG file(s) without tumour segment skipped", no_tumour)
    if no_ct:
        log.warning("CRLM: %d SEG file(s) whose CT series was not found skipped", no_ct)
    if not pairs:
        raise InputError(root, f"no CT/SEG pair with tumour segments found ({CRLM_LAYOUT})")
    pairs.sort(key=lambda p: (p[0].patient_id, str(p[0].file)))
    counts: dict[str, int] = {}
    for seg, _ in pairs:
        counts[seg.patient_id] = counts.get(seg.patient_id, 0) + 1
    cases, index = [], dict.fromkeys(counts, 0)
    for seg, ct in pairs:
        index[seg.patient_id] += 1
        case_id = _crlm_case_id(seg.patient_id)
        if counts[seg.patient_id] > 1:
            case_id += f"-{index[seg.patient_id]}"
        cases.append(
            Case(
                case_id=case_id,
                patient_id=seg.patient_id,
                image=ct.folder,
                masks=(seg.file,),
                lesions=None,
                source="crlm",
                mask_rule="single",
                lesion_rule="instance",
                segments=segments,
            )
        )
    return cases
