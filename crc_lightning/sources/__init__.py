"""Everything that turns something on disk into :class:`~crc_lightning.sources.case.Case` objects.

One registry, keyed by the ``data.kind`` of ``conf/data/<name>.yaml`` (what ``data=`` selects):

=============  ===============================================================  ===============
kind           what it reads                                                    labels
=============  ===============================================================  ===============
``synthetic``  the built-in phantom cohort (:mod:`.synthetic`), generated once   genes
``manifest``   your cohort CSV (:mod:`.manifest`)                               genes
``lits``       LiTS17 (:mod:`.lits`)                                            none (OOD)
``ircadb``     3D-IRCADb-01 (:mod:`.ircadb`)                                    none (OOD)
``crlm``       TCIA Colorectal-Liver-Metastases (:mod:`.crlm`)                  none (OOD)
=============  ===============================================================  ===============

A loader takes the plain ``data`` mapping, the gene columns of the label set and the reading options
(:class:`~crc_lightning.io.ReadOptions`, from ``preprocess.*``), validates what it can cheaply
(for a manifest: every header, geometry and grid), and returns the cases; nothing is written except the synthetic cohort's own files.
Unlabelled public sources are de-duplicated by content (:mod:`.dedupe`). Adding a source is adding
one function to :data:`SOURCES`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from crc_lightning.io import InputError, ReadOptions
from crc_lightning.sources.case import Case

__all__ = ["SOURCES", "Case", "load_cases"]

log = logging.getLogger(__name__)

Loader = Callable[[Mapping[str, Any], tuple[str, ...], ReadOptions], list[Case]]


def _required(data: Mapping[str, Any], key: str, example: str) -> Any:
    value = data.get(key)
    if value in (None, "", "???"):
        raise InputError(
            None, f"`data.{key}` is required, e.g. `python -m crc_lightning.preprocess {example}`"
        )
    return value


def _synthetic(data: Mapping[str, Any], genes: tuple[str, ...], options: ReadOptions) -> list[Case]:
    from crc_lightning.sources.manifest import read_manifest
    from crc_lightning.sources.synthetic import ensure_synthetic_cohort

    syn = dict(data.get("synthetic") or {})
    csv = ensure_synthetic_cohort(
        Path(str(data["root"])),
        int(syn.get("n_patients", 48)),
        int(syn.get("seed", 2024)),
        float(syn.get("dicom_fraction", 0.25)),
    )
    return read_manifest(
        csv, genes=genes, source=str(data.get("name", "synthetic")), options=options
    )


def _manifest(data: Mapping[str, Any], genes: tuple[str, ...], options: ReadOptions) -> list[Case]:
    from crc_lightning.sources.manifest import read_manifest

    csv = _required(data, "manifest", "data=manifest data.manifest=/path/labels.csv")
    return read_manifest(
        Path(str(csv)),
        genes=genes,
        source=str(data.get("name", "cohort")),
        options=options,
        segments=segments_of(data),
    )


def segments_of(data: Mapping[str, Any]) -> Any:
    """``data.segments`` (DICOM SEG masks: which segments are lesions) as a plain value."""
    value = data.get("segments")
    if value is None or isinstance(value, str):
        return value
    return tuple(int(n) for n in value)


def _public(kind: str, walk: Callable[[Path, Mapping[str, Any]], list[Case]]) -> Loader:
    def load(data: Mapping[str, Any], genes: tuple[str, ...], options: ReadOptions) -> list[Case]:
        from crc_lightning.sources.dedupe import dedupe_by_content

        root = Path(str(_required(data, "root", f"data={kind} data.root=/path/to/{kind}")))
        kept, dropped = dedupe_by_content(walk(root, data), options)
        log.info("%s: %d cases, %d content duplicate(s) dropped", kind, len(kept), dropped)
        return kept

    return load


def _lits(root: Path, data: Mapping[str, Any]) -> list[Case]:
    from crc_lightning.sources.lits import iter_lits

    return iter_lits(root)


def _ircadb(root: Path, data: Mapping[str, Any]) -> list[Case]:
    from crc_lightning.sources.ircadb import iter_ircadb

    return iter_ircadb(root)


def _crlm(root: Path, data: Mapping[str, Any]) -> list[Case]:
    from crc_lightning.sources.crlm import CRLM_TUMOUR_SEGMENTS, iter_crlm

    segments = segments_of(data) if "segments" in data else CRLM_TUMOUR_SEGMENTS
    return iter_crlm(root, segments)


SOURCES: dict[str, Loader] = {
    "synthetic": _synthetic,
    "manifest": _manifest,
    "lits": _public("lits", _lits),
    "ircadb": _public("ircadb", _ircadb),
    "crlm": _public("crlm", _crlm),
}


def load_cases(
    data: Mapping[str, Any], genes: Sequence[str], options: ReadOptions | None = None
) -> list[Case]:
    """The cases the ``data`` config (a plain mapping with ``kind``) describes, validated with the
    reading ``options``; an unknown kind or a source that yields nothing is an
    :class:`InputError`."""
    kind = str(data.get("kind"))
    loader = SOURCES.get(kind)
    if loader is None:
        raise InputError(None, f"unknown data.kind {kind!r}; expected one of {sorted(SOURCES)}")
    cases = loader(data, tuple(str(g) for g in genes), options or ReadOptions())
    if not cases:
        raise InputError(None, f"data '{data.get('name', kind)}' yielded no cases")
    return cases
