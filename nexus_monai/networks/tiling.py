"""Tiled encoding of :class:`~nexus_monai.networks.NexusINR`: bounded memory whatever the volume size.

The encoders are fully convolutional (stride 1, zero 'same' padding), so the feature at an LR
voxel depends only on the input within the receptive-field radius ``r`` (:func:`receptive_radius`).
A box of an LR grid (the *core*) is therefore encoded exactly from the input cropped to the core
grown by ``r`` voxels on every side (the *halo*), clamped at the volume's edges, where the crop's
own zero padding is the volume's. Everything after the encoders is per voxel (KD-Attn keys) or
per query point (lookups, attention window, MLPs), so decoding the query points of one output
tile needs only the cores around them: a core spans the points' continuous indices in that LR
grid plus ``margin`` voxels (trilinear corners and the attention window), and a query then sees
exactly the voxels it would see in the whole map (interior) or the same clamped edge voxels.

Pieces (used by :class:`~nexus_monai.engines.inr.ImplicitGridInferer`):

* :func:`receptive_radius`, :func:`window_margin`: halo and margin of a network.
* :func:`core_box`: the core of one LR grid for a set of query indices.
* :func:`encode_box`: the network's maps (features + KD-Attn keys) on the cores, with the cropped
  LR images and their affines, ready for ``network.decode``.
* :func:`plan_tile_shape`: the output-tile shape of least encoder work (halos included) whose
  estimated memory fits a byte budget; :func:`plan_tiles` also bounds the halo overhead
  (encoder voxels computed / untiled encoder voxels), growing the budget up to a cap to meet
  it; :func:`iter_boxes` walks the output grid in such tiles.
"""

from __future__ import annotations

import itertools
import math
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from nexus_monai.networks.attention import block_points
from nexus_monai.networks.encoders import channels_last_convs

__all__ = [
    "receptive_radius", "encoder_radius", "window_margin", "lookup_margin", "encoder_bytes_per_voxel",
    "decode_bytes_per_point", "decode_fixed_bytes", "encoder_macs_per_voxel", "core_box", "TILE_OVERHEAD_MACS",
    "CALL_OVERHEAD_MACS",
    "encode_box", "plan_tile_shape", "plan_tiles", "iter_boxes", "tile_memory_bytes",
]

MIN_TILE_EDGE = 8
# fixed costs of the plan's cost model, in encoder multiply-adds of the same time (measured order of magnitude on
# a 2-core CPU at ~200 GFLOP/s: ~10 ms per tile -- crops, 4 encoder calls, key projection --, ~2 ms per decode
# call; on CUDA every kernel launch is such a cost: ``plan_tiles``' ``call_overhead_macs`` sets it per device)
TILE_OVERHEAD_MACS = 1.0e9
CALL_OVERHEAD_MACS = 0.2e9
_SPATIAL = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.Upsample, nn.modules.conv._ConvTransposeNd)


def receptive_radius(module: nn.Module) -> int:
    """Receptive-field radius (voxels) of a stride-1 fully convolutional encoder: the sum over its
    ``Conv3d`` layers of ``dilation * (k - 1) / 2`` (the longest path through any residual/dense
    graph is at most every convolution once). ``ValueError`` if a layer is strided, not 'same'
    padded with zeros, or otherwise changes the grid (pooling, upsampling)."""
    radius = 0
    for name, m in module.named_modules():
        if isinstance(m, _SPATIAL):
            raise ValueError(f"{name}: {type(m).__name__} changes the voxel grid; the encoder cannot be tiled")
        if isinstance(m, nn.Conv3d):
            half = [d * (k - 1) // 2 for k, d in zip(m.kernel_size, m.dilation)]
            if any(s != 1 for s in m.stride) or list(m.padding) != half or m.padding_mode != "zeros":
                raise ValueError(f"{name}: only stride-1 zero 'same'-padded convolutions can be tiled")
            radius += max(half)
    return radius


def encoder_radius(network: nn.Module) -> int:
    """The halo of a network: the largest :func:`receptive_radius` of its encoders."""
    return max((receptive_radius(e) for e in network.encoders.values()), default=0)


def window_margin(network: nn.Module) -> int:
    """Voxels a query at continuous index ``i`` may read below ``floor(i)`` (above: ``floor(i) + 1`` and
    this many more; :func:`core_box` adds both): the widest KD-Attn window radius (the window is centred
    on ``round(i)``) + 1 for float rounding between crop and whole-grid indices."""
    half = [int(w) // 2 for m in network.modules() if hasattr(m, "window") and hasattr(m, "offsets") for w in m.window]
    return 1 + max(half, default=0)


def lookup_margin(network: nn.Module, affines: Mapping[str, torch.Tensor]) -> int:
    """Voxels (any LR grid) a decode may read beyond its queries' own indices, added to :func:`window_margin`:
    the network's ``lookup_margin(affines)`` (NexusINR's ``cross_null_space`` reads each query's slab
    points), 0 for a network without one."""
    fn = getattr(network, "lookup_margin", None)
    return int(fn(affines)) if callable(fn) else 0


def encoder_bytes_per_voxel(encoder: nn.Module) -> int:
    """Upper estimate of an encoder's working memory per voxel during inference: every convolution
    output alive at once plus the widest input (concatenations), float32."""
    convs = [m for m in encoder.modules() if isinstance(m, nn.Conv3d)]
    return 4 * (sum(m.out_channels for m in convs) + max((m.in_channels for m in convs), default=1))


def decode_bytes_per_point(network: nn.Module, blocked: bool = True) -> int:
    """Upper estimate of ``network.decode``'s working memory per query point (float32): lookups, the
    decoder MLPs and the KD-Attn per-point tensors (window row indices, positional signatures, queries).
    ``blocked`` (CPU inference): KD-Attn's window rows and scores live per block of points
    (:func:`decode_fixed_bytes`); otherwise (a GPU: one block) they count per point too."""
    c = int(getattr(network, "features", 64))
    attns = [m for m in network.modules() if hasattr(m, "offsets") and hasattr(m, "window")]
    window = max((len(m.offsets) for m in attns), default=0)
    heads = max((int(m.heads) for m in attns), default=0)
    hidden = max((m.out_features for m in network.modules() if isinstance(m, nn.Linear)), default=c)
    rows = 0 if blocked else 2 * window * (2 * c + 4 * heads) * 4
    return 16 * window + rows + 4 * (20 * c + 4 * hidden) + 256


def decode_fixed_bytes(network: nn.Module) -> int:
    """``network.decode``'s working memory independent of the chunk (float32): one CPU block of KD-Attn
    (its window rows, scores and weights; :func:`~nexus_monai.networks.attention.block_points` points)."""
    c = int(getattr(network, "features", 64))
    attns = [m for m in network.modules() if hasattr(m, "offsets") and hasattr(m, "window")]
    if not attns:
        return 0
    window = max(len(m.offsets) for m in attns)
    heads = max(int(m.heads) for m in attns)
    return 2 * block_points() * window * (2 * c + 4 * heads) * 4


def encoder_macs_per_voxel(encoder: nn.Module) -> int:
    """Multiply-adds per output voxel of a stride-1 convolutional encoder: every ``Conv3d``'s kernel
    volume x input channels / groups x output channels."""
    return int(sum(math.prod(m.kernel_size) * m.in_channels // m.groups * m.out_channels
                   for m in encoder.modules() if isinstance(m, nn.Conv3d)))


def core_box(index: torch.Tensor, shape: Sequence[int], margin: int) -> tuple[list[int], list[int]]:
    """``(lo, hi)`` (``hi`` exclusive) of the LR voxels that points at continuous ``index`` ``(N, 3)``
    can read, ``margin`` voxels around them, clamped to the grid ``shape``."""
    lo_f = torch.floor(index.min(0).values).tolist()
    hi_f = torch.floor(index.max(0).values).tolist()
    lo, hi = [], []
    for a, b, n in zip(lo_f, hi_f, shape):
        start = min(max(int(a) - margin, 0), int(n) - 1)
        lo.append(start)
        hi.append(max(min(int(b) + margin + 2, int(n)), start + 1))
    return lo, hi


def _crop(x: torch.Tensor, lo: Sequence[int], hi: Sequence[int]) -> torch.Tensor:
    return x[..., lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]


def _shifted(affine: torch.Tensor, lo: Sequence[int]) -> torch.Tensor:
    """The affine of a crop starting at voxel ``lo``: ``affine @ translate(lo)``."""
    shift = torch.eye(4, dtype=affine.dtype, device=affine.device)
    shift[:3, 3] = torch.as_tensor([float(v) for v in lo], dtype=affine.dtype)
    return affine @ shift


def encode_box(network: nn.Module, images: Mapping[str, torch.Tensor], affines: Mapping[str, torch.Tensor],
               boxes: Mapping[str, tuple[Sequence[int], Sequence[int]]], radius: int, channels_last: bool = True,
               ) -> tuple[dict, dict, dict]:
    """Encode the cores ``boxes[m] = (lo, hi)`` of each LR image ``(1, 1, X, Y, Z)`` exactly.

    Returns ``(maps, cropped images, cropped affines)``: the arguments of ``network.decode`` for
    query points whose cores these are (``maps`` as from ``network.encode`` on the cropped images,
    but with every feature computed from the input around it, halo ``radius`` voxels).
    """
    maps: dict[str, torch.Tensor] = {}
    crops, crop_affines = {}, {}
    with channels_last_convs(channels_last):
        for m, image in images.items():
            lo, hi = boxes[m]
            shape = image.shape[-3:]
            hlo = [max(0, a - radius) for a in lo]
            hhi = [min(int(n), b + radius) for b, n in zip(hi, shape)]
            x = _crop(image, hlo, hhi)
            inner = ([a - h for a, h in zip(lo, hlo)], [b - h for b, h in zip(hi, hlo)])
            for name, encoder in network.encoders.items():
                if name.split("_")[0] == m:
                    maps[name] = _crop(encoder(x), *inner).contiguous()
            crops[m] = _crop(image, lo, hi).contiguous()
            crop_affines[m] = _shifted(affines[m], lo)
    return network.add_attention_keys(maps), crops, crop_affines


def iter_boxes(shape: Sequence[int], tile: Sequence[int]) -> Iterator[tuple[list[int], list[int]]]:
    """``(lo, hi)`` voxel boxes of ``tile`` (last ones cut at the edge) covering a grid of ``shape``."""
    ranges = [range(0, int(n), int(t)) for n, t in zip(shape, tile)]
    for start in itertools.product(*ranges):
        yield list(start), [min(s + int(t), int(n)) for s, t, n in zip(start, tile, shape)]


def _lr_extent(jacobian: np.ndarray, tile: np.ndarray) -> np.ndarray:
    """LR voxels spanned by output tiles ``(T, 3)`` through ``|d index_lr / d index_out|`` ``(3, 3)``."""
    return np.ceil(tile @ np.abs(jacobian).T) + 1


def tile_memory_bytes(tile: np.ndarray, lr: Sequence[tuple[np.ndarray, Sequence[int], int]], radius: int, margin: int,
                      enc_bytes: int, map_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(memory, encoder voxels)`` per candidate output tile ``(T, 3)``; ``lr``: per LR grid
    ``(jacobian, shape, encoders)``. Memory: the largest halo crop's encoder work + every core's
    maps + input crops + the tile's query coordinates; voxels: encoder outputs incl. halos."""
    tile = np.asarray(tile, dtype=np.float64).reshape(-1, 3)
    work, maps, voxels = np.zeros(len(tile)), np.zeros(len(tile)), np.zeros(len(tile))
    for jac, shape, n_enc in lr:
        n = np.asarray(shape, dtype=np.float64)
        core = np.minimum(_lr_extent(jac, tile) + 2 * margin + 1, n)
        halo = np.minimum(core + 2 * radius, n).prod(1)
        work = np.maximum(work, halo * enc_bytes)
        maps += core.prod(1) * map_bytes + halo * 8
        voxels += halo * n_enc
    return work + maps + tile.prod(1) * 96, voxels


def plan_tile_shape(grid_shape: Sequence[int], grid_affine: torch.Tensor,
                    lr: Mapping[str, tuple[Sequence[int], torch.Tensor]], network: nn.Module, budget_bytes: float,
                    radius: int | None = None, margin: int | None = None,
                    occupied: np.ndarray | None = None) -> tuple[int, int, int]:
    """Output-tile shape that minimises the encoder voxels computed (halos included, whole grid)
    among the shapes whose :func:`tile_memory_bytes` fits ``budget_bytes`` (the smallest-memory
    shape if none does). ``lr``: ``{modality: (LR shape, LR affine)}``. ``occupied``: output voxel
    indices ``(N, 3)`` with a point to decode (e.g. a coarse sample); then only the tiles holding
    one count (empty tiles are skipped at inference). :func:`plan_tiles` adds the halo-overhead bound."""
    return plan_tiles(grid_shape, grid_affine, lr, network, budget_bytes, radius, margin, occupied)["tile_shape"]


def plan_tiles(grid_shape: Sequence[int], grid_affine: torch.Tensor,
               lr: Mapping[str, tuple[Sequence[int], torch.Tensor]], network: nn.Module, budget_bytes: float,
               radius: int | None = None, margin: int | None = None, occupied: np.ndarray | None = None,
               max_overhead: float | None = None, grow_to_bytes: float | None = None, chunk: int | None = None,
               point_bytes: float = 0.0, tile_overhead_macs: float = TILE_OVERHEAD_MACS,
               call_overhead_macs: float = CALL_OVERHEAD_MACS, grow_overhead: float | None = None,
               grow_soft_bytes: float | None = None) -> dict:
    """The tile shape and decode chunk of least estimated inference time within a memory budget, with a
    bound on the halo overhead.

    Time, in encoder multiply-adds (the encoders and the decoder together): per encoded tile its
    encoders' MACs (halos included), ``tile_overhead_macs`` (crops, encoder calls, key projection) and
    ``call_overhead_macs`` per decode call (``ceil(tile voxels / chunk)`` calls); the decoded points
    themselves cost the same whatever the tiling. Memory: :func:`tile_memory_bytes` + the decode chunk
    (``min(chunk, tile voxels)`` points of ``point_bytes``). Without ``chunk`` only the encoder work
    and the tile fixed cost count (the decode calls are left to the caller).

    Overhead = encoder voxels computed by the tiling (halos included, only tiles holding an
    ``occupied`` point when given) / encoder voxels of the untiled encoders (every LR voxel once
    per encoder): the recomputed encoder FLOPs relative to the untiled network. With
    ``max_overhead`` and a best tiling within ``budget_bytes`` above it, the budget grows to the
    least memory of a tiling that meets the bound (whole-grid count, an upper bound of the
    occupied one), at most to ``grow_to_bytes``; ``met`` False when even that cannot meet it.
    ``grow_overhead`` (<= ``max_overhead``): first grow toward this tighter overhead, up to
    ``grow_soft_bytes`` (an "auto" budget: halos cost encoder time), then as above for the bound.

    Returns ``{"tile_shape", "chunk_size", "overhead", "memory_bytes", "budget_bytes", "met",
    "bound_budget_bytes", "tiles", "decode_calls"}`` (``bound_budget_bytes``: the least memory that meets
    the bound, ``None`` if no tiling does; ``tiles`` / ``decode_calls``: over the whole grid, or the tiles
    holding an ``occupied`` point).
    """
    radius = encoder_radius(network) if radius is None else radius
    margin = window_margin(network) if margin is None else margin
    enc_bytes = max(encoder_bytes_per_voxel(e) for e in network.encoders.values())
    enc_macs = max(encoder_macs_per_voxel(e) for e in network.encoders.values())
    c = int(getattr(network, "features", 64))
    map_bytes = 4 * c * (len(network.encoders) // max(len(lr), 1) + 2)  # feature maps + KD-Attn keys/values
    out_a = grid_affine.double().cpu()
    per_grid = []
    untiled = 0.0
    for m, (shape, affine) in lr.items():
        jac = (torch.linalg.inv(affine.double().cpu()) @ out_a)[:3, :3].numpy()
        n_enc = sum(1 for name in network.encoders if name.split("_")[0] == m)
        per_grid.append((jac, [int(s) for s in shape[-3:]], n_enc))
        untiled += float(np.prod([int(s) for s in shape[-3:]])) * n_enc
    # edges of at least MIN_TILE_EDGE voxels (or the whole axis): smaller tiles are all halo
    edges = [{math.ceil(int(n) / k) for k in range(1, min(int(n), 48) + 1)} for n in grid_shape]
    axes = [sorted(e for e in es if e >= min(MIN_TILE_EDGE, int(n))) for es, n in zip(edges, grid_shape)]
    tiles = np.array(list(itertools.product(*axes)), dtype=np.float64)
    memory, voxels = tile_memory_bytes(tiles, per_grid, radius, margin, enc_bytes, map_bytes)
    points = tiles.prod(1)
    chunks = np.minimum(points, float(chunk)) if chunk else points
    calls = np.ceil(points / chunks) if chunk else np.zeros(len(tiles))
    memory = memory + chunks * float(point_bytes)
    per_tile = voxels * enc_macs + tile_overhead_macs + calls * call_overhead_macs  # time, in MACs
    counts = np.prod(np.ceil(np.asarray(grid_shape, dtype=np.float64) / tiles), axis=1)
    cost = counts * per_tile
    enc_voxels = counts * voxels
    occ = np.asarray(occupied, dtype=np.int64) if occupied is not None and len(occupied) else None

    def occupied_tiles(i: int) -> float:
        t = tiles[i].astype(np.int64)
        cells = np.ceil(np.asarray(grid_shape) / t).astype(np.int64)
        key = ((occ[:, 0] // t[0]) * cells[1] + occ[:, 1] // t[1]) * cells[2] + occ[:, 2] // t[2]
        return float(np.count_nonzero(np.bincount(key, minlength=int(cells.prod()))))

    def select(budget: float) -> tuple[int, float]:
        """``(index, tiles encoded)`` of the cheapest tiling within ``budget``."""
        fits = memory <= budget
        if not fits.any():
            i = int(np.argmin(memory))
            return i, (occupied_tiles(i) if occ is not None else float(counts[i]))
        if occ is None:
            i = int(np.argmin(np.where(fits, cost, np.inf)))
            return i, float(counts[i])
        # tiles without a point to decode are skipped: count only the tiles holding an occupied sample
        order = np.argsort(np.where(fits, cost, np.inf))[:600]
        order = order[fits[order] & (cost[order] <= 3.0 * cost[order[0]])]  # fewer than 600 may fit
        best_cost, best, best_n = np.inf, int(order[0]), 0.0
        for i in order:
            n = occupied_tiles(int(i))
            if n * per_tile[i] < best_cost:
                best_cost, best, best_n = n * per_tile[i], int(i), n
        return best, best_n

    best, n_tiles = select(budget_bytes)
    meets = enc_voxels <= (max_overhead if max_overhead is not None else np.inf) * untiled
    bound_budget = float(memory[meets].min()) if meets.any() else None
    used_budget = float(budget_bytes)
    if grow_to_bytes is not None and grow_overhead is not None and n_tiles * voxels[best] > grow_overhead * untiled:
        reach = enc_voxels <= grow_overhead * untiled  # soft growth: toward the tighter overhead, up to grow_soft_bytes
        soft = min(float(grow_soft_bytes if grow_soft_bytes is not None else grow_to_bytes), float(grow_to_bytes))
        grown = min(float(memory[reach].min()) if reach.any() else np.inf, soft)
        if grown > used_budget:
            used_budget = grown
            best, n_tiles = select(used_budget)
    if max_overhead is not None and n_tiles * voxels[best] > max_overhead * untiled and bound_budget is not None \
            and grow_to_bytes is not None and bound_budget > used_budget:  # hard growth: to meet the bound
        used_budget = min(bound_budget, float(grow_to_bytes))
        best, n_tiles = select(used_budget)
    overhead = n_tiles * voxels[best] / untiled
    met = max_overhead is None or overhead <= max_overhead
    return {"tile_shape": tuple(int(v) for v in tiles[best]), "chunk_size": int(chunks[best]) if chunk else None,
            "overhead": float(overhead), "memory_bytes": float(memory[best]), "budget_bytes": used_budget,
            "met": bool(met), "bound_budget_bytes": bound_budget, "tiles": int(n_tiles),
            "decode_calls": int(n_tiles * calls[best]) if chunk else None}
