"""The soft consistency layer: x = f + A^T (A A^T + lambda I)^-1 (y - A f) under the header's nominal operator.

lambda -> 0 meets the scan (A x = y), a huge lambda leaves f; the line operator equals the guard's
acquisition model; conjugate gradients (any grid) agree with the exact line solve; tiled inference equals
untiled with the layer inside the network; the layer's switches off keep the earlier network's weights."""

import pytest
import torch
from monai.data import MetaTensor

from nexus_monai.engines.inr import ImplicitGridInferer
from nexus_monai.geometry import TargetGrid, make_affine, thick_slice_affine
from nexus_monai.networks import NexusINR
from nexus_monai.networks.data_consistency import grid_consistency, line_operator, soft_consistency
from nexus_monai.transforms.consistency import AcquisitionModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _scan(shape=(10, 9, 24), axis=2, k=2.5, offset=0.3, seed=0):
    """A smooth-ish HR volume on a 2 mm grid and its thick-slice LR scan (nominal Gaussian, slabs off the
    grid by ``offset`` voxels, recorded in the affine) -> (hr (X, Y, Z), grid, lr MetaTensor)."""
    g = torch.Generator().manual_seed(seed)
    hr = torch.nn.functional.avg_pool3d(torch.rand(1, 1, *shape, generator=g), 3, 1, 1)[0, 0]
    hr_aff = make_affine((2.0, 2.0, 2.0), (-5.0, 3.0, 7.0))
    nat = hr_aff.clone()
    nat[:3, 3] += offset * hr_aff[:3, axis]
    lr_aff = thick_slice_affine(nat, axis, k)
    m = int((shape[axis] - offset) // k) - 1
    op, rows = line_operator(shape[axis], offset, m, k)
    lr = (hr.movedim(axis, -1).double() @ op.T).movedim(-1, axis).float() + 0.05 * torch.randn(
        *[m if a == axis else s for a, s in enumerate(shape)], generator=g)
    return hr, TargetGrid(shape, hr_aff), MetaTensor(lr[None], affine=lr_aff)


def test_line_operator_equals_the_guards_acquisition_model_with_an_offset_header():
    hr, grid, lr = _scan()
    model = AcquisitionModel.of(lr, grid)
    op, rows = line_operator(grid.shape[2], 0.3, lr.shape[3], 2.5)
    ours = (hr.double() @ op.T).float()
    assert len(rows) == lr.shape[3]
    assert torch.allclose(ours, model.acquire(hr)[:, :, rows], atol=1e-5)


def test_small_lambda_meets_the_scan_and_huge_lambda_keeps_the_estimate():
    hr, grid, lr = _scan()
    f = hr + 0.2 * torch.rand(hr.shape, generator=torch.Generator().manual_seed(3))
    op, _ = line_operator(grid.shape[2], 0.3, lr.shape[3], 2.5)
    y = lr[0]
    hard = soft_consistency(f[None], y[None], op, 1e-9, 3)[0]
    assert torch.allclose((hard.double() @ op.T).float(), y, atol=1e-4)  # A x == y
    assert float((hard - f).abs().max()) > 1e-2
    none = soft_consistency(f[None], y[None], op, 1e9, 3)[0]
    assert torch.allclose(none, f, atol=1e-6)  # x == f
    # per-item lambda in a batch: each item behaves as alone
    both = soft_consistency(torch.stack((f, f)), torch.stack((y, y)), op, torch.tensor([1e-9, 1e9]), 3)
    assert torch.allclose(both[0], hard, atol=1e-5) and torch.allclose(both[1], f, atol=1e-6)


def test_conjugate_gradients_agree_with_the_line_solve_and_meet_the_scan_on_another_grid():
    hr, grid, lr = _scan()
    f = hr + 0.1
    stats = {}
    lines = grid_consistency(f, lr, grid, 0.01, stats=stats)
    assert stats["mode"] == "lines"
    cg = grid_consistency(f, lr, grid, 0.01, stats=stats, mode="cg", cg_iterations=200, cg_tol=1e-8)
    assert stats["mode"] == "cg"
    assert float((cg - lines).abs().max()) < 1e-3
    # an output grid at 1.5 mm (not separable): CG with lambda -> 0 meets the covered LR voxels
    fine = TargetGrid((13, 12, 32), make_affine((1.5, 1.5, 1.5), (-5.25, 2.75, 6.75)))
    g = torch.rand(fine.shape, generator=torch.Generator().manual_seed(5))
    x = grid_consistency(g, lr, fine, 1e-7, stats=stats, cg_iterations=300, cg_tol=1e-9)
    assert stats["mode"] == "cg"
    model = AcquisitionModel.of(lr, fine)
    before = ((model.lr - model.acquire(g)) * model.covered).abs().max()
    after = ((model.lr - model.acquire(x)) * model.covered).abs().max()
    assert float(after) < 1e-3 < float(before)


def _tiny(**kw):
    torch.manual_seed(0)
    return NexusINR(encoder="rdn", features=4, encoder_options={"blocks": 1, "layers": 1, "growth": 4},
                    decoder_hidden=8, decoder_layers=2, attn_heads=2, pe=False, zero_init=False, **kw).eval()


def test_tiled_equals_untiled_with_the_consistency_layer_and_the_layer_acts():
    net = _tiny(acquisition_input=True, data_consistency=True)
    with torch.no_grad():
        for lin in net.film.values():
            lin.weight.normal_(0, 0.3)
    shape = (24, 24, 16)
    hr = torch.eye(4, dtype=torch.float64) * 2.0
    hr[3, 3] = 1.0
    x = torch.rand(1, *shape, generator=torch.Generator().manual_seed(1))
    t1 = MetaTensor(x[:, :, :, ::2].clone(), affine=thick_slice_affine(hr, "z", 2))
    t2 = MetaTensor(x[:, :, ::4, :].clone(), affine=thick_slice_affine(hr, "y", 4))
    grid = TargetGrid(shape, hr)
    ref = ImplicitGridInferer(max_memory_gib=None, chunk_size=4096)(t1, t2, net, grid)
    tiled = ImplicitGridInferer(tile_shape=(7, 9, 6), chunk_size=777)
    out = tiled(t1, t2, net, grid)
    assert tiled.last_plan["tiled"]
    assert max(float((out[c] - ref[c]).abs().max()) for c in out) <= 1e-5
    layer, net.consistency = net.consistency, None
    raw = ImplicitGridInferer(max_memory_gib=None, chunk_size=4096)(t1, t2, net, grid)
    net.consistency = layer
    assert float((raw["t2"] - ref["t2"]).abs().max()) > 1e-3  # the layer changed the output


def test_switches_off_keep_the_earlier_weights_and_acquisition_input_starts_as_identity():
    plain, told = _tiny(), _tiny(acquisition_input=True, data_consistency=True)
    assert not any(k.startswith(("film", "consistency")) for k in plain.state_dict())
    assert plain.consistency is None
    extra = set(told.state_dict()) - set(plain.state_dict())
    assert extra and all(k.startswith(("film.", "consistency.")) for k in extra)
    batch = {"t1": torch.rand(1, 1, 8, 8, 4), "t2": torch.rand(1, 1, 8, 2, 8),
             "t1_affine": thick_slice_affine(torch.eye(4, dtype=torch.float64), "z", 2)[None].float(),
             "t2_affine": thick_slice_affine(torch.eye(4, dtype=torch.float64), "y", 4)[None].float(),
             "query_world": torch.rand(1, 50, 3) * 6}
    zero_film = _tiny(acquisition_input=True)  # FiLM starts at identity: the features are the unmodulated ones
    with torch.no_grad():
        z = zero_film._point_inputs(zero_film.encode(batch["t1"], batch["t2"]), {"t1": batch["t1"], "t2": batch["t2"]},
                                    {"t1": batch["t1_affine"], "t2": batch["t2_affine"]}, batch["query_world"])[0]
        zero_film.acquisition_input = False
        z0 = zero_film._point_inputs(zero_film.encode(batch["t1"], batch["t2"]), {"t1": batch["t1"], "t2": batch["t2"]},
                                     {"t1": batch["t1_affine"], "t2": batch["t2_affine"]}, batch["query_world"])[0]
    assert all(torch.equal(z[k], z0[k]) for k in z)
