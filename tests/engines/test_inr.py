"""ImplicitGridInferer (engines/inr.py) against the network on every voxel; AuxLossWarmup (engines/inr_handlers.py)."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor

from nexus_monai.engines.inr import ImplicitGridInferer
from nexus_monai.engines.inr_handlers import AuxLossWarmup
from nexus_monai.geometry import TargetGrid, WorldNormalizer
from nexus_monai.losses import NexusINRLoss

from helpers import HR_AFFINE, HR_SHAPE, T1_AFFINE, T1_SHAPE, T2_AFFINE, T2_SHAPE, fake_inr_out, tiny_net

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _subject(zero_region: bool = False):
    g = torch.Generator().manual_seed(4)
    t1 = torch.rand(1, *T1_SHAPE, generator=g) + 0.1
    t2 = torch.rand(1, *T2_SHAPE, generator=g) + 0.1
    if zero_region:  # background along x (the axis both scans share with the HR grid): LR x < 4
        t1[:, :4] = 0
        t2[:, :4] = 0
    return MetaTensor(t1, affine=T1_AFFINE.clone()), MetaTensor(t2, affine=T2_AFFINE.clone())



def test_inferer_chunk_invariance_and_matches_forward():
    net = tiny_net()
    net.train()
    t1, t2 = _subject()
    grid = TargetGrid.from_spacing(T1_SHAPE, T1_AFFINE, (2.0, 2.0, 2.0))
    assert grid.shape == HR_SHAPE
    small = ImplicitGridInferer(chunk_size=7, skip_empty=False)(t1, t2, net, grid)
    big = ImplicitGridInferer(chunk_size=100000, skip_empty=False)(t1, t2, net, grid)
    assert net.training  # mode restored
    for c in ("t1", "t2"):
        assert small[c].shape == grid.shape and small[c].dtype == torch.float32
        assert torch.allclose(small[c], big[c], atol=1e-6)
    # same as calling the network on every voxel centre of the grid (C-order) with the LR-grid normaliser
    world = grid.world_coords(torch.float64).reshape(1, -1, 3)
    norm = WorldNormalizer.from_grids([(T1_SHAPE, T1_AFFINE), (T2_SHAPE, T2_AFFINE)])
    with torch.no_grad():
        ref = net(t1.as_tensor()[None], t2.as_tensor()[None], T1_AFFINE[None], T2_AFFINE[None],
                  world.float(), norm(world).float(), aux=False)
    for c in ("t1", "t2"):
        assert torch.allclose(big[c], ref[c].reshape(grid.shape), atol=1e-5)



def test_inferer_skip_empty_gives_exact_zeros():
    net = tiny_net(seed=3)
    t1, t2 = _subject(zero_region=True)
    grid = TargetGrid(HR_SHAPE, HR_AFFINE)
    skipped = ImplicitGridInferer(chunk_size=7, skip_empty=True)(t1, t2, net, grid)
    full = ImplicitGridInferer(chunk_size=7, skip_empty=False)(t1, t2, net, grid)
    big = ImplicitGridInferer(chunk_size=100000, skip_empty=True)(t1, t2, net, grid)
    # HR index i <= 2 reads only LR x <= 3 (shared x axis): both scans are exactly 0 there
    empty = torch.zeros(HR_SHAPE, dtype=torch.bool)
    empty[:3] = True
    for c in ("t1", "t2"):
        assert skipped[c].shape == HR_SHAPE
        assert torch.all(skipped[c][empty] == 0)
        assert torch.any(full[c][empty] != 0)  # the network itself does not output 0 there
        # everywhere with signal the decoded values are those of the full decode
        assert torch.allclose(skipped[c][4:], full[c][4:], atol=1e-6)
        assert torch.all(skipped[c][4:] != 0)
        assert torch.allclose(skipped[c], big[c], atol=1e-6)



def test_aux_loss_warmup_holds_aux_weights_at_zero_then_restores_them():
    loss = NexusINRLoss(w_kd=0.1, w_t2self=0.5, w_cmfa=0.2, w_fdl=0.01, w_seg=0.3)
    seen = []
    engine = Engine(lambda e, b: seen.append((e.state.epoch, dict(loss.w))))
    AuxLossWarmup(loss, warmup_epochs=2).attach(engine)
    engine.run([0], max_epochs=4)
    for epoch, w in seen:
        aux = {k: w[k] for k in ("kd", "cmfa", "fdl", "seg")}
        on = {"kd": 0.1, "cmfa": 0.2, "fdl": 0.01, "seg": 0.3}
        assert aux == ({"kd": 0.0, "cmfa": 0.0, "fdl": 0.0, "seg": 0.0} if epoch <= 2 else on)
        assert w["sr_t1"] == w["sr_t2"] == 1.0 and w["t2self"] == 0.5  # always on
    with pytest.raises(ValueError, match="unknown loss terms"):
        AuxLossWarmup(loss, 1, terms=("kd", "nope"))
    # the zeroed terms are still computed (and logged), they just do not count
    out = fake_inr_out()
    terms = loss(out, torch.zeros(2, 6), torch.zeros(2, 6), torch.zeros(2, 6, dtype=torch.long))
    loss.w.update(kd=0.0, cmfa=0.0, fdl=0.0, seg=0.0)
    zeroed = loss(out, torch.zeros(2, 6), torch.zeros(2, 6), torch.zeros(2, 6, dtype=torch.long))
    assert set(zeroed) == set(terms) and zeroed["loss"] < terms["loss"]
    torch.testing.assert_close(zeroed["loss"], zeroed["sr_t1"] + zeroed["sr_t2"] + 0.5 * zeroed["t2self"])



def test_subject_scores_run_ssim_on_the_metric_device(monkeypatch):
    """SSIM's window filters go to metric_device() (the GPU when there is one), with the same values."""
    import nexus_monai.engines.inr as inr
    from nexus_monai.metrics.image_quality import ssim3d

    torch.manual_seed(0)
    gt = {c: torch.nn.functional.avg_pool3d(torch.rand(1, 1, 24, 24, 20), 3, 1, 1)[0, 0] for c in ("t1", "t2")}
    pred = {c: gt[c] + 0.01 * torch.randn_like(gt[c]) for c in gt}
    seen = []

    def spy(*args, device=None, **kw):
        seen.append(device)
        return ssim3d(*args, device=device, **kw)

    monkeypatch.setattr(inr, "ssim3d", spy)
    row = inr.subject_scores(gt, pred)
    assert seen == [inr.metric_device()] * 2
    assert inr.metric_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(inr, "ssim3d", ssim3d)
    assert row["ssim_t1"] == pytest.approx(inr.subject_scores(gt, pred, device="cpu")["ssim_t1"], abs=1e-9)
