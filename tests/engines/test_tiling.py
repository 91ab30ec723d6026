"""Tiled encoding (``nexus_monai.networks.tiling`` / ``nexus_monai.engines.tiled``): the output of a
tiled inference equals the whole-volume one, the halo is the receptive field, the plan fits its budget."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

import nexus_monai.engines.tiled as tiled
from nexus_monai.engines.inr import ImplicitGridInferer
from nexus_monai.geometry import TargetGrid, thick_slice_affine
from nexus_monai.networks import NexusINR
from nexus_monai.networks.encoders import RDN, ResCNN, SRResNet, channels_last_convs
from nexus_monai.networks.tiling import (encode_box, plan_tile_shape, receptive_radius, tile_memory_bytes,
                                         window_margin)

SHAPE = (40, 32, 24)


@pytest.fixture(scope="module")
def case():
    """A tiny Nexus-INR with every stage on (MMF, both KD-Attn directions, SEL, PE, cross input) whose
    convolutions are scaled up so that far inputs matter, and an LR pair with a zero background slab."""
    torch.manual_seed(0)
    net = NexusINR(encoder="rdn", features=4, encoder_options={"blocks": 1, "layers": 2, "growth": 4}, decoder_hidden=8,
                   decoder_layers=2, attn_heads=2, pe=True, pe_frequencies=2, zero_init=False, bidirectional=True,
                   cross_input=True, sel_residual=True).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv3d):
                m.weight.mul_(3.0)
    hr = torch.eye(4, dtype=torch.float64)
    hr[:3, 3] = torch.tensor([-10.0, 5.0, 3.0])
    x = torch.rand(1, *SHAPE, generator=torch.Generator().manual_seed(1))
    x[:, :14] = 0  # a background slab: whole output tiles there have nothing to decode
    x[:, :, :, -5:] = 0
    t1 = MetaTensor(x[:, :, :, ::2].clone(), affine=thick_slice_affine(hr, "z", 2))
    t2 = MetaTensor(x[:, :, ::4, :].clone(), affine=thick_slice_affine(hr, "y", 4))
    grid = TargetGrid(SHAPE, hr)
    ref = ImplicitGridInferer(max_memory_gib=None, chunk_size=4096)(t1, t2, net, grid)
    return net, t1, t2, grid, ref


def _max_diff(a, b):
    return max(float((a[c] - b[c]).abs().max()) for c in a)


@pytest.mark.parametrize("tile", [(7, 9, 6), (13, 32, 5)])
def test_tiled_equals_untiled(case, tile):
    net, t1, t2, grid, ref = case
    inferer = ImplicitGridInferer(tile_shape=tile, chunk_size=777)
    out = inferer(t1, t2, net, grid)
    assert inferer.last_plan["tiled"] and inferer.last_plan["halo_voxels"] == 5  # 1 + 1 + 2 dense + 1 global 3x3x3
    assert inferer.last_plan["tiles_skipped"] > 0 and inferer.last_plan["tiles_encoded"] > 0
    assert float(ref["t1"].abs().max()) > 0.5
    assert _max_diff(out, ref) <= 1e-5
    assert float(out["t1"][:10].abs().max()) == 0.0 and float(ref["t1"][:10].abs().max()) == 0.0  # skipped = background


def test_tiled_needs_the_whole_halo_and_margin(case, monkeypatch):
    """The comparison above can fail: a halo below the receptive field or no lookup margin changes the output."""
    net, t1, t2, grid, ref = case
    monkeypatch.setattr(tiled, "encoder_radius", lambda n: 2)
    assert _max_diff(ImplicitGridInferer(tile_shape=(7, 9, 6))(t1, t2, net, grid), ref) > 1e-4
    monkeypatch.setattr(tiled, "encoder_radius", lambda n: 5)
    monkeypatch.setattr(tiled, "window_margin", lambda n: 0)
    assert _max_diff(ImplicitGridInferer(tile_shape=(7, 9, 6))(t1, t2, net, grid), ref) > 1e-4


def test_budget_planned_inference_equals_untiled(case, monkeypatch):
    net, t1, t2, grid, ref = case
    monkeypatch.setattr(tiled, "MIN_TILE_BUDGET_BYTES", 2**19)  # 512 KiB for the tiles: several of them
    inferer = ImplicitGridInferer(max_memory_gib=0.001)
    out = inferer(t1, t2, net, grid)
    assert inferer.last_plan["tile_shape"] != list(SHAPE)
    assert _max_diff(out, ref) <= 1e-5


def test_encode_box_features_equal_whole_maps(case):
    net, t1, t2, _, _ = case
    vols = {"t1": t1.as_subclass(torch.Tensor)[None], "t2": t2.as_subclass(torch.Tensor)[None]}
    affines = {c: torch.as_tensor(v.affine, dtype=torch.float64)[None] for c, v in (("t1", t1), ("t2", t2))}
    boxes = {"t1": ([11, 0, 3], [30, 9, 12]), "t2": ([20, 2, 0], [40, 6, 10])}
    with torch.no_grad():
        whole = net.encode(vols["t1"], vols["t2"])
        maps, crops, crop_affines = encode_box(net, vols, affines, boxes, radius=5)
    for name in ("t1_shared", "t1_spec", "t2_shared", "t2_spec"):
        lo, hi = boxes[name[:2]]
        ref = whole[name][..., lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        assert maps[name].shape == ref.shape and float((maps[name] - ref).abs().max()) <= 1e-5
    a1 = affines["t1"][0]
    start = a1[:3, :3] @ torch.tensor([11.0, 0, 3], dtype=torch.float64) + a1[:3, 3]  # world position of voxel (11, 0, 3)
    assert torch.allclose(crop_affines["t1"][0, :3, 3], start)
    assert crops["t2"].shape[-3:] == (20, 4, 10)


def test_receptive_radius_counts_each_conv():
    assert receptive_radius(RDN(1, 8, blocks=2, layers=3, growth=4)) == 1 + 1 + 2 * 3 + 1
    assert receptive_radius(SRResNet(1, 8, blocks=2)) == 1 + 2 * 2 + 1
    assert receptive_radius(ResCNN(1, 8, depth=2)) == 3
    assert receptive_radius(torch.nn.Conv3d(1, 1, 5, padding=4, dilation=2)) == 4
    with pytest.raises(ValueError, match="stride"):
        receptive_radius(torch.nn.Sequential(torch.nn.Conv3d(1, 1, 3, stride=2, padding=1)))
    with pytest.raises(ValueError, match="voxel grid"):
        receptive_radius(torch.nn.Sequential(torch.nn.MaxPool3d(2)))
    net = NexusINR(features=4, encoder_options={"blocks": 1, "layers": 1, "growth": 4}, attn_window=(5, 3, 3),
                   attn_heads=2)
    assert window_margin(net) == 1 + 2


def test_channels_last_encoder_matches_default_layout():
    torch.manual_seed(0)
    enc = RDN(1, 8, blocks=2, layers=2, growth=4).eval()
    x = torch.rand(1, 1, 12, 10, 9)
    with torch.no_grad():
        ref = enc(x)
        with channels_last_convs():
            fast = enc(x)
    assert fast.shape == ref.shape and float((fast - ref).abs().max()) <= 1e-5


def test_plan_fits_budget_and_grows_with_it():
    torch.manual_seed(0)
    net = NexusINR(features=16, encoder_options={"blocks": 2, "layers": 3, "growth": 16}, decoder_hidden=32)
    hr = torch.eye(4, dtype=torch.float64)
    lr = {"t1": ((240, 240, 80), thick_slice_affine(hr, "z", 2)),
          "t2": ((240, 60, 160), thick_slice_affine(hr, "y", 4))}
    small = plan_tile_shape((240, 240, 160), hr, lr, net, 200 * 2**20)
    large = plan_tile_shape((240, 240, 160), hr, lr, net, 2000 * 2**20)
    assert np.prod(small) < np.prod(large)
    jac = {m: (torch.linalg.inv(a) @ hr)[:3, :3].numpy() for m, (_, a) in lr.items()}
    per_grid = [(jac[m], s, 2) for m, (s, _) in lr.items()]
    from nexus_monai.networks.tiling import encoder_bytes_per_voxel

    enc = max(encoder_bytes_per_voxel(e) for e in net.encoders.values())
    memory, _ = tile_memory_bytes(np.array([small]), per_grid, 9, window_margin(net), enc, 4 * 16 * 4)
    assert memory[0] <= 200 * 2**20
