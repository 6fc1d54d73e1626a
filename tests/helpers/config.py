"""Compose an app's real config exactly as ``python -m crc_lightning.<app>`` would, from the configs
shipped inside the package (the lightning-hydra-template pattern: tests use the real YAML)."""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from crc_lightning.apps._hydra import CONF_DIR

__all__ = ["CONF_DIR", "compose_app"]


def compose_app(app: str, *overrides: str, hydra_config: bool = False) -> DictConfig:
    """``conf/<app>.yaml`` composed with ``overrides`` (``hydra_config``: keep the ``hydra`` node)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(app, overrides=list(overrides), return_hydra_config=hydra_config)
