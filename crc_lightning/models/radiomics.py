"""The radiomics model: scikit-learn pipelines on lesion features, tuned on training patients only.

One binary model per class of the label set (multi-label, like the deep classifier's sigmoid
heads), each a :class:`sklearn.pipeline.Pipeline`::

    median imputation → drop constant features → standardise → SelectKBest(ANOVA F) → classifier

with the classifier an L2 logistic regression and/or a random forest (``estimators``). The number
of kept features, the regularisation strength C and the forest's depth / leaf size are chosen by an
**inner cross-validation on the training patients only**: ``StratifiedGroupKFold`` grouped by
patient (every lesion of a patient lands on the same side) and stratified on the class, scored by
ROC AUC. :func:`fit` is only ever given training rows; the splits it used are kept on the model
(:attr:`RadiomicsModel.inner_splits`, row positions of what it was given) so that this can be
checked. After the search, each class's best pipeline is refitted on all training rows.

Saving (:meth:`RadiomicsModel.save`) never uses pickle: the pipelines go to a ``skops`` file (a
zip of JSON + ``.npy`` arrays) and the rest to JSON with the skops file's sha256. Loading
(:meth:`RadiomicsModel.load`) checks that hash and admits only the scikit-learn / NumPy types these
pipelines are made of (:data:`TRUSTED_TYPES`); a file holding any other type is refused before
anything in it is built.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from crc_lightning.io.files import atomic_path, sha256_file, write_json
from crc_lightning.models.checkpoint import CheckpointError

__all__ = [
    "MODEL_FILE",
    "MODEL_META_FILE",
    "TRUSTED_TYPES",
    "RadiomicsModel",
    "RadiomicsModelConfig",
    "fit",
    "inner_splits",
    "prediction_frame",
]

MODEL_FILE = "radiomics.skops"
MODEL_META_FILE = "radiomics.json"
FORMAT = "crc_lightning.radiomics"
FORMAT_VERSION = 1
ESTIMATORS = ("logistic", "forest")
# everything the pipelines below are built from; load() admits nothing else
TRUSTED_TYPES: tuple[str, ...] = (
    "sklearn.pipeline.Pipeline",
    "sklearn.impute._base.SimpleImputer",
    "sklearn.feature_selection._variance_threshold.VarianceThreshold",
    "sklearn.preprocessing._data.StandardScaler",
    "sklearn.feature_selection._univariate_selection.SelectKBest",
    "sklearn.feature_selection._univariate_selection.f_classif",
    "sklearn.linear_model._logistic.LogisticRegression",
    "sklearn.ensemble._forest.RandomForestClassifier",
    "sklearn.tree._classes.DecisionTreeClassifier",
    "sklearn.tree._tree.Tree",
    "sklearn.dummy.DummyClassifier",
    "numpy.dtype",
    "numpy.ndarray",
    "numpy.float64",
    "numpy.int64",
    "numpy.intp",
    "numpy.bool_",
    "builtins.slice",
    "builtins.tuple",
    "builtins.list",
    "builtins.dict",
)


@dataclass(frozen=True)
class RadiomicsModelConfig:
    """The model's settings (``conf/radiomics/default.yaml``, block ``model``)."""

    estimators: tuple[str, ...] = ("logistic",)  # logistic and/or forest, chosen per class
    inner_folds: int = 5  # inner CV folds (fewer when a class has fewer patients)
    k_features: tuple[int, ...] = (5, 10, 20)  # SelectKBest grid (capped at the feature count)
    C: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)  # logistic regression's inverse L2 strength
    forest_trees: int = 300
    forest_max_depth: tuple[int, ...] = (3, 0)  # 0 = unlimited
    forest_min_samples_leaf: tuple[int, ...] = (3,)
    class_weight: str | None = "balanced"
    max_iter: int = 5000
    n_jobs: int = 1  # GridSearchCV workers

    def __post_init__(self) -> None:
        bad = [e for e in self.estimators if e not in ESTIMATORS]
        if bad or not self.estimators:
            raise ValueError(f"radiomics.model.estimators: unknown {bad}; known {list(ESTIMATORS)}")
        if self.inner_folds < 2:
            raise ValueError(f"radiomics.model.inner_folds must be ≥ 2, got {self.inner_folds}")
        if not self.k_features or min(self.k_features) < 1 or not self.C or min(self.C) <= 0:
            raise ValueError("radiomics.model: k_features ≥ 1 and C > 0, each a non-empty list")
        if self.class_weight not in (None, "balanced"):
            raise ValueError("radiomics.model.class_weight must be null or 'balanced'")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> RadiomicsModelConfig:
        cfg = dict(cfg or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(cfg) - set(known))
        if unknown:
            raise ValueError(
                f"unknown radiomics.model parameter(s) {unknown}; known: {sorted(known)}"
            )
        for key in ("estimators", "k_features", "C", "forest_max_depth", "forest_min_samples_leaf"):
            if key in cfg:
                cfg[key] = tuple(cfg[key])
        return cls(**cfg)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# --------------------------------------------------------------------------- building blocks


def _pipeline(seed: int) -> Any:
    from sklearn.feature_selection import SelectKBest, VarianceThreshold, f_classif
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    return Pipeline(
        [
            ("impute", SimpleImputer(strategy="median", keep_empty_features=True)),
            ("constant", VarianceThreshold(0.0)),
            ("scale", StandardScaler()),
            ("select", SelectKBest(f_classif)),
            ("clf", LogisticRegression(random_state=seed)),
        ]
    )


def _grid(config: RadiomicsModelConfig, n_features: int, seed: int) -> list[dict[str, list]]:
    """The hyper-parameter grid, one entry per estimator kind."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    ks = sorted({min(int(k), n_features) for k in config.k_features})
    grid: list[dict[str, list]] = []
    if "logistic" in config.estimators:
        grid.append(
            {
                "select__k": ks,
                "clf": [
                    LogisticRegression(
                        C=float(c),
                        l1_ratio=0.0,  # L2
                        class_weight=config.class_weight,
                        max_iter=config.max_iter,
                        random_state=seed,
                    )
                    for c in config.C
                ],
            }
        )
    if "forest" in config.estimators:
        grid.append(
            {
                "select__k": ks,
                "clf": [
                    RandomForestClassifier(
                        n_estimators=config.forest_trees,
                        max_depth=int(d) or None,
                        min_samples_leaf=int(leaf),
                        class_weight=config.class_weight,
                        random_state=seed,
                        n_jobs=1,
                    )
                    for d in config.forest_max_depth
                    for leaf in config.forest_min_samples_leaf
                ],
            }
        )
    return grid


def inner_splits(
    y: np.ndarray, groups: Sequence[str], n_folds: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Patient-grouped, class-stratified inner CV splits of the given rows (row positions).

    ``n_folds`` is capped by the number of patients with and without the class, so every
    validation fold can hold both; fewer than 2 → no split (the caller fits the prior).
    """
    from sklearn.model_selection import StratifiedGroupKFold

    y = np.asarray(y).astype(int)
    groups = np.asarray([str(g) for g in groups])
    pos = set(groups[y == 1])
    neg = set(groups[y == 0])
    n = min(int(n_folds), len(pos), len(neg))
    if n < 2:
        return []
    cv = StratifiedGroupKFold(n_splits=n, shuffle=True, random_state=int(seed))
    return [(tr, va) for tr, va in cv.split(np.zeros((len(y), 1)), y, groups)]


# --------------------------------------------------------------------------- the model


@dataclass
class RadiomicsModel:
    """Per-class fitted pipelines over named features, with what was chosen and why."""

    classes: tuple[str, ...]
    feature_names: tuple[str, ...]
    estimators: list[Any]  # one fitted sklearn estimator per class
    selection: list[dict[str, Any]]  # per class: chosen parameters, inner-CV AUC
    config: RadiomicsModelConfig = field(default_factory=RadiomicsModelConfig)
    seed: int = 0
    n_train: int = 0  # lesions
    n_train_patients: int = 0
    # per class: the inner CV splits as row positions into the rows fit() was given (not saved)
    inner_splits: list[list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=list)

    def predict_proba(self, features: pd.DataFrame) -> np.ndarray:
        """Probability of each class [n, C] for the lesions (rows) of ``features``."""
        X = _matrix(features, self.feature_names)
        out = np.empty((len(X), len(self.classes)), dtype=np.float64)
        for c, est in enumerate(self.estimators):
            proba = est.predict_proba(X)
            classes = list(est.classes_)
            out[:, c] = proba[:, classes.index(1)] if 1 in classes else 0.0
        return out

    # ------------------------------------------------------------------ persistence

    def save(self, folder: str | Path) -> Path:
        """Write :data:`MODEL_FILE` (skops) and :data:`MODEL_META_FILE` (JSON) into ``folder``."""
        import skops.io as sio

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / MODEL_FILE) as tmp:
            sio.dump(list(self.estimators), tmp)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "classes": list(self.classes),
            "feature_names": list(self.feature_names),
            "selection": self.selection,
            "config": self.config.to_dict(),
            "seed": int(self.seed),
            "n_train": int(self.n_train),
            "n_train_patients": int(self.n_train_patients),
            "skops_sha256": sha256_file(folder / MODEL_FILE),
            "versions": _versions(),
        }
        write_json(folder / MODEL_META_FILE, meta)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> RadiomicsModel:
        """Read a saved model; refuses a file that does not match its JSON or holds any type
        outside :data:`TRUSTED_TYPES` (nothing from it is built then). No pickle is involved."""
        import skops.io as sio

        folder = Path(folder)
        meta_path, model_path = folder / MODEL_META_FILE, folder / MODEL_FILE
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(meta_path, f"not a readable radiomics model ({e})") from None
        if meta.get("format") != FORMAT or int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise CheckpointError(meta_path, f"not a {FORMAT} file of version ≤ {FORMAT_VERSION}")
        if not model_path.is_file():
            raise CheckpointError(model_path, "missing (saved with the radiomics model's JSON)")
        if sha256_file(model_path) != meta.get("skops_sha256"):
            raise CheckpointError(model_path, "content does not match its radiomics.json (sha256)")
        try:
            untrusted = sio.get_untrusted_types(file=model_path)
        except Exception as e:  # not a skops zip (e.g. a pickle renamed .skops)
            raise CheckpointError(model_path, f"not a skops file ({type(e).__name__})") from None
        refused = sorted(set(untrusted) - set(TRUSTED_TYPES))
        if refused:
            raise CheckpointError(model_path, f"holds types that are not trusted: {refused}")
        estimators = sio.load(model_path, trusted=list(untrusted))
        classes = tuple(meta["classes"])
        if not isinstance(estimators, list) or len(estimators) != len(classes):
            raise CheckpointError(model_path, f"expected {len(classes)} per-class estimators")
        return cls(
            classes=classes,
            feature_names=tuple(meta["feature_names"]),
            estimators=estimators,
            selection=list(meta.get("selection", [])),
            config=RadiomicsModelConfig.from_config(meta.get("config")),
            seed=int(meta.get("seed", 0)),
            n_train=int(meta.get("n_train", 0)),
            n_train_patients=int(meta.get("n_train_patients", 0)),
        )


def _versions() -> dict[str, str]:
    import sklearn
    import skops

    return {"scikit-learn": sklearn.__version__, "skops": skops.__version__}


def _matrix(features: pd.DataFrame, names: Sequence[str]) -> np.ndarray:
    missing = [n for n in names if n not in features.columns]
    if missing:
        raise ValueError(
            f"radiomics model: {len(missing)} feature column(s) missing, e.g. {missing[:5]}"
        )
    X = features.loc[:, list(names)].to_numpy(dtype=np.float64)
    return np.where(np.isfinite(X), X, np.nan)  # ±inf (degenerate features) → imputed


def fit(
    features: pd.DataFrame,
    labels: np.ndarray,
    patient_ids: Sequence[str],
    classes: Sequence[str],
    config: RadiomicsModelConfig | Mapping[str, Any] | None = None,
    seed: int = 0,
) -> RadiomicsModel:
    """Fit one tuned pipeline per class on the given (training) lesions.

    ``features``: one row per lesion, only feature columns (all numeric); ``labels``: 0/1
    [n, C] in ``classes`` order; ``patient_ids``: the patient of each row (the inner CV's groups).
    Hyper-parameters are chosen by grid search over :func:`inner_splits` of these rows only; a
    class without positives or negatives in two patients gets its prior (a constant).
    """
    if not isinstance(config, RadiomicsModelConfig):
        config = RadiomicsModelConfig.from_config(config)
    names = tuple(str(c) for c in features.columns)
    X = _matrix(features, names)
    Y = np.asarray(labels).astype(int).reshape(len(X), -1)
    groups = [str(p) for p in patient_ids]
    if Y.shape[1] != len(classes) or len(groups) != len(X):
        raise ValueError(
            f"radiomics fit: {len(X)} rows, labels {Y.shape}, {len(groups)} patient ids, "
            f"{len(classes)} classes"
        )
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):  # tiny matrices: BLAS threads only add overhead
        estimators, selection, splits_all = _fit_classes(X, Y, groups, names, classes, config, seed)
    return RadiomicsModel(
        classes=tuple(classes),
        feature_names=names,
        estimators=estimators,
        selection=selection,
        config=config,
        seed=int(seed),
        n_train=len(X),
        n_train_patients=len(set(groups)),
        inner_splits=splits_all,
    )


def _fit_classes(
    X: np.ndarray,
    Y: np.ndarray,
    groups: list[str],
    names: tuple[str, ...],
    classes: Sequence[str],
    config: RadiomicsModelConfig,
    seed: int,
) -> tuple[list[Any], list[dict[str, Any]], list[list[tuple[np.ndarray, np.ndarray]]]]:
    from sklearn.dummy import DummyClassifier
    from sklearn.model_selection import GridSearchCV

    estimators, selection, splits_all = [], [], []
    for c, name in enumerate(classes):
        y = Y[:, c]
        splits = inner_splits(y, groups, config.inner_folds, seed)
        splits_all.append(splits)
        if not splits:
            est = DummyClassifier(strategy="prior").fit(X, y)
            estimators.append(est)
            selection.append({"class": name, "estimator": "prior", "inner_auc": None})
            continue
        search = GridSearchCV(
            _pipeline(seed),
            _grid(config, len(names), seed),
            scoring="roc_auc",
            cv=splits,
            refit=True,
            n_jobs=config.n_jobs,
            error_score=np.nan,
        )
        search.fit(X, y)
        best = search.best_estimator_
        i = int(search.best_index_)
        clf = best.named_steps["clf"]
        selection.append(
            {
                "class": name,
                "estimator": "forest" if hasattr(clf, "n_estimators") else "logistic",
                "params": _plain_params(search.best_params_),
                "inner_auc": _float(search.cv_results_["mean_test_score"][i]),
                "inner_auc_std": _float(search.cv_results_["std_test_score"][i]),
                "inner_folds": len(splits),
                "selected_features": [
                    names[j]
                    for j in np.flatnonzero(best.named_steps["constant"].get_support())[
                        best.named_steps["select"].get_support()
                    ]
                ],
            }
        )
        estimators.append(best)
    return estimators, selection, splits_all


def _float(v: Any) -> float | None:
    v = float(v)
    return v if np.isfinite(v) else None


def _plain_params(params: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key == "clf":
            keep = ("C", "max_depth", "min_samples_leaf", "n_estimators")
            out.update({f"clf__{k}": v for k, v in value.get_params().items() if k in keep})
        else:
            out[key] = value.item() if hasattr(value, "item") else value
    return out


def prediction_frame(
    lesions: pd.DataFrame,
    labels: np.ndarray,
    proba: np.ndarray,
    classes: Sequence[str],
    fold: int,
) -> pd.DataFrame:
    """Rows of a job's ``predictions.csv`` for lesion-level predictions: ``patient_id, lesion,
    crop_id, slice, fold, <CLASS>..., p_<CLASS>...`` (``crop_id`` / ``slice`` empty)."""
    n = len(lesions)
    frame = pd.DataFrame(
        {
            "patient_id": lesions["patient_id"].astype(str).to_numpy(),
            "lesion": lesions["lesion"].astype(int).to_numpy(),
            "crop_id": pd.array([pd.NA] * n, dtype="string"),
            "slice": pd.array([pd.NA] * n, dtype="Int64"),
            "fold": int(fold),
        }
    )
    for c, name in enumerate(classes):
        frame[name] = np.asarray(labels)[:, c].astype(int)
    for c, name in enumerate(classes):
        frame[f"p_{name}"] = np.asarray(proba)[:, c]
    return frame
