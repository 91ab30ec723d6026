"""I3Net baseline (Song et al., TMI 2024): cohort-trained inter- and intra-slice interpolation.

A CPU-sized RE-IMPLEMENTATION: the network is :class:`~nexus_monai.networks.i3net.I3Net`
(each missing acquisition-plane slice synthesised by a 2D network from the neighbouring
acquired slices, with a convolutional inter-slice branch and a DCT-domain intra-slice branch),
trained by the bundle ``bundles/i3net`` on the cohort's HR training volumes with the thick axis
simulated by the acquisition operator::

    python -m monai.bundle run training --config_file bundles/i3net/configs/train.yaml

Inference loads ``bundles/i3net/models/model.pt`` and runs one scan at a time on its natural HR
grid (:func:`~nexus_monai.baselines.slice_stack.predict_thick_axis`), resampled onto the
requested grid when it differs. Any thick axis and (non-integer) factor.
"""

from __future__ import annotations

from monai.data import MetaTensor

from nexus_monai.baselines.slice_stack import cohort_network, predict_thick_axis
from nexus_monai.geometry import TargetGrid

__all__ = ["i3net"]


def i3net(lr: MetaTensor, grid: TargetGrid, *, network=None, bundle=None, weights=None, axis=None, factor=None,
          source=None) -> MetaTensor:
    """I3Net on one LR scan ``(1, x, y, z)`` -> ``(1, *grid.shape)`` (trained bundle checkpoint)."""
    network = network if network is not None else cohort_network("i3net", bundle, weights)
    neighbours = int(getattr(network, "in_channels", 7)) - 3
    return predict_thick_axis(lr, grid, network, neighbours=neighbours, axis=axis, factor=factor, source=source,
                              method="I3Net")
