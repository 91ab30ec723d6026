"""The tile planner sized for the device and the network: the halo overhead (encoder voxels computed /
untiled) is bounded, an "auto" budget grows to meet the bound, an explicit budget is honoured with one
warning line, the budget comes from the device's memory, and the CPU default's plan is unchanged."""

import logging
import math

import pytest
import torch
from monai.data import MetaTensor

import nexus_monai.engines.tiled as tiled
from nexus_monai.benchmark.inputs import benchmark_inputs, load_benchmark_network
from nexus_monai.engines.inr import ImplicitGridInferer
from nexus_monai.geometry import TargetGrid, as_affine, thick_slice_affine
from nexus_monai.networks import NexusINR

SHAPE = (40, 32, 24)
GIB = 1024.0**3


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(0)
    net = NexusINR(encoder="rdn", features=4, encoder_options={"blocks": 1, "layers": 2, "growth": 4}, decoder_hidden=8,
                   decoder_layers=2, attn_heads=2, pe=True, pe_frequencies=2, zero_init=False).eval()
    hr = torch.eye(4, dtype=torch.float64)
    x = torch.rand(1, *SHAPE, generator=torch.Generator().manual_seed(1))
    x[:, :8] = 0
    t1 = MetaTensor(x[:, :, :, ::2].clone(), affine=thick_slice_affine(hr, "z", 2))
    t2 = MetaTensor(x[:, :, ::4, :].clone(), affine=thick_slice_affine(hr, "y", 4))
    grid = TargetGrid(SHAPE, hr)
    ref = ImplicitGridInferer(max_memory_gib=None, chunk_size=4096)(t1, t2, net, grid)
    return net, t1, t2, grid, ref


def _count_encoder_voxels(net):
    """Encoder output voxels actually computed (halos included), counted by forward hooks."""
    count = [0]
    handles = [e.register_forward_hook(lambda m, i, o: count.__setitem__(0, count[0] + o[0, 0].numel()))
               for e in net.encoders.values()]
    return count, handles


def _max_diff(a, b):
    return max(float((a[c] - b[c]).abs().max()) for c in a)


def test_auto_budget_grows_to_meet_the_halo_bound(case, monkeypatch, caplog):
    net, t1, t2, grid, ref = case
    untiled = 2 * t1[0].numel() + 2 * t2[0].numel()  # shared + specific encoder per contrast, each LR voxel once
    monkeypatch.setattr(tiled, "MIN_TILE_BUDGET_BYTES", 2**16)
    # a start budget far too small for the bound (tiles of 8 voxels, mostly halo), a roomy cap
    monkeypatch.setattr(tiled, "memory_budget", lambda setting, device, outputs: (2.0**17, 2.0**30, "test"))
    count, handles = _count_encoder_voxels(net)
    with caplog.at_level(logging.WARNING, logger="nexus_monai.engines.tiled"):
        out = ImplicitGridInferer(chunk_size=4096)(t1, t2, net, grid)
    for h in handles:
        h.remove()
    assert not caplog.records
    assert count[0] <= 1.5 * untiled  # the real recomputation, not only the planner's estimate
    assert _max_diff(out, ref) <= 1e-5
    # without growth (cap = start budget) the same start budget gives small tiles, far above the bound
    monkeypatch.setattr(tiled, "memory_budget", lambda setting, device, outputs: (2.0**17, 2.0**17, "test"))
    count, handles = _count_encoder_voxels(net)
    inferer = ImplicitGridInferer(chunk_size=4096)
    with caplog.at_level(logging.WARNING, logger="nexus_monai.engines.tiled"):
        out = inferer(t1, t2, net, grid)
    for h in handles:
        h.remove()
    assert count[0] > 1.5 * untiled and inferer.last_plan["halo_overhead"] > 1.5
    assert count[0] <= inferer.last_plan["halo_overhead"] * untiled  # the estimate bounds the real work
    assert len(caplog.records) == 1 and "halo overhead" in caplog.records[0].getMessage()
    assert _max_diff(out, ref) <= 1e-5


def test_explicit_budget_is_honoured_with_one_warning(case, monkeypatch, caplog):
    net, t1, t2, grid, ref = case
    monkeypatch.setattr(tiled, "MIN_TILE_BUDGET_BYTES", 2**21)
    inferer = ImplicitGridInferer(max_memory_gib=0.001)  # below the process RSS: the floor of 2 MiB for the tiles
    with caplog.at_level(logging.WARNING, logger="nexus_monai.engines.tiled"):
        out = inferer(t1, t2, net, grid)
    plan = inferer.last_plan
    assert plan["tile_memory_gib"] <= plan["tile_budget_gib"] and plan["tile_budget_gib"] * GIB == 2**21
    assert plan["halo_overhead"] > 1.5
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert "\n" not in msg and "--max-memory-gib" in msg and f"{plan['halo_overhead']:.2f}x" in msg
    assert _max_diff(out, ref) <= 1e-5


def test_memory_budget_from_the_device(monkeypatch):
    monkeypatch.setattr(tiled, "available_memory_bytes", lambda: 10 * GIB)
    monkeypatch.setattr(tiled, "process_rss_bytes", lambda: 0.25 * GIB)
    cpu = torch.device("cpu")
    budget, cap, _ = tiled.memory_budget("auto", cpu, 0.5 * GIB)
    assert budget == pytest.approx((tiled.DEFAULT_MAX_MEMORY_GIB - 0.75) * GIB)
    assert cap == pytest.approx(tiled.CPU_FREE_FRACTION * 10 * GIB - 0.5 * GIB)
    assert tiled.memory_budget(3.0, cpu, 0.5 * GIB)[:2] == (pytest.approx(2.25 * GIB), None)  # honoured, no growth
    # CUDA (no GPU needed: the two queries are replaced): the device's free memory, or the given budget
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 * GIB)
    gpu = torch.device("cuda:0")
    assert tiled.memory_budget("auto", gpu, 0.0)[:2] == (pytest.approx(tiled.CUDA_FREE_FRACTION * 40 * GIB), None)
    assert tiled.memory_budget(10.0, gpu, 0.0)[:2] == (pytest.approx(8 * GIB), None)


def test_budget_setting_is_checked():
    assert ImplicitGridInferer().max_memory_gib == "auto"
    assert ImplicitGridInferer(max_memory_gib="AUTO").max_memory_gib == "auto"
    assert ImplicitGridInferer(max_memory_gib=2).max_memory_gib == 2.0
    assert ImplicitGridInferer(max_memory_gib=None).max_memory_gib is None
    for bad in (0, -1.0, float("nan"), "lots"):
        with pytest.raises(ValueError):
            ImplicitGridInferer(max_memory_gib=bad)
    with pytest.raises(ValueError, match="max_halo_overhead"):
        ImplicitGridInferer(max_halo_overhead=0.5)


def test_cpu_default_plan_is_unchanged(monkeypatch):
    """The CPU default network on a 2 mm subject: the auto budget plans exactly the tiles the former fixed
    1.75 GiB default planned (so validation and scoring are unchanged), within the bound, without a warning.
    The process's RSS enters both budgets: fixed here at a fresh process's size, so the comparison does not
    depend on what the test session loaded before."""
    monkeypatch.setattr(tiled, "process_rss_bytes", lambda: 0.6 * 1024.0**3)
    net, *_ = load_benchmark_network("bundles/nexus_inr", random_weights=True)
    inputs = benchmark_inputs((120, 120, 80))
    vols = {c: inputs[f"{c}_lr"].as_subclass(torch.Tensor)[None].float() for c in ("t1", "t2")}
    affines = {c: as_affine(inputs[f"{c}_lr"].affine)[None] for c in ("t1", "t2")}
    bg = {"t1": 0.0, "t2": 0.0}
    auto = tiled.plan(ImplicitGridInferer(), net, vols, affines, inputs["grid"], bg)
    fixed = tiled.plan(ImplicitGridInferer(max_memory_gib=tiled.DEFAULT_MAX_MEMORY_GIB), net, vols, affines,
                       inputs["grid"], bg)
    assert auto["tile_shape"] == fixed["tile_shape"] and auto["halo_overhead"] <= 1.5


def test_plan_chooses_tile_and_decode_chunk_together(case):
    """The plan's memory holds the decode chunk (min(chunk, tile voxels) points), its cost the decode calls:
    with a GPU-like call overhead one call decodes a whole tile, and the tile shrinks to fit that chunk."""
    from nexus_monai.networks.tiling import plan_tiles

    net = case[0]
    hr = torch.eye(4, dtype=torch.float64)
    shape = (64, 64, 48)
    lr = {"t1": ((64, 64, 24), thick_slice_affine(hr, "z", 2)), "t2": ((64, 16, 48), thick_slice_affine(hr, "y", 4))}
    budget = 16 * 2**20
    bare = plan_tiles(shape, hr, lr, net, budget, chunk=4096, point_bytes=0.0)
    withmem = plan_tiles(shape, hr, lr, net, budget, chunk=4096, point_bytes=1000.0)
    points = math.prod(withmem["tile_shape"])
    assert withmem["chunk_size"] == min(4096, points)
    assert withmem["memory_bytes"] <= budget
    assert withmem["decode_calls"] == withmem["tiles"] * math.ceil(points / withmem["chunk_size"])
    assert withmem["memory_bytes"] - bare["memory_bytes"] == pytest.approx(1000.0 * withmem["chunk_size"]) \
        or withmem["tile_shape"] != bare["tile_shape"]
    gpu = plan_tiles(shape, hr, lr, net, budget, chunk=1 << 22, point_bytes=100.0, call_overhead_macs=1e12)
    assert gpu["decode_calls"] == gpu["tiles"] and gpu["chunk_size"] == math.prod(gpu["tile_shape"])
    # a whole tile's points in memory at once: heavier points force smaller tiles under the same budget
    heavy = plan_tiles(shape, hr, lr, net, budget, chunk=1 << 22, point_bytes=2000.0, call_overhead_macs=1e12)
    assert heavy["memory_bytes"] <= budget and math.prod(heavy["tile_shape"]) * 2000.0 <= budget
    assert heavy["tiles"] > gpu["tiles"]
