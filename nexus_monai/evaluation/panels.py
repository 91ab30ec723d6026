"""PNG slice panels: re-exported from :mod:`nexus_monai.visualize` (where the code lives, one
layer lower, so data generators and engines can use it without importing the evaluation)."""

from __future__ import annotations

from nexus_monai.visualize import save_panel, to_uint8

__all__ = ["to_uint8", "save_panel"]
