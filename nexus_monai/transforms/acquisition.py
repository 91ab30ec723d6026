"""Simulated thick-slice (anisotropic) MRI acquisition of an HR volume.

Along one array axis ``a`` with factor ``k`` (int or float > 1): a slice profile is applied along
``a`` and one sample is kept per slab of ``k`` HR voxels, at the slab centre (HR index
``n * k + (k - 1) / 2``). The output carries the LR affine from
:func:`nexus_monai.geometry.thick_slice_affine` (spacing x k along ``a``, origin at the centre of
the first slab), so a world point addresses the same anatomy in HR and LR.

Profiles (weights over HR voxels ``i`` for LR slice ``n`` centred at ``p = n k + (k - 1)/2``):

* ``gaussian`` (default): ``exp(-(i - p)^2 / (2 s^2))`` with FWHM ``= k`` HR voxels
  (``s = k / (2 sqrt(2 ln 2))``), cut at 4 s.
* ``boxcar``: the overlap of voxel ``i`` (``[i - 1/2, i + 1/2]``) with the slab
  ``[n k - 1/2, (n + 1) k - 1/2]``; for integer ``k`` exactly the slab mean.
* ``none``: point sampling at ``p`` (linear interpolation between the two nearest HR voxels when
  ``p`` is not an integer), as in the SSMCSR code.

``fwhm_scale`` (default 1; the slice thickness / slice spacing ratio) widens or narrows the
profile: Gaussian FWHM ``= fwhm_scale * k``, boxcar width ``fwhm_scale * k`` centred on the slab
centre (below 1: a slice gap; ignored by ``none``). ``offset`` (HR voxels, default 0) moves every
slab centre to ``n k + (k - 1) / 2 + offset``: slabs off the HR grid, recorded in the LR affine as
a scanner records its slice positions. ``noise`` (default 0) adds Rician noise of sigma ``noise x``
the 99.5th percentile of the LR scan's non-zero voxels, drawn from ``numpy.random.default_rng(noise_seed)``,
to the LR scan only and only where it is non-zero (skull-stripped scans stay 0 outside the brain).

The embedded dataset (generator 3.0.0) draws all of these per scan and records them in its
datalist entries (``<contrast>_slice_profile``, ``_thickness_ratio``, ``_slab_offset``,
``_lr_noise``, ``_noise_seed``) beside a noise-free render (``<contrast>_clean``); the dictionary
transform reads them per subject when given ``profile_key``, ``fwhm_scale_key``, ``offset_key``,
``noise_key``, ``noise_seed_key`` and acquires the ``noise_free_key`` volume when the data holds it
(absent keys: the transform's own settings and the key itself). Only the axis and factor go into
``meta["acquisition"]`` (what a NIfTI header also tells); the draw is kept in
``meta["acquisition_draw"]`` for provenance and no method may read it.

Rows are normalised to sum 1. The Gaussian rows are tilted to first order so that their
centroid is exactly the slab centre also for non-integer factors and at the volume border
(where the cut kernel is renormalised). Boxcar rows for a non-integer factor keep the exact
voxel-overlap weights, whose centroid can sit up to ~0.08 HR voxel off the slab centre (k = 1.5; 0.05 at k = 2.5).
"""

from __future__ import annotations

import math
from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable, Transform

from nexus_monai.geometry import as_affine, parse_axis, thick_slice_affine

__all__ = [
    "PROFILES",
    "slice_profile_matrix",
    "num_thick_slices",
    "apply_along_axis",
    "rician_noise",
    "SimulateAnisotropicAcquisition",
    "SimulateAnisotropicAcquisitiond",
    "RandSimulateAnisotropicAcquisitiond",
    "DRAWN_KEY_ARGUMENTS",
    "drawn_acquisition_arguments",
    "AcquisitionRicianNoise",
    "AcquisitionRicianNoised",
]

PROFILES = ("gaussian", "boxcar", "none")


def num_thick_slices(n_hr: int, factor: float) -> int:
    """Number of complete slabs of ``factor`` HR voxels in ``n_hr`` voxels."""
    return int(math.floor(n_hr / float(factor) + 1e-9))


def slice_profile_matrix(n_hr: int, factor: float, profile: str = "gaussian", fwhm_scale: float = 1.0,
                         offset: float = 0.0) -> torch.Tensor:
    """Weights ``(M, n_hr)`` (float64) mapping HR samples along the thick axis to ``M`` LR slices
    (slab ``n`` centred at HR index ``n k + (k - 1) / 2 + offset``)."""
    k = float(factor)
    scale = float(fwhm_scale)
    offset = float(offset)
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"fwhm_scale must be a finite number > 0, got {fwhm_scale}")
    if not (abs(offset) <= 0.5 * k and math.isfinite(offset)):
        raise ValueError(f"slab offset must be a finite number of at most half a slab ({0.5 * k} voxels), got {offset}")
    if not (k >= 1.0 and math.isfinite(k)):
        raise ValueError(f"acquisition factor must be a finite number >= 1, got {factor}")
    if profile not in PROFILES:
        raise ValueError(f"slice profile must be one of {PROFILES}, got {profile!r}")
    m = num_thick_slices(n_hr, k)
    if m < 1:
        raise ValueError(f"factor {k} leaves no complete slice in {n_hr} voxels")
    i = torch.arange(n_hr, dtype=torch.float64)[None, :]
    n = torch.arange(m, dtype=torch.float64)[:, None]
    centre = n * k + (k - 1.0) / 2.0 + offset
    if profile == "gaussian":
        sigma = scale * k / (2.0 * math.sqrt(2.0 * math.log(2.0)))
        d = i - centre
        w = torch.exp(-0.5 * (d / sigma) ** 2) * (d.abs() <= 4.0 * sigma)
        # Sampled at integers around a non-integer centre (or cut at the border) the discrete
        # Gaussian's centroid drifts off the slab centre; a first-order tilt puts it back, so
        # every LR sample stays centred on its slab's world position.
        w = w / w.sum(dim=1, keepdim=True)
        tilt = (w * d).sum(1, keepdim=True) / (w * d * d).sum(1, keepdim=True)
        w = torch.clamp(w * (1.0 - tilt * d), min=0.0)
    elif profile == "boxcar":
        lo, hi = n * k - 0.5, (n + 1) * k - 0.5
        if scale != 1.0 or offset != 0.0:
            lo, hi = centre - scale * k / 2.0, centre + scale * k / 2.0
        w = torch.clamp(torch.minimum(i + 0.5, hi) - torch.maximum(i - 0.5, lo), min=0.0)
    else:
        w = torch.clamp(1.0 - (i - centre).abs(), min=0.0)
    if bool((w.sum(dim=1) <= 0).any()):  # a slab pushed off the volume by the offset (k ~ 1 only)
        raise ValueError(f"slab offset {offset} moves a slab off the {n_hr}-voxel volume")
    return w / w.sum(dim=1, keepdim=True)


def rician_noise(x: torch.Tensor, noise: float, seed: int) -> torch.Tensor:
    """``x`` with Rician noise ``sqrt((x + s n1)^2 + (s n2)^2)`` where ``x != 0``; ``s = noise x p99.5``
    of the non-zero voxels of ``x``; ``n1, n2 ~ N(0, 1)`` from ``numpy.random.default_rng(seed)``
    (deterministic, so cached datasets stay valid). Zeros (outside a skull-stripped brain) stay 0."""
    if noise < 0 or not math.isfinite(noise):
        raise ValueError(f"noise must be a finite number >= 0, got {noise}")
    if noise == 0:
        return x
    nz = x != 0
    if not bool(nz.any()):
        return x
    sigma = float(noise) * float(torch.quantile(x[nz].double().flatten()[:16_000_000], 0.995))
    rng = np.random.default_rng(int(seed))
    n1 = torch.as_tensor(rng.standard_normal(tuple(x.shape)), dtype=torch.float64)
    n2 = torch.as_tensor(rng.standard_normal(tuple(x.shape)), dtype=torch.float64)
    out = torch.sqrt((x.double() + sigma * n1) ** 2 + (sigma * n2) ** 2)
    return torch.where(nz, out, torch.zeros_like(out)).to(x.dtype)


def apply_along_axis(x: torch.Tensor, matrix: torch.Tensor, dim: int) -> torch.Tensor:
    """``matrix`` ``(m, n)`` applied to dimension ``dim`` (length n -> m) of ``x``.

    With :func:`slice_profile_matrix` this is the acquisition operator D; with its transpose, D^T.
    """
    return (x.movedim(dim, -1) @ matrix.to(x.dtype).T).movedim(-1, dim)


class SimulateAnisotropicAcquisition(Transform):
    """Thick-slice acquisition of a ``(C, X, Y, Z)`` MetaTensor -> LR MetaTensor with LR affine.

    Deterministic (so MONAI's ``CacheDataset`` caches it): its noise comes from ``noise_seed``.

    Args:
        axis: thick axis, ``"x"/"y"/"z"`` or ``0/1/2`` (array axes i/j/k).
        factor: slab step in HR voxels (int or float >= 1).
        profile: ``"gaussian"`` (FWHM = factor voxels), ``"boxcar"`` or ``"none"``.
        fwhm_scale: slice thickness / slab step (default 1; < 1 a slice gap).
        offset: slab centres' shift off the HR grid, HR voxels (default 0); in the LR affine.
        noise: LR Rician noise sigma / the LR scan's non-zero 99.5th percentile (default 0).
        noise_seed: seed of that noise.

    Output shape along ``axis``: ``floor(n / factor)``; other axes unchanged.
    """

    def __init__(self, axis: int | str, factor: float, profile: str = "gaussian", fwhm_scale: float = 1.0,
                 offset: float = 0.0, noise: float = 0.0, noise_seed: int = 0):
        self.axis = parse_axis(axis)
        self.factor = float(factor)
        if profile not in PROFILES:
            raise ValueError(f"slice profile must be one of {PROFILES}, got {profile!r}")
        self.profile = profile
        self.fwhm_scale = float(fwhm_scale)
        self.offset = float(offset)
        if not (float(noise) >= 0 and math.isfinite(float(noise))):
            raise ValueError(f"noise must be a finite number >= 0, got {noise}")
        self.noise, self.noise_seed = float(noise), int(noise_seed)

    def __call__(self, img: torch.Tensor) -> MetaTensor:
        if img.ndim != 4:
            raise ValueError(f"expected a channel-first (C, X, Y, Z) volume, got shape {tuple(img.shape)}")
        affine = img.affine if isinstance(img, MetaTensor) else torch.eye(4, dtype=torch.float64)
        x = img.as_subclass(torch.Tensor) if isinstance(img, MetaTensor) else torch.as_tensor(img)
        dim = self.axis + 1
        w = slice_profile_matrix(x.shape[dim], self.factor, self.profile, self.fwhm_scale, self.offset)
        out = apply_along_axis(x.to(torch.float64), w, dim)
        out = rician_noise(out, self.noise, self.noise_seed).to(x.dtype if x.is_floating_point() else torch.float32)
        meta = dict(img.meta) if isinstance(img, MetaTensor) else {}
        meta.pop("affine", None)
        meta["acquisition"] = {"axis": self.axis, "factor": self.factor}  # what a NIfTI header also tells
        meta["acquisition_draw"] = {"profile": self.profile, "fwhm_scale": self.fwhm_scale, "offset": self.offset,
                                    "noise": self.noise, "noise_seed": self.noise_seed}  # provenance only
        shift = torch.eye(4, dtype=torch.float64)
        shift[self.axis, 3] = self.offset  # slab centres off the HR grid: a scanner's slice positions
        lr_affine = thick_slice_affine(as_affine(affine) @ shift, self.axis, self.factor)
        return MetaTensor(out.contiguous(), affine=lr_affine, meta=meta)


class AcquisitionRicianNoise(Randomizable, Transform):
    """Rician noise ``sqrt((x + s n1)^2 + (s n2)^2)`` with ``s = noise_std * p99.5(non-zero x)``.

    ``n1, n2 ~ N(0, 1)`` are drawn from ``self.R`` (``set_random_state`` makes it reproducible).
    The affine and metadata are kept.
    """

    def __init__(self, noise_std: float = 0.0):
        if noise_std < 0:
            raise ValueError("noise_std must be >= 0")
        self.noise_std = float(noise_std)
        self._noise: tuple[np.ndarray, np.ndarray] | None = None

    def randomize(self, shape: Sequence[int]) -> None:
        self._noise = (
            self.R.standard_normal(size=tuple(shape)).astype(np.float32),
            self.R.standard_normal(size=tuple(shape)).astype(np.float32),
        )

    def __call__(self, img: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        if self.noise_std == 0:
            return img
        x = img.as_subclass(torch.Tensor) if isinstance(img, MetaTensor) else torch.as_tensor(img)
        if randomize or self._noise is None:
            self.randomize(x.shape)
        nz = x[x != 0]
        ref = float(torch.quantile(nz.float().flatten()[:16_000_000], 0.995)) if nz.numel() else 1.0
        sigma = self.noise_std * ref
        n1, n2 = (torch.as_tensor(a, dtype=x.dtype) for a in self._noise)
        out = torch.sqrt((x + sigma * n1) ** 2 + (sigma * n2) ** 2)
        return MetaTensor(out, affine=img.affine, meta=dict(img.meta)) if isinstance(img, MetaTensor) else out


class AcquisitionRicianNoised(Randomizable, MapTransform):
    """Dictionary twin of :class:`AcquisitionRicianNoise` (one draw per key)."""

    def __init__(self, keys: KeysCollection, noise_std: float = 0.0, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.noise = AcquisitionRicianNoise(noise_std)

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        self.noise.set_random_state(seed, state)
        return self

    def randomize(self, data=None) -> None:
        pass  # drawn per key by the array transform from its own state

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.noise(d[key])
        return d


def _output_keys(keys: tuple, output_keys: KeysCollection | None) -> tuple:
    """``output_keys`` as a tuple with one entry per key (default: the keys themselves)."""
    out = (
        tuple(keys) if output_keys is None else ((output_keys,) if isinstance(output_keys, str) else tuple(output_keys))
    )
    if len(out) != len(keys):
        raise ValueError("output_keys must have one entry per key")
    return out


class SimulateAnisotropicAcquisitiond(MapTransform):
    """Dictionary twin of :class:`SimulateAnisotropicAcquisition`.

    ``output_keys`` (default: the same keys, overwritten) receive the LR volumes, so an HR key
    can be kept beside its LR version (e.g. ``keys="t1", output_keys="t1_lr"``). One acquisition
    setting per transform; compose two for two protocols (T1 z x 2, T2 y x 4).

    The drawn acquisition (optional data keys, each overriding the transform's own setting for
    that call when present in the data): ``profile_key`` (slice profile), ``fwhm_scale_key``
    (thickness / spacing, default 1), ``offset_key`` (slab offset, HR voxels, default 0),
    ``noise_key`` (LR noise fraction, default ``noise``), ``noise_seed_key`` (default 0); and
    ``noise_free_keys`` (one per key, e.g. ``t1_clean``): when that key is in the data, the LR scan is
    acquired from it (the noise-free render) instead of from ``keys``. The embedded dataset's entries
    hold ``<contrast>_slice_profile``, ``_thickness_ratio``, ``_slab_offset``, ``_lr_noise``,
    ``_noise_seed`` and ``<contrast>_clean``; every protocol YAML passes them (see
    :data:`DRAWN_KEY_ARGUMENTS`).
    """

    def __init__(
        self,
        keys: KeysCollection,
        axis: int | str,
        factor: float,
        profile: str = "gaussian",
        output_keys: KeysCollection | None = None,
        allow_missing_keys: bool = False,
        profile_key: str | None = None,
        fwhm_scale_key: str | None = None,
        offset_key: str | None = None,
        noise_key: str | None = None,
        noise_seed_key: str | None = None,
        noise_free_keys: KeysCollection | None = None,
        noise: float = 0.0,
    ):
        super().__init__(keys, allow_missing_keys)
        self.output_keys = _output_keys(self.keys, output_keys)
        self.noise_free_keys = None if noise_free_keys is None else _output_keys(self.keys, noise_free_keys)
        self.acquire = SimulateAnisotropicAcquisition(axis, factor, profile, noise=noise)
        self.profile_key, self.fwhm_scale_key = profile_key, fwhm_scale_key
        self.offset_key, self.noise_key, self.noise_seed_key = offset_key, noise_key, noise_seed_key

    def _drawn(self, d: Mapping, key: str | None, default, cast):
        value = d.get(key) if key else None
        return default if value is None else cast(value)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        a = self.acquire
        acquire = SimulateAnisotropicAcquisition(
            a.axis, a.factor, self._drawn(d, self.profile_key, a.profile, str),
            self._drawn(d, self.fwhm_scale_key, a.fwhm_scale, float), self._drawn(d, self.offset_key, 0.0, float),
            self._drawn(d, self.noise_key, a.noise, float), self._drawn(d, self.noise_seed_key, 0, int),
        )
        sources = self.noise_free_keys or self.keys
        for key, source, out_key in zip(self.keys, sources, self.output_keys):
            if key not in d:
                if self.allow_missing_keys:
                    continue
                raise KeyError(f"key {key!r} not found")
            d[out_key] = acquire(d[source] if source in d else d[key])
        return d


DRAWN_KEY_ARGUMENTS = ("profile_key", "fwhm_scale_key", "offset_key", "noise_key", "noise_seed_key",
                       "noise_free_keys")
"""The arguments of :class:`SimulateAnisotropicAcquisitiond` that pass a scan's drawn acquisition;
every config that simulates scans sets them all (tests/transforms/test_drawn_acquisition_keys.py)."""


def drawn_acquisition_arguments(contrast: str) -> dict[str, str]:
    """The datalist keys of ``contrast``'s drawn acquisition, as keyword arguments of
    :class:`SimulateAnisotropicAcquisitiond` (the embedded dataset's entry keys)."""
    return {"profile_key": f"{contrast}_slice_profile", "fwhm_scale_key": f"{contrast}_thickness_ratio",
            "offset_key": f"{contrast}_slab_offset", "noise_key": f"{contrast}_lr_noise",
            "noise_seed_key": f"{contrast}_noise_seed", "noise_free_keys": f"{contrast}_clean"}


class RandSimulateAnisotropicAcquisitiond(Randomizable, MapTransform):
    """Thick-slice acquisition with a random slab factor, drawn independently for every key.

    The random-scale training of ArSSR-style cohort INRs (Wu et al. 2022) for anisotropic LR:
    each key (usually an HR patch) is acquired along its own thick axis with a factor drawn
    uniformly from ``factor_range`` (continuous, so non-integer scales are trained), and the
    result goes to ``output_keys`` with its LR affine (the slab centres' world positions).
    The chosen factors are recorded in each output's ``meta["acquisition"]``.

    Args:
        keys: HR volumes ``(C, X, Y, Z)``.
        axes: one thick axis (``"x"/"y"/"z"`` or ``0/1/2``) per key, or one for all keys; ``None``
            entries draw the axis at random from the three.
        factor_range: ``(low, high)``, ``1 <= low <= high``; per-key draws from ``U(low, high)``.
        profile: slice profile, as in :class:`SimulateAnisotropicAcquisition`.
        output_keys: where the LR volumes go (default: overwrite ``keys``).
    """

    def __init__(
        self,
        keys: KeysCollection,
        axes: int | str | Sequence | None,
        factor_range: Sequence[float] = (1.5, 5.0),
        profile: str = "gaussian",
        output_keys: KeysCollection | None = None,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.output_keys = _output_keys(self.keys, output_keys)
        if axes is None or isinstance(axes, (int, str)):
            axes = [axes] * len(self.keys)
        if len(axes) != len(self.keys):
            raise ValueError(f"axes must be one axis or one per key ({len(self.keys)}), got {axes}")
        self.axes = [None if a is None else parse_axis(a) for a in axes]
        lo, hi = (float(f) for f in factor_range)
        if not (1.0 <= lo <= hi and math.isfinite(hi)):
            raise ValueError(f"factor_range must be (low, high) with 1 <= low <= high, got {factor_range}")
        self.factor_range = (lo, hi)
        if profile not in PROFILES:
            raise ValueError(f"slice profile must be one of {PROFILES}, got {profile!r}")
        self.profile = profile
        self._draws: list[tuple[int, float]] = []

    def randomize(self, data=None) -> None:
        self._draws = [
            (int(self.R.randint(3)) if axis is None else axis, float(self.R.uniform(*self.factor_range)))
            for axis in self.axes
        ]

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        self.randomize()
        for key, out_key, (axis, factor) in zip(self.keys, self.output_keys, self._draws):
            if key not in d:
                if self.allow_missing_keys:
                    continue
                raise KeyError(f"key {key!r} not found")
            d[out_key] = SimulateAnisotropicAcquisition(axis, factor, self.profile)(d[key])
        return d
