"""PNG slice panels (numpy + PIL; deterministic bytes, no timestamps).

A low-layer module (beside data and transforms) so that the data generators, the engines'
handlers and the evaluation can all draw panels without importing upwards.
"""

from __future__ import annotations

import io
import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from nexus_monai.data.io import write_text_atomic

__all__ = ["to_uint8", "save_panel"]


def to_uint8(image: np.ndarray, vmax: float) -> np.ndarray:
    """2D float image -> uint8 with ``[0, vmax]`` mapped to ``[0, 255]`` (clipped)."""
    scale = 255.0 / vmax if vmax > 0 else 0.0
    return np.clip(np.asarray(image, dtype=np.float64) * scale, 0, 255).astype(np.uint8)


def save_panel(tiles: Sequence[Sequence[np.ndarray]], path: str | os.PathLike, row_labels: Sequence[str] = (),
               col_labels: Sequence[str] = (), zoom: int = 2) -> None:
    """Save a grid of 2D uint8 tiles (rows x columns) with text labels as one PNG.

    Tiles are shown with array axis 0 horizontal and axis 1 vertical, flipped so that the
    second axis points up (radiological slices of RAS volumes look upright).
    """
    rows = [[np.flipud(np.asarray(t).T) for t in row] for row in tiles]
    h = max(t.shape[0] for row in rows for t in row) * zoom
    w = max(t.shape[1] for row in rows for t in row) * zoom
    left, top, pad = (90 if row_labels else 0), (18 if col_labels else 0), 4
    canvas = Image.new("L", (left + len(rows[0]) * (w + pad), top + len(rows) * (h + pad)), 0)
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            img = Image.fromarray(tile).resize((tile.shape[1] * zoom, tile.shape[0] * zoom), Image.NEAREST)
            canvas.paste(img, (left + c * (w + pad), top + r * (h + pad)))
        if r < len(row_labels):
            draw.text((4, top + r * (h + pad) + h // 2), str(row_labels[r]), fill=255)
    for c, label in enumerate(col_labels):
        draw.text((left + c * (w + pad) + 2, 3), str(label), fill=255)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    write_text_atomic(path, buf.getvalue())
