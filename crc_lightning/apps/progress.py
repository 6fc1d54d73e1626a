"""How a training job shows that it is alive: a rich progress bar on a terminal, else one line per
epoch (loss, validation metrics, elapsed time, ETA) — never minutes of silence.

Why: with progress bars off (sweeps, ``make demo``, logs piped to a file) Lightning prints nothing
between epochs, and a loaded 2-core machine took 16 minutes of SimCLR without a line: a user could
not tell a slow run from a hang. Lightning's own TQDM bar written to a file or pipe is a wall of
carriage returns, so it is kept for terminals only, as Lightning's :class:`RichProgressBar`.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as L

log = logging.getLogger(__name__)

__all__ = ["EpochLine", "format_duration", "progress_callbacks"]

# the training loss as the modules log it (SimCLR logs per step and per epoch)
_LOSS_KEYS = ("train/loss_epoch", "train/loss")


def format_duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, sec = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _value(metrics: Mapping[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class EpochLine(L.Callback):
    """One log line per finished training epoch, on rank 0::

        [job 2] epoch 3/15: loss 0.6125, val/loss 0.6401, val/auc 0.612 | 41 s elapsed, ETA ≤ 2 min 45 s

    The ETA assumes every remaining epoch up to ``max_epochs`` runs (early stopping can only make
    it shorter, hence "≤" when an early-stopping callback is there). ``label`` prefixes the line
    (the job's number in a sweep).
    """

    def __init__(self, label: str = "") -> None:
        self.label = label
        self._start: float | None = None
        self._first_epoch = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.monotonic()
        self._first_epoch = int(trainer.current_epoch)  # > 0 when resumed from a checkpoint

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking or self._start is None:
            return
        log.info(self.line(trainer))

    def line(self, trainer: L.Trainer) -> str:
        metrics = trainer.callback_metrics
        epoch = int(trainer.current_epoch) + 1
        max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        parts = []
        loss = next((v for k in _LOSS_KEYS if (v := _value(metrics, k)) is not None), None)
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        for key in sorted(k for k in metrics if str(k).startswith("val/")):
            value = _value(metrics, key)
            parts.append(f"{key} {'-' if value is None else f'{value:.4f}'}")
        elapsed = time.monotonic() - (self._start or time.monotonic())
        done = max(1, epoch - self._first_epoch)
        timing = f"{format_duration(elapsed)} elapsed"
        if max_epochs is not None and epoch < max_epochs:
            stops_early = any(type(cb).__name__ == "EarlyStopping" for cb in trainer.callbacks)
            eta = format_duration(elapsed / done * (max_epochs - epoch))
            timing += f", ETA {'≤ ' if stops_early else ''}{eta}"
        head = f"{self.label} " if self.label else ""
        total = f"/{max_epochs}" if max_epochs is not None else ""
        return f"{head}epoch {epoch}{total}: {', '.join(parts) or 'done'} | {timing}"


def _on_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def progress_callbacks(enable_progress_bar: bool, label: str = "") -> tuple[list[Any], bool]:
    """``(callbacks, enable_progress_bar)`` for a Trainer: Lightning's :class:`RichProgressBar`
    when a bar is wanted and stderr is a terminal, otherwise :class:`EpochLine` and no bar."""
    if enable_progress_bar and _on_terminal():
        from lightning.pytorch.callbacks import RichProgressBar

        return [RichProgressBar(leave=True)], True
    return [EpochLine(label)], False
