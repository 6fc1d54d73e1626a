"""Hand-crafted (radiomics) features of each lesion of a scan, as pure functions on arrays.

The same CT and raw mask that Algorithm 1 reads (``Case.load``) → one feature dict per lesion:
IBSI-defined shape, first-order and texture features (GLCM, GLRLM, GLSZM, GLDM, NGTDM) computed in
3D on the whole lesion by **PyRadiomics** (the maintained ``pyradiomics-bhklab`` fork of
``pyradiomics``; C extensions for the texture matrices), with the settings of
``conf/radiomics/default.yaml`` (:class:`RadiomicsParams`).

Per lesion (its id comes from :func:`scan_label_map`, the one call of
:func:`crc_lightning.io.lesions.lesion_labels_in_box` here, so lesion ids equal the crop store's):

1. the lesion's bounding box, padded so interpolation has context, is cut out of the volume;
2. optional resampling to ``resample_mm`` voxels (IBSI 1, Sec. 2.4: image by B-spline, the mask by
   linear interpolation of its 0/1 values thresholded at ``mask_threshold``, then HU rounded). The
   new grid is centred on the lesion's box ("align grid centres", the IBSI recommendation), so it
   does not depend on where the lesion sits in the volume nor on the axis order or direction of
   the arrays — PyRadiomics' own resampling aligns the grid with the image origin instead;
3. PyRadiomics' ``RadiomicsFeatureExtractor`` on that block with a fixed bin width
   (``bin_width`` HU; bin edges on multiples of it, as IBSI's FBS with a lower bound that is one).

Arrays are [z, y, x] with spacing (sz, sy, sx) mm; SimpleITK gets them as (x, y, z). Feature names
are PyRadiomics' without the image-type prefix (``shape_VoxelVolume``, ``firstorder_Entropy``,
``glcm_Contrast``, …); a lesion too small to describe (fewer than ``min_voxels`` voxels after
resampling) gets NaN features. Only numbers leave this module: no path or id is logged.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from crc_lightning.io.lesions import lesion_labels_in_box
from crc_lightning.preprocessing.algorithm import lesion_boxes

__all__ = [
    "FEATURE_CLASSES",
    "INTERPOLATORS",
    "RadiomicsParams",
    "lesion_block",
    "lesion_features",
    "resample_lesion",
    "scan_features",
    "scan_label_map",
]

FEATURE_CLASSES = ("shape", "firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm")
INTERPOLATORS = ("bspline", "linear", "nearest")
N_VOXELS = "n_voxels"  # always present: the lesion's voxel count on the grid features use
_PREFIX = "original_"


@dataclass(frozen=True)
class RadiomicsParams:
    """Every setting of the feature extraction (``conf/radiomics/default.yaml``, block
    ``features``); part of the cache key of the feature table."""

    bin_width: float = 25.0  # HU per grey level (fixed bin size)
    resample_mm: tuple[float, float, float] | None = (1.0, 1.0, 1.0)  # (sz, sy, sx); None = native
    interpolator: str = "bspline"  # image interpolation when resampling
    mask_threshold: float = 0.5  # partial-volume threshold of the linearly interpolated mask
    round_hu: bool = True  # round resampled HU to whole numbers (IBSI, for CT)
    pad_mm: float = 5.0  # context cut around a lesion for interpolation (≥ 2 voxels too)
    feature_classes: tuple[str, ...] = FEATURE_CLASSES
    min_voxels: int = 8  # smaller lesions get NaN features
    glcm_distances: tuple[int, ...] = (1,)

    def __post_init__(self) -> None:
        if not self.bin_width > 0:
            raise ValueError(f"radiomics.bin_width must be > 0, got {self.bin_width}")
        if self.resample_mm is not None and (
            len(self.resample_mm) != 3 or min(self.resample_mm) <= 0
        ):
            raise ValueError(
                f"radiomics.resample_mm must be null or 3 positive numbers (sz, sy, sx), "
                f"got {self.resample_mm}"
            )
        if self.interpolator not in INTERPOLATORS:
            raise ValueError(
                f"radiomics.interpolator must be one of {INTERPOLATORS}, got {self.interpolator!r}"
            )
        if not 0.0 < self.mask_threshold <= 1.0:
            raise ValueError(
                f"radiomics.mask_threshold must be in (0, 1], got {self.mask_threshold}"
            )
        unknown = [c for c in self.feature_classes if c not in FEATURE_CLASSES]
        if unknown or not self.feature_classes:
            raise ValueError(
                f"radiomics.feature_classes: unknown {unknown} (known: {list(FEATURE_CLASSES)})"
            )
        if self.pad_mm < 0 or self.min_voxels < 2 or not self.glcm_distances:
            raise ValueError("radiomics: pad_mm ≥ 0, min_voxels ≥ 2, glcm_distances non-empty")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> RadiomicsParams:
        """Build from a config mapping; an unknown key is an error. ``resample_mm`` may be one
        number (isotropic), three, or null."""
        cfg = dict(cfg or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"unknown radiomics parameter(s) {unknown}; known: {sorted(known)}")
        if "resample_mm" in cfg and cfg["resample_mm"] is not None:
            r = cfg["resample_mm"]
            r = [r] * 3 if isinstance(r, (int, float)) else list(r)
            cfg["resample_mm"] = tuple(float(v) for v in r)
        for key in ("feature_classes", "glcm_distances"):
            if key in cfg:
                cfg[key] = tuple(cfg[key])
        if "glcm_distances" in cfg:
            cfg["glcm_distances"] = tuple(int(d) for d in cfg["glcm_distances"])
        for key, kind in (("bin_width", float), ("mask_threshold", float), ("pad_mm", float)):
            if key in cfg:
                cfg[key] = kind(cfg[key])
        return cls(**cfg)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able settings (lists for tuples), for cache keys and metadata."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out


# --------------------------------------------------------------------------- lesions


def scan_label_map(
    raw_mask: np.ndarray, connectivity: int, lesion_rule: str = "components"
) -> tuple[np.ndarray, tuple[slice, slice, slice] | None]:
    """The lesion label map of a raw mask's non-zero box, and that box (None if empty).

    The one place this module decides what the lesions are — the call Algorithm 1 makes
    (:func:`crc_lightning.preprocessing.algorithm.preprocess_scan`, with the case's lesion rule
    ``components`` | ``instance``), so lesion ``k`` here is lesion ``k`` of the crop store.
    """
    return lesion_labels_in_box(raw_mask, lesion_rule, connectivity)


def lesion_block(
    image: np.ndarray,
    labels: np.ndarray,
    lesion: int,
    box: tuple[slice, slice, slice],
    spacing_zyx: Sequence[float],
    pad_mm: float,
    offset: Sequence[int] = (0, 0, 0),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The lesion's box padded by ``pad_mm`` (and ≥ 2 voxels) per side, clipped to the image:
    (image block float32, lesion mask block bool, [z, y, x] start of the block in ``image``).

    ``labels`` covers the block of ``image`` starting at ``offset``; ``box`` is in ``labels``.
    """
    start, stop = [], []
    for s, o, sp, n in zip(box, offset, spacing_zyx, image.shape):
        pad = max(2, math.ceil(round(pad_mm / float(sp), 9)))
        start.append(max(s.start + o - pad, 0))
        stop.append(min(s.stop + o + pad, n))
    block = tuple(slice(a, b) for a, b in zip(start, stop))
    img = np.asarray(image[block], dtype=np.float32)
    mask = np.zeros(img.shape, bool)
    inner = tuple(slice(s.start + o - a, s.stop + o - a) for s, o, a in zip(box, offset, start))
    mask[inner] = labels[box] == lesion
    return img, mask, np.array(start)


def resample_lesion(
    image: np.ndarray,
    mask: np.ndarray,
    spacing_zyx: Sequence[float],
    params: RadiomicsParams,
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Resample a lesion block (image, bool mask) to ``params.resample_mm``: (image, mask, spacing).

    The new grid covers the mask's bounding box (voxel edges) plus one new voxel each side and is
    centred on it, so a flip or transposition of the input gives the flipped or transposed output
    (up to float rounding). SimpleITK does the interpolation: image by ``params.interpolator``,
    mask linearly then ``≥ mask_threshold``.
    """
    import SimpleITK as sitk

    if params.resample_mm is None:
        return image, mask, tuple(float(s) for s in spacing_zyx)  # type: ignore[return-value]
    old = np.asarray(spacing_zyx, dtype=np.float64)
    new = np.asarray(params.resample_mm, dtype=np.float64)
    idx = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    lo = np.array([i[0] for i in idx], dtype=np.float64) - 0.5
    hi = np.array([i[-1] for i in idx], dtype=np.float64) + 0.5
    centre = (lo + hi) / 2 * old  # physical, block origin at voxel 0's centre
    size = np.ceil(np.round((hi - lo) * old / new, 9)).astype(int) + 2
    origin = centre - (size - 1) / 2 * new

    def run(array: np.ndarray, interpolator: int, default: float) -> np.ndarray:
        src = sitk.GetImageFromArray(array)
        src.SetSpacing(old[::-1].tolist())
        out = sitk.Resample(
            src,
            size[::-1].tolist(),
            sitk.Transform(),
            interpolator,
            origin[::-1].tolist(),
            new[::-1].tolist(),
            (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
            float(default),
            sitk.sitkFloat32,
        )
        return sitk.GetArrayFromImage(out)

    kinds = {"bspline": sitk.sitkBSpline, "linear": sitk.sitkLinear}
    img = run(image, kinds.get(params.interpolator, sitk.sitkNearestNeighbor), float(image.min()))
    if params.round_hu:
        img = np.rint(img)
    msk = run(mask.astype(np.float32), sitk.sitkLinear, 0.0) >= params.mask_threshold - 1e-6
    return img.astype(np.float32), msk, tuple(float(s) for s in new)  # type: ignore[return-value]


# --------------------------------------------------------------------------- features


@functools.lru_cache(maxsize=8)
def _extractor(params: RadiomicsParams) -> Any:
    import radiomics
    from radiomics.featureextractor import RadiomicsFeatureExtractor

    # its per-lesion INFO/WARNING chatter (stderr handler, and job logs through propagation)
    radiomics.setVerbosity(logging.ERROR)
    logging.getLogger("radiomics").setLevel(logging.ERROR)
    extractor = RadiomicsFeatureExtractor(
        binWidth=float(params.bin_width),
        resampledPixelSpacing=None,  # done by resample_lesion, on a lesion-centred grid
        distances=list(params.glcm_distances),
        additionalInfo=False,
        minimumROIDimensions=1,
        minimumROISize=None,  # lesion_features checks min_voxels itself
        label=1,
    )
    extractor.disableAllFeatures()
    for name in params.feature_classes:
        extractor.enableFeatureClassByName(name)
    return extractor


def _radiomics(
    image: np.ndarray, mask: np.ndarray, spacing_zyx: Sequence[float], params: RadiomicsParams
) -> dict[str, float]:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(image, dtype=np.float32))
    msk = sitk.GetImageFromArray(np.ascontiguousarray(mask, dtype=np.uint8))
    xyz = [float(s) for s in spacing_zyx][::-1]
    img.SetSpacing(xyz)
    msk.SetSpacing(xyz)
    out = _extractor(params).execute(img, msk, label=1)
    return {
        k[len(_PREFIX) :]: _number(v) for k, v in out.items() if not k.startswith("diagnostics_")
    }


def _number(value: Any) -> float:
    """A feature as a float; a complex result (PyRadiomics' square root of a negative eigenvalue
    of a flat lesion, e.g. ``shape_LeastAxisLength``) is missing, not its real part."""
    v = np.asarray(value)
    if np.iscomplexobj(v):
        return float(v.real) if abs(float(v.imag)) <= 1e-12 else math.nan
    return float(v)


def lesion_features(
    image: np.ndarray,
    labels: np.ndarray,
    spacing_zyx: Sequence[float],
    params: RadiomicsParams,
    offset: Sequence[int] = (0, 0, 0),
) -> dict[int, dict[str, float]]:
    """Features of every lesion of a label map, ordered by lesion id.

    ``image``: [z, y, x] HU; ``labels``: lesion ids of the block of ``image`` starting at
    ``offset`` (the whole volume by default); ``spacing_zyx``: (sz, sy, sx) mm. Each dict holds
    :data:`N_VOXELS` and the PyRadiomics features (NaN for a lesion under ``min_voxels``).
    """
    out: dict[int, dict[str, float]] = {}
    names: list[str] | None = None
    small: list[int] = []
    for lesion, box in lesion_boxes(labels).items():
        img, msk, _ = lesion_block(image, labels, lesion, box, spacing_zyx, params.pad_mm, offset)
        img, msk, spacing = resample_lesion(img, msk, spacing_zyx, params)
        n = int(np.count_nonzero(msk))
        if n < params.min_voxels:
            small.append(lesion)
            out[lesion] = {N_VOXELS: float(n)}
            continue
        feats = _radiomics(img, msk, spacing, params)
        names = names or list(feats)
        out[lesion] = {N_VOXELS: float(n), **feats}
    if names is None and out:  # every lesion is too small: names from a dummy block
        probe = np.zeros((3, 3, 3), bool)
        probe[:, :, :] = True
        rng = np.random.default_rng(0).normal(0, 50, (3, 3, 3)).astype(np.float32)
        names = list(_radiomics(rng, probe, (1.0, 1.0, 1.0), params))
    for lesion in small:
        out[lesion].update(dict.fromkeys(names or [], math.nan))
    return out


def scan_features(
    image: np.ndarray,
    raw_mask: np.ndarray,
    spacing_zyx: Sequence[float],
    params: RadiomicsParams,
    connectivity: int = 26,
    lesion_rule: str = "components",
) -> dict[int, dict[str, float]]:
    """:func:`lesion_features` of a scan as read (HU image and raw mask on one grid): the lesion
    ids of :func:`scan_label_map` (``connectivity`` = the crop store's, ``lesion_rule`` = the
    case's)."""
    labels, box = scan_label_map(raw_mask, connectivity, lesion_rule)
    if box is None:
        return {}
    return lesion_features(image, labels, spacing_zyx, params, [b.start for b in box])
