"""Interpolation baselines of Table 1: trilinear and cubic B-spline upsampling onto any grid.

The resampling itself lives below the engines, in :mod:`nexus_monai.transforms.interpolation`
(SimpleITK ``sitkLinear`` / ``sitkBSpline`` at the world positions of the target voxels); this
module is the baselines' name for it, as ``nexus-sr upsample`` and the ``trilinear`` / ``cubic``
methods of the evaluation registry use it.
"""

from __future__ import annotations

from nexus_monai.transforms.interpolation import METHODS, to_sitk, upsample

__all__ = ["METHODS", "to_sitk", "upsample"]
