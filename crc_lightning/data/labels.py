"""Label sets: map the manifest's gene columns to the class names of ``conf/labels/<name>.yaml``.

A class lists the genes it groups; it is positive when any of them is. A class with an empty gene list
(``OTHER``) is positive when no gene of the set is. Class names are used everywhere (predictions,
metrics, reports) exactly as written in the config.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class LabelSet:
    name: str
    genes: tuple[str, ...]
    classes: tuple[str, ...]
    groups: tuple[tuple[str, ...], ...]  # genes of each class, in class order; () means "none"

    @classmethod
    def from_config(cls, cfg: Mapping) -> LabelSet:
        genes = tuple(str(g) for g in cfg["genes"])
        classes, groups = [], []
        for name, members in dict(cfg["classes"]).items():
            members = tuple(str(m) for m in (members or ()))
            unknown = [m for m in members if m not in genes]
            if unknown:
                raise ValueError(
                    f"label set {cfg['name']!r}: class {name!r} names unknown genes {unknown}"
                )
            classes.append(str(name))
            groups.append(members)
        return cls(name=str(cfg["name"]), genes=genes, classes=tuple(classes), groups=tuple(groups))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def encode(self, genes: pd.DataFrame | np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
        """Gene 0/1 table (columns = ``self.genes`` or in that order) → class 0/1 matrix [n, C]."""
        if isinstance(genes, pd.DataFrame):
            g = genes.loc[:, list(self.genes)].to_numpy(dtype=np.int64)
        else:
            g = np.asarray(genes, dtype=np.int64).reshape(-1, len(self.genes))
        col = {gene: i for i, gene in enumerate(self.genes)}
        any_gene = g.any(axis=1)
        out = np.zeros((g.shape[0], self.num_classes), dtype=np.int64)
        for c, members in enumerate(self.groups):
            if members:
                out[:, c] = g[:, [col[m] for m in members]].any(axis=1)
            else:
                out[:, c] = ~any_gene
        return out
