"""Fixtures shared by the app tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.config import compose_app

# a small synthetic cohort for the sharded-preprocessing tests (NIfTI and DICOM inputs)
SHARD_COHORT = ["data=synthetic", "data.synthetic.n_patients=6",
                "data.synthetic.dicom_fraction=0.34", "progress=false"]  # fmt: skip


@pytest.fixture(scope="module")
def single_store(tmp_path_factory) -> tuple[Path, Path]:
    """``(root, store)``: the :data:`SHARD_COHORT` generated under ``root`` and its store built
    by one process — the oracle of every shard-and-merge test."""
    from crc_lightning.apps.preprocess import preprocess

    root = tmp_path_factory.mktemp("shards")
    preprocess(compose_app("preprocess", *SHARD_COHORT, f"paths.root_dir={root}",
                           f"data.store={root / 'single'}"))  # fmt: skip
    return root, root / "single"
