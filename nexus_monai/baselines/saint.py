"""SAINT baseline (Peng et al., CVPR 2020): cohort-trained spatially aware slice interpolation.

A CPU-sized RE-IMPLEMENTATION: the network is :class:`~nexus_monai.networks.saint.SAINT`
(marginal 2D SR on the sagittal and coronal stacks along the thick axis + residual fusion on the
acquisition-plane slices), trained by the bundle ``bundles/saint`` on the cohort's HR training
volumes with the thick axis simulated by the acquisition operator::

    python -m monai.bundle run training --config_file bundles/saint/configs/train.yaml

Inference (here, ``nexus-sr evaluate --methods saint`` and the bundle's ``inference``) loads
``bundles/saint/models/model.pt`` and runs one scan at a time on its natural HR grid
(:func:`~nexus_monai.baselines.slice_stack.predict_thick_axis`), resampled onto the requested
grid when it differs. Any thick axis and (non-integer) factor: the network sees the scan with
its thick axis last and the spacing as input channels.
"""

from __future__ import annotations

from monai.data import MetaTensor

from nexus_monai.baselines.slice_stack import cohort_network, predict_thick_axis
from nexus_monai.geometry import TargetGrid

__all__ = ["saint"]


def saint(lr: MetaTensor, grid: TargetGrid, *, network=None, bundle=None, weights=None, axis=None, factor=None,
          source=None) -> MetaTensor:
    """SAINT on one LR scan ``(1, x, y, z)`` -> ``(1, *grid.shape)`` (trained bundle checkpoint)."""
    network = network if network is not None else cohort_network("saint", bundle, weights)
    return predict_thick_axis(lr, grid, network, neighbours=0, axis=axis, factor=factor, source=source, method="SAINT")
