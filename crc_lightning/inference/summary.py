"""The per-patient summary of ``python -m crc_lightning.predict``, as markdown: the model that was
applied, one row per lesion (probabilities, most likely class) and each lesion's saliency overlay.

The predict app renders it into one self-contained HTML page per patient with the report's renderer
(:func:`crc_lightning.evaluation.html.write_html`), so the page and the report look alike. The page
stays on the machine that made it (it names the patient); nothing here is sent to a logger.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from crc_lightning.sources.manifest import safe_id

__all__ = ["patient_markdown", "patient_page_name", "saliency_name"]

DISCLAIMER = (
    "> Research software, not a medical device: these probabilities are not a substitute for a "
    "biopsy."
)


def saliency_name(patient_id: str, lesion: int) -> str:
    """File name of a lesion's saliency overlay in predict's ``saliency/`` folder."""
    return f"{safe_id(str(patient_id))}_{int(lesion)}.png"


def patient_page_name(patient_id: str) -> str:
    """File name of a patient's HTML summary in predict's ``patients/`` folder."""
    return f"{safe_id(str(patient_id))}.html"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _p(x: float) -> str:
    return "–" if not np.isfinite(x) else f"{x:.3f}"


def _p_spread(row: Any, c: str) -> str:
    """An ensemble's cell: ``p ± SD (min–max)`` across its members."""
    p = float(row[f"p_{c}"])
    if not np.isfinite(p):
        return "–"
    return (
        f"{p:.3f} ± {float(row[f'p_{c}_sd']):.3f} "
        f"({float(row[f'p_{c}_min']):.3f}–{float(row[f'p_{c}_max']):.3f})"
    )


def _model_line(card: Mapping[str, Any], classes: Sequence[str], n_members: int) -> str:
    labels = card.get("labels") or {}
    weights = card.get("weights") or {}
    source = card.get("source") or {}
    win = card.get("window")
    what = (
        f"an ensemble of {n_members} models (mean of their lesion probabilities)"
        if n_members > 1
        else f"`{_cell(Path(str(source.get('file') or 'checkpoint')).name)}`"
    )
    crops = (
        f"{card.get('res')} × {card.get('res')} px crops, CT window "
        f"{win['width']:g}/{win['level']:g} HU, backbone init "
        f"{_cell(weights.get('init') or 'not recorded')}"
        if win
        else "radiomics features"
    )
    return (
        f"Model: {what} — variant {_cell(card.get('variant') or 'not recorded')}, label set "
        f"{_cell(labels.get('name') or 'not recorded')} ({', '.join(classes)}), {crops}."
    )


def patient_markdown(
    lesions: pd.DataFrame,
    classes: Sequence[str],
    card: Mapping[str, Any],
    saliency: Mapping[int, str] | None = None,
    n_members: int = 1,
) -> str:
    """Markdown of one patient's prediction: ``lesions`` = predict's lesion rows of that patient
    (``patient_id, lesion, n_slices, p_<CLASS>…``, with ``p_<CLASS>_sd/_min/_max`` when
    ``n_members`` > 1), ``saliency`` = ``{lesion: image path}`` relative to where the page's
    images are resolved."""
    pid = str(lesions["patient_id"].iat[0]) if len(lesions) else "?"
    classes = [str(c) for c in classes]
    ensemble = n_members > 1
    how = (
        f" Each cell is the mean over the {n_members} members of their lesion probability ± its "
        "standard deviation across members (lowest–highest member in brackets)."
        if ensemble
        else ""
    )
    lines = [
        f"# Patient {_cell(pid)}: predicted mutation family per lesion",
        "",
        DISCLAIMER,
        "",
        _model_line(card, classes, n_members),
        "",
        "## Lesions",
        "",
        "Probability of each class (sigmoid, multi-label: they need not sum to 1), averaged over "
        f"the lesion's slices that pass Algorithm 1.{how}",
        "",
        "| lesion | slices | " + " | ".join(f"p({c})" for c in classes) + " | most likely |",
        "|---:|---:|" + "---:|" * len(classes) + "---|",
    ]
    for _, row in lesions.iterrows():
        p = np.array([row[f"p_{c}"] for c in classes], dtype=float)
        best = classes[int(np.nanargmax(p))] if row["n_slices"] > 0 else "no slice passed"
        lines.append(
            f"| {int(row['lesion'])} | {int(row['n_slices'])} | "
            + " | ".join(_p_spread(row, c) if ensemble else _p(x) for c, x in zip(classes, p))
            + f" | {best} |"
        )
    shown = {int(k): v for k, v in (saliency or {}).items()}
    if shown:
        lines += [
            "",
            "## Saliency",
            "",
            "Where the model looked, on each lesion's largest included slice (Grad-CAM, or the "
            "attention map of a model with the self-attention block), for its most likely class.",
        ]
        for lesion, image in sorted(shown.items()):
            row = lesions[lesions["lesion"] == lesion]
            p = row[[f"p_{c}" for c in classes]].to_numpy(dtype=float)[0]
            best = classes[int(np.nanargmax(p))]
            lines += [
                "",
                f"### Lesion {lesion}",
                "",
                f"![Lesion {lesion}: saliency overlay on its largest slice, most likely "
                f"{best} (p = {_p(float(np.nanmax(p)))})](<{image}>)",
            ]
    return "\n".join(lines) + "\n"
