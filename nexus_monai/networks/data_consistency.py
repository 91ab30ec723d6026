"""Soft data consistency inside the network (ours): the network's estimate corrected toward each LR scan.

For one contrast with network estimate ``f`` (on an output grid), LR scan ``y`` and the scan's
*nominal* acquisition operator ``A`` (what the NIfTI header tells: thick axis and spacing from the
affine, slab positions from the affine, Gaussian profile with FWHM = the slice spacing; the operator
of :class:`~nexus_monai.transforms.consistency.AcquisitionModel`), the consistency step is

    ``x = f + A^T (A A^T + lambda I)^-1 (y - A f)``

the maximum-a-posteriori estimate for a Gaussian prior ``f`` with per-voxel error ``tau`` and
measurement noise ``sigma``: ``lambda = (sigma^2 + sigma_floor^2) / tau^2``. ``sigma`` is the scan's
noise estimate (:func:`~nexus_monai.transforms.consistency.estimate_noise_sigma`, in the intensity
units the network works in) and ``tau`` a learned scalar per contrast. ``lambda -> 0`` is the hard
projection onto ``A x = y`` (it copies the scan's noise into the output); a huge ``lambda`` leaves
``x = f``.

Where the operator is applied:

* **lines** (:func:`line_operator`, :func:`soft_consistency`): when the output grid shares the
  scan's in-plane grid (training patches, and prediction on the acquisition's own HR grid), ``A``
  acts along the thick axis only, one ``(M, n)`` matrix per line: the trilinear resampling of the
  line onto the scan's natural HR samples (a sub-voxel slab offset recorded in the header is a shift
  here) followed by the slice-profile rows; ``A A^T`` is ``M x M`` and solved exactly (Cholesky).
* **grid** (:func:`grid_consistency`): on any other output grid (another in-plane spacing, oblique)
  ``A`` is not separable on the output grid; ``(A A^T + lambda I) u = r`` is solved by conjugate
  gradients with ``A`` = :meth:`AcquisitionModel.acquire` and ``A^T`` its exact adjoint (autograd
  vector-Jacobian product of the same trilinear resampling), then ``x = f + A^T u``.

LR voxels whose slab leaves the output grid are not used (their rows are dropped), as in the guard.
At inference the step runs once on the stitched output volume (``A^+`` is not local along a line),
so a tiled decode gives the same result as an untiled one.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nexus_monai.geometry import TargetGrid, as_affine, plain_tensor
from nexus_monai.transforms.acquisition import num_thick_slices, slice_profile_matrix
from nexus_monai.transforms.consistency import ISOTROPIC_TOLERANCE, AcquisitionModel, estimate_noise_sigma

__all__ = ["line_operator", "soft_consistency", "grid_consistency", "SoftDataConsistency", "separable_layout"]


def _interp_matrix(n_out: int, positions: torch.Tensor) -> torch.Tensor:
    """``(len(positions), n_out)`` linear interpolation at continuous indices of a line of ``n_out`` voxels
    (the border value within half a voxel beyond the end voxels, 0 further out: the rule of the guard's
    resampling)."""
    p = positions.to(torch.float64)
    inside = (p >= -0.5 - 1e-6) & (p <= n_out - 0.5 + 1e-6)
    p = p.clamp(0.0, n_out - 1.0)
    lo = torch.floor(p).long().clamp(max=n_out - 1)
    hi = (lo + 1).clamp(max=n_out - 1)
    w_hi = p - lo.to(torch.float64)
    s = torch.zeros(len(p), n_out, dtype=torch.float64)
    rows = torch.arange(len(p))
    s[rows, lo] += 1.0 - w_hi
    s[rows, hi] += w_hi
    return s * inside[:, None]


def line_operator(n_out: int, first: float, n_lr: int, factor: float, profile: str = "gaussian",
                  step: float = 1.0, fwhm_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The acquisition of one line of ``n_out`` output voxels by ``n_lr`` slabs -> ``(A (M, n_out), rows (M,))``.

    The scan's natural HR samples (``k = factor`` per slab, :func:`natural_hr_grid
    <nexus_monai.transforms.consistency.natural_hr_grid>`) sit at output indices ``first + j * step``;
    ``A = D S`` with ``S`` their linear interpolation from the line and ``D`` the slice-profile rows
    (:func:`~nexus_monai.transforms.acquisition.slice_profile_matrix`, ``D = I`` for ``factor = 1``).
    ``rows``: the LR slabs whose samples all lie on the line (the others are dropped from ``A``).
    float64.
    """
    k = float(factor)
    if abs(k - 1.0) <= ISOTROPIC_TOLERANCE:
        n_nat, d = n_lr, torch.eye(n_lr, dtype=torch.float64)
    else:
        n_nat = int(math.ceil(n_lr * k - 1e-6))
        if num_thick_slices(n_nat, k) < n_lr:
            n_nat += 1
        d = slice_profile_matrix(n_nat, k, profile, fwhm_scale)[:n_lr]
    s = _interp_matrix(n_out, float(first) + float(step) * torch.arange(n_nat, dtype=torch.float64))
    a = d @ s
    rows = torch.nonzero(a.sum(1) > 0.999).flatten()
    return a[rows], rows


def soft_consistency(f: torch.Tensor, y: torch.Tensor, op: torch.Tensor, lam, dim: int) -> torch.Tensor:
    """``x = f + A^T (A A^T + lambda I)^-1 (y - A f)`` along dimension ``dim`` of ``f``.

    ``f``: ``(B, ...)`` with the line of ``n`` voxels along ``dim``; ``y``: the same shape with ``M``
    along ``dim`` (the measurements of each line); ``op``: ``A`` ``(M, n)`` shared by every line;
    ``lam``: a float or ``(B,)`` (one value per item). Returns ``x`` shaped like ``f``.
    """
    if op.shape[0] == 0:
        return f
    dtype = f.dtype
    fl = f.movedim(dim, -1).to(torch.float64)
    yl = y.movedim(dim, -1).to(torch.float64)
    a = op.to(device=f.device, dtype=torch.float64)
    b = fl.shape[0]
    lam_t = torch.as_tensor(lam, dtype=torch.float64, device=f.device).reshape(-1)
    lam_t = lam_t.expand(b) if lam_t.numel() == 1 else lam_t
    gram = (a @ a.T)[None] + lam_t[:, None, None] * torch.eye(a.shape[0], dtype=torch.float64, device=f.device)
    r = (yl - fl @ a.T).reshape(b, -1, a.shape[0])  # (B, L, M)
    chol = torch.linalg.cholesky(gram)
    u = torch.cholesky_solve(r.transpose(1, 2), chol).transpose(1, 2)  # (B, L, M)
    x = fl + (u @ a).reshape(fl.shape)
    return x.to(dtype).movedim(-1, dim)


def separable_layout(model: AcquisitionModel, grid: TargetGrid, atol: float = 1e-4):
    """``(axis, first, step, shifts)`` when the scan's operator acts along lines of ``grid``, else ``None``.

    Separable means: the natural HR grid of the scan and ``grid`` share the in-plane axes with unit
    scale and whole-voxel shifts (``shifts[b]``: output index = natural index + shift along in-plane axis
    ``b``), and the thick axis maps onto the output's same axis (``first`` + ``step`` x natural index).
    """
    axis = model.axis if model.axis is not None else 0
    m = torch.linalg.inv(grid.affine.double()) @ as_affine(model.hr.affine).double()  # natural index -> output
    lin = m[:3, :3]
    off = lin - torch.diag(torch.diagonal(lin))
    if float(off.abs().max()) > atol:
        return None
    shifts = {}
    for b in range(3):
        if b == axis:
            continue
        t = float(m[b, 3])
        if abs(float(lin[b, b]) - 1.0) > atol or abs(t - round(t)) > atol:
            return None
        shifts[b] = int(round(t))
    if float(lin[axis, axis]) <= 0:
        return None
    return axis, float(m[axis, 3]), float(lin[axis, axis]), shifts


def _lines_on_grid(model: AcquisitionModel, f: torch.Tensor, grid: TargetGrid, lam: float, layout) -> torch.Tensor:
    axis, first, step, shifts = layout
    op, rows = line_operator(grid.shape[axis], first, model.lr.shape[axis], model.factor if model.axis is not None
                             else 1.0, model.profile, step)
    if op.shape[0] == 0:
        return f
    x = f.clone()
    out_sl, lr_sl = [slice(None)] * 3, [slice(None)] * 3
    for b, t in shifts.items():  # the in-plane overlap of the output grid and the scan
        lo, hi = max(0, t), min(grid.shape[b], model.lr.shape[b] + t)
        if hi <= lo:
            return f
        out_sl[b], lr_sl[b] = slice(lo, hi), slice(lo - t, hi - t)
    y = model.lr[tuple(lr_sl)].index_select(axis, rows)
    x[tuple(out_sl)] = soft_consistency(f[tuple(out_sl)][None], y[None], op, lam, axis + 1)[0]
    return x


def _conjugate_gradients(matvec, b: torch.Tensor, iterations: int, tol: float) -> tuple[torch.Tensor, int]:
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = float((r * r).sum())
    stop = tol * tol * max(rs, 1e-30)
    it = 0
    for it in range(1, int(iterations) + 1):
        if rs <= stop:
            it -= 1
            break
        ap = matvec(p)
        alpha = rs / max(float((p * ap).sum()), 1e-30)
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = float((r * r).sum())
        p = r + (rs_new / max(rs, 1e-30)) * p
        rs = rs_new
    return x, it


def grid_consistency(f: torch.Tensor, lr, grid: TargetGrid, lam: float, profile: str = "gaussian",
                     cg_iterations: int = 50, cg_tol: float = 1e-6, stats: dict | None = None,
                     mode: str = "auto") -> torch.Tensor:
    """The consistency step on a whole output volume ``f`` ``(X, Y, Z)`` on ``grid`` against LR MetaTensor ``lr``.

    Separable case (:func:`separable_layout`): exact solve per line. Otherwise conjugate gradients on
    ``(A A^T + lambda I) u = y - A f`` (``cg_iterations``, relative residual ``cg_tol``). ``stats``
    (optional dict) receives ``{"mode": "lines" | "cg", "cg_iterations": n}``. ``mode="cg"`` forces
    conjugate gradients also on a separable grid (a cross-check of the two solvers).
    """
    f = plain_tensor(f).float()
    f = f[0] if f.ndim == 4 else f
    model = AcquisitionModel.of(lr, grid, profile)
    layout = separable_layout(model, grid) if mode == "auto" else None
    if layout is not None:
        if stats is not None:
            stats.update(mode="lines", cg_iterations=0)
        return _lines_on_grid(model, f, grid, lam, layout)
    covered = model.covered.float()

    def forward(v):
        return model.acquire(v) * covered

    def adjoint(u):
        _, vjp = torch.func.vjp(forward, torch.zeros_like(f))
        return vjp(u)[0]

    r = (model.lr - model.acquire(f)) * covered
    with torch.enable_grad():
        u, n_it = _conjugate_gradients(lambda v: forward(adjoint(v)) + lam * v, r, cg_iterations, cg_tol)
        x = f + adjoint(u)
    if stats is not None:
        stats.update(mode="cg", cg_iterations=n_it)
    return x.detach()


class SoftDataConsistency(nn.Module):
    """``x = f + A^T (A A^T + lambda I)^-1 (y - A f)`` with ``lambda = (sigma^2 + sigma_floor^2) / tau_m^2``.

    ``tau_m`` (per contrast, learned, initial ``tau``): the expected per-voxel error of the network's
    estimate, in the network's intensity units (LR scans divided by their 99.5th percentile: ``tau``
    0.05 = 5 % of bright tissue). ``sigma_floor`` keeps a noise-free scan from a hard projection.
    """

    def __init__(self, contrasts=("t1", "t2"), tau: float = 0.05, sigma_floor: float = 0.005):
        super().__init__()
        self.log_tau = nn.ParameterDict({c: nn.Parameter(torch.tensor(math.log(float(tau)))) for c in contrasts})
        self.sigma_floor = float(sigma_floor)

    def lam(self, contrast: str, sigma) -> torch.Tensor:
        """``lambda`` for noise ``sigma`` (float or ``(B,)``) -> tensor of the same shape."""
        s = torch.as_tensor(sigma, dtype=torch.float32, device=self.log_tau[contrast].device)
        return (s ** 2 + self.sigma_floor ** 2) * torch.exp(-2.0 * self.log_tau[contrast])

    def lines(self, contrast: str, f: torch.Tensor, y: torch.Tensor, op: torch.Tensor, sigma, dim: int) -> torch.Tensor:
        """Training form: :func:`soft_consistency` along ``dim`` with this contrast's ``lambda`` (differentiable)."""
        return soft_consistency(f, y, op, self.lam(contrast, sigma), dim)

    @torch.no_grad()
    def on_grid(self, contrast: str, f: torch.Tensor, lr, grid: TargetGrid, sigma: float | None = None,
                stats: dict | None = None) -> torch.Tensor:
        """Inference form: :func:`grid_consistency` on the stitched volume; ``sigma`` from the scan when None."""
        sigma = estimate_noise_sigma(lr) if sigma is None else float(sigma)
        lam = float(self.lam(contrast, sigma).detach().cpu())
        return grid_consistency(f, lr, grid, lam, stats=stats)
