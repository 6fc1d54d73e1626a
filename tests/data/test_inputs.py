"""The HU → model-input steps (window, resize) against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from crc_lightning.data.inputs import resize_square, window


def test_window_and_resize():
    hu = np.array([-1024, -160, 40, 240, 3000], np.int16)
    np.testing.assert_allclose(window(hu, 400, 40), [0, 0, 127.5, 255, 255])
    assert window(hu, 400, 40).dtype == np.float32
    np.testing.assert_allclose(
        window(hu, width=100, level=0), [0, 0, 229.5, 255, 255]
    )  # (40+50)/100·255
    # bilinear, align_corners=False: output centres map to -0.25, 0.25, 0.75, 1.25 → clamp
    up = resize_square(np.array([[0, 1], [0, 1]], np.int16), 4)
    np.testing.assert_allclose(up, np.tile([0, 0.25, 0.75, 1], (4, 1)), atol=1e-6)
    ramp = np.tile(np.arange(64, dtype=np.float32), (64, 1))
    down = resize_square(ramp, 32)  # anti-aliased: a linear ramp stays linear inside
    np.testing.assert_allclose(down[5, 2:-2], (np.arange(32) * 2 + 0.5)[2:-2], atol=1e-3)
    assert down.dtype == np.float32 and down.shape == (32, 32)
    with pytest.raises(ValueError, match="square"):
        resize_square(np.zeros((3, 4)), 8)
