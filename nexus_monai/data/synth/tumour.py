"""Tumour: a glioma-like lesion with oedema, enhancing rim and necrotic core (BraTS labels).

Every subject has one. A centre is drawn among voxels that are mostly white matter (WM fraction >= 0.5) and at least
15 mm deep inside the brain (4 mm probe grid, so ``small`` and ``full`` agree). Three nested,
star-shaped compartments are the insides of ``|x - c| < R (1 + a n(direction))``, ``n`` a smooth
unit-variance random field read on the sphere of radius ``R`` (lobes ~R/2 wide, ``a`` 0.12-0.35):
oedema (label 2, R 15-34 mm, pushed outwards along white matter, with finger-like 6 mm-scale
irregularity, a boundary fading over 3-8 mm, densest next to the core, kept out of CSF-filled
spaces), tumour core (R 0.4-0.7 of the oedema radius, >= 8 mm) whose necrotic centre (label 1,
R 0.5-0.8 of the core radius, >= 3 mm inside it) is surrounded by an enhancing rim (label 4).
Compartment fractions (a one-voxel partial-volume ramp at core boundaries) replace the normal
tissue fractions; the label map is the compartment whose fraction passes 0.5. Lesion signal
carries a 4-10 % smooth texture (PD-like, ~4 mm grain), and the tumour pushes the surrounding
anatomy away (mass effect, 10-35 % radial expansion near the centre).

"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from nexus_monai.data.synth.anatomy import Anatomy, sample_source
from nexus_monai.data.synth.grid import COARSE_MM, FOV_MM, SmoothField, grid_axes
from nexus_monai.data.synth.sources import source_maps

__all__ = ["TumourShape", "draw_tumour_shape", "draw_tumour_fields", "choose_tumour_centre", "tumour_fractions",
           "TUMOUR_COMPARTMENTS"]

TUMOUR_COMPARTMENTS = ("oedema", "necrosis", "enhancing")


@dataclass
class TumourShape:
    """Tumour geometry: radii in mm, irregularity amplitudes, centre chosen later (world mm)."""

    r_oedema: float
    r_core: float
    r_necrosis: float
    irregularity: np.ndarray  # (3,) amplitudes for oedema, core, necrosis
    wm_affinity: float
    mass_effect: float
    oedema_grading: float
    oedema_edge_mm: float  # width of the oedema's fading boundary
    finger_amplitude: float  # fine (6 mm) irregularity of the oedema boundary
    texture: float
    centre: np.ndarray | None = None
    shape_noise: list[SmoothField] | None = None  # oedema, core, necrosis boundaries
    texture_noise: SmoothField | None = None  # intensity heterogeneity of the lesion

    @property
    def reach_mm(self) -> float:
        """Largest possible distance of lesion tissue from the centre (mm): radial modulation
        ``1 + 2 a``, white-matter push ``b / 2``, fine irregularity ``3 a_f``, fading edge."""
        push = 1.0 + 0.5 * self.wm_affinity + 3.0 * self.finger_amplitude
        return self.r_oedema * (1.0 + 2.0 * float(self.irregularity[0])) * push + self.oedema_edge_mm


def draw_tumour_shape(rng: np.random.Generator) -> TumourShape:
    """Draw tumour radii (mm) and shape parameters; the centre is chosen once the anatomy exists."""
    r_oedema = rng.uniform(15.0, 34.0)
    r_core = max(8.0, rng.uniform(0.4, 0.7) * r_oedema)
    r_necrosis = min(max(3.0, rng.uniform(0.5, 0.8) * r_core), r_core - 3.0)
    return TumourShape(
        r_oedema=r_oedema,
        r_core=r_core,
        r_necrosis=r_necrosis,
        irregularity=np.array([rng.uniform(0.15, 0.35), rng.uniform(0.12, 0.30), rng.uniform(0.12, 0.30)]),
        wm_affinity=rng.uniform(0.3, 0.7),
        mass_effect=rng.uniform(0.10, 0.35),
        oedema_grading=rng.uniform(0.2, 0.45),
        oedema_edge_mm=rng.uniform(3.0, 8.0),
        finger_amplitude=rng.uniform(0.08, 0.18),
        texture=rng.uniform(0.04, 0.10),
    )


def draw_tumour_fields(rng: np.random.Generator, tumour: TumourShape) -> None:
    """Shape fields (correlation ~ half of each compartment radius) and a 4 mm texture field,
    on a box around the chosen centre (sizes in mm: independent of the output grid)."""
    reach = tumour.reach_mm + 10.0
    low, high = tumour.centre - reach, tumour.centre + reach
    tumour.shape_noise = [
        SmoothField(rng, low, high, max(radius / ratio, 3.0))
        for radius, ratio in ((tumour.r_oedema, 2.5), (tumour.r_core, 2.0), (tumour.r_necrosis, 1.5))
    ]
    tumour.shape_noise.append(SmoothField(rng, low, high, 6.0))  # finger-like oedema extensions
    tumour.texture_noise = SmoothField(rng, low, high, 4.0)


def choose_tumour_centre(rng, anatomy: Anatomy, tumour: TumourShape) -> np.ndarray:
    """Pick a centre (world mm) in mostly-WM brain >= 15 mm deep, on a 4 mm grid (size-independent)."""
    shape = tuple(int(round(f / COARSE_MM)) for f in FOV_MM)
    axes = grid_axes(shape, COARSE_MM)
    gm, wm, mask = sample_source(axes, anatomy, source_maps(anatomy.source, COARSE_MM / 2))
    brain = mask >= 0.5
    depth = ndimage.distance_transform_edt(brain) * COARSE_MM
    z_ok = (axes[2] > axes[2][0] + 25.0)[None, None, :]
    for min_wm, min_depth in ((0.5, 15.0), (0.3, 10.0), (0.0, 5.0)):
        candidates = np.flatnonzero((wm >= min_wm * np.maximum(mask, 1e-6)) & (depth >= min_depth) & brain & z_ok)
        if candidates.size:
            break
    else:  # pragma: no cover - the template always has deep white matter
        raise RuntimeError("no voxel can host the simulated tumour")
    idx = np.unravel_index(candidates[rng.integers(candidates.size)], shape)
    jitter = rng.uniform(-COARSE_MM / 2, COARSE_MM / 2, 3)
    return np.array([axes[a][idx[a]] for a in range(3)]) + jitter


def _ramp(level: np.ndarray, radius: float, width: float) -> np.ndarray:
    """Partial-volume fraction of the inside of ``level < 1`` (distance scale ``radius`` mm),
    ramping linearly over ``width`` mm across the boundary."""
    return np.clip((1.0 - level) * radius / width + 0.5, 0.0, 1.0)


_SPHERE_GRID = (37, 72)  # (polar, azimuth) samples of the radial shape functions


def _radial_factor(field: SmoothField, centre: np.ndarray, radius: float, amplitude: float, offsets) -> np.ndarray:
    """Star-shaped boundary modulation ``1 + amplitude * clip(n(direction), -2, 2)``.

    ``n`` is the smooth field sampled on the sphere of ``radius`` mm around ``centre`` (so lobes
    are ~ correlation length wide) and looked up by each voxel's direction; ``offsets`` are the
    voxel offsets from the centre (three broadcastable arrays, mm)."""
    n_pol, n_az = _SPHERE_GRID
    polar = np.linspace(0.0, np.pi, n_pol)
    azimuth = np.linspace(-np.pi, np.pi, n_az + 1)  # last column repeats the first (wrap)
    pp, aa = np.meshgrid(polar, azimuth, indexing="ij")
    points = centre + radius * np.stack([np.sin(pp) * np.cos(aa), np.sin(pp) * np.sin(aa), np.cos(pp)], -1).reshape(-1,
                                                                                                                    3)
    table = 1.0 + amplitude * np.clip(field.at(points)[0].reshape(pp.shape), -2.0, 2.0)
    dx, dy, dz = np.broadcast_arrays(*offsets)
    dist = np.sqrt(dx**2 + dy**2 + dz**2)
    pol_idx = np.arccos(np.clip(dz / np.maximum(dist, 1e-9), -1.0, 1.0)) / np.pi * (n_pol - 1)
    az_idx = (np.arctan2(dy, dx) + np.pi) / (2 * np.pi) * n_az
    return ndimage.map_coordinates(table, [pol_idx, az_idx], order=1, mode="nearest")


def tumour_fractions(axes, tumour: TumourShape, wm: np.ndarray, csf: np.ndarray, brain: np.ndarray, spacing: float):
    """Oedema / enhancing / necrosis fractions and a lesion texture factor on a bounding box.

    Each compartment is the inside of ``|x - c| < R_k(direction)`` (star-shaped, lobulated); the
    oedema boundary is further pushed along white matter. Returns ``(slices, fractions,
    texture)``: fractions and texture cover ``slices`` of the output grid."""
    c = tumour.centre
    reach = tumour.reach_mm + 2 * spacing
    sl = []
    for a in range(3):
        lo = int(np.searchsorted(axes[a], c[a] - reach))
        hi = int(np.searchsorted(axes[a], c[a] + reach, side="right"))
        sl.append(slice(max(lo, 0), min(hi, len(axes[a]))))
    sl = tuple(sl)
    sub = [axes[a][sl[a]] for a in range(3)]
    offsets = ((sub[0] - c[0])[:, None, None], (sub[1] - c[1])[None, :, None], (sub[2] - c[2])[None, None, :])
    dist = np.sqrt(offsets[0] ** 2 + offsets[1] ** 2 + offsets[2] ** 2)
    radii = (tumour.r_oedema, tumour.r_core, tumour.r_necrosis)
    levels = [
        dist / (radius * _radial_factor(fld, c, radius, amp, offsets))
        for fld, radius, amp in zip(tumour.shape_noise[:3], radii, tumour.irregularity)
    ]
    fingers = np.clip(tumour.shape_noise[3](*sub)[0], -3.0, 3.0)
    level_ed = levels[0] - tumour.wm_affinity * (wm[sl] - 0.5) - tumour.finger_amplitude * fingers
    oedema = _ramp(level_ed, tumour.r_oedema, max(spacing, tumour.oedema_edge_mm))
    # oedema is densest next to the core and fades towards its edge (mixes with normal tissue)
    oedema *= 1.0 - tumour.oedema_grading * np.clip(level_ed, 0.0, 1.0)
    oedema *= np.clip((0.6 - csf[sl]) / 0.2, 0.0, 1.0)  # oedema stays out of CSF-filled spaces
    core = _ramp(levels[1], tumour.r_core, spacing)
    necrosis = _ramp(levels[2], tumour.r_necrosis, spacing)
    outer = np.maximum(oedema, core) * brain[sl]
    core = np.minimum(core, outer)
    necrosis = np.minimum(necrosis, core)
    fractions = {
        "oedema": (outer - core).astype(np.float32),
        "enhancing": (core - necrosis).astype(np.float32),
        "necrosis": necrosis.astype(np.float32),
    }
    texture = (1.0 + tumour.texture * tumour.texture_noise(*sub)[0]).astype(np.float32)
    return sl, fractions, texture
