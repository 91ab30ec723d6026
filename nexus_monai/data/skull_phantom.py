"""A skull, scalp and noisy air around a skull-stripped HR subject (SIMULATED, for measurements and tests).

The embedded dataset is skull-stripped by construction. To measure what ``--skull-strip`` and
``--mask`` cost on a scan as it arrives, :func:`add_head` wraps a subject's brain in layered
tissue shells at distances from the brain surface (mm, each shell's thickness modulated by a
smooth random field of +-25 %, seeded):

============================  =========  ===========  ==========================================
shell (outward)               thickness  T1w / T2w    why
============================  =========  ===========  ==========================================
meninges + outer CSF          1.5 mm     0.25 / 0.90  CSF: dark on T1w, bright on T2w
inner table (cortical bone)   1.5 mm     0.03 / 0.03  no signal in either
diploe (marrow, fatty)        2.5 mm     0.75 / 0.45
outer table (cortical bone)   1.5 mm     0.03 / 0.03
galea + muscle                2.0 mm     0.45 / 0.30
subcutaneous fat + skin       3.5 mm     1.05 / 0.60  fat: brighter than white matter on T1w
air                           -          0 + noise
============================  =========  ===========  ==========================================

Intensities are fractions of each contrast's 99.5th percentile inside the brain, as spin-echo
/ gradient-echo images show these tissues relative to brain (textbook appearance, not a
physics simulation). Rician noise of ``noise`` x that percentile is added OUTSIDE the brain
only, so the brain voxels are bit-identical to the input and a difference between a
skull-stripped run and the original run is due to the stripping alone.

Volumes: ``(1, X, Y, Z)`` MetaTensors; the brain mask is ``volume > 0`` of the T1w input.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor
from scipy import ndimage

from nexus_monai.geometry import as_affine, spacing

__all__ = ["SHELLS", "add_head", "brain_mask"]

SHELLS = (  # (name, thickness mm, T1w fraction, T2w fraction)
    ("meninges_csf", 1.5, 0.25, 0.90),
    ("inner_table", 1.5, 0.03, 0.03),
    ("diploe", 2.5, 0.75, 0.45),
    ("outer_table", 1.5, 0.03, 0.03),
    ("galea_muscle", 2.0, 0.45, 0.30),
    ("fat_skin", 3.5, 1.05, 0.60),
)


def brain_mask(t1: MetaTensor) -> np.ndarray:
    """Bool ``(X, Y, Z)``: the voxels of a skull-stripped scan that are not 0 (holes filled)."""
    return ndimage.binary_fill_holes(t1[0].as_subclass(torch.Tensor).numpy() > 0)


def add_head(volumes: dict[str, MetaTensor], seed: int = 0, noise: float = 0.02) -> dict[str, MetaTensor]:
    """``{"t1", "t2"}`` HR volumes on one grid -> the same subject with skull, scalp and noisy air.

    ``noise``: Rician noise level outside the brain as a fraction of each contrast's brain 99.5th
    percentile. The brain (``volumes["t1"] > 0``) is left unchanged.
    """
    t1 = volumes["t1"]
    brain = brain_mask(t1)
    sp = spacing(t1.affine).numpy()
    dist = ndimage.distance_transform_edt(~brain, sampling=sp)  # mm from the brain surface
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal(brain.shape), sigma=20.0 / sp.mean())
    field = 1.0 + 0.25 * field / max(float(np.abs(field).max()), 1e-9)  # smooth thickness scale in [0.75, 1.25]
    edges = np.cumsum([s[1] for s in SHELLS])
    out = {}
    for c, col in (("t1", 2), ("t2", 3)):
        x = volumes[c][0].as_subclass(torch.Tensor).double().numpy()
        ref = float(np.percentile(x[brain], 99.5))
        head = np.zeros_like(x)
        inner = np.zeros(brain.shape)
        for shell, outer in zip(SHELLS, edges):
            sel = (~brain) & (dist > inner) & (dist <= outer * field)
            head[sel] = shell[col] * ref
            inner = outer * field
        head = ndimage.gaussian_filter(head, 0.5)  # partial volume at the shell boundaries
        n1 = rng.standard_normal(x.shape) * noise * ref
        n2 = rng.standard_normal(x.shape) * noise * ref
        outside = np.sqrt((head + n1) ** 2 + n2**2)
        y = np.where(brain, x, outside)
        out[c] = MetaTensor(torch.as_tensor(y, dtype=torch.float32)[None], affine=as_affine(volumes[c].affine).clone(),
                            meta={k: v for k, v in getattr(volumes[c], "meta", {}).items() if k != "affine"})
    return out
