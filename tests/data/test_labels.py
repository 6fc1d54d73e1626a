"""Label sets come from conf/labels and map gene columns to classes as the paper groups them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from crc_lightning.data.labels import LabelSet
from tests.helpers.config import CONF_DIR

CONF = Path(CONF_DIR) / "labels"


def _load(name: str) -> LabelSet:
    return LabelSet.from_config(OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml")))


def test_five_and_three_class_names():
    assert _load("five").classes == ("KRAS", "NRAS", "BRAF", "PIK3CA", "OTHER")
    assert _load("three").classes == ("RAS", "PIK3CA_BRAF", "OTHER")


def test_encode_matches_hand_truth_table():
    genes = pd.DataFrame(
        [[0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 1], [0, 0, 1, 1]],
        columns=["KRAS", "NRAS", "BRAF", "PIK3CA"],
    )
    np.testing.assert_array_equal(
        _load("five").encode(genes),
        [[0, 0, 0, 0, 1], [1, 0, 0, 0, 0], [0, 1, 0, 1, 0], [0, 0, 1, 1, 0]],
    )
    np.testing.assert_array_equal(
        _load("three").encode(genes), [[0, 0, 1], [1, 0, 0], [1, 1, 0], [0, 1, 0]]
    )
