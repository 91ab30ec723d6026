"""Query points for implicit networks: world coordinates, normalised coordinates and targets.

Training: :class:`SampleQueryPointsd` draws K voxel centres of the HR patch (or all of them) and
returns their world positions (mm), their normalised positions (through the subject's ONE
:class:`~nexus_monai.geometry.WorldNormalizer`, computed by :class:`ComputeWorldNormalizerd` on
the full LR scans before any cropping) and the ground truth at those voxels.

Lesion-aware points (training only; off by default): with ``lesion_key`` (the patch's lesion instance
map) the points also carry ``query_lesion``, the signed region code of
:func:`~nexus_monai.transforms.lesions.lesion_region` (``+v`` inside lesion ``v``, ``-v`` in its ring,
0 elsewhere), which the lesion-weighted loss reads; with ``lesion_point_fraction`` f a share of the
K points is drawn inside the lesions of ``lesion_classes`` and their rings: ``min(round(f K), n)``
of the ``n`` such voxels, uniformly without replacement, the rest uniformly among the other voxels.

Inference: :func:`iter_query_chunks` walks any :class:`~nexus_monai.geometry.TargetGrid` in
bounded chunks.
"""

from __future__ import annotations

import warnings
from typing import Hashable, Iterator, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable

from nexus_monai.geometry import TargetGrid, WorldNormalizer, as_affine, field_of_view, voxel_to_world
from nexus_monai.keys import LESION_CLASS_STRIDE, QUERY_LABEL, QUERY_LESION, QUERY_NORM, QUERY_WORLD, query_key
from nexus_monai.transforms.lesions import DEFAULT_LESION_CLASSES, RING_VOXELS, lesion_region

__all__ = ["ComputeWorldNormalizerd", "SampleQueryPointsd", "iter_query_chunks", "patch_world_box"]


class ComputeWorldNormalizerd(MapTransform):
    """Store ``WorldNormalizer.from_grids`` of ``keys`` (their shapes and affines) in ``output_key``.

    Use the subject's LR scans (what exists at inference time); the value is a dict of tensors
    ``{"centre": (3,), "scale": ()}`` that collates into batches.
    """

    def __init__(self, keys: KeysCollection, output_key: str = "world_norm", margin_mm: float = 0.0,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.output_key = output_key
        self.margin_mm = float(margin_mm)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        grids = [(d[k].shape[1:], as_affine(d[k].affine)) for k in self.key_iterator(d)]
        if not grids:
            raise KeyError(f"none of {self.keys} found to build the world normaliser")
        d[self.output_key] = WorldNormalizer.from_grids(grids, self.margin_mm).to_dict()
        return d


class SampleQueryPointsd(Randomizable, MapTransform):
    """Sample K HR voxel centres of ``keys`` (images on one grid) as query points.

    Adds (K = ``num_points``, or every voxel when None):
        ``query_world`` (K, 3) float32 world mm; ``query_norm`` (K, 3) float32 normalised;
        ``query_index`` (K, 3) int64 voxel indices in the HR (patch) grid;
        ``query_<key>`` (K, C) float32 ground-truth values for each key;
        ``query_label`` (K,) int64 from ``label_key`` when given;
        ``query_lesion`` (K,) int64 region code from ``lesion_key`` when given (zeros, with a
        warning, for a sample without that key, so a batch always collates).

    ``lesion_point_fraction``, ``lesion_classes`` and ``lesion_ring`` (voxels): see the module
    docstring; with fraction 0 (default) the points are drawn exactly as without a lesion map.
    """

    def __init__(
        self,
        keys: KeysCollection,
        num_points: int | None = 4096,
        label_key: str | None = None,
        normalizer_key: str = "world_norm",
        allow_missing_keys: bool = False,
        lesion_key: str | None = None,
        lesion_point_fraction: float = 0.0,
        lesion_classes: Sequence[int] = DEFAULT_LESION_CLASSES,
        lesion_ring: int = RING_VOXELS,
    ):
        super().__init__(keys, allow_missing_keys)
        self.num_points = None if num_points is None else int(num_points)
        self.label_key = label_key
        self.normalizer_key = normalizer_key
        if not 0.0 <= float(lesion_point_fraction) <= 1.0:
            raise ValueError(f"lesion_point_fraction must be in [0, 1], got {lesion_point_fraction}")
        if float(lesion_point_fraction) > 0 and not lesion_key:
            raise ValueError("lesion_point_fraction > 0 needs lesion_key (the patch's lesion instance map)")
        self.lesion_key, self.lesion_point_fraction = lesion_key, float(lesion_point_fraction)
        self.lesion_classes = tuple(int(c) for c in lesion_classes)
        self.lesion_ring = int(lesion_ring)
        self._warned = False
        self._flat: np.ndarray | None = None

    def randomize(self, total: int, region: np.ndarray | None = None) -> None:
        """Draw the flat voxel indices; ``region``: flat indices of the lesion(+ring) voxels to over-sample."""
        if self.num_points is None or self.num_points >= total:
            self._flat = np.arange(total)
        elif region is None or region.size == 0 or self.lesion_point_fraction <= 0:
            self._flat = np.sort(self.R.choice(total, size=self.num_points, replace=False))
        else:
            n_in = min(int(round(self.lesion_point_fraction * self.num_points)), region.size)
            rest = np.setdiff1d(np.arange(total), region, assume_unique=True)
            n_out = min(self.num_points - n_in, rest.size)
            n_in = self.num_points - n_out  # a patch almost all lesion: fill up from the region
            chosen = np.concatenate((self.R.choice(region, size=n_in, replace=False),
                                     self.R.choice(rest, size=n_out, replace=False)))
            self._flat = np.sort(chosen)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        keys = list(self.key_iterator(d))
        ref = d[keys[0]]
        shape = tuple(ref.shape[1:])
        for k in keys[1:] + ([self.label_key] if self.label_key else []):
            if tuple(d[k].shape[1:]) != shape:
                raise ValueError(f"query keys must share one grid: {k!r} has {tuple(d[k].shape[1:])}, {keys[0]!r} has "
                                 f"{shape}")
        if self.normalizer_key not in d:
            raise KeyError(f"{self.normalizer_key!r} missing: run ComputeWorldNormalizerd on the full scans first")
        code = self._lesion_code(d, shape)
        region = None
        if code is not None and self.lesion_point_fraction > 0:
            cls = np.abs(code).reshape(-1) // LESION_CLASS_STRIDE
            region = np.flatnonzero(np.isin(cls, np.asarray(self.lesion_classes, dtype=np.int64)) & (cls > 0))
        self.randomize(int(np.prod(shape)), region)
        flat = torch.as_tensor(self._flat)
        index = torch.stack(torch.unravel_index(flat, shape), dim=-1)
        world = voxel_to_world(index.to(torch.float64), as_affine(ref.affine))
        norm = WorldNormalizer.from_dict(d[self.normalizer_key])
        d["query_index"] = index
        d[QUERY_WORLD] = world.to(torch.float32)
        d[QUERY_NORM] = norm(world).to(torch.float32)
        for k in keys:
            v = d[k].as_subclass(torch.Tensor).reshape(d[k].shape[0], -1)
            d[query_key(k)] = v[:, flat].T.to(torch.float32).contiguous()
        if self.label_key:
            d[QUERY_LABEL] = d[self.label_key].as_subclass(torch.Tensor).reshape(-1)[flat].round().long()
        if code is not None:
            d[QUERY_LESION] = torch.as_tensor(code.reshape(-1)[self._flat])
        return d

    def _lesion_code(self, d: Mapping, shape: tuple[int, ...]) -> np.ndarray | None:
        """The patch's signed lesion region code ``(X, Y, Z)``; zeros if the sample has no map; None without
        ``lesion_key``."""
        if not self.lesion_key:
            return None
        if self.lesion_key not in d:
            if not self._warned:
                warnings.warn(f"SampleQueryPointsd: no {self.lesion_key!r} in the sample (no lesion map): its query "
                              f"points carry no lesion, lesion-aware sampling and weighting do nothing for it",
                              stacklevel=2)
                self._warned = True
            return np.zeros(shape, np.int64)
        if tuple(d[self.lesion_key].shape[1:]) != shape:
            raise ValueError(f"lesion map {self.lesion_key!r} has shape {tuple(d[self.lesion_key].shape[1:])}, the "
                             f"query grid {shape}")
        return lesion_region(d[self.lesion_key], self.lesion_ring)


def iter_query_chunks(grid: TargetGrid, normalizer: WorldNormalizer,
                      max_points: int = 65536) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """Yield ``(start, stop, world (n, 3), normalised (n, 3))`` over a full output grid."""
    for start, stop, world in grid.iter_world_chunks(max_points, dtype=torch.float64):
        yield start, stop, world.to(torch.float32), normalizer(world).to(torch.float32)


def patch_world_box(shape: Sequence[int], affine) -> torch.Tensor:
    """World-space axis-aligned bounds ``(2, 3)`` of a patch's voxel-edge box (for checks/logs)."""
    c = field_of_view(shape, affine)
    return torch.stack((c.min(0).values, c.max(0).values))
