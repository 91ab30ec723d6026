"""Per-subject anatomy: the warp of a source template into the output frame, tissue maps, and the
skull-stripping edge.

A world point ``y`` of the output frame is pulled back into the subject's anatomy source by

1. a tumour mass effect ``y' = y - a (y - c) exp(-|y - c|^2 / 2 r^2)`` (tissue pushed away from
   the tumour centre ``c``),
2. a similarity transform: rotation of a few degrees (up to 5 deg, 7.5 deg held out), head
   scale 0.88-1.05 times ``(1.88 L / source brain volume)^(1/3)`` (so every source spans the same
   1.3-2.3 L inside the mask; per-axis anisotropy +-2 %, +-6 % held out), translation of +-5 mm
   in x and y, and z such that the brain top lies 6-12 mm below the top of the field of view
   (measured on a probe grid after warping),
3. a smooth random displacement field (Gaussian radial-basis coefficients on a 40 mm control
   grid; RMS 0.8-3 mm, held out 3.5-5 mm plus a 20 mm-scale field of 1-2 mm RMS),
4. a ventricular enlargement (radial expansion around the lateral ventricles; 0-6 % for
   training, 15-30 % held out) and, for held-out subjects only, a left/right flip of the source
   (a no-op for the exactly symmetric MNI152 2009a; not for MNI152NLin6Asym).

The source maps are resampled through this map with ``scipy.ndimage.map_coordinates`` (order
1) directly at the output resolution, after a Gaussian pre-smoothing to the output resolution
(see :func:`~nexus_monai.data.synth.sources.source_maps`). The maps are then sharpened by a power
``gamma`` in [1, 2], perturbed by smooth multiplicative fields (15 mm grain, 5-15 %) and by a fine
cortical texture (a 3 mm-grain field exchanging GM and WM, amplitude 0-30 %, i.e. gyral detail
finer than a population template has), and renormalised to sum to 1 inside the brain mask.

Skull-stripping edge. The brain mask (source mask >= 0.5 after warping) is moved by a signed
distance: ``inside = d(x) < offset + ragged * n(x)``, ``d`` the signed distance to the mask
boundary (mm, positive outside), ``offset`` U(-2, 2) mm (erosion < 0 < dilation), ``n`` a
unit-variance field of 6 mm grain and ``ragged`` U(0, 1.5) mm. Voxels added by a dilation are
extra-cerebral CSF (their GM and WM fractions are 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from nexus_monai.data.synth.grid import COARSE_MM, FOV_MM, SmoothField, grid_axes, rotation
from nexus_monai.data.synth.sources import load_source, source_maps

__all__ = ["Anatomy", "draw_anatomy", "sample_source", "place_brain", "tissue_maps", "strip_edge"]

_ANCHOR_BELOW_TOP_MM = 70.0  # source point put at the output origin before the shift
_REFERENCE_BRAIN_L = 1.88  # brain volume the head-scale range refers to (MNI152 2009 mask)

RANGES = {
    "head_scale": (0.88, 1.05),
    "anisotropy": 0.02,
    "anisotropy_held_out": 0.06,
    "rotation_deg": (5.0, 3.0, 4.0),
    "rotation_held_out_factor": 1.5,
    "shift_xy_mm": (-5.0, 5.0),
    "top_margin_mm": (6.0, 12.0),
    "warp_rms_mm": (0.8, 3.0),
    "warp_rms_held_out_mm": (3.5, 5.0),
    "fine_warp_rms_held_out_mm": (1.0, 2.0),
    "ventricle_expansion": (0.0, 0.06),
    "ventricle_expansion_held_out": (0.15, 0.30),
    "tissue_gamma": (1.0, 2.0),
    "tissue_perturbation": (0.05, 0.15),
    "cortical_texture": (0.0, 0.30),
    "mask_offset_mm": (-2.0, 2.0),
    "mask_ragged_mm": (0.0, 1.5),
}
"""Every anatomy range (mm, degrees, fractions); the dataset README prints this table."""


@dataclass
class Anatomy:
    """Geometric and tissue-map parameters of one subject (mm, degrees)."""

    source: str
    held_out: bool
    scale: np.ndarray  # (3,) head scale per axis
    rotation_deg: np.ndarray  # (3,)
    shift_mm: np.ndarray  # (3,) brain position in the output frame; z is set by place_brain
    top_margin_mm: float
    warp_rms_mm: float
    fine_warp_rms_mm: float
    ventricle_expansion: float
    gamma: float
    perturbation: float
    cortical_texture: float
    mask_offset_mm: float
    mask_ragged_mm: float
    warp: SmoothField
    fine_warp: SmoothField
    tissue_noise: SmoothField
    texture_noise: SmoothField
    edge_noise: SmoothField

    @property
    def matrix(self) -> np.ndarray:
        """Output-world -> source-world linear part (rotation then inverse scale)."""
        return np.diag(1.0 / self.scale) @ rotation(self.rotation_deg).T

    def describe(self) -> dict:
        keys = ("source", "scale", "rotation_deg", "shift_mm", "top_margin_mm", "warp_rms_mm", "fine_warp_rms_mm",
                "ventricle_expansion", "gamma", "perturbation", "cortical_texture", "mask_offset_mm", "mask_ragged_mm")
        return {**{k: getattr(self, k) for k in keys}, "source_flipped_lr": bool(self.held_out)}


def draw_anatomy(rng: np.random.Generator, source: str, held_out: bool) -> Anatomy:
    """Draw the geometry of one subject; ``held_out`` selects the held-out anatomy ranges."""
    r = RANGES
    low, high = -FOV_MM / 2, FOV_MM / 2
    tpl = load_source(source)
    volume_l = float(tpl.maps[2].sum()) * tpl.voxel_mm**3 / 1e6
    aniso = r["anisotropy_held_out"] if held_out else r["anisotropy"]
    scale = rng.uniform(*r["head_scale"]) * (1.0 + rng.uniform(-1, 1, 3) * aniso)
    scale *= (_REFERENCE_BRAIN_L / volume_l) ** (1.0 / 3.0)
    rotation_deg = rng.uniform(-1, 1,
                               3) * np.array(r["rotation_deg"]) * (r["rotation_held_out_factor"] if held_out else 1.0)
    shift = np.array([*rng.uniform(*r["shift_xy_mm"], 2), 0.0])
    top_margin = rng.uniform(*r["top_margin_mm"])
    warp_rms = rng.uniform(*r["warp_rms_held_out_mm"]) if held_out else rng.uniform(*r["warp_rms_mm"])
    fine_rms = rng.uniform(*r["fine_warp_rms_held_out_mm"]) if held_out else 0.0
    expansion = rng.uniform(*(r["ventricle_expansion_held_out"] if held_out else r["ventricle_expansion"]))
    return Anatomy(
        source=source,
        held_out=held_out,
        scale=scale,
        rotation_deg=rotation_deg,
        shift_mm=shift,
        top_margin_mm=top_margin,
        warp_rms_mm=warp_rms,
        fine_warp_rms_mm=fine_rms,
        ventricle_expansion=expansion,
        gamma=rng.uniform(*r["tissue_gamma"]),
        perturbation=rng.uniform(*r["tissue_perturbation"]),
        cortical_texture=rng.uniform(*r["cortical_texture"]),
        mask_offset_mm=rng.uniform(*r["mask_offset_mm"]),
        mask_ragged_mm=rng.uniform(*r["mask_ragged_mm"]),
        warp=SmoothField(rng, low, high, 40.0, n_fields=3),
        fine_warp=SmoothField(rng, low, high, 20.0, n_fields=3),
        tissue_noise=SmoothField(rng, low, high, 15.0, n_fields=3),
        texture_noise=SmoothField(rng, low, high, 3.0, n_fields=1),
        edge_noise=SmoothField(rng, low, high, 6.0, n_fields=1),
    )


def sample_source(axes, anatomy: Anatomy, maps: np.ndarray, tumour=None) -> np.ndarray:
    """Resample the source ``maps (C, ...)`` on the grid ``axes`` (world mm per axis) through the
    subject's pull-back map; ``tumour`` (a ``TumourShape`` with a centre) adds its mass effect.
    Returns ``(C, X, Y, Z)`` float32."""
    tpl = load_source(anatomy.source)
    shape = tuple(len(a) for a in axes)
    y = np.empty((3, *shape))
    y[0], y[1], y[2] = np.meshgrid(*axes, indexing="ij", copy=False)
    if tumour is not None and tumour.centre is not None and tumour.mass_effect > 0:
        d = y - tumour.centre[:, None, None, None]
        radius = 1.2 * tumour.r_core + 4.0
        y -= tumour.mass_effect * d * np.exp(-0.5 * (d**2).sum(0) / radius**2)[None]
    # similarity about the brain: source point = anchor + M (y - shift); the smooth warps are
    # attached to the brain (evaluated at y - shift)
    shift = anatomy.shift_mm
    anchor = np.array([tpl.centre_xy[0], tpl.centre_xy[1], tpl.top_z - _ANCHOR_BELOW_TOP_MM])
    x = np.einsum("ab,b...->a...", anatomy.matrix, y - shift[:, None, None, None])
    x += anchor[:, None, None, None]
    brain_axes = [axes[a] - shift[a] for a in range(3)]
    x += anatomy.warp_rms_mm / math.sqrt(3.0) * anatomy.warp(*brain_axes)
    if anatomy.fine_warp_rms_mm > 0:
        x += anatomy.fine_warp_rms_mm / math.sqrt(3.0) * anatomy.fine_warp(*brain_axes)
    if anatomy.ventricle_expansion > 0:
        d = x - tpl.ventricle_centre[:, None, None, None]
        x -= anatomy.ventricle_expansion * d * np.exp(-0.5 * (d**2).sum(0) / 30.0**2)[None]
    if anatomy.held_out:
        x[0] = 2.0 * tpl.centre_xy[0] - x[0]  # left/right flip about the source's mid-sagittal plane
    inv = tpl.world_to_voxel
    vox = np.einsum("ab,b...->a...", inv[:3, :3], x) + inv[:3, 3][:, None, None, None]
    out = np.empty((maps.shape[0], *shape), dtype=np.float32)
    for c in range(maps.shape[0]):
        ndimage.map_coordinates(maps[c], vox, output=out[c], order=1, mode="constant", cval=0.0)
    return out


def place_brain(anatomy: Anatomy) -> None:
    """Set ``anatomy.shift_mm[2]`` so the top of the warped brain lies ``top_margin_mm`` below the
    top of the field of view (measured on a 4 mm probe grid, interpolated to sub-mm)."""
    anatomy.shift_mm[2] = 0.0
    probe_fov = FOV_MM + 80.0
    shape = tuple(int(round(f / COARSE_MM)) for f in probe_fov)
    axes = grid_axes(shape, COARSE_MM)
    mask = sample_source(axes, anatomy, source_maps(anatomy.source, COARSE_MM / 2)[2:])[0]
    profile = mask.max(axis=(0, 1))
    k = int(np.flatnonzero(profile >= 0.5).max())
    top = axes[2][k]
    if k + 1 < len(profile):
        top += COARSE_MM * (profile[k] - 0.5) / max(profile[k] - profile[k + 1], 1e-6)
    anatomy.shift_mm[2] = FOV_MM[2] / 2 - anatomy.top_margin_mm - top


def strip_edge(mask_prob: np.ndarray, axes, spacing: float, anatomy: Anatomy) -> np.ndarray:
    """The skull-stripped brain mask: ``mask_prob >= 0.5`` eroded / dilated by the subject's
    offset and made ragged by its edge field (see the module docstring)."""
    brain = mask_prob >= 0.5
    outside = ndimage.distance_transform_edt(~brain) * spacing
    inside = ndimage.distance_transform_edt(brain) * spacing
    signed = np.where(brain, 0.5 * spacing - inside, outside - 0.5 * spacing)  # boundary at 0
    threshold = anatomy.mask_offset_mm + anatomy.mask_ragged_mm * anatomy.edge_noise(*axes)[0]
    return signed < threshold


def tissue_maps(gm: np.ndarray, wm: np.ndarray, brain: np.ndarray, axes, anatomy: Anatomy) -> np.ndarray:
    """WM, GM, CSF fractions ``(3, X, Y, Z)`` (sum 1 inside ``brain``, 0 outside) from the warped
    source maps: sharpening, smooth perturbation and fine cortical texture."""
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    normal = np.power(np.clip(np.stack([wm, gm, csf]), 0.0, 1.0), anatomy.gamma)
    normal *= np.exp(anatomy.perturbation * anatomy.tissue_noise(*axes)).astype(np.float32)
    if anatomy.cortical_texture > 0:
        fine = np.clip(anatomy.texture_noise(*axes)[0], -3.0, 3.0).astype(np.float32)
        normal[0] *= np.exp(anatomy.cortical_texture * fine)
        normal[1] *= np.exp(-anatomy.cortical_texture * fine)
    normal /= np.maximum(normal.sum(0, keepdims=True), 1e-6)
    normal *= brain[None]
    return normal.astype(np.float32)
