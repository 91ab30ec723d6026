"""Losses of nexus_monai."""

from nexus_monai.losses.segmentation import DiceBCELoss

__all__ = ["DiceBCELoss"]
