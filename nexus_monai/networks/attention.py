"""Local-window cross-attention between two feature maps on different grids (KD-Attn).

Full voxel-wise cross-attention over an upsampled 40^3 patch (64k x 64k scores) is infeasible;
this block lets each query point attend to the ``window`` of key-map voxels around the SAME
world position in the key map's own (LR) voxel grid: cost ``O(K * prod(window) * C)``, linear
in the number of query points (voxels). Default window 3 x 3 x 3 key voxels, 4 heads.

Shapes: query ``(B, K, C)``; ``key_map`` ``(B, C, x, y, z)``; ``key_index`` ``(B, K, 3)`` the query
points' continuous voxel indices in ``key_map``'s grid -> ``(B, K, C)`` (query + attention output).
"""

from __future__ import annotations

import itertools
from typing import Sequence

import torch
from torch import nn

__all__ = ["LocalWindowCrossAttention"]


class LocalWindowCrossAttention(nn.Module):
    """Multi-head cross-attention of query features to the key map's voxels in a local window.

    The window is ``window`` key-grid voxels centred on the key voxel nearest to each query
    (indices clamped at the border). Keys/values are projected on the key grid before the
    lookup (a per-voxel LayerNorm + linear map), and the continuous offset of each window voxel
    from the query (key-grid voxels) is embedded and added to its key.

    Args:
        dim: feature dimension C of queries and keys.
        heads: attention heads (``dim`` must be divisible by it).
        window: window size in key-grid voxels per axis (odd numbers).
    """

    def __init__(self, dim: int, heads: int = 4, window: Sequence[int] = (3, 3, 3)):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        if any(int(w) % 2 == 0 for w in window):
            raise ValueError(f"window sizes must be odd, got {tuple(window)}")
        self.heads, self.dim = heads, dim
        self.window = tuple(int(w) for w in window)
        offsets = list(itertools.product(*[range(-(w // 2), w // 2 + 1) for w in self.window]))
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.long))  # (W, 3) voxel offsets
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.pos = nn.Sequential(nn.Linear(3, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))
        self.out = nn.Linear(dim, dim)

    def project_keys(self, key_map: torch.Tensor) -> torch.Tensor:
        """``(B, C, x, y, z)`` -> keys and values ``(B, x * y * z, 2C)`` on the key grid."""
        flat = key_map.flatten(2).transpose(1, 2)
        return self.to_kv(self.norm_kv(flat))

    def forward(self, query: torch.Tensor, key_map: torch.Tensor, key_index: torch.Tensor,
                projected: torch.Tensor | None = None) -> torch.Tensor:
        """``query (B, K, C)``, ``key_map (B, C, x, y, z)``, ``key_index (B, K, 3)`` -> ``(B, K, C)``.

        ``projected``: :meth:`project_keys` of ``key_map``, to reuse it across query chunks.
        """
        b, k, c = query.shape
        shape = torch.tensor(key_map.shape[-3:], device=query.device)
        kv = self.project_keys(key_map) if projected is None else projected
        centre = torch.round(key_index).long()
        # (B, K, W, 3)
        voxels = (centre[:, :, None, :] + self.offsets).clamp(min=torch.zeros_like(shape), max=shape - 1)
        flat = (voxels[..., 0] * shape[1] + voxels[..., 1]) * shape[2] + voxels[..., 2]  # (B, K, W)
        w, n = flat.shape[-1], kv.shape[1]
        if b > 1:  # rows of the (B * N, 2C) table
            flat = flat + (torch.arange(b, device=flat.device) * n).view(b, 1, 1)
        # whole rows by index_select: the same values as a gather with an expanded index, 3x faster on CPU (measured)
        gathered = kv.reshape(b * n, 2 * c).index_select(0, flat.reshape(-1)).reshape(b, k, w, 2 * c)
        keys, values = gathered.chunk(2, dim=-1)
        keys = keys + self.pos((voxels.to(key_index.dtype) - key_index[:, :, None, :]))
        h, d = self.heads, c // self.heads
        q = self.to_q(self.norm_q(query)).reshape(b, k, h, 1, d)
        keys = keys.reshape(b, k, w, h, d).transpose(2, 3)  # (B, K, H, W, d)
        values = values.reshape(b, k, w, h, d).transpose(2, 3)
        attn = torch.softmax((q @ keys.transpose(-1, -2)) / d**0.5, dim=-1)  # (B, K, H, 1, W)
        mixed = (attn @ values).reshape(b, k, c)
        return query + self.out(mixed)
