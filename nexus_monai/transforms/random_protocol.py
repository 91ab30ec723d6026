"""A training world of random acquisitions (SynthSR-style): every sample, every contrast its own protocol.

:class:`RandomProtocold` takes one HR patch per contrast (already cropped, e.g. by
:class:`~nexus_monai.transforms.patches.RandPairedPatchd` with ``patch_size`` = core + ``PAD``) and,
independently per contrast, draws (:class:`ProtocolDraw`):

* the thick axis x / y / z (uniform; two contrasts may share it);
* the factor ``k`` in ``factor_range`` (1-6): ``1`` (isotropic) with ``iso_prob``, an integer 2..6 with
  ``integer_prob``, else continuous (non-integer: a 5 mm slice over a 2 mm world is 2.5);
* the slice profile family (Gaussian or boxcar), the ratio thickness / spacing in ``ratio_range``
  (below 1 is a slice gap), a sub-voxel slab offset in [0, 1) HR voxel recorded in the LR affine (as a
  scanner records slice positions), and Rician noise with SD ``noise_range`` x the brain's 99.5th
  percentile (the HR patch is already divided by it: SD = the drawn fraction), added to the LR only
  and only where it is non-zero (a skull-stripped scan's background stays 0, as in the evaluation world);
* optionally (``world_mm_range``) the world voxel size: the patch is first anti-alias downsampled
  (Gaussian pre-filter, then linear resampling) from the render's spacing to the drawn one; never
  upsampled (a draw finer than the render is clipped to the render's spacing).

Whole-slab rule (random and non-integer factors). Along contrast m's thick axis the slab lattice starts
at the patch's first voxel plus the offset ``o``; ``M = ceil(core / k)`` slabs are kept, whose natural HR
samples (``ceil(M k)`` at ``o, o + 1, ...``) need ``n = ceil(o + ceil(M k))`` HR voxels: the patch is
padded (with the real anatomy beyond the core, cropped by the caller) to the largest such ``n`` over the
contrasts thick along that axis, ``core`` along the others; with ``PAD = 7`` voxels this always fits
(``ceil(M k) < core + k <= core + 6``). Every kept slab then lies whole inside the patch, so the data
consistency step on the patch sees exactly the scan's rows; voxels past the last slab (less than one
slab) are measured by no slab of m and stay in the null space of its operator.

The LR of a contrast is ``D_true S_o`` applied to the patch (``S_o``: linear resampling at the offset
samples, ``D_true``: the drawn profile and ratio,
:func:`~nexus_monai.networks.data_consistency.line_operator`), then noise. The network and its
consistency step see only the LR and its header: the nominal operator (Gaussian, FWHM = spacing, the
offset from the affine).

Query points for the consistency-trained loss are whole planes ("plates") of the padded patch spanned by
the two contrasts' thick axes (so every query lies on complete lines along both), ``~num_points`` in all.
Output keys: ``<c>_lr`` (MetaTensor with its LR affine), ``query_world``/``query_norm``/``query_<c>``/
``query_label`` as :class:`~nexus_monai.transforms.query.SampleQueryPointsd` gives them, and for the
consistency step ``plate_shape`` ``(3,)`` (plates, n_u, n_v), per contrast ``dc_<c>_op`` (nominal ``A``
of one line ``(M, n)``), ``dc_<c>_y`` (the plates' LR measurements, ``M`` along the line's plate
dimension), ``dc_<c>_dim`` (1 or 2: that plate dimension), ``dc_<c>_sigma`` (the LR patch's noise
estimate) and ``protocol_<c>`` (the draw, for logs).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable

from nexus_monai.geometry import (
    WorldNormalizer,
    as_affine,
    hr_affine_of_thick_slices,
    spacing,
    thick_slice_affine,
    voxel_to_world,
)
from nexus_monai.keys import QUERY_LABEL, QUERY_NORM, QUERY_WORLD, query_key
from nexus_monai.networks.data_consistency import line_operator
from nexus_monai.transforms.consistency import estimate_noise_sigma

__all__ = ["PAD", "ProtocolDraw", "RandomProtocold", "downsample_world", "slab_padding"]

PAD = 7  # HR voxels a caller adds to the core patch along every axis (whole-slab rule, module docstring)


@dataclass
class ProtocolDraw:
    """One contrast's drawn acquisition: ``axis`` (0/1/2), ``factor`` (>= 1), ``profile``, ``ratio``
    (thickness / spacing), ``offset`` (HR voxels), ``noise`` (SD / brain p99.5)."""

    axis: int
    factor: float
    profile: str
    ratio: float
    offset: float
    noise: float


def slab_padding(core: int, factor: float, offset: float) -> tuple[int, int]:
    """``(M slabs, n HR voxels)`` of the whole-slab rule for a core of ``core`` voxels."""
    m = int(math.ceil(core / float(factor) - 1e-9))
    n_nat = int(math.ceil(m * float(factor) - 1e-6))
    return m, int(math.ceil(float(offset) + n_nat - 1e-9))


def downsample_world(volume: torch.Tensor, affine, factor: float, mode: str = "bilinear") -> MetaTensor:
    """Anti-aliased isotropic downsampling of ``(C, X, Y, Z)`` by ``factor`` >= 1 (voxel size x factor).

    Images (``mode="bilinear"``): Gaussian pre-filter with SD ``sqrt(factor^2 - 1) / 2.355`` source voxels
    (FWHM of the new voxel less the old one's), then linear resampling at the new voxel centres (the
    first new voxel centred on the first ``factor`` source voxels, as a thick-slice slab is). Labels:
    ``mode="nearest"`` without the pre-filter. Returns a MetaTensor with the new affine.
    """
    f = float(factor)
    x = torch.as_tensor(volume.as_subclass(torch.Tensor) if isinstance(volume, MetaTensor) else volume).float()
    aff = as_affine(affine)
    if f <= 1.0 + 1e-6:
        return MetaTensor(x, affine=aff)
    if mode != "nearest":
        sd = math.sqrt(f * f - 1.0) / (2.0 * math.sqrt(2.0 * math.log(2.0)))
        r = max(1, int(math.ceil(3 * sd)))
        t = torch.arange(-r, r + 1, dtype=torch.float32)
        g = torch.exp(-0.5 * (t / sd) ** 2)
        g = g / g.sum()
        for dim in (1, 2, 3):
            shape = [1, 1, 1]
            shape[dim - 1] = len(g)
            x = F.conv3d(F.pad(x[:, None], [r if i == 3 - dim else 0 for i in range(3) for _ in (0, 1)],
                               mode="replicate"), g.reshape(1, 1, *shape))[:, 0]
    new_shape = [max(1, int(math.floor(n / f + 1e-9))) for n in x.shape[1:]]
    coords = [(torch.arange(n, dtype=torch.float32) * f + (f - 1.0) / 2.0) for n in new_shape]
    grid = torch.stack(torch.meshgrid(*coords, indexing="ij"), -1)
    norm = (2.0 * grid + 1.0) / torch.tensor(x.shape[1:], dtype=torch.float32) - 1.0
    out = F.grid_sample(x[None], norm.flip(-1)[None], mode=mode, padding_mode="border", align_corners=False)[0]
    new_aff = aff.clone()
    for a in range(3):
        new_aff = thick_slice_affine(new_aff, a, f)
    return MetaTensor(out, affine=new_aff)


class RandomProtocold(Randomizable, MapTransform):
    """Random acquisition per sample and per contrast, plates of query points, consistency-step inputs.

    Args:
        keys: the contrasts' HR patches ``(1, X, Y, Z)`` (one grid), e.g. ``("t1", "t2")``; the LR goes
            to ``<key>_lr``.
        label_key / mask_key: HR label (``query_label``) and brain mask (plates through brain) keys.
        core: the core patch size (HR voxels per axis); the input must be at least ``core + PAD``.
        num_points: query points per sample (whole plates, at least one).
        factor_range, iso_prob, integer_prob, profiles, ratio_range, noise_range, offset: the draw
            (module docstring); ``offset=False`` keeps slabs on the HR grid.
        world_mm_range: ``(low, high)`` world voxel size in mm, or ``None`` to keep the render's.
        normalizer_key: the subject's world normaliser (``ComputeWorldNormalizerd``).
    """

    def __init__(self, keys: KeysCollection = ("t1", "t2"), label_key: str | None = "seg",
                 mask_key: str | None = "brain", core: int = 24, num_points: int = 2048,
                 factor_range: Sequence[float] = (1.0, 6.0), iso_prob: float = 0.1, integer_prob: float = 0.4,
                 profiles: Sequence[str] = ("gaussian", "boxcar"), ratio_range: Sequence[float] = (0.7, 1.3),
                 noise_range: Sequence[float] = (0.0, 0.03), offset: bool = True,
                 world_mm_range: Sequence[float] | None = None, normalizer_key: str = "world_norm"):
        super().__init__(keys)
        self.label_key, self.mask_key = label_key, mask_key
        self.core, self.num_points = int(core), int(num_points)
        lo, hi = (float(v) for v in factor_range)
        if not 1.0 <= lo <= hi <= 6.0 + 1e-9:
            raise ValueError(f"factor_range must lie in [1, 6] with low <= high, got {factor_range}")
        self.factor_range = (lo, hi)
        self.iso_prob, self.integer_prob = float(iso_prob), float(integer_prob)
        self.profiles = tuple(profiles)
        self.ratio_range = tuple(float(v) for v in ratio_range)
        self.noise_range = tuple(float(v) for v in noise_range)
        self.offset = bool(offset)
        self.world_mm_range = None if world_mm_range is None else tuple(float(v) for v in world_mm_range)
        self.normalizer_key = normalizer_key
        self.draws: dict[str, ProtocolDraw] = {}

    def draw_one(self) -> ProtocolDraw:
        lo, hi = self.factor_range
        u = self.R.uniform()
        ints = [k for k in range(2, 7) if lo <= k <= hi]
        if u < self.iso_prob and lo <= 1.0:
            k = 1.0
        elif u < self.iso_prob + self.integer_prob and ints:
            k = float(self.R.choice(ints))
        else:
            k = float(self.R.uniform(max(lo, 1.0), hi))
        axis = int(self.R.randint(3))
        profile = str(self.profiles[int(self.R.randint(len(self.profiles)))])
        ratio = float(self.R.uniform(*self.ratio_range))
        offset = float(self.R.uniform()) if (self.offset and k > 1.0) else 0.0
        noise = float(self.R.uniform(*self.noise_range))
        return ProtocolDraw(axis, k, profile, ratio, offset, noise)

    def randomize(self, data=None) -> None:
        self.draws = {c: self.draw_one() for c in self.keys}
        self._world = None if self.world_mm_range is None else float(self.R.uniform(*self.world_mm_range))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        self.randomize()
        if self._world is not None:
            render = float(spacing(as_affine(d[self.keys[0]].affine)).min())
            f = max(1.0, self._world / render)
            for k in list(self.keys) + [k for k in (self.label_key, self.mask_key) if k and k in d]:
                d[k] = downsample_world(d[k], d[k].affine, f, "bilinear" if k in self.keys else "nearest")
        ref = d[self.keys[0]]
        shape = tuple(int(s) for s in ref.shape[1:])
        hr_aff = as_affine(ref.affine).double()
        # whole-slab rule: per axis the size the contrasts thick along it need (core elsewhere)
        sizes = [self.core] * 3
        for c, dr in self.draws.items():
            if dr.factor > 1.0:
                m, n = slab_padding(self.core, dr.factor, dr.offset)
                while n > shape[dr.axis] and m > 1:
                    m -= 1
                    n = int(math.ceil(dr.offset + math.ceil(m * dr.factor - 1e-6) - 1e-9))
                sizes[dr.axis] = max(sizes[dr.axis], n)
        sizes = [min(s, n) for s, n in zip(sizes, shape)]
        crop = tuple(slice(0, s) for s in sizes)
        for k in list(self.keys) + [k for k in (self.label_key, self.mask_key) if k and k in d]:
            d[k] = MetaTensor(d[k].as_subclass(torch.Tensor)[(slice(None),) + crop], affine=hr_aff.float())
        for c, dr in self.draws.items():
            d[f"{c}_lr"], d[f"dc_{c}_sigma"] = self._acquire(d[c], hr_aff, dr)
            d[f"protocol_{c}"] = asdict(dr)
        self._plates(d, sizes, hr_aff)
        return d

    def _acquire(self, hr: MetaTensor, hr_aff: torch.Tensor, dr: ProtocolDraw) -> tuple[MetaTensor, float]:
        x = hr.as_subclass(torch.Tensor).double()
        if dr.factor > 1.0:
            n = x.shape[dr.axis + 1]
            m, _ = slab_padding(self.core, dr.factor, dr.offset)
            m = min(m, max(1, int(math.floor((n - dr.offset) / dr.factor + 1e-9))))
            true_op, rows = line_operator(n, dr.offset, m, dr.factor, dr.profile, fwhm_scale=dr.ratio)
            x = (x.movedim(dr.axis + 1, -1) @ true_op.T).movedim(-1, dr.axis + 1)
            nat = hr_aff.clone()
            nat[:3, 3] += dr.offset * hr_aff[:3, dr.axis]
            lr_aff = thick_slice_affine(nat, dr.axis, dr.factor)  # the kept rows are a prefix: slab 0 first
        else:
            lr_aff = hr_aff.clone()
        if dr.noise > 0:
            n1 = torch.as_tensor(self.R.standard_normal(x.shape), dtype=torch.float64)
            n2 = torch.as_tensor(self.R.standard_normal(x.shape), dtype=torch.float64)
            noisy = torch.sqrt((x + dr.noise * n1) ** 2 + (dr.noise * n2) ** 2)
            x = torch.where(x != 0, noisy, torch.zeros_like(x))  # skull-stripped: the background stays 0
        lr = MetaTensor(x.float(), affine=lr_aff.float())
        return lr, float(estimate_noise_sigma(lr))

    def _plates(self, d: dict, sizes: Sequence[int], hr_aff: torch.Tensor) -> None:
        thick = sorted({dr.axis for dr in self.draws.values() if dr.factor > 1.0})
        if len(thick) >= 2:
            u, v = thick[0], thick[1]
        else:
            first = thick[0] if thick else int(self.R.randint(3))
            other = [a for a in range(3) if a != first][int(self.R.randint(2))]
            u, v = sorted((first, other))
        w = 3 - u - v
        n_plates = max(1, min(sizes[w], int(round(self.num_points / float(sizes[u] * sizes[v])))))
        candidates = np.arange(sizes[w])
        if self.mask_key and self.mask_key in d:
            mask = d[self.mask_key].as_subclass(torch.Tensor)[0] > 0
            fg = mask.float().mean(dim=tuple(a for a in range(3) if a != w)).numpy()
            if (fg > 0.05).sum() >= n_plates:
                candidates = np.flatnonzero(fg > 0.05)
        pos = np.sort(self.R.choice(candidates, size=n_plates, replace=False))
        iu, iv = torch.arange(sizes[u]), torch.arange(sizes[v])
        gp, gu, gv = torch.meshgrid(torch.as_tensor(pos), iu, iv, indexing="ij")
        index = torch.zeros(*gp.shape, 3, dtype=torch.long)
        index[..., w], index[..., u], index[..., v] = gp, gu, gv
        flat = index.reshape(-1, 3)
        world = voxel_to_world(flat.double(), hr_aff)
        d[QUERY_WORLD] = world.float()
        d[QUERY_NORM] = WorldNormalizer.from_dict(d[self.normalizer_key])(world).float()
        for c in self.keys:
            vol = d[c].as_subclass(torch.Tensor)[0]
            d[query_key(c)] = vol[flat[:, 0], flat[:, 1], flat[:, 2]][:, None].float()
        if self.label_key and self.label_key in d:
            lab = d[self.label_key].as_subclass(torch.Tensor)[0]
            d[QUERY_LABEL] = lab[flat[:, 0], flat[:, 1], flat[:, 2]].round().long()
        d["plate_shape"] = torch.tensor([n_plates, sizes[u], sizes[v]])
        for c, dr in self.draws.items():
            lr = d[f"{c}_lr"]
            y = lr.as_subclass(torch.Tensor)[0].index_select(w, torch.as_tensor(pos)).movedim(w, 0)  # (P, ., .)
            if dr.factor > 1.0:
                axis, dim = dr.axis, 1 if dr.axis == u else 2
                k_hdr = float(spacing(as_affine(lr.affine))[axis] / spacing(hr_aff)[axis])
                nat = hr_affine_of_thick_slices(as_affine(lr.affine).double(), axis, k_hdr)
                first = float((torch.linalg.inv(hr_aff) @ nat)[axis, 3])
                op, rows = line_operator(sizes[axis], first, lr.shape[axis + 1], k_hdr, "gaussian")
                y = y.index_select(dim, rows)
            else:  # isotropic: A = I, lines along the plate's first dimension
                dim = 1
                op = torch.eye(sizes[u], dtype=torch.float64)
            d[f"dc_{c}_op"] = op.float()
            d[f"dc_{c}_y"] = y.float().contiguous()
            d[f"dc_{c}_dim"] = torch.tensor(dim)
