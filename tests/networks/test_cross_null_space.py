"""NexusINR ``cross_null_space``: what the other contrast adds has zero slab average along the own
contrast's thick axis, so it cannot change what the own LR scan measures; untrained = trilinear
with ``zero_init``; tiled inference still equals whole-volume inference."""

import copy

import pytest
import torch
from helpers import HR_AFFINE, HR_SHAPE, T1_AFFINE, T2_AFFINE, tiny_batch, tiny_net
from monai.data import MetaTensor

from nexus_monai.engines.inr import ImplicitGridInferer
from nexus_monai.geometry import TargetGrid, sample_at_world, thick_slice_affine, voxel_to_world
from nexus_monai.networks import NexusINR

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SWITCHES = dict(cross_null_space=True, cross_input=False, mmf=True, kd_attn=True, sel=True, sel_residual=True,
                bidirectional=True)


def _all_hr_voxels(b: int = 1) -> dict:
    """tiny_batch's LR pair with every HR voxel centre (8^3, C order) as a query point."""
    batch = tiny_batch(b=b, k=8)
    idx = torch.stack(torch.meshgrid(*[torch.arange(8.0, dtype=torch.float64)] * 3, indexing="ij"), -1).reshape(-1, 3)
    world = voxel_to_world(idx, HR_AFFINE).float()
    batch["query_world"] = world[None].expand(b, -1, -1).contiguous()
    batch["query_norm"] = batch["query_world"] / 100.0
    return batch


def _randomise_cross_heads(net: NexusINR) -> None:
    with torch.no_grad():
        for head in net.cross_heads.values():
            head[-1].weight.normal_(0, 1.0)
            head[-1].bias.normal_(0, 1.0)


def _slab_means(vol: torch.Tensor, contrast: str) -> torch.Tensor:
    """(8, 8, 8) HR volume -> its slab means along the contrast's thick axis (T1w z x2, T2w y x4)."""
    return vol.reshape(8, 8, 4, 2).mean(-1) if contrast == "t1" else vol.reshape(8, 2, 4, 8).mean(-2)


def test_cross_term_has_zero_slab_average_and_the_own_scan_alone_sets_the_slab_averages():
    net = tiny_net(**SWITCHES)
    _randomise_cross_heads(net)
    batch = _all_hr_voxels()
    silent = copy.deepcopy(net)
    with torch.no_grad():
        for head in silent.cross_heads.values():
            head[-1].weight.zero_()
            head[-1].bias.zero_()
        out, own = net(**batch, aux=False), silent(**batch, aux=False)
        # the other contrast's LR scan replaced: contrast m's slab averages must not move
        swapped = dict(batch, t1=torch.rand_like(batch["t1"]) * 3, t2=torch.rand_like(batch["t2"]) * 3)
        out_t2_new_t1 = net(**dict(batch, t1=swapped["t1"]), aux=False)["t2"]
        out_t1_new_t2 = net(**dict(batch, t2=swapped["t2"]), aux=False)["t1"]
    for c, other_swapped in (("t1", out_t1_new_t2), ("t2", out_t2_new_t1)):
        cross = (out[c] - own[c])[0].reshape(HR_SHAPE)
        assert float(cross.std()) > 1e-2  # the cross head does contribute ...
        torch.testing.assert_close(_slab_means(cross, c), torch.zeros_like(_slab_means(cross, c)), atol=2e-5, rtol=0)
        # ... and its averages along the OTHER contrast's thick axis are not zero (the check above can fail)
        assert float(_slab_means(cross, "t2" if c == "t1" else "t1").abs().max()) > 1e-2
        changed = other_swapped[0].reshape(HR_SHAPE)
        assert float((changed - out[c][0].reshape(HR_SHAPE)).abs().max()) > 1e-2
        torch.testing.assert_close(_slab_means(changed, c), _slab_means(out[c][0].reshape(HR_SHAPE), c), atol=2e-5,
                                   rtol=0)


def test_without_the_switch_the_other_scan_moves_the_slab_averages():
    """The same swap on the default network (cross_input) changes the own contrast's slab averages."""
    net = tiny_net(cross_input=True, mmf=True, kd_attn=True, sel=True, bidirectional=True)
    batch = _all_hr_voxels()
    with torch.no_grad():
        a = net(**batch, aux=False)["t2"][0].reshape(HR_SHAPE)
        b = net(**dict(batch, t1=torch.rand_like(batch["t1"]) * 3), aux=False)["t2"][0].reshape(HR_SHAPE)
    assert float((_slab_means(a, "t2") - _slab_means(b, "t2")).abs().max()) > 1e-3


@pytest.mark.parametrize("bidirectional", [False, True])
def test_zero_init_untrained_is_exactly_trilinear_and_the_cross_head_learns(bidirectional):
    net = tiny_net(zero_init=True, residual=True, **dict(SWITCHES, bidirectional=bidirectional))
    batch = tiny_batch()
    out = net(**batch, aux=True)
    for c in ("t1", "t2"):
        tri = sample_at_world(batch[c], batch[f"{c}_affine"], batch["query_world"])[:, 0]
        torch.testing.assert_close(out[c], tri, atol=0, rtol=0)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        o = net(**batch, aux=True)
        ((o["t1"] - 1.0) ** 2 + (o["t2"] - 1.0) ** 2).mean().backward()
        opt.step()
    for c in ("t1", "t2"):
        assert net.cross_heads[c][-1].weight.abs().sum() > 0


def test_slab_geometry_and_lookup_margin():
    assert NexusINR.slab_geometry(T1_AFFINE) == (2, 2) and NexusINR.slab_geometry(T2_AFFINE) == (1, 4)
    net = tiny_net(**SWITCHES)
    # T2w slab (8 mm along y) in the T1w grid (2 mm along y): up to 4 voxels away
    assert net.lookup_margin({"t1": T1_AFFINE, "t2": T2_AFFINE}) == 4
    assert tiny_net(cross_input=True).lookup_margin({"t1": T1_AFFINE, "t2": T2_AFFINE}) == 0
    mixed = torch.stack([T1_AFFINE, T2_AFFINE])
    with pytest.raises(ValueError, match="thick axes"):
        NexusINR.slab_geometry(mixed)
    with pytest.raises(ValueError, match="exclusive"):
        tiny_net(cross_null_space=True, cross_input=True)


def test_tiled_equals_untiled_with_the_null_space_head():
    torch.manual_seed(0)
    net = NexusINR(encoder="rdn", features=4, encoder_options={"blocks": 1, "layers": 1, "growth": 4},
                   decoder_hidden=8, decoder_layers=2, attn_heads=2, pe=False, zero_init=False, **SWITCHES).eval()
    _randomise_cross_heads(net)
    shape = (24, 24, 16)
    hr = torch.eye(4, dtype=torch.float64)
    x = torch.rand(1, *shape, generator=torch.Generator().manual_seed(1))
    t1 = MetaTensor(x[:, :, :, ::2].clone(), affine=thick_slice_affine(hr, "z", 2))
    t2 = MetaTensor(x[:, :, ::4, :].clone(), affine=thick_slice_affine(hr, "y", 4))
    grid = TargetGrid(shape, hr)
    ref = ImplicitGridInferer(max_memory_gib=None, chunk_size=4096)(t1, t2, net, grid)
    inferer = ImplicitGridInferer(tile_shape=(7, 9, 6), chunk_size=777)
    out = inferer(t1, t2, net, grid)
    assert inferer.last_plan["tiled"] and inferer.last_plan["margin_voxels"] == 2 + 4  # window + slab reach
    assert max(float((out[c] - ref[c]).abs().max()) for c in out) <= 1e-5
