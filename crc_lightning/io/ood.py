"""Out-of-distribution (unlabelled) CT sources as :class:`Case` lists, and content de-duplication.

Each adapter walks one public dataset in the layout it is distributed in, pairs every CT with its
tumour annotation and returns ``Case`` objects with ``lesions=None`` (no gene labels), sorted by the
dataset's own numbering so the order never depends on the file system:

* :func:`iter_lits` — LiTS17: ``volume-N.nii[.gz]`` + ``segmentation-N.nii[.gz]`` anywhere under the
  root (e.g. ``Training Batch 1/``, ``Training Batch 2/``); tumour = label 2.
* :func:`iter_ircadb` — 3D-IRCADb-01: ``3Dircadb1.N/PATIENT_DICOM/`` + the tumour folders of
  ``3Dircadb1.N/MASKS_DICOM/`` (``livertumor*``, ``tumor*``), OR-ed.
* :func:`iter_crlm` — TCIA Colorectal-Liver-Metastases as downloaded by the NBIA retriever:
  ``<root>/CRLM-CT-XXXX/<study>/<series>/*.dcm``; a CT series and a DICOM SEG whose ``Tumor_*``
  segments are kept (Liver, Liver_Remnant, Hepatic, Portal are not).

:func:`dedupe_by_content` drops repeated scans across sources: LiTS volumes 28–47 *are* 3D-IRCADb
patients, re-saved as NIfTI and possibly flipped, so file hashes cannot see it. The fingerprint is a
histogram of the rounded HU values plus the sorted shape: invariant to any voxel permutation (flips,
axis swaps, file format), and different for different scans in practice.

Logging: counts at INFO/WARNING; dataset ids of skipped or dropped scans only at DEBUG.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crc_lightning.io.cases import Case, tumour_segments
from crc_lightning.io.errors import InputError

__all__ = [
    "CRLM_LAYOUT",
    "IRCADB_LAYOUT",
    "LITS_LAYOUT",
    "content_fingerprint",
    "dedupe_by_content",
    "iter_crlm",
    "iter_ircadb",
    "iter_lits",
]

log = logging.getLogger(__name__)

LITS_LAYOUT = (
    "<root>/**/volume-N.nii[.gz] with segmentation-N.nii[.gz] (e.g. in 'Training Batch 1/')"
)
IRCADB_LAYOUT = (
    "<root>/3Dircadb1.N/PATIENT_DICOM/ (DICOM series) and <root>/3Dircadb1.N/MASKS_DICOM/<organ>/ "
    "(DICOM mask series, tumours named livertumor*/tumor*)"
)
CRLM_LAYOUT = (
    "<root>/CRLM-CT-XXXX/<study>/<series>/*.dcm with, per patient, a CT series (Modality CT) and a "
    "DICOM SEG (Modality SEG) with 'Tumor_*' segments"
)

_LITS_VOLUME = re.compile(r"^volume-(\d+)\.nii(\.gz)?$", re.IGNORECASE)
_LITS_SEG = re.compile(r"^segmentation-(\d+)\.nii(\.gz)?$", re.IGNORECASE)
_IRCADB_PATIENT = re.compile(r"^3Dircadb1\.(\d+)$", re.IGNORECASE)
_IRCADB_TUMOUR = re.compile(r"^(liver)?tumou?r", re.IGNORECASE)  # livertumor01, livertumors, tumor1
_HU_OFFSET = 32768  # int16 HU + offset ≥ 0 for np.bincount
_HU_BINS = 65536
_SLAB = 16  # slices per chunk when fingerprinting (bounded memory on 512² × 800 volumes)


def _require_dir(root: Path, layout: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, f"not a folder; expected the layout {layout}")
    return root


# ----------------------------------------------------------------------------------------- LiTS
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
    root = _require_dir(Path(root), LITS_LAYOUT)
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
        )
        for n in paired
    ]


# ---------------------------------------------------------------------------------------- IRCADb
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
    root = _require_dir(Path(root), IRCADB_LAYOUT)
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
                mask_rule="union_components",
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


# ------------------------------------------------------------------------------------------ CRLM
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


def iter_crlm(root: str | Path) -> list[Case]:
    """TCIA-CRLM cases: each SEG with tumour segments, paired with the CT series it annotates.

    Mask rule ``seg_tumour``: only segments labelled like ``Tumor_1`` are kept (``tumou?r``).
    SEGs without tumour segment, or whose CT is not found, are skipped with a warning.
    """
    root = _require_dir(Path(root), CRLM_LAYOUT)
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
        if not tumour_segments(dict(seg.segment_labels)):
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
                mask_rule="seg_tumour",
            )
        )
    return cases


# ----------------------------------------------------------------------------------- de-duplication
def content_fingerprint(array: np.ndarray) -> str:
    """sha256 of (sorted shape, histogram of int16-rounded HU): unchanged by flips/transposes."""
    array = np.asarray(array)
    counts = np.zeros(_HU_BINS, dtype=np.int64)
    flat = array.reshape(array.shape[0], -1) if array.ndim else array.reshape(1, 1)
    for start in range(0, flat.shape[0], _SLAB):
        chunk = np.rint(flat[start : start + _SLAB].astype(np.float64, copy=False))
        chunk = np.clip(chunk, -_HU_OFFSET, _HU_OFFSET - 1).astype(np.int64) + _HU_OFFSET
        counts += np.bincount(chunk.ravel(), minlength=_HU_BINS)
    h = hashlib.sha256()
    h.update(np.asarray(sorted(array.shape), dtype="<i8").tobytes())
    h.update(counts.astype("<i8").tobytes())
    return h.hexdigest()


def dedupe_by_content(cases: Iterable[Case]) -> tuple[list[Case], int]:
    """Drop cases whose image content repeats an earlier case's; ``(kept, n_dropped)``.

    First occurrence wins, in the order given (put the preferred source first). Each image is read
    and fingerprinted once (an image shared by several cases is read once).
    """
    from crc_lightning.io import read_image

    kept: list[Case] = []
    seen: set[str] = set()
    by_image: dict[Path, str] = {}
    dropped: list[str] = []
    for case in cases:
        key = Path(case.image).resolve()
        if key not in by_image:
            by_image[key] = content_fingerprint(read_image(case.image).array)
        fp = by_image[key]
        if fp in seen:
            dropped.append(case.case_id)
            continue
        seen.add(fp)
        kept.append(case)
    log.info("dedupe_by_content: dropped %d of %d case(s)", len(dropped), len(kept) + len(dropped))
    if dropped:
        log.debug("content duplicates dropped: %s", dropped)
    return kept, len(dropped)
