"""The one place where coordinates are defined: world (mm) <-> voxel <-> ``grid_sample``.

Conventions used everywhere in nexus_monai:

* A volume is a channel-first tensor ``(C, X, Y, Z)`` (or batched ``(B, C, X, Y, Z)``); its
  spatial array axes are ``i, j, k = 0, 1, 2``, also called ``"x", "y", "z"``.
* An affine ``A`` is a 4x4 float64 matrix mapping voxel indices to world millimetres (RAS, as
  nibabel and MONAI's ``MetaTensor.affine`` hold them): ``world = A @ [i, j, k, 1]``. Integer
  indices are voxel *centres*; a voxel covers ``[i - 0.5, i + 0.5]``.
* ``torch.nn.functional.grid_sample`` on an input ``(B, C, X, Y, Z)`` reads ``grid[..., 0]``
  along ``Z``, ``grid[..., 1]`` along ``Y``, ``grid[..., 2]`` along ``X`` (reversed order), and
  with ``align_corners=False`` the normalised coordinate is ``g = (2 * index + 1) / n - 1``.
  Only :func:`voxel_to_grid` / :func:`grid_to_voxel` know this; everything else goes through
  them.
* Positional encodings see world coordinates through ONE per-subject
  :class:`WorldNormalizer` shared by every grid of that subject (never each grid's own min/max).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor

__all__ = [
    "AXES",
    "parse_axis",
    "as_affine",
    "batched_affine",
    "plain_tensor",
    "spacing",
    "world_to_voxel",
    "voxel_to_world",
    "voxel_to_grid",
    "grid_to_voxel",
    "world_to_grid",
    "voxel_to_voxel",
    "voxel_centres",
    "sample_at_world",
    "sample_at_voxel",
    "field_of_view",
    "thick_slice_affine",
    "hr_affine_of_thick_slices",
    "TargetGrid",
    "WorldNormalizer",
    "rotation_matrix",
    "make_affine",
]

AXES = {"x": 0, "y": 1, "z": 2, "i": 0, "j": 1, "k": 2, "0": 0, "1": 1, "2": 2}


def parse_axis(axis: int | str) -> int:
    """Array axis ``0/1/2`` from ``0/1/2`` or ``"x"/"y"/"z"`` (= array axes i/j/k, not world axes)."""
    key = str(axis).strip().lower()
    if key not in AXES:
        raise ValueError(f"axis must be one of x, y, z (array axes i, j, k) or 0, 1, 2; got {axis!r}")
    return AXES[key]


def as_affine(affine) -> torch.Tensor:
    """A float64 ``(4, 4)`` (or ``(B, 4, 4)``) torch affine from a tensor, MetaTensor or array."""
    if isinstance(affine,
                  MetaTensor) or (hasattr(affine, "affine") and not isinstance(affine, (torch.Tensor, np.ndarray))):
        affine = affine.affine
    if isinstance(affine, torch.Tensor):
        out = affine.detach().as_subclass(torch.Tensor) if type(affine) is not torch.Tensor else affine.detach()
        out = out.to(dtype=torch.float64, device="cpu")
    else:
        out = torch.as_tensor(np.asarray(affine, dtype=np.float64))
    if out.shape[-2:] != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {tuple(out.shape)}")
    return out


def batched_affine(image, batch: int) -> torch.Tensor:
    """The float64 affine of ``image`` as ``(batch, 4, 4)``: a single ``(4, 4)`` affine repeated (a view)."""
    a = as_affine(image.affine)
    return a.expand(batch, 4, 4) if a.ndim == 2 else a


def plain_tensor(x) -> torch.Tensor:
    """``x`` as a plain ``torch.Tensor`` (a MetaTensor's data without its metadata, no copy)."""
    return x.as_subclass(torch.Tensor) if isinstance(x, torch.Tensor) else torch.as_tensor(x)


def spacing(affine) -> torch.Tensor:
    """Voxel size in mm along array axes i, j, k: the column norms of the 3x3 part. ``(3,)``."""
    a = as_affine(affine)
    return torch.linalg.norm(a[..., :3, :3], dim=-2)


def _apply(points: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``matrix`` (4x4 or Bx4x4, float64) applied to points ``(..., 3)``; result in points' dtype."""
    p = torch.as_tensor(points)
    dtype = p.dtype if p.is_floating_point() else torch.float32
    m = matrix.to(p.device)
    p64 = p.to(torch.float64)
    if m.ndim == 3:  # batched: points (B, ..., 3)
        shape = p64.shape
        flat = p64.reshape(shape[0], -1, 3)
        out = flat @ m[:, :3, :3].transpose(1, 2) + m[:, None, :3, 3]
        return out.reshape(shape).to(dtype)
    return (p64 @ m[:3, :3].T + m[:3, 3]).to(dtype)


def world_to_voxel(points, affine) -> torch.Tensor:
    """Continuous voxel indices ``(..., 3)`` of world points ``(..., 3)`` in mm."""
    return _apply(points, torch.linalg.inv(as_affine(affine)))


def voxel_to_world(indices, affine) -> torch.Tensor:
    """World points in mm ``(..., 3)`` of continuous voxel indices ``(..., 3)``."""
    return _apply(indices, as_affine(affine))


def voxel_to_voxel(indices, src_affine, dst_affine) -> torch.Tensor:
    """Indices in grid ``src`` -> indices of the same world points in grid ``dst``."""
    return _apply(indices, torch.linalg.inv(as_affine(dst_affine)) @ as_affine(src_affine))


def voxel_to_grid(indices, shape: Sequence[int]) -> torch.Tensor:
    """Voxel indices ``(..., 3)`` (i, j, k) -> ``grid_sample`` coordinates (reversed axis order).

    ``align_corners=False``: index ``-0.5`` maps to ``-1`` and ``n - 0.5`` to ``+1``.
    """
    idx = torch.as_tensor(indices)
    n = torch.as_tensor([float(s) for s in shape[-3:]], dtype=idx.dtype if idx.is_floating_point() else torch.float32,
                        device=idx.device)
    g = (2.0 * idx + 1.0) / n - 1.0
    return g.flip(-1)


def grid_to_voxel(grid, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`voxel_to_grid`."""
    g = torch.as_tensor(grid).flip(-1)
    n = torch.as_tensor([float(s) for s in shape[-3:]], dtype=g.dtype, device=g.device)
    return ((g + 1.0) * n - 1.0) / 2.0


def world_to_grid(points, affine, shape: Sequence[int]) -> torch.Tensor:
    """World points ``(..., 3)`` mm -> ``grid_sample`` coordinates of a volume with that affine/shape."""
    return voxel_to_grid(world_to_voxel(points, affine), shape)


def voxel_centres(shape: Sequence[int], affine=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """World coordinates ``(X, Y, Z, 3)`` of every voxel centre (indices when ``affine`` is None)."""
    axes = [torch.arange(int(n), dtype=torch.float64) for n in shape[-3:]]
    idx = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    if affine is not None:
        idx = voxel_to_world(idx, affine)
    return idx.to(dtype)


def sample_at_world(
    volume: torch.Tensor,
    affine,
    points: torch.Tensor,
    mode: str = "bilinear",
    padding_mode: str = "border",
) -> torch.Tensor:
    """Sample ``volume`` at world points through its own inverse affine.

    Args:
        volume: ``(C, X, Y, Z)`` with affine ``(4, 4)``, or ``(B, C, X, Y, Z)`` with affine
            ``(4, 4)`` or ``(B, 4, 4)``.
        points: world mm, ``(N, 3)`` (unbatched) or ``(B, N, 3)``.
        mode: ``"bilinear"`` (= trilinear in 3D) or ``"nearest"``.
        padding_mode: ``"border"``, ``"zeros"`` or ``"reflection"`` (torch ``grid_sample``).

    Returns:
        ``(C, N)`` or ``(B, C, N)`` in the volume's dtype.
    """
    batched = volume.ndim == 5
    vol = volume.as_subclass(torch.Tensor) if isinstance(volume, torch.Tensor) else torch.as_tensor(volume)
    vol = vol if batched else vol[None]
    pts = torch.as_tensor(points)
    pts = pts if batched else pts[None]
    if pts.shape[0] != vol.shape[0]:
        pts = pts.expand(vol.shape[0], *pts.shape[1:])
    grid = world_to_grid(pts, affine, vol.shape[-3:]).to(device=vol.device, dtype=vol.dtype)
    out = F.grid_sample(vol, grid[:, :, None, None, :], mode=mode, padding_mode=padding_mode, align_corners=False)
    out = out[:, :, :, 0, 0]
    return out if batched else out[0]


def sample_at_voxel(volume: torch.Tensor, indices: torch.Tensor, mode: str = "bilinear",
                    padding_mode: str = "border") -> torch.Tensor:
    """Sample a batched volume ``(B, C, X, Y, Z)`` at continuous voxel indices ``(B, N, 3)`` -> ``(B, C, N)``.

    The index-space twin of :func:`sample_at_world` (same ``grid_sample`` convention).
    """
    grid = voxel_to_grid(indices, volume.shape[-3:]).to(device=volume.device, dtype=volume.dtype)
    out = F.grid_sample(volume, grid[:, :, None, None, :], mode=mode, padding_mode=padding_mode, align_corners=False)
    return out[:, :, :, 0, 0]


def field_of_view(shape: Sequence[int], affine) -> torch.Tensor:
    """The 8 world-space corners ``(8, 3)`` of the box covered by the voxels (edges, not centres)."""
    lo = [-0.5, -0.5, -0.5]
    hi = [float(n) - 0.5 for n in shape[-3:]]
    corners = torch.tensor(
        [[(lo, hi)[a][0], (lo, hi)[b][1], (lo, hi)[c][2]] for a in (0, 1) for b in (0, 1) for c in (0, 1)],
        dtype=torch.float64,
    )
    return voxel_to_world(corners, affine)


def thick_slice_affine(affine, axis: int | str, factor: float) -> torch.Tensor:
    """Affine of a thick-slice acquisition of a grid: slabs of ``factor`` voxels along ``axis``.

    LR voxel ``n`` along ``axis`` is centred on HR index ``n * factor + (factor - 1) / 2`` (the
    centre of its slab), so a world point maps to the same anatomy in both grids.
    """
    return as_affine(affine) @ _slab_matrix(axis, factor)


def hr_affine_of_thick_slices(lr_affine, axis: int | str, factor: float) -> torch.Tensor:
    """Inverse of :func:`thick_slice_affine`: the HR affine whose slabs give ``lr_affine``."""
    return as_affine(lr_affine) @ torch.linalg.inv(_slab_matrix(axis, factor))


def _slab_matrix(axis: int | str, factor: float) -> torch.Tensor:
    """HR index of LR index along ``axis``: ``n * factor + (factor - 1) / 2`` (4x4, float64)."""
    a = parse_axis(axis)
    m = torch.eye(4, dtype=torch.float64)
    m[a, a] = float(factor)
    m[a, 3] = (float(factor) - 1.0) / 2.0
    return m


@dataclass(frozen=True)
class TargetGrid:
    """An output grid: spatial ``shape`` (X, Y, Z) and a 4x4 ``affine`` (voxel -> world mm)."""

    shape: tuple[int, int, int]
    affine: torch.Tensor

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "affine", as_affine(self.affine))
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"target grid shape must be 3 positive ints, got {self.shape}")
        if not bool(torch.isfinite(self.affine).all()):
            raise ValueError("target grid affine is not finite (NaN or Inf)")
        if abs(float(torch.linalg.det(self.affine[:3, :3]))) < 1e-12:
            raise ValueError("target grid affine is singular")

    @classmethod
    def like(cls, image) -> "TargetGrid":
        """The grid of another image: a MetaTensor ``(C, X, Y, Z)`` or a nibabel image."""
        if hasattr(image, "header") and hasattr(image, "affine"):  # nibabel image
            return cls(tuple(image.shape[:3]), image.affine)
        return cls(tuple(image.shape[-3:]), image.affine)

    @classmethod
    def from_spacing(cls, shape: Sequence[int], affine, new_spacing: float | Sequence[float]) -> "TargetGrid":
        """Same field of view and orientation as ``(shape, affine)``, voxels of ``new_spacing`` mm.

        The new shape is ``round(n * old / new)`` per axis and the new grid is centred on the old
        one, so when the extents divide exactly the two fields of view coincide (e.g. a z x 2 LR
        grid resampled at the HR spacing gives back the HR grid exactly).
        """
        a = as_affine(affine)
        old = spacing(a)
        new = torch.as_tensor(new_spacing, dtype=torch.float64).expand(3).clone()
        if torch.any(new <= 0) or not torch.all(torch.isfinite(new)):
            raise ValueError(f"target spacing must be positive mm, got {new.tolist()}")
        n = torch.as_tensor([float(s) for s in shape[-3:]], dtype=torch.float64)
        new_n = torch.clamp(torch.round(n * old / new), min=1)
        ratio = new / old  # new voxel size in old voxel units
        m = torch.eye(4, dtype=torch.float64)
        m[:3, :3] = torch.diag(ratio)
        m[:3, 3] = (n - 1) / 2 - (new_n - 1) / 2 * ratio
        return cls(tuple(int(v) for v in new_n.tolist()), a @ m)

    @property
    def spacing(self) -> torch.Tensor:
        return spacing(self.affine)

    @property
    def num_voxels(self) -> int:
        return int(np.prod(self.shape))

    def world_coords(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """World coordinates of all voxel centres, ``(X, Y, Z, 3)`` mm."""
        return voxel_centres(self.shape, self.affine, dtype=dtype)

    def iter_world_chunks(self, max_points: int,
                          dtype: torch.dtype = torch.float32) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Yield ``(start, stop, coords (stop - start, 3))`` over the C-order flattened grid.

        Only one chunk of coordinates exists at a time, so memory stays bounded for any output
        size; write results into ``out.view(-1)[start:stop]``.
        """
        if max_points < 1:
            raise ValueError("max_points must be >= 1")
        nx, ny, nz = self.shape
        total = self.num_voxels
        for start in range(0, total, max_points):
            stop = min(start + max_points, total)
            flat = torch.arange(start, stop, dtype=torch.int64)
            idx = torch.stack((flat // (ny * nz), (flat // nz) % ny, flat % nz), dim=-1).to(torch.float64)
            yield start, stop, voxel_to_world(idx, self.affine).to(dtype)


class WorldNormalizer:
    """One per-subject map of world mm to normalised coordinates, shared by all of its grids.

    ``normalised = (world - centre) / scale`` with one isotropic ``scale`` (mm), chosen so the
    union of the given fields of view fits ``[-1, 1]`` along its longest side (aspect kept).
    """

    def __init__(self, centre: Sequence[float], scale: float):
        self.centre = torch.as_tensor(centre, dtype=torch.float64).reshape(3)
        self.scale = float(scale)
        if not self.scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")

    @classmethod
    def from_grids(cls, grids: Sequence[tuple[Sequence[int], object]], margin_mm: float = 0.0) -> "WorldNormalizer":
        """From ``[(shape, affine), ...]`` (e.g. both LR scans of a subject): the union box."""
        corners = torch.cat([field_of_view(s, a) for s, a in grids], dim=0)
        lo, hi = corners.min(0).values - margin_mm, corners.max(0).values + margin_mm
        return cls((lo + hi) / 2, float((hi - lo).max()) / 2)

    @classmethod
    def from_dict(cls, d: dict) -> "WorldNormalizer":
        centre, scale = d["centre"], d["scale"]
        centre = centre.detach().cpu().reshape(-1, 3)[0] if isinstance(centre, torch.Tensor) else centre
        scale = float(scale.reshape(-1)[0]) if isinstance(scale, torch.Tensor) else float(scale)
        return cls(centre, scale)

    def to_dict(self) -> dict:
        return {"centre": self.centre.clone(), "scale": torch.tensor(self.scale, dtype=torch.float64)}

    def __call__(self, world) -> torch.Tensor:
        w = torch.as_tensor(world)
        dtype = w.dtype if w.is_floating_point() else torch.float32
        return ((w.to(torch.float64) - self.centre.to(w.device)) / self.scale).to(dtype)

    def inverse(self, normalised) -> torch.Tensor:
        n = torch.as_tensor(normalised)
        return (n.to(torch.float64) * self.scale + self.centre.to(n.device)).to(n.dtype)

    def __repr__(self) -> str:
        c = ", ".join(f"{v:.2f}" for v in self.centre.tolist())
        return f"WorldNormalizer(centre=[{c}] mm, scale={self.scale:.2f} mm)"


def rotation_matrix(angles_deg: Sequence[float]) -> torch.Tensor:
    """3x3 rotation (float64) from x-y-z Euler angles in degrees (R = Rz @ Ry @ Rx)."""
    ax, ay, az = (math.radians(float(v)) for v in angles_deg)
    rx = torch.tensor([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]],
                      dtype=torch.float64)
    ry = torch.tensor([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]],
                      dtype=torch.float64)
    rz = torch.tensor([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]],
                      dtype=torch.float64)
    return rz @ ry @ rx


def make_affine(spacing_mm: Sequence[float], origin_mm: Sequence[float] = (0.0, 0.0, 0.0),
                rotation_deg: Sequence[float] = (0.0, 0.0, 0.0)) -> torch.Tensor:
    """A 4x4 affine with the given voxel size (mm), origin (world mm of voxel 0) and rotation."""
    a = torch.eye(4, dtype=torch.float64)
    a[:3, :3] = rotation_matrix(rotation_deg) @ torch.diag(torch.as_tensor(spacing_mm, dtype=torch.float64))
    a[:3, 3] = torch.as_tensor(origin_mm, dtype=torch.float64)
    return a

