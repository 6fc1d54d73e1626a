"""Radiomics features of a crop store's lesions, cached once per case (format: :mod:`.format`).

The features (:mod:`crc_lightning.preprocessing.radiomics`) are computed from the same CT and raw
mask as the crops, with the same lesion ids, and stored beside them::

    <store>/radiomics/<settings_key>/cases/<case_hash>.parquet   one case's lesions (the cache)
    <store>/radiomics/<settings_key>/features.parquet            every lesion of the store
    <store>/radiomics/<settings_key>/features.json               what it was built from

``case_hash`` is the crop store's own key of the case (:func:`.writer.case_fingerprint`: input
bytes, mask rule, preprocessing parameters, package version) and ``settings_key`` hashes the
radiomics settings, the feature library's version and :data:`.format.FEATURES_FORMAT`; so a case is
recomputed exactly when its crops would be or when a feature setting changes, and several feature
settings live side by side. Like the crop store: every file is written atomically
(:func:`crc_lightning.io.files.write_atomic`), the table and its metadata last, a killed run
resumes from the finished case files, cases run in parallel (joblib) under a progress bar, and
every bad case is reported at once.

Reading (:func:`read_feature_table`) checks the table against the store's ``store.json`` (the case
hashes it lists) without touching any CT, so a sweep over seeds pays milliseconds; a table that
does not match is refused with the command that rebuilds it. :func:`lesion_table` joins it with the
store's index: one row per lesion that has crops, with its gene columns — the rows a radiomics
model trains and predicts on, so it is evaluated on the same lesions as the deep models.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from crc_lightning.cropstore.format import (
    BUILD_HINT,
    FEATURE_CASES_DIR,
    FEATURE_ID_COLUMNS,
    FEATURES_FILE,
    FEATURES_FORMAT,
    FEATURES_META_FILE,
    INDEX_FILE,
    feature_case_file,
    features_dir,
    is_store,
    read_meta,
)
from crc_lightning.io.errors import InputError
from crc_lightning.io.files import TMP_PREFIX, write_atomic, write_json
from crc_lightning.preprocessing.algorithm import PreprocessParams
from crc_lightning.preprocessing.radiomics import RadiomicsParams, scan_features

log = logging.getLogger(__name__)

__all__ = [
    "FeatureError",
    "build_feature_table",
    "feature_columns",
    "feature_library_version",
    "feature_table",
    "lesion_table",
    "read_feature_table",
    "settings_key",
]


class FeatureError(InputError):
    """Features cannot be computed or read; every file and its problem is listed."""

    def __init__(self, where: str | Path | None, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(where, f"radiomics features: {len(self.problems)} problem(s):\n{lines}")


def feature_library_version() -> str:
    """Version of the installed PyRadiomics distribution (part of the settings key)."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("pyradiomics-bhklab", "pyradiomics"):
        with contextlib.suppress(PackageNotFoundError):
            return f"{dist}=={version(dist)}"
    raise ImportError(
        "radiomics features need PyRadiomics: `pip install pyradiomics-bhklab` "
        "(a maintained fork; PyPI's pyradiomics 3.1.0 has no build for Python ≥ 3.10)"
    )


def settings_key(params: RadiomicsParams, connectivity: int) -> str:
    """The folder name of one feature setting: sha256 (first 16 hex) of the radiomics settings, the
    lesion connectivity, the library version and the table format."""
    blob = {
        "format": FEATURES_FORMAT,
        "library": feature_library_version(),
        "params": params.to_dict(),
        "connectivity": int(connectivity),
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- one case


@dataclass
class _Outcome:
    case_id: str
    case_hash: str = ""
    frame: pd.DataFrame | None = None
    computed: bool = False
    error: str | None = None


def _case_frame(case: Any, features: dict[int, dict[str, float]]) -> pd.DataFrame:
    pid = str(case.patient_id)
    rows = [
        {
            "patient_id": pid,
            "lesion": int(lesion),
            "lesion_uid": f"{pid}/{lesion}",
            "source": str(case.source),
            **values,
        }
        for lesion, values in sorted(features.items())
    ]
    frame = pd.DataFrame(rows)
    if frame.empty:
        frame = pd.DataFrame(columns=list(FEATURE_ID_COLUMNS))
    return frame.astype({"patient_id": "string", "lesion_uid": "string", "source": "string"})


def _read_parquet(path: Path) -> pd.DataFrame | None:
    """A finished case file, or None when it is absent or unreadable (then it is recomputed)."""
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class _Job:
    """What one case's worker needs (picklable for joblib)."""

    store: Path
    key: str
    params: RadiomicsParams
    preprocess: PreprocessParams
    version: str


def _feature_case(case: Any, stored_hash: str | None, job: _Job) -> _Outcome:
    """Hash the case's inputs (they must be the crop store's), then reuse its finished case
    file or load it, compute its features and write the file.

    Data problems come back as the outcome's error (all are reported together); programming
    errors propagate."""
    from crc_lightning.cropstore.writer import case_fingerprint

    out = _Outcome(case_id=str(case.case_id))
    try:
        _, _, out.case_hash = case_fingerprint(case, job.preprocess, job.version)
        if out.case_hash != stored_hash:
            why = (
                "is not in the store"
                if stored_hash is None
                else "changed since the store was built"
            )
            raise InputError(case.image, f"case {case.case_id} {why}; re-run preprocess")
        path = feature_case_file(job.store, job.key, out.case_hash)
        frame = _read_parquet(path) if path.exists() else None
        if frame is None:
            # read exactly as the crop store's writer read it (orientation, mask resampling)
            image, raw_mask = case.load(job.preprocess.read_options())
            feats = scan_features(
                image.array, raw_mask.array, image.spacing, job.params, case.lesion_rule,
                job.preprocess.connectivity,
            )  # fmt: skip
            frame = _case_frame(case, feats)
            buffer = io.BytesIO()
            frame.to_parquet(buffer, index=False)
            write_atomic(path, buffer.getvalue())
            out.computed = True
        out.frame = frame
    except InputError as e:
        out.error = str(e)
    except (ValueError, OSError, RuntimeError) as e:  # RuntimeError: SimpleITK / PyRadiomics
        out.error = f"{case.image} (case {case.case_id}): {type(e).__name__}: {e}"
    return out


# --------------------------------------------------------------------------- the table


def _store_inputs(store: Path) -> dict[str, Any]:
    if not is_store(store):
        raise InputError(store, f"not a crop store (no {INDEX_FILE}); {BUILD_HINT}")
    return read_meta(store)


def _outcomes(
    cases: Sequence[Any], meta: dict[str, Any], job: _Job, n_jobs: int, progress: bool
) -> list[_Outcome]:
    """Every case's outcome, in order (joblib workers when ``n_jobs`` ≠ 1), under a progress bar."""
    from joblib import Parallel, delayed
    from tqdm.auto import tqdm

    stored = {c: v.get("case_hash") for c, v in dict(meta.get("inputs", {})).items()}
    todo = [(case, stored.get(str(case.case_id)), job) for case in cases]
    bar = tqdm(total=len(todo), desc="radiomics", unit="case", disable=not progress)
    try:
        if n_jobs == 1 or len(todo) <= 1:
            results = (_feature_case(*t) for t in todo)
        else:
            parallel = Parallel(n_jobs=n_jobs, return_as="generator")
            results = parallel(delayed(_feature_case)(*t) for t in todo)
        outcomes = []
        for out in results:
            outcomes.append(out)
            bar.update()
        return outcomes
    finally:
        bar.close()


def _combine(frames: Iterable[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=list(FEATURE_ID_COLUMNS))
    table = pd.concat(frames, ignore_index=True, sort=False)
    return table[[*FEATURE_ID_COLUMNS, *feature_columns(table)]]


def build_feature_table(
    cases: Iterable[Any],
    store_dir: str | Path,
    params: RadiomicsParams | dict[str, Any],
    n_jobs: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Compute (or reuse) the features of every lesion of ``cases`` — exactly the crop store's
    cases, unchanged since it was built — and write the store's feature table for ``params``.

    Returns the summary also written to ``features.json``. Case files of this settings key that no
    case references any more are deleted after the table is in place. Builders of one settings key
    take turns (a file lock), so parallel jobs of a sweep never write the same files at once.
    """
    params = _params(params)
    store = Path(store_dir)
    meta = _store_inputs(store)
    folder = features_dir(store, settings_key(params, _connectivity(meta)))
    with _exclusive(folder):
        return _build(list(cases), store, meta, params, n_jobs, progress)


def _params(params: RadiomicsParams | dict[str, Any]) -> RadiomicsParams:
    return params if isinstance(params, RadiomicsParams) else RadiomicsParams.from_config(params)


def _connectivity(meta: dict[str, Any]) -> int:
    return PreprocessParams.from_config(meta.get("params", {})).connectivity


@contextlib.contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """Hold ``folder/.lock`` (POSIX ``flock``; nothing to hold where there is no fcntl)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(folder / ".lock", "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _build(
    cases: list[Any],
    store: Path,
    meta: dict[str, Any],
    params: RadiomicsParams,
    n_jobs: int,
    progress: bool,
) -> dict[str, Any]:
    from crc_lightning.cropstore.writer import package_version

    connectivity = _connectivity(meta)
    key = settings_key(params, connectivity)
    folder = features_dir(store, key)
    (folder / FEATURE_CASES_DIR).mkdir(parents=True, exist_ok=True)
    _remove_tmp(folder)  # a killed builder's (we hold the lock: no builder is running)
    t0 = time.perf_counter()
    preprocess = PreprocessParams.from_config(meta.get("params", {}))
    missing = sorted(set(meta.get("inputs", {})) - {str(c.case_id) for c in cases})
    if missing:
        raise FeatureError(
            store, [f"case {c!r} of the store is not among the cases given" for c in missing[:20]]
        )
    job = _Job(store, key, params, preprocess, package_version())
    outcomes = _outcomes(cases, meta, job, n_jobs, progress)
    problems = [o.error for o in outcomes if o.error]
    if problems:  # finished case files stay: the next run resumes from them
        raise FeatureError(store, problems)
    table = _combine(o.frame for o in outcomes if o.frame is not None)
    values = table.drop(columns=list(FEATURE_ID_COLUMNS))
    summary = {
        "cases": len(cases),
        "lesions": len(table),
        "features": values.shape[1],
        "lesions_without_features": int(values.isna().any(axis=1).sum()),
        "computed": sum(o.computed for o in outcomes),
        "reused": sum(not o.computed for o in outcomes),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    write_atomic(folder / FEATURES_FILE, buffer.getvalue())
    write_json(
        folder / FEATURES_META_FILE,
        {
            "format": FEATURES_FORMAT,
            "library": feature_library_version(),
            "settings_key": key,
            "params": params.to_dict(),
            "connectivity": connectivity,
            "inputs": {o.case_id: o.case_hash for o in outcomes},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "summary": summary,
        },
    )
    keep = {o.case_hash for o in outcomes}
    summary["removed_files"] = _collect_garbage(folder / FEATURE_CASES_DIR, keep)
    log.info(
        "radiomics features: %d cases (%d computed, %d reused), %d lesions × %d features",
        summary["cases"],
        summary["computed"],
        summary["reused"],
        summary["lesions"],
        summary["features"],
    )
    return summary


def _remove_tmp(folder: Path) -> None:
    for tmp in [
        *folder.glob(f"{TMP_PREFIX}*"),
        *(folder / FEATURE_CASES_DIR).glob(f"{TMP_PREFIX}*"),
    ]:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _collect_garbage(cases_dir: Path, keep: set[str]) -> int:
    """Delete this setting's case files that no case of the new table references."""
    stale = [
        p
        for p in cases_dir.glob("*.parquet")
        if p.stem not in keep and not p.name.startswith(TMP_PREFIX)
    ]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def read_feature_table(
    store_dir: str | Path, params: RadiomicsParams | dict[str, Any]
) -> pd.DataFrame:
    """The store's feature table for ``params``, checked against the store without reading any
    CT: it must list the same cases with the same case hashes as ``store.json``. Missing or stale
    → :class:`FeatureError` naming the command that (re)builds it."""
    params = _params(params)
    store = Path(store_dir)
    meta = _store_inputs(store)
    folder = features_dir(store, settings_key(params, _connectivity(meta)))
    hint = "build it with crc_lightning.cropstore.features.feature_table (same data= as the store)"
    try:
        built = json.loads((folder / FEATURES_META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise FeatureError(folder, [f"no feature table for these settings; {hint}"]) from None
    current = {c: v.get("case_hash") for c, v in dict(meta.get("inputs", {})).items()}
    if built.get("inputs") != current:
        raise FeatureError(
            folder, [f"the crop store changed since the features were built; {hint}"]
        )
    return pd.read_parquet(folder / FEATURES_FILE)


def feature_table(
    store_dir: str | Path,
    params: RadiomicsParams | dict[str, Any],
    cases: Callable[[], Iterable[Any]],
    n_jobs: int = 1,
    progress: bool = True,
) -> pd.DataFrame:
    """:func:`read_feature_table`, building it first (from ``cases()``) when it is missing or
    stale: what a training job calls; only the first job of a sweep computes anything."""
    params = _params(params)
    with contextlib.suppress(FeatureError):
        return read_feature_table(store_dir, params)
    store = Path(store_dir)
    meta = _store_inputs(store)
    with _exclusive(features_dir(store, settings_key(params, _connectivity(meta)))):
        with contextlib.suppress(FeatureError):  # another job built it while this one waited
            return read_feature_table(store, params)
        _build(list(cases()), store, meta, params, n_jobs, progress)
    return read_feature_table(store, params)


def feature_columns(features: pd.DataFrame) -> list[str]:
    """The feature columns of a feature table (everything but :data:`FEATURE_ID_COLUMNS`), in
    order: what a radiomics model is fitted on."""
    return [c for c in features.columns if c not in FEATURE_ID_COLUMNS]


def lesion_table(features: pd.DataFrame, index: pd.DataFrame, genes: Sequence[str]) -> pd.DataFrame:
    """One row per lesion of the crop-store ``index`` (lesions with crops, labelled), its features
    and its ``genes`` columns, in the index's order of first appearance.

    A lesion of the index without a features row is an error (the table is from another store).
    """
    lesions = index.drop_duplicates("lesion_uid")[["lesion_uid", *genes]]
    missing = sorted(set(lesions["lesion_uid"]) - set(features["lesion_uid"]))
    if missing:
        raise FeatureError(
            None,
            [f"{len(missing)} lesion(s) of the crop store have no features row (stale table?)"],
        )
    table = lesions.merge(features, on="lesion_uid", how="left", validate="one_to_one")
    return table[[*FEATURE_ID_COLUMNS, *genes, *feature_columns(features)]].reset_index(drop=True)
