"""Local-window cross-attention between two feature maps on different grids (KD-Attn).

Full voxel-wise cross-attention over an upsampled 40^3 patch (64k x 64k scores) is infeasible;
this block lets each query point attend to the ``window`` of key-map voxels around the SAME
world position in the key map's own (LR) voxel grid: cost ``O(K * prod(window) * C)``, linear
in the number of query points (voxels). Default window 3 x 3 x 3 key voxels, 4 heads.

Shapes: query ``(B, K, C)``; ``key_map`` ``(B, C, x, y, z)``; ``key_index`` ``(B, K, 3)`` the query
points' continuous voxel indices in ``key_map``'s grid -> ``(B, K, C)`` (query + attention output).

How it runs (the same values as a per-point evaluation of the formula, up to float rounding):

* keys and values are projected once per key map (:meth:`LocalWindowCrossAttention.project_keys`,
  once per volume or tile), then each point's window rows are read with ONE ``index_select`` of
  whole ``2C`` rows and used in place (keys and values are strided views of it, never copied);
* the positional term ``pos(v - i)`` (``v`` a window voxel, ``i`` the query's continuous index)
  depends only on the window offset and the point's *positional signature* -- the per-axis offsets
  ``clamp(round(i) + o) - i`` -- which on an output grid aligned with the key grid takes a few
  values (the sub-voxel phases, e.g. 2 for 1 mm queries in a 2 mm slab grid, plus the clamped
  patterns at the volume's border). The positional MLP runs once per distinct signature and
  offset, and enters the scores as ``q . pos`` (one GEMM of the queries against the table);
  with more than ``MAX_PHASES`` distinct signatures (an oblique grid) the table rows are looked
  up per point instead (still one MLP evaluation per distinct signature);
* scores ``q . (k + pos) / sqrt(d)`` for all heads at once (a block-diagonal query, one batched
  GEMM with the positional scores as its addend), softmax over the window, and the values mixed
  with one batched GEMM; CPU inference runs this in blocks of ``BLOCK_POINTS`` points per thread
  (their window rows stay in cache), training and GPUs in one block.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import torch
from torch import nn

__all__ = ["LocalWindowCrossAttention", "MAX_PHASES", "BLOCK_POINTS", "block_points"]

MAX_PHASES = 8  # distinct positional signatures above which the positional table is looked up per point
BLOCK_POINTS = 4096  # points per block and thread in CPU inference: a block's window rows stay in cache


def block_points() -> int:
    """Points per block of CPU inference: ``BLOCK_POINTS`` per torch thread (each thread's share stays in its
    cache; fewer, larger parallel regions than a block per ``BLOCK_POINTS`` when several threads split it)."""
    return BLOCK_POINTS * max(1, torch.get_num_threads())


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
        self.last_phases = 0  # distinct positional signatures of the last call (diagnostics)

    def project_keys(self, key_map: torch.Tensor) -> torch.Tensor:
        """``(B, C, x, y, z)`` -> keys and values ``(B, x * y * z, 2C)`` on the key grid."""
        flat = key_map.flatten(2).transpose(1, 2)
        return self.to_kv(self.norm_kv(flat))

    def window_index(self, key_index: torch.Tensor, shape: Sequence[int]
                     ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Each point's window and positional signature.

        Returns ``flat`` ``(B, K, W)``: the window's key-grid rows (C order, clamped at the border, in
        the order of ``offsets``); per axis ``rel`` ``(B, K, w_a)``: the offsets ``clamp(round(i) + o) - i``
        (key-grid voxels, ``key_index``'s dtype, as a per-point evaluation computes them); per axis
        ``keys`` ``(B, K)`` int64: equal for two points exactly when their ``rel`` rows are equal
        (float32 indices; other dtypes: empty list). ``round(i) - i`` is exact in floating point
        (Sterbenz), so a row is fixed by it and the border clamp: ``rel_o = fl(e_o + (round(i) - i))``
        with ``e_o = clamp(round(i) + o) - round(i)``; a centre further than the half-window outside
        the grid reads one clamped voxel ``v`` for every offset, its row is ``fl(v - i)``.
        """
        centre = torch.round(key_index).long()
        flat, rel, keys = None, [], []
        # traced/scripted export: no dtype-reinterpreting view there, and no data-dependent grouping to bake in
        exact = key_index.dtype == torch.float32 and not (torch.jit.is_tracing() or torch.jit.is_scripting())
        for a, w in enumerate(self.window):
            n, r = int(shape[a]), w // 2
            c, i = centre[..., a], key_index[..., a]
            o = torch.arange(-r, r + 1, device=key_index.device)
            v = (c[..., None] + o).clamp(0, n - 1)  # (B, K, w_a)
            rel.append(v.to(key_index.dtype) - i[..., None])
            if exact:
                lo, hi = (c - r).clamp(0, n - 1) - c, (c + r).clamp(0, n - 1) - c  # in [-r, r] unless far
                far = (c < -r) | (c > n - 1 + r)
                value = torch.where(far, c.clamp(0, n - 1).to(i.dtype) - i, c.to(i.dtype) - i)
                bits = value.contiguous().view(torch.int32).long() & 0xFFFFFFFF
                pattern = torch.where(far, (2 + (c > 0).long()) << 48, ((lo + r) << 32) | ((hi + r) << 40))
                keys.append(bits | pattern)
            view = [1, 1, 1]
            view[a] = w
            v = v.reshape(*v.shape[:2], *view)
            flat = v if flat is None else flat * n + v
        return flat.reshape(*flat.shape[:2], -1), rel, keys

    def positional_table(self, rel: list[torch.Tensor], keys: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The positional MLP once per distinct signature: ``(table (U, W, C), signature id (B, K))``."""
        first = []  # per axis: one point of each distinct row, and every point's row id
        ids = None
        if keys:
            for a, k in enumerate(keys):
                flat_k = k.reshape(-1)
                lo, hi = torch.aminmax(flat_k)
                if bool(lo == hi):
                    inv, count = torch.zeros_like(flat_k), 1
                else:
                    uniq, inv = torch.unique(flat_k, sorted=False, return_inverse=True)
                    count = uniq.numel()
                rows = rel[a].reshape(-1, rel[a].shape[-1])
                pick = torch.empty(count, dtype=torch.long, device=inv.device).scatter_(
                    0, inv, torch.arange(inv.numel(), device=inv.device))  # some point of each row id
                first.append(rows.index_select(0, pick))
                ids = inv if ids is None else ids * count + inv
            total = first[0].shape[0] * first[1].shape[0] * first[2].shape[0]
            if total <= MAX_PHASES:  # every combination (a few unused ones cost nothing)
                sig = ids
                table_rel = [first[0][:, None, None, :, None, None], first[1][None, :, None, None, :, None],
                             first[2][None, None, :, None, None, :]]
                grid = torch.stack(torch.broadcast_tensors(*table_rel), -1).reshape(total, -1, 3)
                return self.pos(grid), sig.reshape(rel[0].shape[:2])
            uniq, sig = torch.unique(ids, sorted=False, return_inverse=True)
            pick = torch.empty(uniq.numel(), dtype=torch.long, device=sig.device).scatter_(
                0, sig, torch.arange(sig.numel(), device=sig.device))
            parts = [r.reshape(-1, r.shape[-1]).index_select(0, pick) for r in rel]
        else:
            unique, sig = torch.unique(torch.cat(rel, -1).reshape(-1, sum(self.window)), dim=0, return_inverse=True)
            parts = list(torch.split(unique, list(self.window), dim=-1))
        u = parts[0].shape[0]
        grid = torch.stack(torch.broadcast_tensors(parts[0][:, :, None, None], parts[1][:, None, :, None],
                                                   parts[2][:, None, None, :]), -1)  # (U, wx, wy, wz, 3)
        return self.pos(grid.reshape(u, -1, 3)), sig.reshape(rel[0].shape[:2])

    def forward(self, query: torch.Tensor, key_map: torch.Tensor, key_index: torch.Tensor,
                projected: torch.Tensor | None = None) -> torch.Tensor:
        """``query (B, K, C)``, ``key_map (B, C, x, y, z)``, ``key_index (B, K, 3)`` -> ``(B, K, C)``.

        ``projected``: :meth:`project_keys` of ``key_map``, to reuse it across query chunks.
        """
        b, k, c = query.shape
        if b * k == 0:  # no points: nothing to attend (the output keeps the query's empty shape)
            return query + self.out(query)
        h, d = self.heads, c // self.heads
        kv = self.project_keys(key_map) if projected is None else projected
        n = kv.shape[1]
        flat, rel, sig_keys = self.window_index(key_index, key_map.shape[-3:])
        w = flat.shape[-1]
        if b > 1:  # rows of the (B * N, 2C) table
            flat = flat + (torch.arange(b, device=flat.device) * n).view(b, 1, 1)
        flat = flat.reshape(b * k, w)
        table, sig = self.positional_table(rel, sig_keys)
        sig = sig.reshape(-1)
        u = table.shape[0]
        self.last_phases = int(u)
        q = self.to_q(self.norm_q(query)).reshape(b * k, c) * d**-0.5
        table = table.to(q.dtype)
        eye = torch.eye(h, dtype=q.dtype, device=q.device)
        pbd = None
        if u <= MAX_PHASES:  # (C, U * H * W): q . pos of every signature in one GEMM
            pbd = (table.reshape(u, w, h, d).permute(2, 3, 0, 1)[:, :, :, None, :]
                   * eye[:, None, None, :, None]).reshape(c, u * h * w)
        rows_kv = kv.reshape(b * n, 2 * c)
        # blocks keep a block's window rows in the CPU's cache; one block when training or on a GPU (launches)
        step = block_points() if query.device.type == "cpu" and not torch.is_grad_enabled() else b * k
        mixed = []
        for s in range(0, b * k, step):
            e = min(s + step, b * k)
            mixed.append(self._block(q[s:e], rows_kv, flat[s:e], table, sig[s:e], pbd, eye))
        mixed = torch.cat(mixed) if len(mixed) > 1 else mixed[0]
        return query + self.out(mixed.reshape(b, k, c).to(query.dtype) if mixed.dtype != query.dtype
                                else mixed.reshape(b, k, c))

    def _block(self, q, rows_kv, flat, table, sig, pbd, eye) -> torch.Tensor:
        """The attention of ``m`` points: ``q`` ``(m, C)`` (scaled), their window rows ``flat`` ``(m, W)``
        and signatures ``sig`` ``(m,)`` -> mixed values ``(m, C)`` (before the output projection)."""
        m, c = q.shape
        h = self.heads
        d = c // h
        w = flat.shape[-1]
        rows = rows_kv.index_select(0, flat.reshape(-1)).view(m, w, 2 * c)
        keys, values = rows[..., :c], rows[..., c:]  # (m, W, C) views
        qbd = (q.view(m, h, 1, d) * eye[None, :, :, None]).reshape(m, h, c)  # head h's dims in its own columns
        if pbd is not None:
            u = pbd.shape[1] // (h * w)
            pos_scores = (q @ pbd).view(m, u, h * w)
            if u > 1:
                pos_scores = pos_scores.gather(1, sig.view(m, 1, 1).expand(m, 1, h * w))
            pos_scores = pos_scores.view(m, h, w)
        else:
            pos_scores = torch.bmm(qbd, table.index_select(0, sig).transpose(1, 2))
        scores = torch.baddbmm(pos_scores, qbd, keys.transpose(1, 2).to(qbd.dtype))  # (m, H, W)
        attn = torch.softmax(scores, dim=-1)
        mixed = torch.bmm(attn, values.to(attn.dtype))  # (m, H, C): head h's block is its output
        return mixed.view(m, h, h, d).diagonal(dim1=1, dim2=2).transpose(1, 2).reshape(m, c)
