"""Algorithm 1 of Perlo et al. 2024 (Sec. IV.A) as small pure functions.

Step by step, for one CT volume and its lesion mask:

1. :func:`~crc_lightning.io.lesions.lesion_labels` — by the case's lesion rule, the 26-connected
   components of ``mask > 0`` numbered 1..n (``components``), or one lesion per mask value
   (``instance``). That rule is the project's one definition of lesion ids, so it lives in
   ``crc_lightning.io.lesions``, shared with manifest validation and ``predict``.
2. :func:`clean_slices` — each lesion's annotation is cleaned slice by slice with a 2D morphological
   opening (erosion then dilation), removing specks and thin bridges left by 3D annotation tools.
3. :func:`select_slices` — a slice is kept when its cleaned area is at least ``epsilon`` times the
   lesion's mean per-slice area (the tiny polar caps of a lesion carry almost no texture).
4. :func:`square_crop_box` — the slice's cleaned lesion bounding box is grown by ``border_mm`` on
   every side and made square *in millimetres*; :func:`extract_crop` cuts it out of the HU slice,
   padding outside the volume with air (-1024 HU), and :func:`to_square_pixels` resamples
   anisotropic pixels so every stored crop is square in pixels *and* in millimetres.

The HU → grey window (the ``input.window`` config node, width 400 / level 40) is applied when crops
are read (:func:`crc_lightning.data.inputs.window`), not here: the store keeps HU. Everything works
inside each lesion's bounding box (``scipy.ndimage.find_objects``) and, for the crop, inside the crop
window of one slice: nothing copies the full volume per lesion. The volumes arrive in the canonical
voxel order (:mod:`crc_lightning.io.volume`), possibly as flipped views, so every crop is in the
radiological view (anterior up, patient's right on the left) whatever the file's axis order.

:class:`PreprocessParams` also holds the three reading options (``resample_mask``, ``gantry_tilt``,
``nonfinite_hu``: :class:`~crc_lightning.io.ReadOptions`): they change voxels, so they are recorded
with the store's parameters, enter every case hash and travel with a checkpoint to ``predict``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np

from crc_lightning.io import ReadOptions
from crc_lightning.io.lesions import lesion_labels_in_box, nonzero_box

__all__ = [
    "Crop",
    "LesionStats",
    "PreprocessParams",
    "border_px",
    "clean_slices",
    "extract_crop",
    "lesion_boxes",
    "preprocess_scan",
    "preprocess_volume",
    "select_slices",
    "slice_areas",
    "square_crop_box",
    "structuring_element",
    "to_square_pixels",
]

_EPS_RTOL = 1e-9  # a_s == ε·μ up to float rounding counts as "at the threshold" (included)
_SPACING_RTOL = 1e-6  # sy, sx closer than this are treated as square pixels
_INT16 = np.iinfo(np.int16)
_LEGACY_KEYS = ("window_width", "window_level")


@dataclass(frozen=True)
class PreprocessParams:
    """Every constant of Algorithm 1 (``conf/preprocess.yaml``, block ``preprocess``).

    ``mean_area_over``: which slices define μ_l — ``"cleaned"`` (default): the lesion's slices that
    are non-empty *after* the per-slice opening, with their cleaned areas; ``"raw"``: the slices that
    are non-empty in the raw annotation, with their raw areas (Algorithm 1 computes μ before
    ``ErosionAndDilation``).
    """

    connectivity: int = 26
    opening_radius_px: int = 1
    epsilon: float = 0.4
    mean_area_over: str = "cleaned"
    min_area_mm2: float = 0.0
    border_mm: float = 10.0
    pad_hu: int = -1024
    resample_mask: bool = False
    gantry_tilt: str = "refuse"
    nonfinite_hu: float | None = None

    def __post_init__(self) -> None:
        self.read_options()  # validates the reading options
        if self.connectivity not in (6, 18, 26):
            raise ValueError(
                f"preprocess.connectivity must be 6, 18 or 26, got {self.connectivity}"
            )
        if self.opening_radius_px < 0:
            raise ValueError(
                f"preprocess.opening_radius_px must be ≥ 0, got {self.opening_radius_px}"
            )
        if not 0.0 <= self.epsilon:
            raise ValueError(f"preprocess.epsilon must be ≥ 0, got {self.epsilon}")
        if self.mean_area_over not in ("cleaned", "raw"):
            raise ValueError(
                f"preprocess.mean_area_over must be 'cleaned' or 'raw', got {self.mean_area_over!r}"
            )
        if self.border_mm < 0 or self.min_area_mm2 < 0:
            raise ValueError("preprocess.border_mm and preprocess.min_area_mm2 must be ≥ 0")

    @classmethod
    def from_config(cls, cfg: Mapping) -> PreprocessParams:
        """Build from a config mapping; an unknown key is an error (a typo must not be ignored).

        ``window_width`` / ``window_level`` are dropped: stores and checkpoints of version 0.1
        recorded the CT window here; it is a read-time setting (the ``input.window`` node).
        """
        cfg = {k: v for k, v in dict(cfg).items() if k not in _LEGACY_KEYS}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - set(known))
        if unknown:
            raise ValueError(f"unknown preprocess parameter(s) {unknown}; known: {sorted(known)}")
        defaults = cls()
        kwargs: dict = {}
        for key, value in cfg.items():
            if key == "nonfinite_hu":
                kwargs[key] = None if value is None else float(value)
                continue
            kind = type(getattr(defaults, key))
            if kind is bool:
                if not isinstance(value, bool):
                    raise ValueError(f"preprocess.{key} must be true or false, got {value!r}")
            elif kind is int and float(value) != int(value):
                raise ValueError(f"preprocess.{key} must be a whole number, got {value!r}")
            kwargs[key] = kind(value)
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return asdict(self)

    def read_options(self) -> ReadOptions:
        """The reading options among these parameters (:class:`~crc_lightning.io.ReadOptions`)."""
        return ReadOptions(
            resample_mask=self.resample_mask,
            gantry_tilt=self.gantry_tilt,
            nonfinite_hu=self.nonfinite_hu,
        )


@dataclass
class Crop:
    """One stored 2D crop: square int16 HU at (``spacing_y``, ``spacing_x``) mm per pixel."""

    lesion: int
    slice: int
    area_mm2: float  # cleaned annotation area on this slice (native pixels)
    spacing_y: float  # pixel size of the stored crop
    spacing_x: float
    array: np.ndarray  # [size, size] int16 HU

    @property
    def size_px(self) -> int:
        return int(self.array.shape[0])


@dataclass
class LesionStats:
    """Per-lesion bookkeeping: slices annotated, emptied by cleaning, dropped by ε, kept."""

    lesion: int
    raw_slices: int
    cleaned_slices: int
    kept_slices: int

    @property
    def dropped_slices(self) -> int:
        return self.raw_slices - self.kept_slices


# --------------------------------------------------------------------------- step 1: lesions


def lesion_boxes(labels: np.ndarray) -> dict[int, tuple[slice, slice, slice]]:
    """Bounding box (z, y, x slices) of every lesion value present, via ``find_objects`` run on
    the non-zero region only."""
    from scipy.ndimage import find_objects

    box = nonzero_box(labels)
    if box is None:
        return {}
    offset = [b.start for b in box]
    return {
        i + 1: tuple(slice(s.start + o, s.stop + o) for s, o in zip(found, offset))
        for i, found in enumerate(find_objects(labels[box]))
        if found is not None
    }


# --------------------------------------------------------------------------- step 2: cleaning


def structuring_element(radius_px: int) -> np.ndarray:
    """The per-slice footprint: a 2D disk of ``radius_px`` pixels as a [1, k, k] 3D array.

    Its z extent is 1, so a 3D binary opening with it is exactly a 2D opening of every slice.
    """
    from skimage.morphology import disk

    return disk(int(radius_px)).astype(bool)[None]


def clean_slices(lesion: np.ndarray, radius_px: int) -> np.ndarray:
    """Per-2D-slice opening (erosion then dilation) of one lesion's annotation [z, y, x] (bool).

    Outside the array counts as background (scipy's ``border_value=0``); callers pass a box padded
    by ``radius_px`` (or touching the volume edge), so the result equals the opening of the full
    slice. ``radius_px = 0`` leaves the annotation unchanged.
    """
    from scipy.ndimage import binary_opening

    lesion = np.asarray(lesion, dtype=bool)
    if radius_px <= 0:
        return lesion.copy()
    return binary_opening(lesion, structure=structuring_element(radius_px))


def slice_areas(lesion: np.ndarray) -> np.ndarray:
    """Annotated pixel count of every slice (axis 0) of a [z, y, x] boolean array (int64)."""
    return np.count_nonzero(lesion.reshape(lesion.shape[0], -1), axis=1).astype(np.int64)


# --------------------------------------------------------------------------- step 3: selection


def select_slices(
    areas: np.ndarray,
    epsilon: float,
    reference_areas: np.ndarray | None = None,
    min_area: float = 0.0,
) -> np.ndarray:
    """Slice inclusion of Algorithm 1: keep slice s iff a_s > 0, a_s ≥ ε·μ_l and a_s ≥ min_area.

    ``areas``: the cleaned per-slice areas a_s of one lesion (any unit, e.g. pixels).
    μ_l is the mean of ``reference_areas`` (default: ``areas``) over the slices where the reference
    is **non-empty** — slices with zero area (outside the lesion's z extent or emptied by the
    opening) do not count, otherwise a lesion's bounding box would lower its own threshold.
    Equality counts as included (a_s = ε·μ_l up to 1e-9 relative float rounding).
    """
    areas = np.asarray(areas, dtype=np.float64)
    ref = areas if reference_areas is None else np.asarray(reference_areas, dtype=np.float64)
    nonempty = ref[ref > 0]
    if nonempty.size == 0:
        return np.zeros(areas.shape, bool)
    threshold = epsilon * float(nonempty.mean())
    keep = areas >= threshold * (1.0 - _EPS_RTOL)
    keep &= areas > 0
    keep &= areas >= min_area
    return keep


# --------------------------------------------------------------------------- step 4: crop


def border_px(border_mm: float, spacing_yx: tuple[float, float]) -> tuple[int, int]:
    """Border of ``border_mm`` in pixels per axis: (ceil(b/sy), ceil(b/sx)) — never less than b."""
    sy, sx = spacing_yx
    return _ceil(border_mm / sy), _ceil(border_mm / sx)


def square_crop_box(
    bbox: tuple[int, int, int, int],
    spacing_yx: tuple[float, float],
    border_mm: float,
) -> tuple[int, int, int, int]:
    """The crop window (y0, x0, ny, nx) in pixels around a lesion's 2D bounding box.

    ``bbox`` = (y0, y1, x0, x1), end exclusive. The box is grown by :func:`border_px` on each side;
    the side of the square is the larger bordered extent in mm, ``L = max(h·sy, w·sx)``, and it is
    converted back per axis (ny = ceil(L/sy), nx = ceil(L/sx)) so the window covers a square
    *physical* area even with anisotropic pixels. The window is centred on the bordered box (an odd
    leftover pixel goes after the box). It may extend outside the image (see :func:`extract_crop`).
    """
    y0, y1, x0, x1 = bbox
    by, bx = border_px(border_mm, spacing_yx)
    sy, sx = spacing_yx
    y0b, y1b, x0b, x1b = y0 - by, y1 + by, x0 - bx, x1 + bx
    h, w = y1b - y0b, x1b - x0b
    side_mm = max(h * sy, w * sx)
    ny, nx = max(h, _ceil(side_mm / sy)), max(w, _ceil(side_mm / sx))
    return y0b - (ny - h) // 2, x0b - (nx - w) // 2, ny, nx


def extract_crop(
    image_slice: np.ndarray, y0: int, x0: int, ny: int, nx: int, pad_value: float = -1024.0
) -> np.ndarray:
    """Cut the window [y0:y0+ny, x0:x0+nx] out of a 2D slice (float32); outside → ``pad_value``.

    Only the window is copied (the slice may be a view into a larger volume).
    """
    out = np.full((ny, nx), pad_value, dtype=np.float32)
    H, W = image_slice.shape
    sy0, sy1 = max(y0, 0), min(y0 + ny, H)
    sx0, sx1 = max(x0, 0), min(x0 + nx, W)
    if sy0 < sy1 and sx0 < sx1:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image_slice[sy0:sy1, sx0:sx1]
    return out


def to_square_pixels(
    crop: np.ndarray, spacing_yx: tuple[float, float]
) -> tuple[np.ndarray, tuple[float, float]]:
    """Resample a square-in-mm crop [ny, nx] to n×n pixels, n = max(ny, nx); return new spacing.

    With square pixels (sy = sx) the crop is returned unchanged. Otherwise the coarser axis is
    upsampled (bilinear, ``skimage.transform.resize``, no anti-aliasing needed when upsampling) to
    the finer pixel size, so a later resize to r×r keeps the lesion's physical aspect ratio.
    The returned spacing is the stored crop's pixel size (ny·sy/n, nx·sx/n).
    """
    sy, sx = spacing_yx
    ny, nx = crop.shape
    if math.isclose(sy, sx, rel_tol=_SPACING_RTOL) and ny == nx:
        return crop, (float(sy), float(sx))
    from skimage.transform import resize

    n = max(ny, nx)
    out = resize(
        crop.astype(np.float32, copy=False),
        (n, n),
        order=1,
        mode="edge",
        anti_aliasing=False,
        preserve_range=True,
    ).astype(np.float32)
    return out, (ny * sy / n, nx * sx / n)


def to_int16_hu(crop: np.ndarray) -> np.ndarray:
    """Round HU to int16 (the storage type; CT HU fit easily), clipping out-of-range values."""
    return np.clip(np.rint(crop), _INT16.min, _INT16.max).astype(np.int16)


# --------------------------------------------------------------------------- whole volume


def preprocess_volume(
    image: np.ndarray,
    labels: np.ndarray,
    spacing_yx: tuple[float, float],
    params: PreprocessParams,
    offset: tuple[int, int, int] = (0, 0, 0),
) -> tuple[list[Crop], list[LesionStats]]:
    """Algorithm 1 on one volume: every kept slice of every lesion → one square int16 HU crop.

    ``image``: [z, y, x] HU; ``labels``: the lesion label map (:func:`lesion_labels`) of the block
    of ``image`` starting at ``offset`` — the whole volume by default, or the lesions' box from
    :func:`lesion_labels_in_box` (background outside it); ``spacing_yx``: in-plane pixel size
    (sy, sx) mm. Crops come ordered by (lesion, slice), slices indexed in ``image``. Each lesion is
    processed inside its bounding box padded by the opening radius in y/x.
    """
    oz, oy, ox = (int(o) for o in offset)
    if any(o < 0 for o in (oz, oy, ox)) or any(
        o + n > m for o, n, m in zip((oz, oy, ox), labels.shape, image.shape)
    ):
        raise ValueError(
            f"label map {labels.shape} at offset {offset} does not fit the image {image.shape}"
        )
    sy, sx = float(spacing_yx[0]), float(spacing_yx[1])
    pixel_mm2 = sy * sx
    r = int(params.opening_radius_px)
    _, H, W = labels.shape
    crops: list[Crop] = []
    stats: list[LesionStats] = []
    for lesion, (zs, ys, xs) in lesion_boxes(labels).items():
        ya, yb = max(ys.start - r, 0), min(ys.stop + r, H)
        xa, xb = max(xs.start - r, 0), min(xs.stop + r, W)
        raw = labels[zs, ya:yb, xa:xb] == lesion
        cleaned = clean_slices(raw, r)
        areas = slice_areas(cleaned)
        raw_areas = slice_areas(raw)
        reference = raw_areas if params.mean_area_over == "raw" else areas
        keep = select_slices(
            areas, params.epsilon, reference, min_area=params.min_area_mm2 / pixel_mm2
        )
        stats.append(
            LesionStats(
                lesion=int(lesion),
                raw_slices=int(np.count_nonzero(raw_areas)),
                cleaned_slices=int(np.count_nonzero(areas)),
                kept_slices=int(np.count_nonzero(keep)),
            )
        )
        for k in np.flatnonzero(keep):
            z = oz + zs.start + int(k)
            rows = np.flatnonzero(cleaned[k].any(axis=1))
            cols = np.flatnonzero(cleaned[k].any(axis=0))
            y0, x0 = oy + ya, ox + xa
            bbox = (y0 + rows[0], y0 + rows[-1] + 1, x0 + cols[0], x0 + cols[-1] + 1)
            y0, x0, ny, nx = square_crop_box(bbox, (sy, sx), params.border_mm)
            window = extract_crop(image[z], y0, x0, ny, nx, params.pad_hu)
            window, (csy, csx) = to_square_pixels(window, (sy, sx))
            crops.append(
                Crop(
                    lesion=int(lesion),
                    slice=z,
                    area_mm2=float(areas[k]) * pixel_mm2,
                    spacing_y=csy,
                    spacing_x=csx,
                    array=to_int16_hu(window),
                )
            )
    return crops, stats


def _ceil(x: float) -> int:
    """Ceiling that forgives float noise (10/0.1 = 100.00000000000001 → 100)."""
    return math.ceil(round(x, 9))


def preprocess_scan(
    image: np.ndarray,
    raw_mask: np.ndarray,
    spacing_zyx: Sequence[float],
    params: PreprocessParams,
    lesion_rule: str,
) -> tuple[list[Crop], list[LesionStats]]:
    """Algorithm 1 on one scan as read (HU image and raw lesion mask on one grid): lesion labels
    (by ``lesion_rule``: ``components`` | ``instance``, :mod:`crc_lightning.io.lesions`) of the
    mask's non-zero box only (no full-size label map), then :func:`preprocess_volume` with that
    offset. What the crop-store writer and ``predict`` both run, so their crops are identical."""
    labels, box = lesion_labels_in_box(raw_mask, lesion_rule, params.connectivity)
    if box is None:
        return [], []
    offset = (box[0].start, box[1].start, box[2].start)
    spacing_yx = (float(spacing_zyx[1]), float(spacing_zyx[2]))
    return preprocess_volume(image, labels, spacing_yx, params, offset)
