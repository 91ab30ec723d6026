"""Brain masks of real scans: a user's mask file, the zero-background check, and moving a mask to the other scan.

The models of this project were trained on skull-stripped scans with a background of exactly 0:
the intensity normalisation takes the 99.5th percentile of the NON-ZERO voxels, and the networks
never saw a skull, a scalp or noisy air. A scan that still has them must be masked first.

* :func:`border_share`: the share of non-zero voxels on the faces of the volume, leaving out the face
  with the most (a field of view may cut the brain stem: the embedded subjects' T1w has 12 % of its
  bottom face in the brain). A skull-stripped scan then has a zero border; a scan with head and air
  has Rician noise there (almost every border voxel > 0), even where the head is far from the
  faces. This is the signature :func:`check_zero_background` uses; the limit of 2 % tolerates a
  few stray voxels. A scan whose air was set to exactly 0 by the scanner but that still shows
  the skull is NOT caught by it: give --mask or --skull-strip for such scans.
* :func:`load_mask`: a mask file on the T1w grid (same shape, same affine within 1e-3 mm), non-empty;
  anything else is a one-line :class:`~nexus_monai.errors.NexusInputError` ("mask on another grid").
* :func:`mask_on_grid`: a mask carried to another scan's grid (the T2w, after registration): a voxel
  is kept when any part of it lies in the mask; :func:`apply_mask` zeroes the rest.

Volumes are ``(1, X, Y, Z)`` MetaTensors with their affines (:mod:`nexus_monai.data.io`).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from monai.data import MetaTensor

from nexus_monai.data.io import load_volume
from nexus_monai.errors import NexusInputError
from nexus_monai.geometry import as_affine, sample_at_world, voxel_centres

__all__ = ["BORDER_SHARE_LIMIT", "border_share", "check_zero_background", "load_mask", "same_grid", "mask_on_grid",
           "apply_mask"]

BORDER_SHARE_LIMIT = 0.02
"""Above this share of non-zero border voxels a scan's background counts as not zero."""
GRID_TOLERANCE_MM = 1e-3


def border_share(volume: torch.Tensor) -> float:
    """Share of non-zero voxels on the faces of ``volume`` (``(X, Y, Z)`` or ``(1, X, Y, Z)``), leaving
    out the one face with the most non-zero voxels (where the field of view may cut a brain stem)."""
    v = volume.as_subclass(torch.Tensor) if isinstance(volume, MetaTensor) else torch.as_tensor(volume)
    v = v[0] if v.ndim == 4 else v
    faces = [v[0], v[-1], v[:, 0], v[:, -1], v[:, :, 0], v[:, :, -1]]
    counts = sorted(((int((f != 0).sum()), f.numel()) for f in faces), key=lambda c: c[0] / max(c[1], 1))[:-1]
    return sum(c[0] for c in counts) / max(sum(c[1] for c in counts), 1)


def check_zero_background(volume: torch.Tensor, source: str | os.PathLike | None, what: str = "scan") -> None:
    """One-line refusal when ``volume``'s background is not zero (:func:`border_share` above the limit)."""
    share = border_share(volume)
    if share > BORDER_SHARE_LIMIT:
        raise NexusInputError(
            source, f"the {what}'s background is not zero ({share:.0%} of the border voxels are non-zero: skull, "
                    f"scalp or noise); give --mask FILE (a brain mask on the T1w grid) or --skull-strip (ROBEX), "
                    f"or --keep-background to use the scans as they are")


def same_grid(a: MetaTensor, b: MetaTensor, tol_mm: float = GRID_TOLERANCE_MM) -> bool:
    """Same spatial shape and affines equal within ``tol_mm``."""
    return tuple(a.shape[-3:]) == tuple(b.shape[-3:]) and bool(
        torch.allclose(as_affine(a.affine), as_affine(b.affine), atol=tol_mm, rtol=0))


def load_mask(path: str | os.PathLike, reference: MetaTensor) -> MetaTensor:
    """A brain mask file as a bool ``(1, X, Y, Z)`` MetaTensor on ``reference``'s grid (the T1w scan).

    Any non-zero voxel is brain. One-line :class:`NexusInputError` for an unreadable file (as
    :func:`~nexus_monai.data.io.load_volume`), a mask on another grid, or an empty mask.
    """
    mask = load_volume(path)
    if not same_grid(mask, reference):
        ref_sp = ", ".join(f"{v:.3g}" for v in torch.linalg.norm(as_affine(reference.affine)[:3, :3], dim=0))
        raise NexusInputError(
            path, f"mask on another grid: shape {tuple(mask.shape[-3:])} vs the T1w scan's "
                  f"{tuple(reference.shape[-3:])} ({ref_sp} mm), or a different affine; give the mask on the T1w grid")
    data = mask.as_subclass(torch.Tensor) != 0
    if not bool(data.any()):
        raise NexusInputError(path, "the mask is empty (no non-zero voxel)")
    return MetaTensor(data, affine=as_affine(reference.affine).clone(), meta={"filename_or_obj": str(path)})


def mask_on_grid(mask: MetaTensor, target: MetaTensor, samples: int = 5) -> MetaTensor:
    """``mask`` (bool, its own affine) on ``target``'s grid: a target voxel is brain when ANY of
    ``samples``^3 points spread over its extent (offsets ``-0.4 .. 0.4`` voxel per axis) falls in the
    mask (nearest neighbour); zero outside ``mask``'s field of view.

    Why any, not the voxel centre: a thick T2w slab that holds some brain must keep its value (zeroing
    it removes brain signal the network needs; measured in docs/skull_and_background.md, a centre or
    majority rule cost 2-3 dB at the brain's edge); a little skull in a boundary slab costs less.
    """
    shape = tuple(target.shape[-3:])
    steps = torch.linspace(-0.4, 0.4, samples, dtype=torch.float64) if samples > 1 else torch.zeros(1).double()
    offsets = torch.stack(torch.meshgrid(steps, steps, steps, indexing="ij"), -1).reshape(-1, 3)
    idx = voxel_centres(shape, None, dtype=torch.float64).reshape(-1, 3)
    src = mask.as_subclass(torch.Tensor).double()
    out = torch.zeros(idx.shape[0], dtype=torch.bool)
    aff = as_affine(target.affine)
    for off in offsets:
        world = (idx + off) @ aff[:3, :3].T + aff[:3, 3]
        out |= sample_at_world(src, mask.affine, world, mode="nearest", padding_mode="zeros")[0] >= 0.5
    return MetaTensor(out.reshape(1, *shape), affine=aff.clone())


def apply_mask(volume: MetaTensor, mask: torch.Tensor) -> MetaTensor:
    """``volume`` with every voxel outside ``mask`` set to 0 (same grid; affine and meta kept)."""
    data = volume.as_subclass(torch.Tensor)
    keep = mask.as_subclass(torch.Tensor) if isinstance(mask, torch.Tensor) else torch.as_tensor(np.asarray(mask))
    out = torch.where(keep.to(torch.bool).reshape(data.shape), data, torch.zeros((), dtype=data.dtype))
    meta = {k: v for k, v in volume.meta.items() if k != "affine"}
    return MetaTensor(out, affine=as_affine(volume.affine).clone(), meta=meta)
