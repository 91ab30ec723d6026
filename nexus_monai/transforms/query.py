"""Query points for implicit networks: world coordinates, normalised coordinates and targets.

Training: :class:`SampleQueryPointsd` draws K voxel centres of the HR patch (or all of them) and
returns their world positions (mm), their normalised positions (through the subject's ONE
:class:`~nexus_monai.geometry.WorldNormalizer`, computed by :class:`ComputeWorldNormalizerd` on
the full LR scans before any cropping) and the ground truth at those voxels.

Inference: :func:`iter_query_chunks` walks any :class:`~nexus_monai.geometry.TargetGrid` in
bounded chunks.
"""

from __future__ import annotations

from typing import Hashable, Iterator, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable

from nexus_monai.geometry import TargetGrid, WorldNormalizer, as_affine, field_of_view, voxel_to_world
from nexus_monai.keys import QUERY_LABEL, QUERY_NORM, QUERY_WORLD, query_key

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
        ``query_label`` (K,) int64 from ``label_key`` when given.
    """

    def __init__(
        self,
        keys: KeysCollection,
        num_points: int | None = 4096,
        label_key: str | None = None,
        normalizer_key: str = "world_norm",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.num_points = None if num_points is None else int(num_points)
        self.label_key = label_key
        self.normalizer_key = normalizer_key
        self._flat: np.ndarray | None = None

    def randomize(self, total: int) -> None:
        if self.num_points is None or self.num_points >= total:
            self._flat = np.arange(total)
        else:
            self._flat = np.sort(self.R.choice(total, size=self.num_points, replace=False))

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
        self.randomize(int(np.prod(shape)))
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
        return d


def iter_query_chunks(grid: TargetGrid, normalizer: WorldNormalizer,
                      max_points: int = 65536) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """Yield ``(start, stop, world (n, 3), normalised (n, 3))`` over a full output grid."""
    for start, stop, world in grid.iter_world_chunks(max_points, dtype=torch.float64):
        yield start, stop, world.to(torch.float32), normalizer(world).to(torch.float32)


def patch_world_box(shape: Sequence[int], affine) -> torch.Tensor:
    """World-space axis-aligned bounds ``(2, 3)`` of a patch's voxel-edge box (for checks/logs)."""
    c = field_of_view(shape, affine)
    return torch.stack((c.min(0).values, c.max(0).values))
