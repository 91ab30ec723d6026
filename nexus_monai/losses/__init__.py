"""Losses of nexus_monai."""

from nexus_monai.losses.nexus_inr import NexusINRLoss, brats_label_to_class
from nexus_monai.losses.segmentation import DiceBCELoss

__all__ = ["DiceBCELoss", "NexusINRLoss", "brats_label_to_class"]
