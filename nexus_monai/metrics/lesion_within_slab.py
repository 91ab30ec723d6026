"""The within-slab part of a volume: what an LR scan's nominal acquisition operator cannot see.

For an LR scan with thick axis ``a`` and factor ``k`` the nominal operator (the header's: spacing and
affine only, Gaussian profile with FWHM = ``k``; the same operator ``ibp`` and the consistency guard
invert, :class:`~nexus_monai.transforms.consistency.AcquisitionModel`) is ``A = D S``: ``S`` resamples
an output-grid volume (trilinear) onto the scan's natural HR grid and ``D`` ``(M, n)`` averages each
slab along ``a``. ``P = D^+ D`` (``D^+`` the Moore-Penrose pseudo-inverse) is the orthogonal projector
onto what the slabs measure; the within-slab part of ``x`` is

    ``w(x) = S' (I - P) S x``

with ``S'`` the trilinear resampling back to the output grid: the part of ``x`` that varies inside
the slabs in a way the scan does not record (``A w = 0`` up to resampling). A guarded output is
``w(network) + A^+ y`` (the measured part, the same for every method that is made consistent with
the scan), so the lesion contrast a guarded network adds over back-projection is the contrast of its
within-slab part; the ground truth's own within-slab contrast is the reference (a lesion much
thinner than a slab has most of its contrast there).

Shapes: volumes ``(X, Y, Z)`` on the output grid; the LR scan is only read for its shape and affine.
"""

from __future__ import annotations

import functools

import torch

from nexus_monai.geometry import TargetGrid, as_affine, plain_tensor
from nexus_monai.transforms.acquisition import apply_along_axis
from nexus_monai.transforms.consistency import AcquisitionModel, _resample

__all__ = ["NOMINAL_PROFILE", "WithinSlab", "within_slab_operator", "within_slab_part"]

NOMINAL_PROFILE = "gaussian"
"""The nominal slice profile (FWHM = slab thickness) of the operator; never the scan's drawn one."""


class WithinSlab:
    """``x -> S' (I - D^+ D) S x`` for one LR scan header (``lr_shape``, ``lr_affine``) and an output ``grid``.

    The thick axis and factor come from the header alone (the axis whose spacing is largest relative
    to the other two), never from simulation metadata. An isotropic scan (``D = I``) has no
    within-slab part: :meth:`__call__` returns zeros.
    """

    def __init__(self, lr_shape, lr_affine, grid: TargetGrid, profile: str = NOMINAL_PROFILE):
        from monai.data import MetaTensor

        header_only = MetaTensor(torch.zeros(tuple(int(s) for s in lr_shape[-3:])), affine=as_affine(lr_affine))
        self.model = AcquisitionModel.of(header_only, grid, profile)
        self.null = None
        if self.model.matrix is not None:
            d = self.model.matrix.double()
            self.null = (torch.eye(d.shape[1], dtype=torch.float64) - torch.linalg.pinv(d) @ d).float()

    def __call__(self, x) -> torch.Tensor:
        """The within-slab part ``(X, Y, Z)`` (float32, same units as ``x``) of an output-grid volume."""
        x = plain_tensor(x).float()
        x = x[0] if x.ndim == 4 else x
        if self.null is None:
            return torch.zeros_like(x)
        m = self.model
        hr = _resample(x, m.grid.affine, m.hr)
        return _resample(apply_along_axis(hr, self.null, m.axis), m.hr.affine, m.grid)


@functools.lru_cache(maxsize=8)
def _cached(lr_shape: tuple, lr_affine: tuple, shape: tuple, affine: tuple, profile: str) -> WithinSlab:
    return WithinSlab(lr_shape, torch.tensor(lr_affine, dtype=torch.float64),
                      TargetGrid(shape, torch.tensor(affine, dtype=torch.float64)), profile)


def within_slab_operator(lr_shape, lr_affine, grid: TargetGrid, profile: str = NOMINAL_PROFILE) -> WithinSlab:
    """:class:`WithinSlab` of one header and grid, built once per process for the last few headers (the
    evaluation scores several methods of a subject against the same scans)."""
    key = lambda a: tuple(tuple(float(v) for v in r) for r in as_affine(a).tolist())  # noqa: E731
    return _cached(tuple(int(s) for s in lr_shape[-3:]), key(lr_affine), tuple(grid.shape), key(grid.affine), profile)


def within_slab_part(x, lr_shape, lr_affine, grid: TargetGrid, profile: str = NOMINAL_PROFILE) -> torch.Tensor:
    """The within-slab part ``(X, Y, Z)`` of one volume ``x`` under one header (:func:`within_slab_operator`)."""
    return within_slab_operator(lr_shape, lr_affine, grid, profile)(x)
