"""The embedded synthetic BraTS-format dataset, simulated from the MNI152 2009 anatomy.

No patient data: every subject is SIMULATED from the ICBM 2009a symmetric MNI152 template that
ships inside the ``nilearn`` wheel (1 mm grey-matter and white-matter probability maps and the
template brain mask; CSF = brain mask - GM - WM, clipped at 0). Loading it needs no network.

Per subject ``i`` (1-based) of a run with ``seed``, everything is drawn from
``numpy.random.default_rng([seed, i])`` (the train/val/test split from ``default_rng([seed, 0])``),
so a run is byte-for-byte reproducible (same software stack) and the ``small`` and ``full``
versions of one subject share their anatomy, tumour and sequence parameters.

Geometry (all lengths in mm, world frame RAS as nibabel reads it)
-----------------------------------------------------------------
The output frame is the BraTS one: ``full`` = 240 x 240 x 155 voxels of 1 mm, ``small`` =
120 x 120 x 78 voxels of 2 mm covering the same field of view. The affine is a plain diagonal
(``diag(s, s, s)``) whose translation puts the centre of the field of view at world (0, 0, 0),
i.e. near the centre of the brain, as in BraTS. A world point ``y`` of the output frame is
pulled back into the template by

1. a tumour mass effect ``y' = y - a (y - c) exp(-|y - c|^2 / 2 r^2)`` (tissue pushed away from
   the tumour centre ``c``),
2. a similarity transform: rotation of a few degrees (up to 5 deg, 7.5 deg held out), head
   scale 0.88-1.05 (the MNI152 brain is larger than a typical native brain: its mask holds
   1.88 L, so this gives 1.3-2.3 L inside the mask; per-axis anisotropy +-2 %, +-6 % held out),
   translation of +-5 mm in x and y, and z such that the brain top lies 6-12 mm below the top
   of the field of view (measured on a probe grid after warping),
3. a smooth random displacement field (Gaussian radial-basis coefficients on a coarse control
   grid, evaluated separably on the output grid; amplitude drawn per subject),
4. a ventricular enlargement (radial expansion around the lateral ventricles; 0-6 % for
   training, 15-30 % held out) and, for held-out subjects only, a second, finer displacement
   field and a left/right flip of the template.

The tissue maps are resampled through this map with ``scipy.ndimage.map_coordinates``
(order 1) directly at the output resolution; for 2 mm output the 1 mm maps are first smoothed
with a Gaussian of FWHM sqrt(2^2 - 1^2) = 1.7 mm (sigma 0.74 mm; 1 mm maps taken as ~1 mm
resolution, so the result has ~2 mm resolution) to avoid aliasing. The maps are then sharpened by
a power ``gamma`` in [1, 2] and perturbed by smooth multiplicative fields (5-15 %), then
renormalised to sum to 1 inside the brain mask.

Held-out anatomy. Validation and test subjects (chosen before any subject is generated) get
anatomy from a range training never sees: displacement amplitude 3.5-5 mm RMS (training
0.8-3 mm) plus a 20 mm-scale field, ventricular enlargement 15-30 % (training 0-6 %),
anisotropic scaling up to +-6 % (training +-2 %). They also use the left/right-flipped template;
note that the nilearn MNI152 2009a template is *exactly* symmetric, so that flip alone changes
nothing here — the held-out difference comes from the other changes, which are asymmetric.

Tumour (every subject)
----------------------
A centre is drawn among voxels that are mostly white matter (WM fraction >= 0.5) and at least
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

Contrast (MR physics)
---------------------
Every voxel signal is the partial-volume sum over compartments ``k`` of fraction ``f_k`` times
the compartment signal, computed from its proton density PD, T1 and T2 (ms) by

* T1w, T1ce, T2w spin echo (TE << TR): ``S = PD (1 - exp(-TR/T1)) exp(-TE/T2)``,
* FLAIR inversion recovery (magnitude of the signed partial-volume sum):
  ``S = PD (1 - 2 exp(-TI/T1) + exp(-TR/T1)) exp(-TE/T2)``,
* gadolinium for T1ce: ``1/T1 = 1/T1_0 + r1 C``, ``1/T2 = 1/T2_0 + r2 C`` with
  r1 = 4.0 and r2 = 5.0 L mmol^-1 s^-1 (order of clinical agents at 3 T, Rohrer et al.,
  Invest Radiol 2005;40:715) and tissue concentration C (mM) per compartment.

Relaxation parameters at 3 T (nominal values; each subject multiplies T1 and T2 by U(0.9, 1.1)
for normal tissue and U(0.85, 1.15) for lesion compartments, PD by U(0.95, 1.05)):

===================  =======  =======  =====  ==================
compartment          T1 (ms)  T2 (ms)  PD     Gd C (mM), T1ce
===================  =======  =======  =====  ==================
white matter           832       80    0.69   0.01 (blood pool)
grey matter           1331      110    0.80   0.02 (blood pool)
CSF                   4000     2000    1.00   0
oedema (2)            1700      210    0.86   0.00-0.03 (leakage)
necrosis (1)          2600      330    0.94   0
enhancing tumour (4)  1600      130    0.84   0.10-0.30
===================  =======  =======  =====  ==================

Sources: WM/GM T1 and T2 from Wansapura et al., J Magn Reson Imaging 1999;9:531-538 (3 T);
CSF taken as nearly free water (T1 ~ 4 s at 3 T, e.g. Rooney et al., Magn Reson Med
2007;57:308-318; T2 ~ 2 s); PD as relative water content (WM ~0.69, GM ~0.80, e.g. Neeb et al.,
NeuroImage 2006). Lesion values are representative approximations chosen inside the ranges
reported by quantitative glioma MRI (oedema and necrosis: long T1/T2, raised water content;
enhancing tumour: Gd shortening T1 by several hundred ms, e.g. a pre-minus-post T1 difference of
~840 ms in enhancing glioblastoma, Müller et al., Cancer Med 2020) — they are not measurements.

Sequences (per subject, uniform in the range): T1w/T1ce spin echo TR 450-600, TE 8-15; T2w
TR 4000-6000, TE 90-110; FLAIR TR 8000-10000, TE 100-125, TI = the CSF null time for the nominal
CSF T1 at that TR, times U(0.97, 1.03).

Artefacts: a smooth multiplicative bias field ``exp(b)``, ``b`` of 5-10 % standard deviation
(+-10-20 % at two sigma), shared by the four scans plus a smaller per-scan part; Rician noise
``|S + sigma (n1 + i n2)|`` with sigma 1-3.5 % of the white-matter signal; a per-scan gain
(arbitrary scanner units, ~1000 x signal). Outside the brain mask the images are exactly 0
(skull-stripped, as BraTS); inside they are floored at a small positive value so that
``image > 0`` recovers the brain mask.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from nexus_monai import __version__ as _PACKAGE_VERSION
from nexus_monai.data.brats import DEFAULT_PROPORTIONS, split_counts
from nexus_monai.data.io import save_volume, write_text_atomic
from nexus_monai.errors import NexusInputError
from nexus_monai.evaluation.panels import to_uint8
from nexus_monai.metrics.image_quality import intensity_scale

__all__ = [
    "generate_dataset",
    "simulate_subject",
    "split_subjects",
    "SimulatedSubject",
    "TISSUE_PROPERTIES",
    "SIZES",
    "GENERATOR_VERSION",
    "MODALITIES",
    "output_affine",
]

GENERATOR_VERSION = "1.0.0"
"""Version of the simulation recipe; bump when the same arguments would give different data."""

MODALITIES = ("t1", "t1ce", "t2", "flair")
"""The four BraTS 2020 scans written per subject (plus ``seg``)."""

SIZES: dict[str, tuple[tuple[int, int, int], float]] = {
    "full": ((240, 240, 155), 1.0),
    "small": ((120, 120, 78), 2.0),
}
"""Output grid per size: (shape in voxels, isotropic spacing in mm)."""

SPLIT_PROPORTIONS = DEFAULT_PROPORTIONS
"""Training / validation / test proportions (the paper's 48/10/15 of 73 BraTS subjects)."""

_README_FIRST_LINE = "nexus_monai SYNTHETIC BraTS-format dataset (SIMULATED from MNI152 2009, not patient data)"
_SUBJECT_RE = re.compile(r"^SynBraTS_\d{4,}$")
_FOV_MM = np.array([240.0, 240.0, 155.0])  # field of view shared by both sizes (BraTS frame)
_COARSE_MM = 4.0  # grid used to choose the tumour position (same for both sizes)
_ANCHOR_BELOW_TOP_MM = 70.0  # template point put at the output origin before the shift
_MIN_TISSUE = 1e-3  # floor (in units of the per-scan gain) for image values inside the brain


@dataclass(frozen=True)
class Tissue:
    """Nominal 3 T relaxation parameters of one compartment: T1, T2 in ms, PD relative to water,
    gadolinium concentration ``gd_mM`` range (mM) used for T1ce."""

    t1_ms: float
    t2_ms: float
    pd: float
    gd_mM: tuple[float, float]


TISSUE_PROPERTIES: dict[str, Tissue] = {
    "wm": Tissue(832.0, 80.0, 0.69, (0.01, 0.01)),
    "gm": Tissue(1331.0, 110.0, 0.80, (0.02, 0.02)),
    "csf": Tissue(4000.0, 2000.0, 1.00, (0.0, 0.0)),
    "oedema": Tissue(1700.0, 210.0, 0.86, (0.0, 0.03)),
    "necrosis": Tissue(2600.0, 330.0, 0.94, (0.0, 0.0)),
    "enhancing": Tissue(1600.0, 130.0, 0.84, (0.10, 0.30)),
}
"""Compartment table (see the module docstring for sources). Keys are the compartment names."""

_LESION = ("oedema", "necrosis", "enhancing")
_GD_R1_PER_MM_MS = 4.0e-3  # 4.0 L/mmol/s  = 4.0e-3 per mM per ms
_GD_R2_PER_MM_MS = 5.0e-3


# ----------------------------------------------------------------------------------------
# Template (MNI152 2009a, 1 mm, from the nilearn wheel)
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Template:
    """Template maps ``(197, 233, 189)`` float32 on a 1 mm grid whose voxel ``v`` is at world
    ``origin + v`` (mm). ``maps`` stacks GM, WM, brain mask."""

    maps: np.ndarray
    origin: np.ndarray
    ventricle_centre: np.ndarray  # world mm, CSF-weighted centre of the lateral ventricles
    top_z: float  # world z (mm) of the highest brain voxel
    centre_xy: np.ndarray  # world (x, y) mm of the brain bounding-box centre


@functools.lru_cache(maxsize=1)
def _load_template() -> _Template:
    from nilearn import datasets  # imported lazily: slow import, only needed here

    images = [
        datasets.load_mni152_gm_template(resolution=1),
        datasets.load_mni152_wm_template(resolution=1),
        datasets.load_mni152_brain_mask(resolution=1),
    ]
    affine = np.asarray(images[0].affine, dtype=np.float64)
    if not np.allclose(affine[:3, :3], np.eye(3)):
        raise RuntimeError("unexpected MNI152 template affine (expected 1 mm RAS diagonal)")
    maps = np.stack([np.asarray(img.dataobj, dtype=np.float32) for img in images])
    gm, wm, mask = maps
    gm *= mask
    wm *= mask
    origin = affine[:3, 3].copy()
    world = [origin[a] + np.arange(maps.shape[1 + a]) for a in range(3)]
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    box = (
        (np.abs(world[0]) < 25)[:, None, None]
        & ((world[1] > -45) & (world[1] < 15))[None, :, None]
        & ((world[2] > -5) & (world[2] < 35))[None, None, :]
    )
    weight = np.where(box & (csf > 0.5), csf, 0.0)
    total = weight.sum()
    ventricle = np.array(
        [
            (weight.sum(axis=(1, 2)) * world[0]).sum() / total,
            (weight.sum(axis=(0, 2)) * world[1]).sum() / total,
            (weight.sum(axis=(0, 1)) * world[2]).sum() / total,
        ]
    )
    inside = mask > 0.5
    span = [world[a][np.flatnonzero(inside.any(axis=tuple(b for b in range(3) if b != a)))] for a in range(3)]
    return _Template(
        maps=maps,
        origin=origin,
        ventricle_centre=ventricle,
        top_z=float(span[2].max()),
        centre_xy=np.array([(span[0].min() + span[0].max()) / 2, (span[1].min() + span[1].max()) / 2]),
    )


@functools.lru_cache(maxsize=2)
def _template_maps(spacing_mm: float) -> np.ndarray:
    """GM/WM/mask maps ``(3, 197, 233, 189)`` pre-smoothed for sampling at ``spacing_mm``."""
    maps = _load_template().maps
    if spacing_mm <= 1.0:
        return maps
    fwhm_sq = spacing_mm**2 - 1.0  # bring the 1 mm maps to a FWHM of ``spacing_mm``
    sigma = math.sqrt(fwhm_sq) / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    return np.stack([ndimage.gaussian_filter(m, sigma, mode="constant", truncate=3.0) for m in maps])


# ----------------------------------------------------------------------------------------
# Smooth random fields
# ----------------------------------------------------------------------------------------


class _SmoothField:
    """Unit-variance smooth random field(s) on a box, from Gaussian radial-basis functions.

    Control points every ``corr_mm`` over ``[low - corr, high + corr]`` per axis carry i.i.d.
    N(0, 1) coefficients; the basis is separable and row-normalised so the field has variance 1
    everywhere. Coefficients are drawn at construction (their number depends only on the box in
    mm), so the same draw evaluated on a 1 mm or 2 mm grid gives the same field.
    """

    def __init__(self, rng: np.random.Generator, low, high, corr_mm: float, n_fields: int = 1):
        self.corr = float(corr_mm)
        self.points = []
        for lo, hi in zip(np.asarray(low, float), np.asarray(high, float)):
            n = int(math.ceil((hi - lo) / self.corr)) + 3
            self.points.append(lo - self.corr + self.corr * np.arange(n))
        self.coef = rng.standard_normal((n_fields, *(len(p) for p in self.points)))

    def _basis(self, axis: int, coords: np.ndarray) -> np.ndarray:
        diff = np.asarray(coords, float)[:, None] - self.points[axis][None, :]
        basis = np.exp(-0.5 * (diff / self.corr) ** 2)
        return basis / np.sqrt((basis**2).sum(axis=1, keepdims=True))

    def at(self, points: np.ndarray) -> np.ndarray:
        """Evaluate at scattered world points ``(N, 3)`` (mm): ``(n_fields, N)``."""
        bx, by, bz = (self._basis(a, points[:, a]) for a in range(3))
        out = np.einsum("nabc,pa->npbc", self.coef, bx, optimize=True)
        out = np.einsum("npbc,pb->npc", out, by, optimize=True)
        return np.einsum("npc,pc->np", out, bz, optimize=True)

    def __call__(self, ax: np.ndarray, ay: np.ndarray, az: np.ndarray) -> np.ndarray:
        """Evaluate on the grid ``ax x ay x az`` (world mm per axis): ``(n_fields, X, Y, Z)``."""
        bx, by, bz = self._basis(0, ax), self._basis(1, ay), self._basis(2, az)
        out = np.empty((self.coef.shape[0], len(bx), len(by), len(bz)))
        for n, coef in enumerate(self.coef):
            part = np.tensordot(bx, coef, axes=([1], [0]))  # (X, b, c)
            part = np.tensordot(part, by, axes=([1], [1]))  # (X, c, Y)
            out[n] = np.tensordot(part, bz, axes=([1], [1]))  # (X, Y, Z)
        return out


# ----------------------------------------------------------------------------------------
# Per-subject parameters
# ----------------------------------------------------------------------------------------


def _rotation(angles_deg) -> np.ndarray:
    """3 x 3 rotation ``Rz Ry Rx`` from angles (degrees) about x, y, z."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass
class _Anatomy:
    """Geometric parameters of one subject (mm, degrees)."""

    held_out: bool
    scale: np.ndarray  # (3,) head scale per axis
    rotation_deg: np.ndarray  # (3,)
    shift_mm: np.ndarray  # (3,) brain position in the output frame; z is set by _place_brain
    top_margin_mm: float
    warp_rms_mm: float
    fine_warp_rms_mm: float
    ventricle_expansion: float
    gamma: float
    perturbation: float
    warp: _SmoothField
    fine_warp: _SmoothField
    tissue_noise: _SmoothField

    @property
    def matrix(self) -> np.ndarray:
        """Output-world -> template-world linear part (rotation then inverse scale)."""
        return np.diag(1.0 / self.scale) @ _rotation(self.rotation_deg).T


def _draw_anatomy(rng: np.random.Generator, held_out: bool) -> _Anatomy:
    """Draw the geometry of one subject; ``held_out`` selects the held-out anatomy ranges."""
    low, high = -_FOV_MM / 2, _FOV_MM / 2
    scale = rng.uniform(0.88, 1.05) * (1.0 + rng.uniform(-1, 1, 3) * (0.06 if held_out else 0.02))
    rotation = rng.uniform(-1, 1, 3) * np.array([5.0, 3.0, 4.0]) * (1.5 if held_out else 1.0)
    shift = np.array([*rng.uniform(-5.0, 5.0, 2), 0.0])
    top_margin = rng.uniform(6.0, 12.0)
    warp_rms = rng.uniform(3.5, 5.0) if held_out else rng.uniform(0.8, 3.0)
    fine_rms = rng.uniform(1.0, 2.0) if held_out else 0.0
    expansion = rng.uniform(0.15, 0.30) if held_out else rng.uniform(0.0, 0.06)
    gamma = rng.uniform(1.0, 2.0)
    perturbation = rng.uniform(0.05, 0.15)
    warp = _SmoothField(rng, low, high, 40.0, n_fields=3)
    fine = _SmoothField(rng, low, high, 20.0, n_fields=3)
    tissue_noise = _SmoothField(rng, low, high, 15.0, n_fields=3)
    return _Anatomy(
        held_out, scale, rotation, shift, top_margin, warp_rms, fine_rms, expansion, gamma, perturbation,
        warp, fine, tissue_noise,
    )


@dataclass
class _TumourShape:
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
    shape_noise: list[_SmoothField] | None = None  # oedema, core, necrosis boundaries
    texture_noise: _SmoothField | None = None  # intensity heterogeneity of the lesion

    @property
    def reach_mm(self) -> float:
        """Largest possible distance of lesion tissue from the centre (mm): radial modulation
        ``1 + 2 a``, white-matter push ``b / 2``, fine irregularity ``3 a_f``, fading edge."""
        push = 1.0 + 0.5 * self.wm_affinity + 3.0 * self.finger_amplitude
        return self.r_oedema * (1.0 + 2.0 * float(self.irregularity[0])) * push + self.oedema_edge_mm


def _draw_tumour_shape(rng: np.random.Generator) -> _TumourShape:
    """Draw tumour radii (mm) and shape parameters; the centre is chosen once the anatomy exists."""
    r_oedema = rng.uniform(15.0, 34.0)
    r_core = max(8.0, rng.uniform(0.4, 0.7) * r_oedema)
    r_necrosis = min(max(3.0, rng.uniform(0.5, 0.8) * r_core), r_core - 3.0)
    return _TumourShape(
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


def _draw_tumour_fields(rng: np.random.Generator, tumour: _TumourShape) -> None:
    """Shape fields (correlation ~ half of each compartment radius) and a 4 mm texture field,
    on a box around the chosen centre (sizes in mm: independent of the output grid)."""
    reach = tumour.reach_mm + 10.0
    low, high = tumour.centre - reach, tumour.centre + reach
    tumour.shape_noise = [
        _SmoothField(rng, low, high, max(radius / ratio, 3.0))
        for radius, ratio in ((tumour.r_oedema, 2.5), (tumour.r_core, 2.0), (tumour.r_necrosis, 1.5))
    ]
    tumour.shape_noise.append(_SmoothField(rng, low, high, 6.0))  # finger-like oedema extensions
    tumour.texture_noise = _SmoothField(rng, low, high, 4.0)


@dataclass
class _Physics:
    """Relaxation table of one subject and its sequence timings (ms)."""

    tissues: dict[str, tuple[float, float, float, float]]  # name -> (T1, T2, PD, Gd mM)
    sequences: dict[str, dict[str, float]]  # modality -> {"TR","TE"[, "TI"]}


def _draw_physics(rng: np.random.Generator) -> _Physics:
    """Jitter the relaxation table and draw the sequence timings (ms) of one subject."""
    tissues = {}
    for name, nominal in TISSUE_PROPERTIES.items():
        spread = 0.15 if name in _LESION else 0.10
        tissues[name] = (
            nominal.t1_ms * rng.uniform(1 - spread, 1 + spread),
            nominal.t2_ms * rng.uniform(1 - spread, 1 + spread),
            nominal.pd * rng.uniform(0.95, 1.05),
            rng.uniform(*nominal.gd_mM),
        )
    t1_tr, t1_te = rng.uniform(450.0, 600.0), rng.uniform(8.0, 15.0)
    t2_tr, t2_te = rng.uniform(4000.0, 6000.0), rng.uniform(90.0, 110.0)
    fl_tr, fl_te = rng.uniform(8000.0, 10000.0), rng.uniform(100.0, 125.0)
    csf_t1 = TISSUE_PROPERTIES["csf"].t1_ms
    fl_ti = csf_t1 * math.log(2.0 / (1.0 + math.exp(-fl_tr / csf_t1))) * rng.uniform(0.97, 1.03)
    sequences = {
        "t1": {"TR": t1_tr, "TE": t1_te},
        "t1ce": {"TR": t1_tr, "TE": t1_te},
        "t2": {"TR": t2_tr, "TE": t2_te},
        "flair": {"TR": fl_tr, "TE": fl_te, "TI": fl_ti},
    }
    return _Physics(tissues, sequences)


def _compartment_signal(modality: str, physics: _Physics, name: str) -> float:
    """Signed signal of one pure compartment (PD units) for one scan."""
    t1, t2, pd, gd = physics.tissues[name]
    seq = physics.sequences[modality]
    if modality == "t1ce" and gd > 0:
        t1 = 1.0 / (1.0 / t1 + _GD_R1_PER_MM_MS * gd)
        t2 = 1.0 / (1.0 / t2 + _GD_R2_PER_MM_MS * gd)
    decay = math.exp(-seq["TE"] / t2)
    if modality == "flair":
        return pd * (1.0 - 2.0 * math.exp(-seq["TI"] / t1) + math.exp(-seq["TR"] / t1)) * decay
    return pd * (1.0 - math.exp(-seq["TR"] / t1)) * decay


# ----------------------------------------------------------------------------------------
# Geometry: output grid -> template
# ----------------------------------------------------------------------------------------


def _grid_axes(shape, spacing: float) -> list[np.ndarray]:
    """World coordinates (mm) of voxel centres per axis; the field of view is centred at 0."""
    return [(np.arange(n) - (n - 1) / 2.0) * spacing for n in shape]


def output_affine(size: str) -> np.ndarray:
    """The 4 x 4 RAS affine (mm) of the output grid of ``size``: diagonal, centred at world 0."""
    shape, spacing = SIZES[size]
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = [-(n - 1) / 2.0 * spacing for n in shape]
    return affine


def _sample_template(axes, anatomy: _Anatomy, maps: np.ndarray, tumour: _TumourShape | None) -> np.ndarray:
    """Resample the template ``maps (C, ...)`` on the grid ``axes`` (world mm per axis) through
    the subject's pull-back map; returns ``(C, X, Y, Z)`` float32."""
    tpl = _load_template()
    shape = tuple(len(a) for a in axes)
    y = np.empty((3, *shape))
    y[0], y[1], y[2] = np.meshgrid(*axes, indexing="ij", copy=False)
    if tumour is not None and tumour.centre is not None and tumour.mass_effect > 0:
        d = y - tumour.centre[:, None, None, None]
        radius = 1.2 * tumour.r_core + 4.0
        y -= tumour.mass_effect * d * np.exp(-0.5 * (d**2).sum(0) / radius**2)[None]
    # similarity about the brain: template point = anchor + M (y - shift); the smooth warps
    # are attached to the brain (evaluated at y - shift)
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
        x[0] = -x[0]  # left/right flip of the template (about its midline x = 0)
    x -= tpl.origin[:, None, None, None]  # world -> template voxel (1 mm, identity rotation)
    out = np.empty((maps.shape[0], *shape), dtype=np.float32)
    for c in range(maps.shape[0]):
        ndimage.map_coordinates(maps[c], x, output=out[c], order=1, mode="constant", cval=0.0)
    return out


# ----------------------------------------------------------------------------------------
# One subject
# ----------------------------------------------------------------------------------------


@dataclass
class SimulatedSubject:
    """One simulated subject on the output grid ``(X, Y, Z)``.

    ``images``: modality -> float32 volume (arbitrary scanner units, 0 outside the brain);
    ``seg``: uint8 labels {0, 1, 2, 4}; ``fractions``: compartment -> float32 volume fraction
    in [0, 1] (inside the brain the six fractions sum to 1); ``brain``: bool mask;
    ``affine``: 4 x 4 RAS (mm); ``parameters``: the drawn parameters (JSON-serialisable).
    """

    images: dict[str, np.ndarray]
    seg: np.ndarray
    fractions: dict[str, np.ndarray]
    brain: np.ndarray
    affine: np.ndarray
    parameters: dict = field(default_factory=dict)


def _place_brain(anatomy: _Anatomy) -> None:
    """Set ``anatomy.shift_mm[2]`` so the top of the warped brain lies ``top_margin_mm`` below the
    top of the field of view (measured on a 4 mm probe grid, interpolated to sub-mm)."""
    anatomy.shift_mm[2] = 0.0
    probe_fov = _FOV_MM + 80.0
    shape = tuple(int(round(f / _COARSE_MM)) for f in probe_fov)
    axes = _grid_axes(shape, _COARSE_MM)
    mask = _sample_template(axes, anatomy, _template_maps(_COARSE_MM / 2)[2:], None)[0]
    profile = mask.max(axis=(0, 1))
    k = int(np.flatnonzero(profile >= 0.5).max())
    top = axes[2][k]
    if k + 1 < len(profile):
        top += _COARSE_MM * (profile[k] - 0.5) / max(profile[k] - profile[k + 1], 1e-6)
    anatomy.shift_mm[2] = _FOV_MM[2] / 2 - anatomy.top_margin_mm - top


def _choose_tumour_centre(rng, anatomy: _Anatomy, tumour: _TumourShape) -> np.ndarray:
    """Pick a centre (world mm) in mostly-WM brain >= 15 mm deep, on a 4 mm grid (size-independent)."""
    shape = tuple(int(round(f / _COARSE_MM)) for f in _FOV_MM)
    axes = _grid_axes(shape, _COARSE_MM)
    gm, wm, mask = _sample_template(axes, anatomy, _template_maps(_COARSE_MM / 2), None)
    brain = mask >= 0.5
    depth = ndimage.distance_transform_edt(brain) * _COARSE_MM
    z_ok = (axes[2] > axes[2][0] + 25.0)[None, None, :]
    for min_wm, min_depth in ((0.5, 15.0), (0.3, 10.0), (0.0, 5.0)):
        candidates = np.flatnonzero((wm >= min_wm * np.maximum(mask, 1e-6)) & (depth >= min_depth) & brain & z_ok)
        if candidates.size:
            break
    else:  # pragma: no cover - the template always has deep white matter
        raise RuntimeError("no voxel can host the simulated tumour")
    idx = np.unravel_index(candidates[rng.integers(candidates.size)], shape)
    jitter = rng.uniform(-_COARSE_MM / 2, _COARSE_MM / 2, 3)
    return np.array([axes[a][idx[a]] for a in range(3)]) + jitter


def _ramp(level: np.ndarray, radius: float, width: float) -> np.ndarray:
    """Partial-volume fraction of the inside of ``level < 1`` (distance scale ``radius`` mm),
    ramping linearly over ``width`` mm across the boundary."""
    return np.clip((1.0 - level) * radius / width + 0.5, 0.0, 1.0)


_SPHERE_GRID = (37, 72)  # (polar, azimuth) samples of the radial shape functions


def _radial_factor(field: _SmoothField, centre: np.ndarray, radius: float, amplitude: float, offsets) -> np.ndarray:
    """Star-shaped boundary modulation ``1 + amplitude * clip(n(direction), -2, 2)``.

    ``n`` is the smooth field sampled on the sphere of ``radius`` mm around ``centre`` (so lobes
    are ~ correlation length wide) and looked up by each voxel's direction; ``offsets`` are the
    voxel offsets from the centre (three broadcastable arrays, mm)."""
    n_pol, n_az = _SPHERE_GRID
    polar = np.linspace(0.0, np.pi, n_pol)
    azimuth = np.linspace(-np.pi, np.pi, n_az + 1)  # last column repeats the first (wrap)
    pp, aa = np.meshgrid(polar, azimuth, indexing="ij")
    points = centre + radius * np.stack([np.sin(pp) * np.cos(aa), np.sin(pp) * np.sin(aa), np.cos(pp)], -1).reshape(-1, 3)
    table = 1.0 + amplitude * np.clip(field.at(points)[0].reshape(pp.shape), -2.0, 2.0)
    dx, dy, dz = np.broadcast_arrays(*offsets)
    dist = np.sqrt(dx**2 + dy**2 + dz**2)
    pol_idx = np.arccos(np.clip(dz / np.maximum(dist, 1e-9), -1.0, 1.0)) / np.pi * (n_pol - 1)
    az_idx = (np.arctan2(dy, dx) + np.pi) / (2 * np.pi) * n_az
    return ndimage.map_coordinates(table, [pol_idx, az_idx], order=1, mode="nearest")


def _tumour_fractions(axes, tumour: _TumourShape, wm: np.ndarray, csf: np.ndarray, brain: np.ndarray, spacing: float):
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


def _to_jsonable(value):
    """Parameters as plain JSON types, floats rounded to 6 decimals (stable text)."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return round(float(value), 6)
    return value


def simulate_subject(seed: int, index: int, size: str = "small", held_out: bool = False) -> SimulatedSubject:
    """Simulate subject ``index`` (1-based) of a run with ``seed`` on the ``size`` grid.

    ``held_out`` selects the held-out anatomy family (validation/test subjects). Deterministic in
    ``(seed, index, size, held_out)``; the ``small`` and ``full`` versions share all parameters.
    Output shapes: ``SIZES[size][0]`` = (240, 240, 155) at 1 mm or (120, 120, 78) at 2 mm.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    shape, spacing = SIZES[size]
    rng = np.random.default_rng([int(seed), int(index)])

    # 1. parameters (draw order is fixed and independent of ``size``)
    anatomy = _draw_anatomy(rng, held_out)
    tumour = _draw_tumour_shape(rng)
    physics = _draw_physics(rng)
    gains = {m: 1000.0 * rng.uniform(0.7, 1.3) for m in MODALITIES}
    noise_level = {m: rng.uniform(0.01, 0.035) for m in MODALITIES}
    bias_sd = rng.uniform(0.05, 0.10)
    bias = _SmoothField(rng, -_FOV_MM / 2, _FOV_MM / 2, 90.0, n_fields=1 + len(MODALITIES))
    _place_brain(anatomy)
    tumour.centre = _choose_tumour_centre(rng, anatomy, tumour)
    _draw_tumour_fields(rng, tumour)

    # 2. anatomy on the output grid
    axes = _grid_axes(shape, spacing)
    gm, wm, mask = _sample_template(axes, anatomy, _template_maps(spacing), tumour)
    brain = mask >= 0.5
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    normal = np.stack([wm, gm, csf])
    normal = np.power(np.clip(normal, 0.0, 1.0), anatomy.gamma)
    normal *= np.exp(anatomy.perturbation * anatomy.tissue_noise(*axes)).astype(np.float32)
    normal /= np.maximum(normal.sum(0, keepdims=True), 1e-6)
    normal *= brain[None]
    wm, gm, csf = normal

    # 3. tumour compartments replace the normal tissue fractions
    sl, lesion, lesion_texture = _tumour_fractions(axes, tumour, wm, csf, brain, spacing)
    fractions = {name: np.zeros(shape, np.float32) for name in _LESION}
    for name in _LESION:
        fractions[name][sl] = lesion[name]
    lesion_total = fractions["oedema"] + fractions["enhancing"] + fractions["necrosis"]
    fractions = {"wm": wm * (1 - lesion_total), "gm": gm * (1 - lesion_total), "csf": csf * (1 - lesion_total), **fractions}
    seg = np.zeros(shape, np.uint8)
    seg[fractions["oedema"] + fractions["enhancing"] + fractions["necrosis"] >= 0.5] = 2
    seg[fractions["enhancing"] + fractions["necrosis"] >= 0.5] = 4
    seg[fractions["necrosis"] >= 0.5] = 1
    seg[~brain] = 0

    # 4. contrasts: partial-volume signal, bias field, Rician noise, skull stripping
    inside = np.flatnonzero(brain)
    bias_fields = bias(*axes).reshape(1 + len(MODALITIES), -1)[:, inside]
    flat = {name: f.reshape(-1)[inside] for name, f in fractions.items()}
    texture = np.ones(shape, np.float32)
    texture[sl] = lesion_texture  # lesion heterogeneity (a smooth PD-like factor, ~4 mm grain)
    texture = texture.reshape(-1)[inside]
    images = {}
    for m, modality in enumerate(MODALITIES):
        signals = {name: _compartment_signal(modality, physics, name) for name in flat}
        clean = np.zeros(inside.size)
        for name, frac in flat.items():
            clean += signals[name] * (frac * texture if name in _LESION else frac)
        clean = np.abs(clean) * gains[modality]
        clean *= np.exp(bias_sd * (0.8 * bias_fields[0] + 0.6 * bias_fields[1 + m]))
        sigma = noise_level[modality] * abs(signals["wm"]) * gains[modality]
        noisy = np.hypot(clean + sigma * rng.standard_normal(inside.size), sigma * rng.standard_normal(inside.size))
        volume = np.zeros(int(np.prod(shape)), np.float32)
        volume[inside] = np.maximum(noisy, _MIN_TISSUE * gains[modality])
        images[modality] = volume.reshape(shape)

    parameters = {
        "subject_index": int(index),
        "seed": int(seed),
        "held_out_anatomy": bool(held_out),
        "anatomy": {
            "scale": anatomy.scale,
            "rotation_deg": anatomy.rotation_deg,
            "shift_mm": anatomy.shift_mm,
            "top_margin_mm": anatomy.top_margin_mm,
            "warp_rms_mm": anatomy.warp_rms_mm,
            "fine_warp_rms_mm": anatomy.fine_warp_rms_mm,
            "ventricle_expansion": anatomy.ventricle_expansion,
            "tissue_map_gamma": anatomy.gamma,
            "tissue_map_perturbation": anatomy.perturbation,
            "template_flipped_lr": bool(held_out),
        },
        "tumour": {
            "centre_mm": tumour.centre,
            "radius_oedema_mm": tumour.r_oedema,
            "radius_core_mm": tumour.r_core,
            "radius_necrosis_mm": tumour.r_necrosis,
            "mass_effect": tumour.mass_effect,
        },
        "tissues_T1_ms_T2_ms_PD_GdmM": {k: list(v) for k, v in physics.tissues.items()},
        "sequences_ms": physics.sequences,
        "gain": gains,
        "noise_sigma_fraction_of_wm": noise_level,
        "bias_sd": bias_sd,
    }
    return SimulatedSubject(images, seg, fractions, brain, output_affine(size), _to_jsonable(parameters))


# ----------------------------------------------------------------------------------------
# Split, montage, files
# ----------------------------------------------------------------------------------------


def split_subjects(subjects: int, seed: int) -> dict[str, list[int]]:
    """Seeded train/validation/test split of subject indices ``1..subjects``.

    Sizes from :func:`nexus_monai.data.brats.split_counts` (48/10/15 proportions, the rule every
    datalist uses); the order from ``default_rng([seed, 0])``. Lists are sorted."""
    n_train, n_val, n_test = split_counts(subjects, SPLIT_PROPORTIONS)
    order = np.random.default_rng([int(seed), 0]).permutation(np.arange(1, subjects + 1))
    return {
        "training": sorted(int(i) for i in order[n_val + n_test :]),
        "validation": sorted(int(i) for i in order[:n_val]),
        "test": sorted(int(i) for i in order[n_val : n_val + n_test]),
    }


_SEG_COLOURS = {1: (230, 40, 40), 2: (40, 200, 60), 4: (250, 220, 30)}


def _montage_png(subject: SimulatedSubject, spacing: float) -> bytes:
    """PNG bytes of a 5 x 3 panel montage (rows t1, t1ce, t2, flair, seg over FLAIR; columns
    axial, coronal, sagittal through the tumour centroid), 1 pixel per mm; axial and coronal in
    neurological orientation (subject right on the right), anterior / superior up, sagittal with
    anterior on the left."""
    from PIL import Image, ImageDraw, ImageFont

    seg = subject.seg
    centre = [int(round(v)) for v in np.argwhere(seg > 0).mean(0)] if seg.any() else [n // 2 for n in seg.shape]
    zoom = max(1, int(round(spacing)))
    side = max(seg.shape) * zoom

    def planes(vol):
        i, j, k = centre
        return [vol[:, :, k].T[::-1], vol[:, j, :].T[::-1], vol[i, :, :].T[::-1, ::-1]]

    def panel(img2d):
        img2d = np.repeat(np.repeat(img2d, zoom, axis=0), zoom, axis=1)
        out = np.zeros((side, side) + img2d.shape[2:], img2d.dtype)
        r0, c0 = (side - img2d.shape[0]) // 2, (side - img2d.shape[1]) // 2
        out[r0 : r0 + img2d.shape[0], c0 : c0 + img2d.shape[1]] = img2d
        return out

    def grey(vol):  # the evaluation's display scale: 99.5th brain percentile -> white
        return to_uint8(vol, intensity_scale(vol, subject.brain) if subject.brain.any() else 1.0)

    rows = []
    for modality in MODALITIES:
        g = grey(subject.images[modality])
        rows.append([np.repeat(panel(p)[..., None], 3, axis=2) for p in planes(g)])
    flair = grey(subject.images["flair"])
    seg_row = []
    for p_img, p_seg in zip(planes(flair), planes(seg)):
        rgb = np.repeat(p_img[..., None], 3, axis=2).astype(np.float32)
        for label, colour in _SEG_COLOURS.items():
            hit = p_seg == label
            rgb[hit] = 0.45 * rgb[hit] + 0.55 * np.array(colour, np.float32)
        seg_row.append(panel(rgb.astype(np.uint8)))
    rows.append(seg_row)

    label_w, pad = 70, 4
    canvas = np.zeros((len(rows) * (side + pad) + pad, label_w + 3 * (side + pad), 3), np.uint8)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            y0, x0 = pad + r * (side + pad), label_w + c * (side + pad)
            canvas[y0 : y0 + side, x0 : x0 + side] = tile
    image = Image.fromarray(canvas, "RGB")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for r, name in enumerate([*MODALITIES, "seg"]):
        draw.text((6, pad + r * (side + pad) + side // 2 - 6), name, fill=(255, 255, 255), font=font)
    draw.text((6, 4), "SIMULATED", fill=(255, 120, 120), font=font)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _readme_text(subjects: int, seed: int, size: str, split: dict[str, list[int]]) -> str:
    shape, spacing = SIZES[size]
    lines = [
        _README_FIRST_LINE,
        "",
        "These images are SIMULATED. They are NOT patient data and carry no clinical information.",
        "Anatomy: ICBM 2009a symmetric MNI152 template (GM/WM probability maps and brain mask shipped",
        "in the nilearn package), warped per subject; tumours, contrasts and artefacts are simulated.",
        "",
        f"generator: nexus_monai.data.synth {GENERATOR_VERSION} (nexus_monai {_PACKAGE_VERSION})",
        f"seed: {seed}",
        f"size: {size} ({shape[0]}x{shape[1]}x{shape[2]} voxels, {spacing:g} mm isotropic, RAS diagonal affine)",
        f"subjects: {subjects} (training {len(split['training'])}, validation {len(split['validation'])}, "
        f"test {len(split['test'])}; datalist: dataset.json)",
        "held-out anatomy: validation/test subjects use stronger multi-scale warps, ventricular",
        "enlargement, anisotropic scaling and the left/right-flipped template (exactly symmetric,",
        "so the flip alone is a no-op).",
        "labels: 0 background, 1 necrotic core, 2 peritumoral oedema, 4 enhancing tumour (BraTS 2020)",
        "files: SynBraTS_NNNN/SynBraTS_NNNN_{t1,t1ce,t2,flair,seg}.nii.gz (+ _params.json, the drawn",
        "       parameters); montage.png shows subject 1.",
        "",
        "Physics (3 T nominal values; per-subject jitter T1/T2 x U(0.9,1.1), lesions x U(0.85,1.15)):",
        f"  {'compartment':<12} {'T1 ms':>7} {'T2 ms':>7} {'PD':>5}  Gd mM (T1ce)",
    ]
    for name, t in TISSUE_PROPERTIES.items():
        gd = f"{t.gd_mM[0]:g}" if t.gd_mM[0] == t.gd_mM[1] else f"{t.gd_mM[0]:g}-{t.gd_mM[1]:g}"
        lines.append(f"  {name:<12} {t.t1_ms:>7g} {t.t2_ms:>7g} {t.pd:>5.2f}  {gd}")
    lines += [
        "  spin echo (T1w, T1ce, T2w): S = PD (1 - exp(-TR/T1)) exp(-TE/T2)",
        "  FLAIR inversion recovery:   S = |PD (1 - 2 exp(-TI/T1) + exp(-TR/T1)) exp(-TE/T2)|",
        "  gadolinium: 1/T1 = 1/T1_0 + r1 C, 1/T2 = 1/T2_0 + r2 C, r1 = 4.0, r2 = 5.0 /mM/s",
        "  sequences: T1w TR 450-600 TE 8-15; T2w TR 4000-6000 TE 90-110;",
        "             FLAIR TR 8000-10000 TE 100-125 TI = CSF null time x U(0.97,1.03) (ms)",
        "  partial volume: voxel signal = sum of fraction x compartment signal",
        "  artefacts: smooth bias field (+-10-20 %), Rician noise (1-3.5 % of WM), 0 outside brain",
        "Sources: Wansapura et al. JMRI 1999 (WM/GM T1, T2 at 3 T); CSF ~ free water; lesion values",
        "are representative approximations, not measurements. See nexus_monai/data/synth.py.",
        "",
    ]
    return "\n".join(lines)


def _is_previous_output(out_dir: Path) -> bool:
    readme = out_dir / "README.txt"
    try:
        with readme.open("r", encoding="utf-8") as fh:
            return fh.readline().rstrip("\n") == _README_FIRST_LINE
    except OSError:
        return False


def _subject_name(index: int) -> str:
    return f"SynBraTS_{index:04d}"


def _write_subject(out_dir: Path, name: str, subject: SimulatedSubject) -> None:
    """Write one subject folder atomically: into a hidden temporary folder, then renamed."""
    final = out_dir / name
    tmp = out_dir / f".{name}.tmp"
    old = out_dir / f".{name}.old"
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)
    tmp.mkdir()
    for modality in MODALITIES:
        save_volume(subject.images[modality], tmp / f"{name}_{modality}.nii.gz", affine=subject.affine, dtype=np.float32)
    save_volume(subject.seg, tmp / f"{name}_seg.nii.gz", affine=subject.affine, dtype=np.uint8)
    params = json.dumps(subject.parameters, indent=1, sort_keys=True) + "\n"
    (tmp / f"{name}_params.json").write_text(params, encoding="utf-8")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def _datalist_entry(name: str) -> dict:
    entry = {"subject": name, "brats_format": "2020"}
    for key in (*MODALITIES, "seg"):
        entry[key] = f"{name}/{name}_{key}.nii.gz"
    return entry


def generate_dataset(out_dir: str | os.PathLike, subjects: int, seed: int, size: str = "small") -> Path:
    """Generate ``subjects`` simulated BraTS-2020-format subjects under ``out_dir``; return it.

    Writes ``SynBraTS_NNNN/SynBraTS_NNNN_{t1,t1ce,t2,flair,seg}.nii.gz`` (images float32, seg
    uint8 labels {0, 1, 2, 4}; ``size="full"`` 240 x 240 x 155 at 1 mm, ``"small"`` 120 x 120 x 78
    at 2 mm; qform/sform code 1) plus ``SynBraTS_NNNN_params.json`` (drawn parameters),
    ``README.txt`` (says SIMULATED, version, seed, size, physics table), ``dataset.json`` (MONAI
    datalist with a seeded 48/10/15 train/validation/test split, paths relative to ``out_dir``)
    and ``montage.png`` (subject 1). Same arguments -> byte-identical files.

    ``out_dir`` must be new, empty, or a previous output of this function (its subject folders
    are replaced; folders of subjects beyond ``subjects`` are removed). Raises
    :class:`NexusInputError` for bad arguments or a foreign non-empty folder.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    if isinstance(subjects, bool) or not isinstance(subjects, (int, np.integer)) or subjects < 1:
        raise NexusInputError(out_dir, f"subjects must be an integer >= 1, got {subjects!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise NexusInputError(out_dir, f"seed must be a non-negative integer, got {seed!r}")
    if size not in SIZES:
        raise NexusInputError(out_dir, f"size must be one of {sorted(SIZES)}, got {size!r}")
    subjects, seed = int(subjects), int(seed)
    if out_dir.exists() and not out_dir.is_dir():
        raise NexusInputError(out_dir, "exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not _is_previous_output(out_dir):
        raise NexusInputError(
            out_dir, "folder is not empty and is not a previous synthetic dataset (no matching README.txt); "
            "choose a new or empty folder"
        )
    out_dir.mkdir(parents=True, exist_ok=True)

    split = split_subjects(subjects, seed)
    held_out = set(split["validation"]) | set(split["test"])
    write_text_atomic(out_dir / "README.txt", _readme_text(subjects, seed, size, split).encode("utf-8"))

    _, spacing = SIZES[size]
    montage = None
    for index in tqdm(range(1, subjects + 1), desc=f"synth {size}", unit="subject"):
        subject = simulate_subject(seed, index, size, held_out=index in held_out)
        _write_subject(out_dir, _subject_name(index), subject)
        if index == 1:
            montage = _montage_png(subject, spacing)
        del subject

    wanted = {_subject_name(i) for i in range(1, subjects + 1)}
    for child in sorted(out_dir.iterdir()):
        if child.is_dir() and _SUBJECT_RE.match(child.name) and child.name not in wanted:
            shutil.rmtree(child)

    shape, _ = SIZES[size]
    datalist = {
        "name": "SynBraTS",
        "description": (
            "SIMULATED BraTS-2020-format brain MRI (t1, t1ce, t2, flair, seg) generated from the MNI152 2009 "
            "template; not patient data. Validation/test subjects have held-out anatomy."
        ),
        "simulated": True,
        "seed": seed,
        "size": size,
        "generator": f"nexus_monai.data.synth {GENERATOR_VERSION}",
        "shape": list(shape),
        "spacing_mm": [spacing] * 3,
        "labels": {"0": "background", "1": "necrotic tumour core", "2": "peritumoral oedema", "4": "enhancing tumour"},
        "modality": {"0": "t1", "1": "t1ce", "2": "t2", "3": "flair"},
        "numTraining": len(split["training"]),
    }
    for part in ("training", "validation", "test"):
        datalist[part] = [_datalist_entry(_subject_name(i)) for i in split[part]]
    write_text_atomic(out_dir / "dataset.json", (json.dumps(datalist, indent=2) + "\n").encode("utf-8"))
    write_text_atomic(out_dir / "montage.png", montage)
    return out_dir


def default_cache_dir() -> Path:
    """Where the embedded dataset is generated on first use (``NEXUS_MONAI_CACHE`` overrides)."""
    return Path(os.environ.get("NEXUS_MONAI_CACHE", Path.home() / ".cache" / "nexus_monai"))


def ensure_embedded_dataset(root: str | os.PathLike | None = None, subjects: int = 24, seed: int = 0, size: str = "small") -> Path:
    """The ``dataset.json`` of the embedded dataset, generating it on first use.

    ``root`` defaults to ``<cache>/synbrats_<size>_n<subjects>_s<seed>``. An existing complete
    dataset (its ``dataset.json`` written last, with matching seed/size/count) is reused.
    """
    root = Path(root) if root else default_cache_dir() / f"synbrats_{size}_n{subjects}_s{seed}"
    datalist = root / "dataset.json"
    if datalist.exists():
        try:
            meta = json.loads(datalist.read_text())
            n = sum(len(meta.get(k, [])) for k in ("training", "validation", "test"))
            if meta.get("seed") == seed and meta.get("size") == size and n == subjects:
                return datalist
        except (json.JSONDecodeError, OSError):
            pass
    generate_dataset(root, subjects, seed, size)
    return datalist
