"""The crop store writer: Algorithm 1 over a list of cases → a crop store (format: :mod:`.format`).

Why content addressing + write-last: a case file is only ever created under its final name by an
atomic rename of a finished temporary file (:func:`crc_lightning.io.files.write_atomic`), and the
index / ``store.json`` are replaced last, so a run killed at any point leaves the previous store
readable and intact; case files that the new index does not reference are deleted only after it is
in place. An unchanged case (same bytes, same parameters, same version) is found by its hash and
not recomputed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from crc_lightning.cropstore.format import (
    CASES_DIR,
    GENES,
    INDEX_COLUMNS,
    INDEX_FILE,
    META_FILE,
    META_KEY,
    STORE_FORMAT,
    case_file,
)
from crc_lightning.io.errors import InputError
from crc_lightning.io.files import TMP_PREFIX, sha256_path, write_atomic
from crc_lightning.io.volume import CANONICAL, CANONICAL_DESCRIPTION
from crc_lightning.preprocessing.algorithm import PreprocessParams, preprocess_scan

log = logging.getLogger(__name__)

__all__ = [
    "CaseOutcome",
    "PreprocessError",
    "build_crop_store",
    "case_fingerprint",
    "package_version",
    "process_case",
    "spacing_distribution",
]


class PreprocessError(InputError):
    """One or more cases cannot be preprocessed; every file and its problem is listed."""

    def __init__(self, store_dir: str | Path, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(
            store_dir,
            f"{len(problems)} case(s) could not be preprocessed (nothing written):\n{lines}",
        )


@dataclass
class CaseOutcome:
    """What one case contributed: its hashes, its crop metadata, or the problem it had."""

    case_id: str
    image_sha256: str = ""
    mask_sha256: str = ""
    case_hash: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    computed: bool = False  # False = reused an existing case file
    error: str | None = None


# --------------------------------------------------------------------------- hashing


def package_version() -> str:
    from crc_lightning import __version__

    return str(__version__)


def case_fingerprint(case: Any, params: PreprocessParams, version: str) -> tuple[str, str, str]:
    """(image_sha256, mask_sha256, case_hash) of a case: what decides whether it is recomputed."""
    image_sha = _sha256_input(case.image)
    masks = [Path(m) for m in case.masks]
    if not masks:
        raise InputError(case.image, f"case {case.case_id!r} has no mask")
    mask_shas = [_sha256_input(m) for m in masks]
    mask_sha = mask_shas[0] if len(mask_shas) == 1 else _sha256_json(mask_shas)
    case_hash = _sha256_json(
        {
            "format": STORE_FORMAT,
            "version": version,
            "params": params.to_dict(),
            "image": image_sha,
            "masks": mask_shas,
            "mask_rule": case.mask_rule,
            "lesion_rule": case.lesion_rule,
            "segments": _plain_segments(getattr(case, "segments", None)),
        }
    )
    return image_sha, mask_sha, case_hash


def _plain_segments(segments: Any) -> Any:
    return list(segments) if isinstance(segments, (list, tuple)) else segments


def _sha256_input(path: Path) -> str:
    """sha256 of an input file or DICOM folder; a missing or empty one is an InputError."""
    try:
        return sha256_path(path)
    except (FileNotFoundError, ValueError) as err:
        raise InputError(path, str(err).split(": ", 1)[-1]) from None


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- case files


def _write_case_npz(path: Path, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
    """One case file: the crop arrays + ``__meta__`` (a JSON string, loadable without pickle)."""
    payload = dict(arrays)
    payload[META_KEY] = np.array(json.dumps(meta))
    write_atomic(path, lambda f: np.savez(f, **payload))


def _read_case_meta(path: Path) -> dict[str, Any] | None:
    """The ``__meta__`` of an existing case file, or None if it is unreadable (then recompute)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return json.loads(str(npz[META_KEY]))
    except (OSError, KeyError, ValueError):
        return None


# --------------------------------------------------------------------------- one case


def process_case(
    case: Any, params: PreprocessParams, cases_dir: Path, case_hash: str
) -> dict[str, Any]:
    """Load a case, run Algorithm 1, write ``cases_dir/<case_hash>.npz``; return its metadata."""
    image, raw_mask = case.load(params.read_options())
    crops, stats = preprocess_scan(
        image.array, raw_mask.array, image.spacing, params, case.lesion_rule
    )
    arrays: dict[str, np.ndarray] = {}
    rows = []
    for c in crops:
        key = f"l{c.lesion}_z{c.slice}"
        arrays[key] = c.array
        rows.append(
            {
                "lesion": c.lesion,
                "slice": c.slice,
                "area_mm2": c.area_mm2,
                "spacing_y": c.spacing_y,
                "spacing_x": c.spacing_x,
                "size_px": c.size_px,
                "key": key,
            }
        )
    meta = {
        "case_hash": case_hash,
        "shape": list(image.shape),
        "spacing": list(image.spacing),
        "orientation": image.orientation,  # of the arrays: always CANONICAL
        "source_orientation": image.source_orientation,  # of the image file's own axes
        "image_resampled": image.resampled,
        "mask_resampled": raw_mask.resampled,
        "crops": rows,
        "lesions": [asdict(s) for s in stats],
    }
    _write_case_npz(cases_dir / f"{case_hash}.npz", arrays, meta)
    return meta


def _run_case(
    case: Any, params: PreprocessParams, cases_dir: Path, version: str, reuse: bool = True
) -> CaseOutcome:
    """Hash → reuse the existing case file if there is one → else compute. Data errors are
    returned (so every bad case is reported at once), programming errors propagate."""
    out = CaseOutcome(case_id=str(case.case_id))
    try:
        out.image_sha256, out.mask_sha256, out.case_hash = case_fingerprint(case, params, version)
        path = cases_dir / f"{out.case_hash}.npz"
        meta = _read_case_meta(path) if reuse and path.exists() else None
        if meta is None:
            meta = process_case(case, params, cases_dir, out.case_hash)
            out.computed = True
        out.meta = meta
    except InputError as e:
        out.error = str(e)
    except (ValueError, OSError) as e:
        out.error = f"{case.image} (case {case.case_id}): {e}"
    return out


# --------------------------------------------------------------------------- index


def _lesion_genes(case: Any, lesion: int) -> dict[str, int] | None:
    """Gene labels of a lesion: {} for unlabelled (OOD) cases, None if a labelled case lacks it."""
    labels = getattr(case, "lesions", None)
    if labels is None:
        return {}
    if lesion in labels:
        return dict(labels[lesion])
    if None in labels:
        return dict(labels[None])
    return None


def _index_rows(case: Any, meta: Mapping[str, Any], counts: dict[str, int]) -> list[dict]:
    pid = str(case.patient_id)
    file = case_file(meta["case_hash"])
    rows, skipped = [], set()
    for c in meta["crops"]:
        genes = _lesion_genes(case, int(c["lesion"]))
        if genes is None:
            skipped.add(int(c["lesion"]))
            continue
        rows.append(
            {
                "crop_id": f"{pid}/{c['lesion']}/{c['slice']}",
                "patient_id": pid,
                "lesion": int(c["lesion"]),
                "lesion_uid": f"{pid}/{c['lesion']}",
                "slice": int(c["slice"]),
                "area_mm2": float(c["area_mm2"]),
                "spacing_y": float(c["spacing_y"]),
                "spacing_x": float(c["spacing_x"]),
                "size_px": int(c["size_px"]),
                "source": str(case.source),
                "case_file": file,
                "key": str(c["key"]),
                **genes,
            }
        )
    counts["lesions_unlabelled"] += len(skipped)
    counts["lesions_without_crops"] += sum(1 for s in meta["lesions"] if s["kept_slices"] == 0)
    counts["lesions_found"] += len(meta["lesions"])
    counts["dropped_slices"] += sum(s["raw_slices"] - s["kept_slices"] for s in meta["lesions"])
    return rows


def _gene_columns(cases: Sequence[Any]) -> list[str]:
    extra = set()
    for case in cases:
        for genes in (getattr(case, "lesions", None) or {}).values():
            extra.update(str(g) for g in genes)
    return list(GENES) + sorted(extra - set(GENES))


def _build_index(rows: list[dict], genes: list[str]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=[*INDEX_COLUMNS, *genes])
    types = {
        "crop_id": "string",
        "patient_id": "string",
        "lesion": "int64",
        "lesion_uid": "string",
        "slice": "int64",
        "area_mm2": "float64",
        "spacing_y": "float64",
        "spacing_x": "float64",
        "size_px": "int64",
        "source": "string",
        "case_file": "string",
        "key": "string",
    }
    df = df.astype(types)
    for g in genes:
        df[g] = pd.array(df[g].to_numpy(dtype=object), dtype="Int8")
    return df.reset_index(drop=True)


# --------------------------------------------------------------------------- the store


def _iter_outcomes(
    cases: Sequence[Any],
    params: PreprocessParams,
    cases_dir: Path,
    version: str,
    n_jobs: int,
    progress: bool,
) -> Iterable[CaseOutcome]:
    from tqdm.auto import tqdm

    bar = dict(total=len(cases), desc="preprocess", unit="case", disable=not progress)
    if n_jobs == 1 or len(cases) <= 1:
        for case in tqdm(cases, **bar):
            yield _run_case(case, params, cases_dir, version)
        return
    from joblib import Parallel, delayed

    parallel = Parallel(n_jobs=n_jobs, return_as="generator")
    jobs = (delayed(_run_case)(case, params, cases_dir, version) for case in cases)
    yield from tqdm(parallel(jobs), **bar)


def _remove_stale_tmp(*folders: Path) -> None:
    """Temporaries left by a run that was killed (an exception removes its own)."""
    for folder in folders:
        for tmp in folder.glob(f"{TMP_PREFIX}*"):
            with contextlib.suppress(OSError):
                tmp.unlink()


def build_crop_store(
    cases: Iterable[Any],
    store_dir: str | Path,
    params: PreprocessParams | Mapping[str, Any],
    n_jobs: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Preprocess ``cases`` (``crc_lightning.io.cases.Case``) into the crop store at ``store_dir``.

    Parallel over cases (joblib, ``n_jobs``; -1 = all cores); cases whose case file already exists
    are reused. Bad cases are all collected and reported in one :class:`PreprocessError`; then
    the store is left exactly as it was (case files created by this run are removed again).
    Returns the summary also written to ``store.json``.
    """
    cases = list(cases)
    if not isinstance(params, PreprocessParams):
        params = PreprocessParams.from_config(params)
    store_dir = Path(store_dir)
    cases_dir = store_dir / CASES_DIR
    version = package_version()

    seen: dict[str, int] = {}
    for case in cases:
        seen[str(case.case_id)] = seen.get(str(case.case_id), 0) + 1
    dupes = sorted(c for c, n in seen.items() if n > 1)
    if dupes:
        raise PreprocessError(store_dir, [f"case id {c!r} appears more than once" for c in dupes])

    cases_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(store_dir, cases_dir)
    t0 = time.perf_counter()
    outcomes: list[CaseOutcome] = []
    try:
        for out in _iter_outcomes(cases, params, cases_dir, version, n_jobs, progress):
            outcomes.append(out)
    except BaseException:
        _remove_stale_tmp(store_dir, cases_dir)
        raise

    def fail(problems: list[str]) -> PreprocessError:
        for out in outcomes:
            if out.computed:  # written by this run: take it back, the store stays as it was
                with contextlib.suppress(FileNotFoundError):
                    (cases_dir / f"{out.case_hash}.npz").unlink()
        return PreprocessError(store_dir, problems)

    problems = [o.error for o in outcomes if o.error]
    if problems:
        raise fail(problems)

    counts = dict.fromkeys(
        ("lesions_found", "lesions_without_crops", "lesions_unlabelled", "dropped_slices"), 0
    )
    rows: list[dict] = []
    for case, out in zip(cases, outcomes):
        rows.extend(_index_rows(case, out.meta, counts))
    metas = [o.meta for o in outcomes]
    genes = _gene_columns(cases)
    index = _build_index(rows, genes)
    dup = index["crop_id"][index["crop_id"].duplicated()].unique().tolist()
    if dup:
        raise fail(
            [
                f"crop id {d!r} is produced by more than one case (one patient with two scans "
                "needs distinct patient_id values)"
                for d in dup[:20]
            ]
        )

    summary = {
        "cases": len(cases),
        "patients": len({str(c.patient_id) for c in cases}),
        "lesions": int(index["lesion_uid"].nunique()),
        "crops": len(index),
        **counts,
        "genes": {g: int((index[g] == 1).sum()) for g in genes},
        "masks_resampled": sum(bool(m.get("mask_resampled")) for m in metas),
        "images_resampled_for_tilt": sum(bool(m.get("image_resampled")) for m in metas),
        "source_orientations": _tally(m.get("source_orientation") or "?" for m in metas),
        "computed": sum(o.computed for o in outcomes),
        "reused": sum(not o.computed for o in outcomes),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    store = {
        "format": STORE_FORMAT,
        "version": version,
        "params": params.to_dict(),
        "orientation": {"code": CANONICAL, "meaning": CANONICAL_DESCRIPTION},
        "spacing": spacing_distribution([m["spacing"] for m in metas]),
        "genes": genes,
        "inputs": {
            o.case_id: {
                "image_sha256": o.image_sha256,
                "mask_sha256": o.mask_sha256,
                "case_hash": o.case_hash,
            }
            for o in outcomes
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "summary": summary,
    }
    buffer = io.BytesIO()
    index.to_parquet(buffer, index=False)
    write_atomic(store_dir / INDEX_FILE, buffer.getvalue())
    write_atomic(store_dir / META_FILE, json.dumps(store, indent=1))
    summary["removed_files"] = _collect_garbage(cases_dir, {o.case_hash for o in outcomes})
    log.info(
        "crop store: %d cases (%d computed, %d reused), %d lesions, %d crops",
        summary["cases"],
        summary["computed"],
        summary["reused"],
        summary["lesions"],
        summary["crops"],
    )
    return summary


def _tally(values: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


def spacing_distribution(spacings: Sequence[Sequence[float]]) -> dict[str, Any]:
    """The voxel spacing of the store's CTs per axis (z, y, x) in mm: min, quartiles, max and the
    number of cases — what a checkpoint carries as its training range (``min``/``max``)."""
    if not spacings:
        return {"axes": ["z", "y", "x"], "cases": 0}
    a = np.asarray(spacings, dtype=float)

    def per_axis(values: np.ndarray) -> list[float]:
        return [round(float(v), 6) for v in values]

    return {
        "axes": ["z", "y", "x"],
        "cases": len(a),
        "min": per_axis(a.min(axis=0)),
        "q25": per_axis(np.percentile(a, 25, axis=0)),
        "median": per_axis(np.median(a, axis=0)),
        "q75": per_axis(np.percentile(a, 75, axis=0)),
        "max": per_axis(a.max(axis=0)),
    }


def _collect_garbage(cases_dir: Path, keep: set[str]) -> int:
    """Delete case files the new index does not reference (after it is in place)."""
    removed = 0
    for path in cases_dir.glob("*.npz"):
        if path.stem not in keep and not path.name.startswith(TMP_PREFIX):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
    return removed
