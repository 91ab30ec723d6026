"""Bounded-memory whole-volume inference: the output grid in tiles, the encoders on halo crops.

:class:`~nexus_monai.engines.inr.ImplicitGridInferer` calls :func:`tiled_decode` when it has a
memory budget (``max_memory_gib``) or an explicit ``tile_shape``. For each output tile:

1. the tile's voxel centres (world mm, as :func:`~nexus_monai.transforms.query.iter_query_chunks`
   computes them) and the empty test of ``skip_empty`` (both LR scans interpolate to their
   background: not decoded); a tile without a point to decode is skipped entirely -- no encoder
   runs on the background around the brain;
2. per LR grid the core box the remaining points can read (:func:`~nexus_monai.networks.tiling.core_box`),
   encoded from a crop with a halo of the encoders' receptive-field radius
   (:func:`~nexus_monai.networks.tiling.encode_box`, channels-last convolutions), so every feature
   equals the untiled one up to float rounding;
3. ``network.decode`` over the points in chunks.

The tile shape and the decode chunk are planned together from the budget
(:func:`~nexus_monai.networks.tiling.plan_tiles`): the least estimated time of the encoders and the
decoder (encoder work with halos, a fixed cost per tile and per decode call -- on CUDA each call is
hundreds of kernel launches, so a decode call takes a whole tile there where memory allows; on CPU
at most ``chunk_size`` points) whose memory -- tile + chunk -- fits. ``max_memory_gib`` is the
process's target peak RSS (on CUDA: the device memory this call may use); tile and chunk get what
remains after the RSS at the start, the output volumes and one KD-Attn block. Peak memory then
depends on the tile, not on the volume size. ``"auto"`` (the default) sizes the budget for the
device (:func:`memory_budget`). Small tiles recompute their halos: the plan keeps the encoder
voxels computed within ``MAX_HALO_OVERHEAD`` x the untiled encoders (an auto budget grows toward
``AUTO_HALO_OVERHEAD`` by up to ``AUTO_SOFT_GROWTH_GIB``, and to meet the bound up to a safety
fraction of the free memory; one warning line when the bound is not met).

With the inferer's ``amp`` the network's parts run under bf16 autocast
(:func:`~nexus_monai.engines.amp.amp_autocast`).
"""

from __future__ import annotations

import logging
from typing import Mapping

import numpy as np
import torch
from torch import nn

from nexus_monai.engines.amp import amp_autocast
from nexus_monai.geometry import TargetGrid, WorldNormalizer, sample_at_world, voxel_to_world, world_to_voxel
from nexus_monai.keys import CONTRASTS
from nexus_monai.networks.tiling import (
    CALL_OVERHEAD_MACS,
    core_box,
    decode_bytes_per_point,
    decode_fixed_bytes,
    encode_box,
    encoder_radius,
    iter_boxes,
    lookup_margin,
    plan_tiles,
    window_margin,
)

__all__ = ["AUTO", "DEFAULT_MAX_MEMORY_GIB", "MIN_TILE_BUDGET_BYTES", "MAX_HALO_OVERHEAD", "CPU_FREE_FRACTION",
           "CUDA_FREE_FRACTION", "CUDA_MAX_CHUNK", "AUTO_HALO_OVERHEAD", "AUTO_SOFT_GROWTH_GIB", "CUDA_CALL_FACTOR",
           "tileable", "process_rss_bytes",
           "available_memory_bytes", "memory_budget", "plan", "tiled_decode"]

AUTO = "auto"  # max_memory_gib: a budget sized for the device (memory_budget)
DEFAULT_MAX_MEMORY_GIB = 1.75  # measured peak RSS for 240 x 240 x 160 at 2 threads: see README (benchmark)
MIN_TILE_BUDGET_BYTES = 256 * 1024**2  # floor when the process already uses the budget
MAX_HALO_OVERHEAD = 1.5  # encoder voxels computed by the tiles (halos incl.) / untiled encoder voxels
# an "auto" budget grows (up to its cap) toward this overhead: with empty tiles skipped, no more encoder work than
# the untiled network (issue 31: bigger tiles made the encoders faster; KD-Attn no longer slows with the tile)
AUTO_HALO_OVERHEAD = 1.0
AUTO_SOFT_GROWTH_GIB = 1.5  # ... by at most this much beyond the default budget (then only to meet MAX_HALO_OVERHEAD)
# of MemAvailable: the most an "auto" CPU budget grows to (the tile memory estimate is itself an upper bound)
CPU_FREE_FRACTION = 0.7
CUDA_FREE_FRACTION = 0.8  # of the device's free memory: an "auto" CUDA budget
CUDA_MAX_CHUNK = 1 << 22  # query points of one decode call on CUDA (a whole tile where the memory allows)
CUDA_CALL_FACTOR = 10.0  # a decode call on CUDA costs this many CPU decode-call overheads (kernel launches)
_GIB = 1024.0**3
_LOG = logging.getLogger(__name__)


def tileable(net: nn.Module) -> bool:
    """Whether ``net`` has the tiled-encoding interface (NexusINR-like, stride-1 conv encoders)."""
    if not (hasattr(net, "encoders") and hasattr(net, "add_attention_keys") and hasattr(net, "decode")):
        return False
    try:
        encoder_radius(net)
    except ValueError:
        return False
    return True


def _proc_kib_bytes(path: str, field: str) -> float:
    """``field`` (a ``kB`` line such as ``VmRSS:``) of a ``/proc`` file, in bytes (0 where unavailable)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field):
                    return float(line.split()[1]) * 1024.0
    except OSError:
        pass
    return 0.0


def process_rss_bytes() -> float:
    """The current resident set size of this process (0 where ``/proc`` is unavailable)."""
    return _proc_kib_bytes("/proc/self/status", "VmRSS:")


def available_memory_bytes() -> float:
    """The machine's available memory (``MemAvailable`` of ``/proc/meminfo``; 0 where unknown)."""
    return _proc_kib_bytes("/proc/meminfo", "MemAvailable:")


def memory_budget(setting, device: torch.device, output_bytes: float) -> tuple[float, float | None, str]:
    """``(bytes for the tiles and one decode chunk, cap to grow to or None, description)``.

    ``setting`` is the inferer's ``max_memory_gib``: a number (the user's budget, honoured: on CPU
    the target peak RSS of the process, on CUDA the device memory this call may allocate) or
    ``"auto"``: on CUDA ``CUDA_FREE_FRACTION`` of the device's free memory; on CPU the default
    target peak RSS ``DEFAULT_MAX_MEMORY_GIB``, grown (the cap) up to ``CPU_FREE_FRACTION`` of the
    machine's available memory when the halo-overhead bound needs it.
    """
    auto = isinstance(setting, str)
    if device.type == "cuda":
        if auto:
            free, _ = torch.cuda.mem_get_info(device)
            return CUDA_FREE_FRACTION * float(free), None, f"auto: {CUDA_FREE_FRACTION:g} x free device memory"
        return float(setting) * _GIB - float(torch.cuda.memory_allocated(device)), None, "given"
    target = DEFAULT_MAX_MEMORY_GIB if auto else float(setting)
    budget = target * _GIB - process_rss_bytes() - output_bytes
    if not auto:
        return budget, None, "given"
    cap = CPU_FREE_FRACTION * available_memory_bytes() - output_bytes
    return budget, max(cap, budget), f"auto: {target:g} GiB peak RSS, up to {CPU_FREE_FRACTION:g} x available memory"


def plan(inferer, net: nn.Module, vols: Mapping[str, torch.Tensor], affines: Mapping[str, torch.Tensor],
         grid: TargetGrid, background: Mapping[str, float] | None = None) -> dict:
    """Tile shape, decode chunk size, halo and margin for this volume under the inferer's budget.

    The halo overhead (encoder voxels computed / untiled) is bounded by the inferer's
    ``max_halo_overhead`` (default ``MAX_HALO_OVERHEAD``): an ``"auto"`` budget grows to meet it
    (up to its cap); when it cannot be met one warning line names the overhead and the budget
    that would meet it.
    """
    radius, margin = encoder_radius(net), window_margin(net) + lookup_margin(net, affines)
    chunk = int(inferer.chunk_size)
    device = vols["t1"].device
    budget = cap = None
    source = None
    max_overhead = getattr(inferer, "max_halo_overhead", MAX_HALO_OVERHEAD)
    cuda = device.type == "cuda"
    per_point = decode_bytes_per_point(net, blocked=not cuda)
    chunk_cap = chunk
    if inferer.max_memory_gib is not None:
        # the output volumes + predict_volumes' scaled copies (host memory)
        outputs = 4.0 * grid.num_voxels * len(CONTRASTS) * 2 if not cuda else 0.0
        budget, cap, source = memory_budget(inferer.max_memory_gib, device, outputs)
        fixed = 0 if cuda else decode_fixed_bytes(net)  # one KD-Attn block of the CPU path
        # CPU: chunks of at most chunk_size points (the decoder's GEMMs gain nothing from more); CUDA: a whole
        # tile per decode call where memory allows (each call is hundreds of kernel launches)
        chunk_cap = CUDA_MAX_CHUNK if cuda else min(chunk, max(1024, int(max(budget, MIN_TILE_BUDGET_BYTES) / 4
                                                                          / per_point)))
        chunk = min(chunk, chunk_cap)
        budget = max(budget - fixed, MIN_TILE_BUDGET_BYTES)
        cap = None if cap is None else max(cap - fixed, budget)
    info = {"tiled": True}
    if inferer.tile_shape is not None:
        tile = tuple(int(t) for t in inferer.tile_shape)
    else:
        lr = {c: (vols[c].shape[-3:], affines[c][0].cpu()) for c in CONTRASTS}
        occupied = _coarse_occupancy(inferer, vols, affines, grid, background) if inferer.skip_empty else None
        # the tile and the decode chunk together: encoder work + fixed costs per tile and per decode call
        planned = plan_tiles(grid.shape, grid.affine, lr, net, budget, radius, margin, occupied,
                             max_overhead=max_overhead, grow_to_bytes=cap, chunk=chunk_cap, point_bytes=per_point,
                             call_overhead_macs=CALL_OVERHEAD_MACS * (CUDA_CALL_FACTOR if cuda else 1.0),
                             grow_overhead=min(AUTO_HALO_OVERHEAD, max_overhead) if cap is not None else None,
                             grow_soft_bytes=None if cap is None else budget + AUTO_SOFT_GROWTH_GIB * _GIB)
        tile, budget, chunk = planned["tile_shape"], planned["budget_bytes"], planned["chunk_size"]
        info.update({"halo_overhead": planned["overhead"], "halo_overhead_bound": max_overhead,
                     "tile_memory_gib": planned["memory_bytes"] / _GIB, "planned_decode_calls": planned["decode_calls"],
                     "planned_tiles": planned["tiles"]})
        if not planned["met"]:
            need = planned["bound_budget_bytes"]
            _LOG.warning("tiled inference: halo overhead %.2fx the untiled encoders (bound %.2fx) within the %.3g GiB "
                         "tile budget (%s); %s", planned["overhead"], max_overhead, budget / _GIB, source,
                         f"tiles of about {need / _GIB:.3g} GiB would meet it (--max-memory-gib)"
                         if need is not None else "no tiling meets it")
    info.update({"tile_shape": list(tile), "chunk_size": chunk, "halo_voxels": radius, "margin_voxels": margin,
                 "tile_budget_gib": None if budget is None else budget / _GIB,
                 "max_memory_gib": inferer.max_memory_gib, "budget_source": source})
    return info


def _coarse_occupancy(inferer, vols, affines, grid: TargetGrid, background: Mapping[str, float] | None,
                      samples: int = 300_000) -> np.ndarray:
    """Output voxel indices ``(N, 3)`` of a regular sub-sample of the grid (about ``samples`` points)
    where ``skip_empty`` would decode: for planning only (which tiles hold something to decode)."""
    step = max(1, round((grid.num_voxels / samples) ** (1 / 3)))
    axes = [torch.arange(0, n, step, dtype=torch.int64) for n in grid.shape]
    idx = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
    world = voxel_to_world(idx.to(torch.float64), grid.affine).to(torch.float32).to(vols["t1"].device)
    bg = background or {}
    signal = sum(
        sample_at_world(vols[c] - float(bg.get(c, 0.0)), affines[c], world[None])[0, 0].abs() for c in CONTRASTS
    )
    return idx[(signal > 0).cpu()].numpy()


def _tile_world(grid: TargetGrid, lo, hi) -> torch.Tensor:
    """World coordinates (float64) of the voxel centres of the box ``[lo, hi)``, C order."""
    axes = [torch.arange(a, b, dtype=torch.int64) for a, b in zip(lo, hi)]
    idx = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3).to(torch.float64)
    return voxel_to_world(idx, grid.affine)


def tiled_decode(inferer, net: nn.Module, vols: Mapping[str, torch.Tensor], affines: Mapping[str, torch.Tensor],
                 normalizer: WorldNormalizer, grid: TargetGrid, background: Mapping[str, float],
                 out: Mapping[str, torch.Tensor], bar=None) -> bool:
    """Fill ``out[c]`` (flat ``(X * Y * Z,)``, pre-filled with the background) tile by tile.

    Returns False (nothing done) when ``net`` cannot be tiled; the caller then encodes whole volumes.
    ``inferer.last_plan`` records the plan and the tiles encoded/skipped.
    """
    if not tileable(net):
        return False
    with torch.inference_mode(), amp_autocast(net, bool(getattr(inferer, "amp", False)), vols["t1"].device):
        info = plan(inferer, net, vols, affines, grid, background)
        radius, margin, chunk = info["halo_voxels"], info["margin_voxels"], info["chunk_size"]
        device = vols["t1"].device
        views = {c: out[c].view(grid.shape) for c in CONTRASTS}
        shifted = {c: vols[c] - background[c] if background[c] else vols[c] for c in CONTRASTS}
        encoded = skipped = 0
        for lo, hi in iter_boxes(grid.shape, info["tile_shape"]):
            n = (hi[0] - lo[0]) * (hi[1] - lo[1]) * (hi[2] - lo[2])
            world64 = _tile_world(grid, lo, hi)
            world = world64.to(torch.float32).to(device)
            keep = None
            if inferer.skip_empty:
                signal = sum(sample_at_world(shifted[c], affines[c], world[None])[0, 0].abs() for c in CONTRASTS)
                keep = torch.nonzero(signal > 0)[:, 0]
                if keep.numel() == 0:
                    skipped += 1
                    if bar is not None:
                        bar.update(n)
                    continue
                world, world64 = world[keep], world64[keep.cpu()]
            norm = normalizer(world64).to(torch.float32).to(device)
            boxes = {c: core_box(world_to_voxel(world, affines[c][0]), vols[c].shape[-3:], margin) for c in CONTRASTS}
            maps, crops, crop_affines = encode_box(net, vols, affines, boxes, radius, inferer.channels_last)
            encoded += 1
            values = {c: torch.empty(world.shape[0], dtype=torch.float32, device=device) for c in CONTRASTS}
            for start in range(0, world.shape[0], chunk):
                stop = min(start + chunk, world.shape[0])
                pred = net.decode(maps, crops["t1"], crops["t2"], crop_affines["t1"], crop_affines["t2"],
                                  world[None, start:stop], norm[None, start:stop])
                for c in CONTRASTS:
                    values[c][start:stop] = pred[c][0].float()
            values = {c: v.cpu() for c, v in values.items()}  # one copy per tile and contrast
            del maps, crops
            for c in CONTRASTS:
                tile = views[c][lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
                if keep is None:
                    tile.copy_(values[c].reshape(tile.shape))
                else:
                    flat = tile.reshape(-1).clone()
                    flat[keep.cpu()] = values[c]
                    tile.copy_(flat.reshape(tile.shape))
            if bar is not None:
                bar.update(n)
        info.update({"tiles_encoded": encoded, "tiles_skipped": skipped})
        inferer.last_plan = info
    return True

