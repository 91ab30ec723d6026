"""Small contrast-specific white-matter lesions, with an instance map in the ``keys.py`` encoding.

Cross-contrast super-resolution can borrow an edge from one contrast that the other does not
have; these lesions make the embedded world contain findings that only one contrast shows.
Every subject (training, validation, test, test-only anatomy) gets, counts uniform in:

* ``LESION_T2_ONLY`` (class 1), 3-10 lesions: white-matter hyperintensities, visible on T2w and
  FLAIR, INVISIBLE on T1w. Spheres of radius 1-6 mm, plus 1-3 elongated (confluent-like) ones:
  ellipsoids with semi-axes 7-12 mm (long, random direction) and 2.5-4 mm (the two short ones), up
  to 24 mm long, i.e. up to 3 slabs of an 8 mm slab (T2w y x 4 on the 2 mm world); T2 = WM T2 x
  U(1.5, 3.0), T1 = WM T1 x U(1.0, 1.3), and PD solved so that the T1w signal equals white matter's
  exactly;
* ``LESION_T1_ONLY`` (class 2), 1-3 lesions: visible on T1w only (T1 = WM T1 x U(0.5, 0.75)
  (bright) or x U(1.5, 2.0) (dark), T2 = WM T2, PD solved so the T2w signal equals WM's);
  spheres of radius 1.5-4 mm, plus 0-1 elongated one (semi-axes 5-9 mm and 1.5-3 mm);
* ``LESION_BOTH`` (class 3), 2-6 perivascular spaces: CSF-filled (the subject's CSF T1, T2, PD),
  visible on both; ellipsoids with a random long axis, semi-axes 2-6 mm (long) and 1-1.5 mm.

Each lesion takes the white-matter share of its footprint: its fraction is ``pv x wm`` where
``pv`` is the exact partial volume of the ellipsoid in each voxel (4^3 sub-samples per voxel),
so on the contrast where it is invisible the signal equals what normal tissue there gives
(same compartment parameters): without noise, identical up to float rounding. The Gd
concentration is WM's (T1ce follows T1w closely but is not forced to be identical).

Placement: centres drawn on a 2 mm probe grid (the same for both sizes) among voxels whose
warped source WM probability is >= 0.9 (0.7 if none), with a WM depth >= the lesion's smallest
semi-axis + 1 mm at 5 points along its long axis (centre and +-1/2, +-1 of long - short semi-axis
from it: a sphere needs depth >= radius + 1 mm at its centre, an elongated lesion follows the white
matter), >= the tumour reach + radius + 4 mm from the tumour centre, and >= the two
radii + 4 mm from every other lesion (lesions never touch). A lesion with no free centre is
skipped (recorded in the parameters).

Instance map (``<ID>_lesions.nii.gz``, int16, datalist key ``lesions``): value ``class * 1000 +
n`` with ``n`` = 1..N numbered over all lesions of the subject, on voxels with ``pv >= 0.5``;
a lesion smaller than that in every voxel labels its voxel of largest ``pv``.

Per-class switch (counterfactual renders, :func:`lesion_classes_off`): inside
``with lesion_classes_off({LESION_T2_ONLY}): simulate_subject(...)`` the lesions of those classes get
white matter's signal on every contrast (exactly what normal tissue there gives); every random draw,
every other lesion and the instance map are unchanged, so the render differs from the plain one only
where those lesions lie.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from nexus_monai.data.synth.anatomy import Anatomy, sample_source
from nexus_monai.data.synth.grid import FOV_MM, grid_axes
from nexus_monai.data.synth.physics import Physics, signal
from nexus_monai.data.synth.sources import source_maps
from nexus_monai.keys import LESION_BOTH, LESION_CLASS_STRIDE, LESION_T1_ONLY, LESION_T2_ONLY

__all__ = ["LESION_RANGES", "Lesion", "probe_axes", "draw_lesions", "rasterise_lesions", "lesion_signals",
           "smallest_lesion_mm3", "lesion_classes_off"]

_PROBE_MM = 2.0
_SUBSAMPLES = 4

LESION_RANGES = {
    LESION_T2_ONLY: {"count": (3, 10), "radius_mm": (1.0, 6.0), "t2_factor": (1.5, 3.0), "t1_factor": (1.0, 1.3),
                     "elongated_count": (1, 3), "elongated_long_semi_axis_mm": (7.0, 12.0),
                     "elongated_short_semi_axis_mm": (2.5, 4.0)},
    LESION_T1_ONLY: {"count": (1, 3), "radius_mm": (1.5, 4.0), "t1_factor_bright": (0.5, 0.75),
                     "t1_factor_dark": (1.5, 2.0), "elongated_count": (0, 1), "elongated_long_semi_axis_mm": (5.0, 9.0),
                     "elongated_short_semi_axis_mm": (1.5, 3.0)},
    LESION_BOTH: {"count": (2, 6), "long_semi_axis_mm": (2.0, 6.0), "short_semi_axis_mm": (1.0, 1.5)},
}
"""Every lesion range (counts inclusive, mm, relaxation factors); the dataset README prints it."""


@dataclass
class Lesion:
    """One lesion: visibility class, centre (world mm), semi-axes (mm) along ``axes`` (3 x 3,
    rows are unit directions) and compartment parameters (T1 ms, T2 ms, PD, Gd mM)."""

    klass: int
    centre: np.ndarray
    semi_axes: np.ndarray
    axes: np.ndarray
    tissue: tuple[float, float, float, float]

    def describe(self) -> dict:
        return {"class": self.klass, "centre_mm": self.centre, "semi_axes_mm": self.semi_axes,
                "axes": self.axes, "T1_ms_T2_ms_PD_GdmM": list(self.tissue)}


def _solve_pd(modality: str, physics: Physics, t1: float, t2: float, gd: float) -> float:
    """PD that makes a compartment with ``t1, t2`` give exactly the WM signal on ``modality``."""
    seq = physics.sequences[modality]
    target = signal(modality, seq, *physics.tissues["wm"])
    return target / signal(modality, seq, t1, t2, 1.0, gd)


def _draw_shapes(rng: np.random.Generator, physics: Physics) -> list[tuple[int, np.ndarray, np.ndarray, tuple]]:
    """Classes, semi-axes, orientations and compartment parameters of every lesion (draw order fixed)."""
    wm_t1, wm_t2, _, wm_gd = physics.tissues["wm"]
    shapes = []
    for klass in (LESION_T2_ONLY, LESION_T1_ONLY, LESION_BOTH):
        r = LESION_RANGES[klass]
        n_round = int(rng.integers(r["count"][0], r["count"][1] + 1))
        n_long = (int(rng.integers(r["elongated_count"][0], r["elongated_count"][1] + 1))
                  if "elongated_count" in r else 0)
        for n in range(n_round + n_long):
            direction = rng.standard_normal(3)
            direction /= np.linalg.norm(direction)
            basis = np.linalg.qr(np.stack([direction, rng.standard_normal(3), rng.standard_normal(3)], 1))[0].T
            if n >= n_round:  # elongated: long semi-axis along basis[0] (= +-direction)
                semi = np.array([rng.uniform(*r["elongated_long_semi_axis_mm"]),
                                 *np.full(2, rng.uniform(*r["elongated_short_semi_axis_mm"]))])
            if klass == LESION_T2_ONLY:
                semi = np.full(3, rng.uniform(*r["radius_mm"])) if n < n_round else semi
                t1, t2 = wm_t1 * rng.uniform(*r["t1_factor"]), wm_t2 * rng.uniform(*r["t2_factor"])
                tissue = (t1, t2, _solve_pd("t1", physics, t1, t2, wm_gd), wm_gd)
            elif klass == LESION_T1_ONLY:
                semi = np.full(3, rng.uniform(*r["radius_mm"])) if n < n_round else semi
                bright = rng.random() < 0.5
                t1 = wm_t1 * rng.uniform(*(r["t1_factor_bright"] if bright else r["t1_factor_dark"]))
                tissue = (t1, wm_t2, _solve_pd("t2", physics, t1, wm_t2, wm_gd), wm_gd)
            else:
                semi = np.array([rng.uniform(*r["long_semi_axis_mm"]), *rng.uniform(*r["short_semi_axis_mm"], 2)])
                tissue = tuple(physics.tissues["csf"])
            shapes.append((klass, semi, basis, tissue))
    return shapes


def probe_axes() -> list[np.ndarray]:
    """The 2 mm probe grid lesion centres are drawn on (the ``small`` output grid)."""
    return grid_axes(tuple(int(round(f / _PROBE_MM)) for f in FOV_MM), _PROBE_MM)


def draw_lesions(rng: np.random.Generator, anatomy: Anatomy, physics: Physics, tumour,
                 probe=None) -> tuple[list[Lesion], int]:
    """Draw and place the lesions of one subject; returns ``(lesions, skipped)``.

    ``probe``: the warped source WM and mask maps on :func:`probe_axes` when already computed
    (``sample_source(probe_axes(), anatomy, source_maps(source, 2.0), tumour)[1:]``)."""
    shapes = _draw_shapes(rng, physics)
    axes = probe_axes()
    if probe is None:
        probe = sample_source(axes, anatomy, source_maps(anatomy.source, _PROBE_MM)[1:], tumour)
    wm, mask = probe
    wm_region = (wm >= 0.5) & (mask >= 0.5)
    depth = ndimage.distance_transform_edt(wm_region) * _PROBE_MM
    for level in (0.9, 0.7):
        eligible = (wm >= level) & (mask >= 0.5)
        if eligible.sum() > 50:
            break
    idx = np.argwhere(eligible)
    points = np.stack([axes[a][idx[:, a]] for a in range(3)], 1)
    far_from_tumour = np.linalg.norm(points - tumour.centre, axis=1) - tumour.reach_mm - 4.0
    origin = np.array([a[0] for a in axes])
    upper = np.array(depth.shape) - 1
    lesions, skipped = [], 0
    for klass, semi, basis, tissue in shapes:
        radius, short = float(semi.max()), float(semi.min())
        ok = far_from_tumour >= radius
        for t in (0.0, -1.0, -0.5, 0.5, 1.0) if radius > short else (0.0,):
            at = np.clip(np.rint((points + t * (radius - short) * basis[0] - origin) / _PROBE_MM), 0, upper).astype(int)
            ok &= depth[tuple(at.T)] >= short + 1.0
        for other in lesions:
            ok &= np.linalg.norm(points - other.centre, axis=1) >= radius + float(other.semi_axes.max()) + 4.0
        pick = rng.integers(1 << 30)  # drawn even when there is no candidate: a fixed draw order
        jitter = rng.uniform(-_PROBE_MM / 2, _PROBE_MM / 2, 3) * 0.5
        candidates = np.flatnonzero(ok)
        if candidates.size == 0:
            skipped += 1
            continue
        lesions.append(Lesion(klass, points[candidates[pick % candidates.size]] + jitter, semi, basis, tissue))
    return lesions, skipped


def rasterise_lesions(lesions: list[Lesion], axes, spacing: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Partial-volume fraction ``pv`` (float32), owner index (int32, lesion index + 1, 0 = none)
    and instance label map (int16, ``class * 1000 + n``) on the grid ``axes`` (world mm)."""
    shape = tuple(len(a) for a in axes)
    pv = np.zeros(shape, np.float32)
    owner = np.zeros(shape, np.int32)
    labels = np.zeros(shape, np.int16)
    offsets = ((np.arange(_SUBSAMPLES) + 0.5) / _SUBSAMPLES - 0.5) * spacing
    for n, lesion in enumerate(lesions, start=1):
        reach = float(lesion.semi_axes.max()) + spacing
        sl = []
        for a in range(3):
            lo = int(np.searchsorted(axes[a], lesion.centre[a] - reach))
            hi = int(np.searchsorted(axes[a], lesion.centre[a] + reach, side="right"))
            sl.append(slice(max(lo, 0), min(hi, shape[a])))
        sub = [axes[a][sl[a]] for a in range(3)]
        # sub-sample coordinates: (X, s, Y, s, Z, s) offsets from the centre, per world axis
        grids = np.meshgrid(*[(s[:, None] + offsets[None, :]).ravel() - lesion.centre[a] for a, s in enumerate(sub)],
                            indexing="ij")
        local = np.einsum("ij,j...->i...", lesion.axes, np.stack(grids))
        inside = ((local / lesion.semi_axes[:, None, None, None]) ** 2).sum(0) <= 1.0
        frac = inside.reshape(len(sub[0]), _SUBSAMPLES, len(sub[1]), _SUBSAMPLES, len(sub[2]),
                              _SUBSAMPLES).mean((1, 3, 5))
        box = tuple(sl)
        hit = frac > 0
        pv[box][hit] = frac[hit]
        owner[box][hit] = n
        value = lesion.klass * LESION_CLASS_STRIDE + n
        mark = frac >= 0.5
        if not mark.any():
            mark = frac == frac.max()
        labels[box][mark & hit] = value
    return pv, owner, labels


_CLASSES_OFF: contextvars.ContextVar[frozenset] = contextvars.ContextVar("lesion_classes_off", default=frozenset())


@contextlib.contextmanager
def lesion_classes_off(classes):
    """Within the block, :func:`lesion_signals` gives the lesions of ``classes`` white matter's signal.

    The per-class switch of the counterfactual renders (module docstring); ``classes``: an iterable of
    lesion classes (``keys.LESION_*``), e.g. ``{LESION_T2_ONLY}``: the subject without its T2w-only lesions.
    """
    token = _CLASSES_OFF.set(frozenset(int(c) for c in classes))
    try:
        yield
    finally:
        _CLASSES_OFF.reset(token)


def lesion_signals(lesions: list[Lesion], modality: str, physics: Physics) -> np.ndarray:
    """Signed compartment signal of every lesion on ``modality``, indexed by owner (0 = unused); white
    matter's for the lesions of the classes switched off by :func:`lesion_classes_off`."""
    seq = physics.sequences[modality]
    off = _CLASSES_OFF.get()
    return np.array([0.0] + [signal(modality, seq, *(physics.tissues["wm"] if lesion.klass in off else lesion.tissue))
                             for lesion in lesions])


def smallest_lesion_mm3() -> float:
    """Volume (mm^3) of the smallest lesion :data:`LESION_RANGES` allows (min over classes of the smallest
    sphere, or ellipsoid with every semi-axis at its lower bound)."""
    volumes = []
    for ranges in LESION_RANGES.values():
        if "radius_mm" in ranges:
            volumes.append(4.0 / 3.0 * math.pi * ranges["radius_mm"][0] ** 3)
        if "elongated_count" in ranges:
            volumes.append(4.0 / 3.0 * math.pi * ranges["elongated_long_semi_axis_mm"][0]
                           * ranges["elongated_short_semi_axis_mm"][0] ** 2)
        if "long_semi_axis_mm" in ranges:
            volumes.append(4.0 / 3.0 * math.pi * ranges["long_semi_axis_mm"][0] * ranges["short_semi_axis_mm"][0] ** 2)
    return float(min(volumes))
