"""The cohort manifest: one CSV row per lesion (or per patient) → one :class:`Case` per scan.

Format (README, "Your cohort: the manifest")::

    patient_id,image,mask,lesion,KRAS,NRAS,BRAF,PIK3CA

``image``/``mask`` are relative to the CSV's folder (absolute paths allowed); ``lesion`` is the
lesion's value in the mask (an instance id; for a DICOM SEG the segment number); empty or ``*``
means "every 26-connected component of ``mask > 0`` is a lesion carrying this row's labels",
whatever the mask's values (0/1, 0/255, labels). That choice is the scan's **lesion rule**
(``components`` for ``*`` rows, ``instance`` for explicit ids), carried by its :class:`Case` into
preprocessing and ``predict`` (:mod:`crc_lightning.io.lesions`).

Why validate everything first: a cohort manifest is typed by hand for hundreds of patients; the
user must see *every* mistake in one go (each with its CSV line number), not one per 20-minute
preprocessing run. The cheap checks (columns, values, files exist, duplicates) run on the whole
file; then every scan's headers (no pixel decoded): the image is readable as what it claims, its
DICOM series complete and regular (or tilted with ``gantry_tilt=resample``), its mask on the same
physical grid (or ``resample_mask``), a SEG's frames on the image grid — so a cohort with one bad
file fails in seconds, naming the file and the problem. Only when all that passes are the masks
read (once per mask file) to check that each lesion id exists. Nothing is ever written.

The CSV is parsed with the standard :mod:`csv` module rather than pandas because the error
messages need exact physical line numbers (blank lines, quoted newlines) and the raw header
(pandas silently renames duplicate columns).

Decisions: one patient may have several scans (several ``(image, mask)`` pairs), but lesions are
identified by ``patient_id + lesion`` everywhere downstream, so a ``(patient_id, lesion)`` may
appear only once, and a ``*`` row must be that patient's only row; an image belongs to one patient.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crc_lightning.io import (
    InputError,
    ManifestError,
    ReadOptions,
    SegmentSelector,
    Volume,
    check_mask_grid,
    read_image_grid,
    read_mask,
)
from crc_lightning.io.lesions import lesion_labels_in_box
from crc_lightning.sources.case import Case

__all__ = ["BASE_COLUMNS", "GENES", "read_manifest", "safe_id"]

BASE_COLUMNS = ("patient_id", "image", "mask", "lesion")
# the gene columns of the manifest format (and so of every crop-store index), in this order; a
# label set (conf/labels/) names which of them it uses
GENES: tuple[str, ...] = ("KRAS", "NRAS", "BRAF", "PIK3CA")
EVERY_COMPONENT = ("", "*")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_BAD_PATIENT_CHARS = ("/", "\\")


@dataclass
class _Row:
    line: int
    patient_id: str
    image: Path | None
    mask: Path | None
    lesion: int | None
    genes: dict[str, int] = field(default_factory=dict)
    lesion_ok: bool = True  # False when the lesion cell is invalid (then left out of lesion checks)


def safe_id(text: str) -> str:
    """A filesystem-safe version of ``text`` (runs of other characters become ``_``)."""
    return _UNSAFE.sub("_", text).strip("_") or "case"


def read_manifest(
    csv_path: str | Path,
    genes: Sequence[str] = GENES,
    check_lesions: bool = True,
    source: str = "cohort",
    options: ReadOptions | None = None,
    segments: SegmentSelector = None,
    check_geometry: bool = True,
) -> list[Case]:
    """Validate a cohort manifest and group its rows into one :class:`Case` per scan.

    Raises a single :class:`ManifestError` listing every problem found (with line numbers).
    ``check_geometry`` checks every scan's headers and grids (reading ``options``; ``segments``
    names the lesion segments of DICOM SEG masks); ``check_lesions`` also reads each mask once to
    check that the listed lesion ids exist.
    """
    options = options or ReadOptions()
    csv_path = Path(csv_path)
    genes = tuple(genes)
    records, header_line, header = _read_csv(csv_path)
    problems: list[str] = []
    columns = _check_header(header, header_line, genes, problems)
    rows = [
        row
        for line, values in records
        if (row := _parse_row(line, values, header, columns, csv_path.parent, genes, problems))
    ]
    if not rows and not problems:
        problems.append("no data rows")
    _check_consistency(rows, problems)
    if problems:
        raise ManifestError(csv_path, problems)
    grids: dict[Path, Volume] = {}
    if check_geometry or check_lesions:
        grids = _check_geometry(rows, problems, options, segments)
        if problems:
            raise ManifestError(csv_path, problems)
    if check_lesions:
        _check_lesions(rows, problems, grids, options, segments)
        if problems:
            raise ManifestError(csv_path, problems)
    return _group(rows, csv_path.parent, source, segments)


def _read_csv(path: Path) -> tuple[list[tuple[int, list[str]]], int, list[str]]:
    """(data records with their first physical line number, header line, header cells)."""
    if not path.is_file():
        raise InputError(path, "manifest file not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            records: list[tuple[int, list[str]]] = []
            header: list[str] | None = None
            header_line = 0
            start = 1
            for values in reader:
                if any(v.strip() for v in values):
                    if header is None:
                        header, header_line = [v.strip() for v in values], start
                    else:
                        records.append((start, values))
                start = reader.line_num + 1
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(path, f"cannot parse the manifest as UTF-8 CSV ({exc})") from exc
    if header is None:
        raise ManifestError(path, ["empty file: expected a header line"])
    return records, header_line, header


def _check_header(
    header: list[str], line: int, genes: tuple[str, ...], problems: list[str]
) -> dict[str, int]:
    """Column name → index (first occurrence); header problems appended to ``problems``."""
    expected = (*BASE_COLUMNS, *genes)
    columns: dict[str, int] = {}
    for i, name in enumerate(header):
        if name in columns:
            problems.append(f"line {line}: duplicate column {name!r}")
        else:
            columns[name] = i
    missing = [c for c in expected if c not in columns]
    unknown = [c for c in columns if c not in expected]
    if missing:
        problems.append(f"line {line}: missing column(s) {', '.join(missing)}")
    if unknown:
        problems.append(
            f"line {line}: unknown column(s) {', '.join(map(repr, unknown))} "
            f"(expected {','.join(expected)})"
        )
    return columns


def _parse_row(
    line: int,
    values: list[str],
    header: list[str],
    columns: dict[str, int],
    folder: Path,
    genes: tuple[str, ...],
    problems: list[str],
) -> _Row | None:
    """One data row; its problems are appended. ``None`` when it has the wrong number of cells."""
    if len(values) != len(header):
        problems.append(f"line {line}: {len(values)} field(s), the header has {len(header)}")
        return None

    def cell(name: str) -> str | None:
        return values[columns[name]].strip() if name in columns else None

    patient_id = cell("patient_id")
    if patient_id is not None:
        if not patient_id:
            problems.append(f"line {line}: empty patient_id")
        elif any(c in patient_id for c in _BAD_PATIENT_CHARS):
            problems.append(
                f"line {line}: patient_id {patient_id!r} contains '/' or '\\' "
                "(it is part of crop ids)"
            )
    paths: dict[str, Path | None] = {}
    for kind in ("image", "mask"):
        text = cell(kind)
        paths[kind] = None
        if text is None:
            continue
        if not text:
            problems.append(f"line {line}: empty {kind} path")
            continue
        path = Path(text).expanduser()
        path = path if path.is_absolute() else folder / path
        if not path.exists():
            problems.append(f"line {line}: {kind} not found: {path}")
        paths[kind] = path
    n_before = len(problems)
    lesion = _parse_lesion(line, cell("lesion"), problems)
    lesion_ok = len(problems) == n_before
    gene_values: dict[str, int] = {}
    for gene in genes:
        text = cell(gene)
        if text is None:
            continue
        if text not in ("0", "1"):
            shown = "empty" if not text else repr(text)
            problems.append(f"line {line}: {gene} is {shown}; expected 0 or 1")
        else:
            gene_values[gene] = int(text)
    return _Row(
        line, patient_id or "", paths["image"], paths["mask"], lesion, gene_values, lesion_ok
    )


def _parse_lesion(line: int, text: str | None, problems: list[str]) -> int | None:
    """The lesion id (a positive integer), or None for "every component" (empty or ``*``)."""
    if text is None or text in EVERY_COMPONENT:
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 1:
        problems.append(
            f"line {line}: lesion {text!r} is not a positive integer (or empty/'*' for every "
            "component)"
        )
        return None
    return value


def _key(path: Path | None) -> Path | None:
    return None if path is None else path.resolve()


def _check_consistency(rows: list[_Row], problems: list[str]) -> None:
    """Cross-row problems: duplicate lesions, '*' mixed with lesion ids, an image under two ids."""
    seen_lesion: dict[tuple[str, int | None], int] = {}
    by_patient: dict[str, list[_Row]] = {}
    image_owner: dict[Path, tuple[str, int]] = {}
    for row in rows:
        pid = row.patient_id
        if not pid:
            continue
        key = (pid, row.lesion)
        if row.lesion_ok:
            by_patient.setdefault(pid, []).append(row)
        if row.lesion_ok and key in seen_lesion:
            what = "'*' (every component)" if row.lesion is None else f"lesion {row.lesion}"
            problems.append(
                f"line {row.line}: duplicate row for patient {pid!r}, {what} "
                f"(first on line {seen_lesion[key]})"
            )
        elif row.lesion_ok:
            seen_lesion[key] = row.line
        image = _key(row.image)
        if image is not None:
            owner = image_owner.setdefault(image, (pid, row.line))
            if owner[0] != pid:
                problems.append(
                    f"line {row.line}: image {row.image} is also listed for patient {owner[0]!r} "
                    f"(line {owner[1]}); an image belongs to one patient"
                )
    for pid, patient_rows in by_patient.items():
        stars = [r for r in patient_rows if r.lesion is None]
        explicit = [r for r in patient_rows if r.lesion is not None]
        if not stars or not explicit:
            continue
        star = stars[0]
        scan = (_key(star.image), _key(star.mask))
        same = [r for r in explicit if (_key(r.image), _key(r.mask)) == scan]
        other = [r for r in explicit if (_key(r.image), _key(r.mask)) != scan]
        for group, where in ((same, "the same image and mask"), (other, "another scan")):
            if group:
                lines = ", ".join(str(r.line) for r in group)
                problems.append(
                    f"line {star.line}: patient {pid!r} has a '*' (every component) row and "
                    f"explicit lesion rows for {where} (line(s) {lines}); lesion ids would "
                    "collide — list every lesion explicitly"
                )


def _scans(rows: list[_Row]) -> dict[tuple[Path, Path], list[_Row]]:
    """Rows grouped by (image, mask), in order of first appearance."""
    scans: dict[tuple[Path, Path], list[_Row]] = {}
    for row in rows:
        if row.image is not None and row.mask is not None:
            scans.setdefault((_key(row.image), _key(row.mask)), []).append(row)  # type: ignore[arg-type]
    return scans


def _lines(rows: list[_Row]) -> str:
    return ", ".join(str(r.line) for r in rows)


def _check_geometry(
    rows: list[_Row], problems: list[str], options: ReadOptions, segments: SegmentSelector
) -> dict[Path, Volume]:
    """Headers only: every image's grid (cached per image), every mask against it. Returns the
    image grids (zero-memory volumes) of the images that passed."""
    grids: dict[Path, Volume] = {}
    failed: set[Path] = set()
    for (image, _mask), scan_rows in _scans(rows).items():
        where = f"line(s) {_lines(scan_rows)}"
        if image in failed:
            continue
        if image not in grids:
            try:
                grids[image] = read_image_grid(scan_rows[0].image, options)  # type: ignore[arg-type]
            except InputError as exc:
                problems.append(f"{where}: image {exc}")
                failed.add(image)
                continue
        try:
            check_mask_grid(scan_rows[0].mask, grids[image], options, segments)  # type: ignore[arg-type]
        except InputError as exc:
            problems.append(f"{where}: mask {exc}")
    return grids


def lesion_rule_of(rows: list[_Row]) -> str:
    """``components`` when the scan's rows say ``*`` (every component), else ``instance``."""
    return "components" if any(r.lesion is None for r in rows) else "instance"


def _check_lesions(
    rows: list[_Row],
    problems: list[str],
    grids: dict[Path, Volume],
    options: ReadOptions,
    segments: SegmentSelector,
) -> None:
    """Read each scan's mask once (on its image grid); every listed lesion id must exist, every
    '*' mask must hold at least one component."""
    for (image, _mask), scan_rows in _scans(rows).items():
        path = scan_rows[0].mask
        rule = lesion_rule_of(scan_rows)
        try:
            raw = read_mask(path, reference=grids[image], options=options, segments=segments)
            labels, box = lesion_labels_in_box(raw.array, rule)
        except (InputError, ValueError) as exc:
            problems.append(f"line(s) {_lines(scan_rows)}: cannot read mask {path}: {exc}")
            continue
        if rule == "components":
            if box is None:
                problems.extend(
                    f"line {r.line}: mask {path} is empty (no lesion)" for r in scan_rows
                )
            continue
        ids = np.unique(labels) if box is not None else np.zeros(0, np.int32)
        ids = ids[ids != 0]
        for row in scan_rows:
            if row.lesion in set(ids.tolist()):
                continue
            shown = ", ".join(map(str, ids[:20].tolist())) + (" …" if ids.size > 20 else "")
            hint = ""
            if ids.size == 1:
                hint = (
                    f"; explicit lesion ids are mask values — for a binary mask (0/{ids[0]}) whose "
                    "26-connected components are the lesions, write '*'"
                )
            problems.append(
                f"line {row.line}: lesion {row.lesion} is not a value of the mask {path} "
                f"(values: {shown or 'none'}){hint}"
            )


def _group(
    rows: list[_Row], folder: Path, source: str, segments: SegmentSelector = None
) -> list[Case]:
    """One Case per (patient_id, image, mask), in order of first appearance."""
    groups: dict[tuple[str, Path, Path], list[_Row]] = {}
    for row in rows:
        groups.setdefault((row.patient_id, _key(row.image), _key(row.mask)), []).append(row)  # type: ignore[arg-type]
    bases = [safe_id(pid) for pid, _, _ in groups]
    cases = []
    for (pid, _image, _mask), base in zip(groups, bases, strict=True):
        group = groups[(pid, _image, _mask)]
        first = group[0]
        case_id = base
        if bases.count(base) > 1:  # several scans, or ids equal once made filesystem-safe
            tag = "|".join([pid, _rel(first.image, folder), _rel(first.mask, folder)])
            case_id = f"{base}-{hashlib.sha256(tag.encode()).hexdigest()[:8]}"
        lesions = {row.lesion: dict(row.genes) for row in group}
        cases.append(
            Case(
                case_id=case_id,
                patient_id=pid,
                image=first.image,  # type: ignore[arg-type]
                masks=(first.mask,),  # type: ignore[arg-type]
                lesions=lesions,
                source=source,
                mask_rule="single",
                lesion_rule=lesion_rule_of(group),
                segments=segments,
            )
        )
    return cases


def _rel(path: Path | None, folder: Path) -> str:
    """``path`` relative to the manifest folder when inside it (stable if the folder moves)."""
    assert path is not None
    try:
        return path.resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()
