"""networks."""

from nexus_monai.networks.transunet import TransUNet

__all__ = ["TransUNet"]
