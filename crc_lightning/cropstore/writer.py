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
    PART_GLOB,
    SHARDS_DIR,
    STORE_FORMAT,
    case_file,
    part_file,
)
from crc_lightning.io.errors import InputError
from crc_lightning.io.files import TMP_PREFIX, sha256_path, write_atomic, write_json
from crc_lightning.io.volume import CANONICAL, CANONICAL_DESCRIPTION
from crc_lightning.preprocessing.algorithm import PreprocessParams, preprocess_scan

log = logging.getLogger(__name__)

__all__ = [
    "CaseOutcome",
    "PreprocessError",
    "build_crop_store",
    "build_shard",
    "case_fingerprint",
    "merge_shards",
    "package_version",
    "process_case",
    "shard_of_patients",
    "shard_parts",
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
    # what the index needs of the case itself, so a shard part is all a merge reads
    position: int = -1  # the case's place in the cohort's case list (index row order)
    patient_id: str = ""
    source: str = ""
    labels: list[list[Any]] | None = None  # [[lesion | None, {gene: 0/1}], ...]; None = unlabelled


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
    out = CaseOutcome(case_id=str(case.case_id), patient_id=str(case.patient_id),
                      source=str(case.source), labels=_case_labels(case))  # fmt: skip
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


def _case_labels(case: Any) -> list[list[Any]] | None:
    """A case's lesion labels as JSON: ``[[lesion | None, {gene: 0/1}], ...]``, None if unlabelled
    (OOD). ``None`` as the lesion = every lesion of the case (a ``*`` manifest row)."""
    labels = getattr(case, "lesions", None)
    if labels is None:
        return None
    return [
        [
            None if k is None else int(k),
            {str(g): None if v is None else int(v) for g, v in genes.items()},
        ]
        for k, genes in labels.items()
    ]


def _lesion_genes(labels: list[list[Any]] | None, lesion: int) -> dict[str, int] | None:
    """Gene labels of a lesion: {} for unlabelled (OOD) cases, None if a labelled case lacks it."""
    if labels is None:
        return {}
    by_lesion = {k: genes for k, genes in labels}
    if lesion in by_lesion:
        return dict(by_lesion[lesion])
    if None in by_lesion:
        return dict(by_lesion[None])
    return None


def _index_rows(out: CaseOutcome, counts: dict[str, int]) -> list[dict]:
    pid, meta = out.patient_id, out.meta
    file = case_file(meta["case_hash"])
    rows, skipped = [], set()
    for c in meta["crops"]:
        genes = _lesion_genes(out.labels, int(c["lesion"]))
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
                "source": out.source,
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


def _gene_columns(outcomes: Sequence[CaseOutcome]) -> list[str]:
    extra = set()
    for out in outcomes:
        for _, genes in out.labels or []:
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


def _checked_cases(cases: Iterable[Any], store_dir: Path) -> list[Any]:
    cases = list(cases)
    seen: dict[str, int] = {}
    for case in cases:
        seen[str(case.case_id)] = seen.get(str(case.case_id), 0) + 1
    dupes = sorted(c for c, n in seen.items() if n > 1)
    if dupes:
        raise PreprocessError(store_dir, [f"case id {c!r} appears more than once" for c in dupes])
    return cases


def _remove_computed(cases_dir: Path, outcomes: Iterable[CaseOutcome]) -> None:
    """Take back the case files a failed run wrote (the store stays as it was)."""
    for out in outcomes:
        if out.computed:
            with contextlib.suppress(FileNotFoundError):
                (cases_dir / f"{out.case_hash}.npz").unlink()


def _compute(
    cases: Sequence[Any],
    positions: Sequence[int],
    store_dir: Path,
    params: PreprocessParams,
    version: str,
    n_jobs: int,
    progress: bool,
    clean_tmp: bool,
) -> list[CaseOutcome]:
    """Algorithm 1 over ``cases`` (reusing existing case files) → their outcomes, in order.
    Bad cases: all reported in one PreprocessError, and this run's case files taken back."""
    cases_dir = store_dir / CASES_DIR
    cases_dir.mkdir(parents=True, exist_ok=True)
    if clean_tmp:  # never in a shard: the other shards' temporaries are in the same folder
        _remove_stale_tmp(store_dir, cases_dir)
    outcomes: list[CaseOutcome] = []
    try:
        for out in _iter_outcomes(cases, params, cases_dir, version, n_jobs, progress):
            outcomes.append(out)
    except BaseException:
        _remove_computed(cases_dir, outcomes)
        if clean_tmp:
            _remove_stale_tmp(store_dir, cases_dir)
        raise
    problems = [o.error for o in outcomes if o.error]
    if problems:
        _remove_computed(cases_dir, outcomes)
        raise PreprocessError(store_dir, problems)
    for out, position in zip(outcomes, positions):
        out.position = int(position)
    return outcomes


def _write_store(
    store_dir: Path,
    outcomes: Sequence[CaseOutcome],
    params: PreprocessParams,
    version: str,
    seconds: float,
    shards: int | None = None,
) -> dict[str, Any]:
    """Index + ``store.json`` from the outcomes of every case (in cohort order), written last;
    then unreferenced case files and leftover shard parts are removed. The same code for a
    single-process build and a merge of shards, so both give the same index bytes."""
    counts = dict.fromkeys(
        ("lesions_found", "lesions_without_crops", "lesions_unlabelled", "dropped_slices"), 0
    )
    rows: list[dict] = []
    for out in outcomes:
        rows.extend(_index_rows(out, counts))
    metas = [o.meta for o in outcomes]
    genes = _gene_columns(outcomes)
    index = _build_index(rows, genes)
    dup = index["crop_id"][index["crop_id"].duplicated()].unique().tolist()
    if dup:
        raise PreprocessError(
            store_dir,
            [
                f"crop id {d!r} is produced by more than one case (one patient with two scans "
                "needs distinct patient_id values)"
                for d in dup[:20]
            ],
        )
    summary = {
        "cases": len(outcomes),
        "patients": len({o.patient_id for o in outcomes}),
        "lesions": int(index["lesion_uid"].nunique()),
        "crops": len(index),
        **counts,
        "genes": {g: int((index[g] == 1).sum()) for g in genes},
        "masks_resampled": sum(bool(m.get("mask_resampled")) for m in metas),
        "images_resampled_for_tilt": sum(bool(m.get("image_resampled")) for m in metas),
        "source_orientations": _tally(m.get("source_orientation") or "?" for m in metas),
        "computed": sum(o.computed for o in outcomes),
        "reused": sum(not o.computed for o in outcomes),
        "seconds": round(seconds, 3),
        **({} if shards is None else {"shards": int(shards)}),
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
    cases_dir = store_dir / CASES_DIR
    summary["removed_files"] = _collect_garbage(cases_dir, {o.case_hash for o in outcomes})
    _remove_stale_tmp(store_dir, cases_dir)
    for part in shard_parts(store_dir):  # superseded by this index
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
    with contextlib.suppress(OSError):
        (store_dir / SHARDS_DIR).rmdir()
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


def build_crop_store(
    cases: Iterable[Any],
    store_dir: str | Path,
    params: PreprocessParams | Mapping[str, Any],
    n_jobs: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Preprocess ``cases`` (``crc_lightning.sources.case.Case``) into the crop store at
    ``store_dir``.

    Parallel over cases (joblib, ``n_jobs``; -1 = all cores); cases whose case file already exists
    are reused. Bad cases are all collected and reported in one :class:`PreprocessError`; then
    the store is left exactly as it was (case files created by this run are removed again).
    Returns the summary also written to ``store.json``.
    """
    store_dir = Path(store_dir)
    cases = _checked_cases(cases, store_dir)
    if not isinstance(params, PreprocessParams):
        params = PreprocessParams.from_config(params)
    version = package_version()
    t0 = time.perf_counter()
    outcomes = _compute(
        cases, range(len(cases)), store_dir, params, version, n_jobs, progress, clean_tmp=True
    )
    try:
        return _write_store(store_dir, outcomes, params, version, time.perf_counter() - t0)
    except PreprocessError:
        _remove_computed(store_dir / CASES_DIR, outcomes)
        raise


def _collect_garbage(cases_dir: Path, keep: set[str]) -> int:
    """Delete case files the new index does not reference (after it is in place)."""
    removed = 0
    for path in cases_dir.glob("*.npz"):
        if path.stem not in keep and not path.name.startswith(TMP_PREFIX):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
    return removed


# --------------------------------------------------------------------------- shards


def shard_of_patients(patient_ids: Sequence[str], shards: int) -> dict[str, int]:
    """``{patient_id: shard}``: the sorted distinct patient ids dealt round-robin over ``shards``
    — deterministic, by patient (every scan of a patient in one shard), balanced to one patient."""
    return {p: i % int(shards) for i, p in enumerate(sorted({str(p) for p in patient_ids}))}


def _cohort_id(cases: Sequence[Any], params: PreprocessParams, version: str) -> str:
    """What every shard of one build must agree on: the ordered case list, parameters, version."""
    return _sha256_json(
        {
            "format": STORE_FORMAT,
            "version": version,
            "params": params.to_dict(),
            "cases": [[str(c.case_id), str(c.patient_id)] for c in cases],
        }
    )


def shard_parts(store_dir: str | Path) -> list[Path]:
    """The shard part files in a store folder (sorted)."""
    return sorted((Path(store_dir) / SHARDS_DIR).glob(PART_GLOB))


def build_shard(
    cases: Iterable[Any],
    store_dir: str | Path,
    params: PreprocessParams | Mapping[str, Any],
    shard: int,
    shards: int,
    n_jobs: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Preprocess shard ``shard`` of ``shards`` (0-based; :func:`shard_of_patients`) of the cohort
    ``cases`` into ``store_dir``: its case files, then its part file (atomically, last), which
    :func:`merge_shards` turns — with the other parts — into the store. ``cases`` is the whole
    cohort, as every shard sees it. Any number of shards may run at once (separate processes or
    machines sharing the folder): case files are content-addressed and written by atomic rename,
    and no shard deletes anything but its own failed work. Returns the shard's summary."""
    store_dir = Path(store_dir)
    shard, shards = int(shard), int(shards)
    if not (shards >= 1 and 0 <= shard < shards):
        raise ValueError(f"shard {shard}/{shards}: need 0 <= shard < shards")
    cases = _checked_cases(cases, store_dir)
    if not isinstance(params, PreprocessParams):
        params = PreprocessParams.from_config(params)
    version = package_version()
    part = store_dir / part_file(shard, shards)
    with contextlib.suppress(FileNotFoundError):
        part.unlink()  # a failed re-run must not leave the previous run's part behind
    owner = shard_of_patients([c.patient_id for c in cases], shards)
    mine = [i for i, c in enumerate(cases) if owner[str(c.patient_id)] == shard]
    t0 = time.perf_counter()
    outcomes = _compute(
        [cases[i] for i in mine], mine, store_dir, params, version, n_jobs, progress, False
    )
    seconds = time.perf_counter() - t0
    write_json(
        part,
        {
            "format": STORE_FORMAT,
            "version": version,
            "params": params.to_dict(),
            "cohort": _cohort_id(cases, params, version),
            "n_cases": len(cases),
            "shard": shard,
            "shards": shards,
            "seconds": round(seconds, 3),
            "cases": [asdict(o) for o in outcomes],
        },
    )
    summary = {
        "shard": shard,
        "shards": shards,
        "cases": len(outcomes),
        "patients": len({o.patient_id for o in outcomes}),
        "crops": sum(len(o.meta["crops"]) for o in outcomes),
        "computed": sum(o.computed for o in outcomes),
        "reused": sum(not o.computed for o in outcomes),
        "seconds": round(seconds, 3),
        "part": str(part),
    }
    log.info("shard %d/%d: %d cases (%d computed), part %s", shard, shards, summary["cases"],
             summary["computed"], part)  # fmt: skip
    return summary


def _read_parts(store_dir: Path) -> list[dict[str, Any]]:
    parts = shard_parts(store_dir)
    if not parts:
        raise InputError(
            store_dir / SHARDS_DIR,
            "no shard parts to merge; run `python -m crc_lightning.preprocess shard=<i>/<n>` for "
            "every shard first (with the same data and preprocess settings)",
        )
    out = []
    for path in parts:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            doc["_file"] = path
            out.append(doc)
        except (OSError, ValueError) as err:
            raise InputError(path, f"unreadable shard part ({err}); run that shard again") from None
    return out


def merge_shards(store_dir: str | Path) -> dict[str, Any]:
    """Merge the shard parts of ``store_dir`` (:func:`build_shard`) into its crop store.

    Checks that the parts are one complete build — the same number of shards, every shard once,
    the same cohort (case list), parameters and package version, each case once — and that the
    case files they name exist; then writes the index and ``store.json`` with the code of
    :func:`build_crop_store` (same cohort order), so the store equals a single-process build's
    (same index bytes, hence the same store hash). No CT is read. The parts are removed after.
    """
    store_dir = Path(store_dir)
    parts = _read_parts(store_dir)
    counts = sorted({int(p["shards"]) for p in parts})
    if len(counts) > 1:
        raise InputError(
            store_dir / SHARDS_DIR,
            f"shard parts of different shard counts {counts}: delete the stale ones, or run every "
            f"shard of one count",
        )
    n = counts[0]
    missing = sorted(set(range(n)) - {int(p["shard"]) for p in parts})
    if missing:
        todo = ", ".join(f"shard={i}/{n}" for i in missing)
        raise InputError(
            store_dir / SHARDS_DIR,
            f"{len(missing)} of {n} shard(s) not done ({todo}): run them, then merge again",
        )
    first = parts[0]
    for p in parts[1:]:
        for key in ("cohort", "params", "version", "format"):
            if p[key] != first[key]:
                raise InputError(
                    p["_file"],
                    f"this shard part has another {key} than {first['_file'].name} (the cohort "
                    "or the settings changed between shards): run every shard again",
                )
    outcomes = [CaseOutcome(**c) for p in parts for c in p["cases"]]
    outcomes.sort(key=lambda o: o.position)
    if [o.position for o in outcomes] != list(range(int(first["n_cases"]))):
        raise InputError(store_dir / SHARDS_DIR, "the shard parts do not cover every case once")
    cases_dir = store_dir / CASES_DIR
    lost = [o.case_id for o in outcomes if not (cases_dir / f"{o.case_hash}.npz").is_file()]
    if lost:
        raise InputError(
            cases_dir, f"{len(lost)} case file(s) named by the shard parts are missing: run "
            "their shards again",
        )  # fmt: skip
    params = PreprocessParams.from_config(first["params"])
    seconds = sum(float(p["seconds"]) for p in parts)
    return _write_store(store_dir, outcomes, params, str(first["version"]), seconds, shards=n)
