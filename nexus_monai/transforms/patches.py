"""Paired random patches: one HR patch and, per modality, the LR patch covering the same world box.

Example (paper protocol): HR ``40^3`` <-> T1 LR (z x 2) ``40 x 40 x 20`` <-> T2 LR (y x 4)
``40 x 10 x 40``. The HR start along each axis is drawn from the positions where every LR grid
has a voxel edge on the HR patch edge, so the boxes coincide exactly for integer factors; for
non-integer factors the LR crop is the nearest voxel-aligned box (within half an LR voxel).
All LR grids must be axis-aligned with the HR grid (same orientation, any scaling/offset).

One draw (start, flips, rot90) is shared by every key; flips and rotations go through MONAI's
``Flip`` / ``Rotate90``, which update each MetaTensor's affine, so after augmentation every
patch still maps its voxels to the same world box (coordinates stay consistent with the arrays).

Rotations keep the acquisition: a quarter turn in the plane of array axes ``(a, b)`` swaps those
axes, so it is drawn only when EVERY patch (HR and each LR) has the same size along ``a`` and
``b``; half turns (which swap nothing) are allowed in every plane. Each LR patch therefore keeps
its thick axis on the same array axis as at inference, and items of a batch keep one shape and
collate. With two contrasts thick along different axes (T1w z x 2, T2w y x 4) every plane holds a
thick axis, so only the three half turns remain (the same arrays as flipping two axes).

Lesion-aware patches (training only; off by default): with ``lesion_key`` (a lesion instance map
on the HR grid, cropped and flipped with the other HR keys) and probability ``lesion_patch_prob``,
a draw is centred on a contrast-specific lesion instead of a foreground voxel: one instance of the
``lesion_classes`` is picked uniformly among the subject's instances (not by voxel count, so a small
lesion is as likely as a large one), then one of its voxels uniformly, and the start along each
axis uniformly among the aligned starts whose patch contains that voxel (no foreground check).
A subject without such lesions (or without a map) gets the ordinary draw.
"""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import Flip, MapTransform, Randomizable, Rotate90, SpatialCrop

from nexus_monai.geometry import as_affine
from nexus_monai.transforms.lesions import DEFAULT_LESION_CLASSES, lesion_instances

__all__ = ["RandPairedPatchd", "hr_to_lr_index_map"]


def hr_to_lr_index_map(hr_affine, lr_affine, tol: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """``(scale (3,), offset (3,))`` with ``lr_index = scale * hr_index + offset`` per axis.

    Raises ``ValueError`` when the LR grid is rotated or permuted relative to the HR grid.
    """
    t = (torch.linalg.inv(as_affine(lr_affine)) @ as_affine(hr_affine)).numpy()
    off_diag = t[:3, :3] - np.diag(np.diag(t[:3, :3]))
    if np.abs(off_diag).max() > tol or np.any(np.diag(t[:3, :3]) <= 0):
        raise ValueError("LR grid is not axis-aligned with the HR grid (rotated, flipped or permuted); paired patches "
                         "need aligned grids")
    return np.diag(t[:3, :3]).copy(), t[:3, 3].copy()


class RandPairedPatchd(Randomizable, MapTransform):
    """Crop one HR patch from ``hr_keys`` and matching LR patches from ``lr_keys``.

    Args:
        hr_keys: volumes on the HR grid ``(C, X, Y, Z)`` (images, label, mask), all one grid.
        lr_keys: LR volumes ``(C, x, y, z)`` whose affines are axis-aligned with the HR grid.
        patch_size: HR patch size in voxels, e.g. ``(40, 40, 40)``.
        mask_key: HR-grid key whose non-zero voxels count as foreground (default: first HR key).
        min_foreground: minimum foreground fraction of a patch. Each draw is centred on a random
            foreground voxel (the patch contains it up to slab alignment); up to ``max_tries``
            draws, then the draw with the most foreground is used.
        flip_prob: probability of flipping along each spatial axis (independently).
        rot90_prob: probability of a rotation, drawn uniformly among the shape-preserving
            ``(k, plane)`` pairs (see the module docstring; ``k`` quarter turns, 1..3).
        lesion_key: HR-grid key of a lesion instance map (list it in ``hr_keys`` too, so it is
            cropped and flipped with the images); needed only with ``lesion_patch_prob > 0``.
        lesion_patch_prob: probability that a draw is centred on a lesion of ``lesion_classes``
            (default 0: the ordinary draw, and the random stream of the transform without lesions).
        lesion_classes: visibility classes (:mod:`nexus_monai.keys`) a lesion draw picks from
            (default: T2w-only and T1w-only).
    """

    def __init__(
        self,
        hr_keys: KeysCollection,
        lr_keys: KeysCollection,
        patch_size: Sequence[int],
        mask_key: str | None = None,
        min_foreground: float = 0.25,
        max_tries: int = 20,
        flip_prob: float = 0.0,
        rot90_prob: float = 0.0,
        allow_missing_keys: bool = False,
        lesion_key: str | None = None,
        lesion_patch_prob: float = 0.0,
        lesion_classes: Sequence[int] = DEFAULT_LESION_CLASSES,
    ):
        hr = [hr_keys] if isinstance(hr_keys, str) else list(hr_keys)
        lr = [lr_keys] if isinstance(lr_keys, str) else list(lr_keys)
        super().__init__(hr + lr, allow_missing_keys)
        self.hr_keys, self.lr_keys = hr, lr
        self.patch_size = tuple(int(p) for p in patch_size)
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be 3 positive ints, got {patch_size}")
        self.mask_key = mask_key or hr[0]
        self.min_foreground = float(min_foreground)
        self.max_tries = int(max_tries)
        self.flip_prob, self.rot90_prob = float(flip_prob), float(rot90_prob)
        if not 0.0 <= float(lesion_patch_prob) <= 1.0:
            raise ValueError(f"lesion_patch_prob must be in [0, 1], got {lesion_patch_prob}")
        if float(lesion_patch_prob) > 0 and not lesion_key:
            raise ValueError("lesion_patch_prob > 0 needs lesion_key (the HR lesion instance map)")
        self.lesion_key, self.lesion_patch_prob = lesion_key, float(lesion_patch_prob)
        self.lesion_classes = tuple(int(c) for c in lesion_classes)
        self.lesion_centred = False  # whether the last draw was centred on a lesion
        self._start: np.ndarray | None = None
        self._flips: tuple[int, ...] = ()
        self._rot: tuple[int, tuple[int, int]] | None = None

    def _lr_windows(self, d: Mapping, start: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        out = {}
        p = np.asarray(self.patch_size, dtype=np.float64)
        for key in self.lr_keys:
            if key not in d:
                continue
            scale, offset = self.maps[key]
            lo_edge = scale * (start - 0.5) + offset  # LR continuous coordinate of the HR patch edge
            lo = np.rint(lo_edge + 0.5).astype(int)
            size = np.maximum(np.rint(p * scale).astype(int), 1)
            out[key] = (lo, lo + size)
        return out

    def _candidates(self, d: Mapping, hr_shape: np.ndarray) -> list[np.ndarray]:
        """Per-axis HR start positions where every LR crop is voxel-aligned and inside its volume."""
        cands = []
        for ax in range(3):
            starts = np.arange(0, hr_shape[ax] - self.patch_size[ax] + 1)
            if starts.size == 0:
                raise ValueError(f"patch size {self.patch_size} exceeds HR volume {tuple(hr_shape)}")
            aligned = np.ones(starts.size, bool)
            inside = np.ones(starts.size, bool)
            for key in self.lr_keys:
                if key not in d:
                    continue
                scale, offset = self.maps[key]
                edge = scale[ax] * (starts - 0.5) + offset[ax] + 0.5
                aligned &= np.abs(edge - np.rint(edge)) < 1e-4
                lo = np.rint(edge).astype(int)
                hi = lo + max(int(np.rint(self.patch_size[ax] * scale[ax])), 1)
                inside &= (lo >= 0) & (hi <= d[key].shape[ax + 1])
            good = starts[aligned & inside]
            if good.size == 0:  # non-integer factors: no exact alignment, nearest box instead
                good = starts[inside]
            if good.size == 0:
                raise ValueError(f"no patch position of size {self.patch_size} fits inside every LR volume along axis "
                                 f"{ax}")
            cands.append(good)
        return cands

    def randomize(self, data: Mapping) -> None:
        hr_shape = np.asarray(data[self.hr_keys[0]].shape[1:])
        cands = self._candidates(data, hr_shape)
        self.lesion_centred = False
        if self.lesion_patch_prob > 0 and self.R.rand() < self.lesion_patch_prob:
            start = self._lesion_start(data, cands)
            if start is not None:
                self._start, self.lesion_centred = start, True
                self._draw_augmentation(data)
                return
        mask = data.get(self.mask_key)
        fg_idx = torch.nonzero(mask[0] != 0) if mask is not None else None
        best, best_fg = None, -1.0
        for _ in range(max(self.max_tries, 1)):
            if fg_idx is not None and len(fg_idx):
                # centre the draw on a random foreground voxel: the patch contains it where alignment allows
                voxel = fg_idx[self.R.randint(len(fg_idx))].numpy()
                target = voxel - np.array([self.R.randint(p) for p in self.patch_size])
                start = np.array([c[np.argmin(np.abs(c - t))] for c, t in zip(cands, target)])
            else:
                start = np.array([c[self.R.randint(len(c))] for c in cands])
            if mask is None:
                best = start
                break
            sl = tuple(slice(int(s), int(s) + p) for s, p in zip(start, self.patch_size))
            fg = float((mask[(slice(None),) + sl] != 0).float().mean())
            if fg > best_fg:
                best, best_fg = start, fg
            if fg >= self.min_foreground:
                break
        self._start = best
        self._draw_augmentation(data)

    def _lesion_start(self, data: Mapping, cands: list[np.ndarray]) -> np.ndarray | None:
        """An aligned start whose patch contains a voxel of a uniformly picked lesion; None without lesions."""
        label = data.get(self.lesion_key) if self.lesion_key else None
        if label is None:
            return None
        instances = lesion_instances(label, self.lesion_classes)
        if not instances:
            return None
        voxels = instances[sorted(instances)[self.R.randint(len(instances))]]
        voxel = voxels[self.R.randint(len(voxels))]
        start = []
        for c, v, p in zip(cands, voxel, self.patch_size):
            holds = c[(c <= v) & (v < c + p)]
            start.append(holds[self.R.randint(len(holds))] if holds.size else c[np.argmin(np.abs(c - (v - p // 2)))])
        return np.asarray(start)

    def _draw_augmentation(self, data: Mapping) -> None:
        self._flips = tuple(ax for ax in range(3) if self.R.rand() < self.flip_prob)
        self._rot = None
        if self.R.rand() < self.rot90_prob:
            options = self.rotations(data)
            self._rot = options[self.R.randint(len(options))]

    def rotations(self, data: Mapping) -> list[tuple[int, tuple[int, int]]]:
        """The ``(k, plane)`` rotations that keep every patch's shape (thick axes stay put)."""
        sizes = [np.asarray(self.patch_size)]
        for key in self.lr_keys:
            if key in data:
                sizes.append(np.maximum(np.rint(np.asarray(self.patch_size) * self.maps[key][0]).astype(int), 1))
        out = []
        for plane in ((0, 1), (0, 2), (1, 2)):
            square = all(sz[plane[0]] == sz[plane[1]] for sz in sizes)
            out += [(k, plane) for k in ((1, 2, 3) if square else (2,))]
        return out

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        hr_ref = d[self.hr_keys[0]]
        for key in self.hr_keys[1:]:
            if key in d and (
                d[key].shape[1:] != hr_ref.shape[1:]
                or not torch.allclose(as_affine(d[key]), as_affine(hr_ref), atol=1e-4)
            ):
                raise ValueError(f"HR key {key!r} is not on the grid of {self.hr_keys[0]!r}")
        self.maps = {k: hr_to_lr_index_map(hr_ref.affine, d[k].affine) for k in self.lr_keys if k in d}
        self.randomize(d)
        start = self._start
        windows = self._lr_windows(d, start)
        for key in self.hr_keys:
            if key in d:
                d[key] = SpatialCrop(roi_start=start.tolist(), roi_end=(start + self.patch_size).tolist())(d[key])
        for key, (lo, hi) in windows.items():
            d[key] = SpatialCrop(roi_start=lo.tolist(), roi_end=hi.tolist())(d[key])
        for key in self.key_iterator(d):
            if self._flips:
                d[key] = Flip(spatial_axis=self._flips)(d[key])
            if self._rot is not None:
                d[key] = Rotate90(k=self._rot[0], spatial_axes=self._rot[1])(d[key])
        d["patch_start"] = torch.as_tensor(start)
        return d
