"""NexusINR (networks/nexus_inr.py): every switch combination forward and backward, per-item affines,
encode/decode chunks, the feature lookup against upsample-then-grid-sample (paper eq. 4-5), zero_init, learning."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from nexus_monai.geometry import TargetGrid, WorldNormalizer, make_affine, sample_at_world, voxel_centres
from nexus_monai.losses import NexusINRLoss
from nexus_monai.networks import NexusINR, lookup

from helpers import HR_AFFINE, HR_SHAPE, T1_AFFINE, T1_SHAPE, T2_AFFINE, T2_SHAPE, TINY_ENCODERS, tiny_batch, tiny_net

pytestmark = pytest.mark.usefixtures("one_torch_thread")


SWITCHES = [dict(mmf=a, kd_attn=b, sel=c) for a, b, c in itertools.product((False, True), repeat=3)]
SWITCHES += [
    dict(mmf=True, kd_attn=True, sel=True, bidirectional=True),
    dict(mmf=False, kd_attn=True, sel=False, bidirectional=True),
    dict(pe=False),
    dict(rel_coord=False),
    dict(residual=False),
    dict(decoder="siren"),
    dict(pe_mode="gaussian", pe_frequencies=5),
    dict(cross_input=True),
    dict(mmf=True, kd_attn=True, sel=True, bidirectional=True, cross_input=True),
]



@pytest.mark.parametrize("switches", SWITCHES,
                         ids=lambda s: "-".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in s.items()))
def test_nexus_inr_switches_forward_backward(switches):
    net = tiny_net(**switches)
    mmf, kd, sel = net.mmf, net.kd_attn, net.sel
    batch = tiny_batch(b=2, k=40)
    out = net(**batch, aux=True)

    for m in ("t1", "t2"):
        assert out[m].shape == (2, 40)
    assert ("t2_self" in out) == kd
    assert ("modality_logits_t1" in out and "modality_logits_t2" in out) == mmf
    assert ("modality_logits_t1" in out or "modality_logits_t2" in out) == mmf
    assert ("seg_logits_t1" in out and "seg_logits_t2" in out) == sel
    assert ("seg_logits_t1" in out or "seg_logits_t2" in out) == sel
    if kd:
        assert out["t2_self"].shape == (2, 40)
    if mmf:
        assert out["modality_logits_t1"].shape == (2, 40, 2)
    if sel:
        assert out["seg_logits_t2"].shape == (2, 40, 4)
    for key in ("z_t1_shared", "z_t2_shared", "z_t2_fused"):
        assert out[key].shape == (2, 40, 8)
    if not kd:  # no attention: the "fused" feature is the plain T2w shared lookup
        assert torch.equal(out["z_t2_fused"], out["z_t2_shared"])
    for key, value in out.items():
        assert torch.isfinite(value).all(), key

    # the expected loss terms, exactly those the switches produce
    label = torch.tensor([0, 1, 2, 4]).repeat(2, 10)
    terms = NexusINRLoss()(out, torch.rand(2, 40), torch.rand(2, 40), label)
    expected = {"loss", "sr_t1", "sr_t2"} | ({"kd", "t2self"} if kd else set()) | ({"cmfa", "fdl"} if mmf else set())
    expected |= {"seg"} if sel else set()
    assert set(terms) == expected

    terms["loss"].backward()
    names = {f"{m}_{b}" for m in ("t1", "t2") for b in (("shared", "spec") if mmf else ("shared",))}
    assert set(net.encoders.keys()) == names
    for name, enc in net.encoders.items():
        grads = [p.grad for p in enc.parameters()]
        assert all(g is not None for g in grads), name
        assert all(torch.isfinite(g).all() for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, name
    if kd:
        assert all(p.grad is not None for p in net.attn_t2.parameters())
        if net.bidirectional:
            assert all(p.grad is not None for p in net.attn_t1.parameters())
            # same weights without the T1w-from-T2w attention: T2w unchanged, T1w changed
            one_way = tiny_net(**{**switches, "bidirectional": False})
            missing, unexpected = one_way.load_state_dict(net.state_dict(), strict=False)
            assert not missing and unexpected and all(k.startswith("attn_t1.") for k in unexpected)
            with torch.no_grad():
                ref = one_way(**batch)
            if not net.cross_input:  # with cross_input the T2w decoder also reads the (changed) T1w feature
                assert torch.allclose(out["t2"], ref["t2"], atol=1e-6)
            assert not torch.allclose(out["t1"], ref["t1"], atol=1e-4)



def test_nexus_inr_requires_query_norm_with_pe():
    batch = tiny_batch(b=1, k=5)
    batch.pop("query_norm")
    with pytest.raises(ValueError):
        tiny_net()(**batch)
    out = tiny_net(pe=False)(**batch)  # without PE the normalised points are not needed
    assert out["t1"].shape == (1, 5)



def test_nexus_inr_uses_each_items_affine():
    """Translating item 1's scans AND its query points by the same offset leaves its prediction unchanged."""
    net = tiny_net(mmf=True, kd_attn=True, sel=True)
    batch = tiny_batch(b=2, k=30)
    for key in ("t1", "t2", "query_world", "query_norm"):
        batch[key][1] = batch[key][0]
    shift = torch.tensor([13.0, -4.0, 7.5])
    for key in ("t1_affine", "t2_affine"):
        batch[key][1, :3, 3] += shift.double()
    batch["query_world"][1] += shift
    out = net(**batch)
    for m in ("t1", "t2", "t2_self"):
        assert torch.allclose(out[m][0], out[m][1], atol=1e-5), m
    # and it is not a trivial check: without shifting the points the prediction changes
    batch["query_world"][1] -= shift
    assert not torch.allclose(net(**batch)["t1"][0], net(**batch)["t1"][1], atol=1e-3)



def test_nexus_inr_decode_chunks_match_forward():
    """encode() once + decode() of point subsets == forward() on all points (the inferer's contract)."""
    net = tiny_net()
    batch = tiny_batch(b=2, k=20)
    full = net(**batch, aux=False)
    maps = net.encode(batch["t1"], batch["t2"])
    assert maps["kv_for_t2"].shape == (2, math.prod(T1_SHAPE), 16)
    for sl in (slice(0, 7), slice(7, 20)):
        part = net.decode(maps, batch["t1"], batch["t2"], batch["t1_affine"], batch["t2_affine"],
                          batch["query_world"][:, sl], batch["query_norm"][:, sl])
        for m in ("t1", "t2"):
            assert torch.allclose(part[m], full[m][:, sl], atol=1e-6)



LOOKUP_CASES = {
    "aniso": (make_affine((1.0, 1.5, 3.0), (5.0, -3.0, 2.0)), (6, 5, 4), (0.5, 0.75, 1.0)),
    "oblique": (make_affine((1.0, 1.5, 3.0), (5.0, -3.0, 2.0), rotation_deg=(10, -5, 20)), (6, 5, 4), (0.5, 0.5, 1.5)),
    "thick_z": (T1_AFFINE, T1_SHAPE, 2.0),
}



@pytest.mark.parametrize("case", LOOKUP_CASES)
def test_lookup_equals_upsample_then_grid_sample(case):
    lr_affine, lr_shape, hr_spacing = LOOKUP_CASES[case]
    torch.manual_seed(1)
    lr_map = torch.randn(1, 5, *lr_shape)
    hr = TargetGrid.from_spacing(lr_shape, lr_affine, hr_spacing)
    centres = hr.world_coords(torch.float64).reshape(1, -1, 3)
    # "upsample": the LR map read at every HR voxel centre -> an HR feature volume on the HR grid
    hr_vol = sample_at_world(lr_map, lr_affine, centres).reshape(1, 5, *hr.shape)
    # "GridSample": trilinear lookup of the HR volume at the HR voxel centres
    via_hr = sample_at_world(hr_vol, hr.affine, centres)  # (1, C, N)
    direct, index = lookup(lr_map, lr_affine[None], centres.float())
    assert direct.shape == (1, centres.shape[1], 5)
    assert np.allclose(direct[0].numpy(), via_hr[0].T.numpy(), atol=1e-5)
    # the index it returns is the LR voxel index (numpy inverse affine)
    ref = (np.linalg.inv(lr_affine.numpy()) @ np.c_[centres[0].numpy(), np.ones(centres.shape[1])].T)[:3].T
    assert np.allclose(index[0].numpy(), ref, atol=1e-4)



def _trilinear_numpy(volume: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """volume (C, X, Y, Z) at one continuous voxel index strictly inside the grid, 8-corner weights."""
    i0 = np.floor(idx).astype(int)
    f = idx - i0
    out = np.zeros(volume.shape[0])
    for corner in itertools.product((0, 1), repeat=3):
        w = np.prod([f[a] if corner[a] else 1.0 - f[a] for a in range(3)])
        out += w * volume[:, i0[0] + corner[0], i0[1] + corner[1], i0[2] + corner[2]]
    return out



@pytest.mark.parametrize("case", ["aniso", "oblique"])
def test_lookup_hand_trilinear(case):
    lr_affine, lr_shape, _ = LOOKUP_CASES[case]
    rng = np.random.default_rng(3)
    vol = rng.standard_normal((4, *lr_shape))
    indices = np.array([[2.3, 1.6, 0.25], [0.1, 3.9, 2.7], [4.5, 2.0, 1.125]])
    world = (lr_affine.numpy() @ np.c_[indices, np.ones(3)].T)[:3].T
    got, _ = lookup(torch.tensor(vol[None]), lr_affine[None], torch.tensor(world[None]))
    for n in range(3):
        assert np.allclose(got[0, n].numpy(), _trilinear_numpy(vol, indices[n]), atol=1e-8)



@pytest.mark.parametrize("bidirectional", [False, True])
def test_zero_init_starts_the_full_network_as_the_baseline(bidirectional):
    """zero_init: KD-Attn, the MMF projection and the residual SEL fusion start as identities, so
    the decoders first see exactly the per-modality shared features (the Baseline's), yet every
    fusion branch receives gradient once the decoders move."""
    net = tiny_net(zero_init=True, mmf=True, kd_attn=True, sel=True, sel_residual=True, bidirectional=bidirectional,
                   cross_input=True)
    batch = tiny_batch()
    out = net(**batch, aux=True)
    torch.testing.assert_close(out["z_t2_fused"], out["z_t2_shared"])  # attention = identity
    seen = {}
    orig = net._decode_one

    def spy(m, h, *rest):
        seen.setdefault(m, h)
        return orig(m, h, *rest)

    net._decode_one = spy
    net(**batch, aux=False)
    # MMF + SEL + (bidirectional) attention pass z_shared through
    torch.testing.assert_close(seen["t1"], out["z_t1_shared"])
    torch.testing.assert_close(seen["t2"], out["z_t2_shared"])
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(2):  # step 1 moves the decoders' zero layer; step 2 reaches the branches behind it
        opt.zero_grad()
        o = net(**batch, aux=True)
        ((o["t1"] - 1.0) ** 2 + (o["t2"] - 1.0) ** 2).mean().backward()
        opt.step()
    branches = ["attn_t2.out.weight", "proj.t1.2.weight", "seg_fuse.t2.2.weight"]
    for name in branches + (["attn_t1.out.weight"] if bidirectional else []):
        assert dict(net.named_parameters())[name].abs().sum() > 0, name
    plain = tiny_net(zero_init=True, sel=True, sel_residual=False)
    # eq. 22 fusion is not residual: not zeroed
    assert dict(plain.named_parameters())["seg_fuse.t1.2.weight"].abs().sum() > 0



def test_training_lowers_sr_loss():
    torch.manual_seed(0)
    net = NexusINR(encoder="rdn", features=8, encoder_options=TINY_ENCODERS["rdn"], decoder_hidden=32, decoder_layers=2,
                   mmf=True, kd_attn=True, sel=True, attn_heads=2, pe_frequencies=2)
    # two smooth HR "subjects" on the 8^3 HR grid
    i, j, k = torch.meshgrid(*[torch.arange(8.0)] * 3, indexing="ij")
    hr = torch.stack([0.5 + 0.3 * torch.sin(0.7 * i + 0.3) * torch.cos(0.5 * j - 0.2) + 0.2 * torch.cos(0.9 * k),
                      0.5 + 0.4 * torch.cos(0.6 * i + 0.5 * k)])[:, None]
    # thick-slice acquisitions: slab means along z (x2) for T1w and along y (x4) for T2w
    t1 = hr.reshape(2, 1, 8, 8, 4, 2).mean(-1)
    t2 = hr.reshape(2, 1, 8, 2, 4, 8).mean(-2) * 0.5 + 0.25  # another contrast
    centres = voxel_centres(HR_SHAPE, HR_AFFINE, torch.float64).reshape(1, -1, 3).expand(2, -1, -1)
    norm = WorldNormalizer.from_grids([(T1_SHAPE, T1_AFFINE), (T2_SHAPE, T2_AFFINE)])
    kwargs = dict(t1=t1, t2=t2, t1_affine=T1_AFFINE.expand(2, 4, 4), t2_affine=T2_AFFINE.expand(2, 4, 4),
                  query_world=centres.float(), query_norm=norm(centres).float())
    target_t1, target_t2 = hr.reshape(2, -1), (hr * 0.5 + 0.25).reshape(2, -1)
    label = torch.tensor([0, 1, 2, 4]).repeat(2, 128)
    loss_fn = NexusINRLoss()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    history = []
    for _ in range(30):
        opt.zero_grad()
        terms = loss_fn(net(**kwargs), target_t1, target_t2, label)
        terms["loss"].backward()
        opt.step()
        history.append((terms["sr_t1"] + terms["sr_t2"]).item())
    with torch.no_grad():
        terms = loss_fn(net(**kwargs), target_t1, target_t2, label)
    final = float(terms["sr_t1"] + terms["sr_t2"])
    assert all(math.isfinite(v) for v in history)
    # zero_init: step 0 IS trilinear interpolation; training must get well below it
    assert final <= 0.8 * history[0], (history[0], final)



def test_zero_init_starts_at_trilinear_and_then_learns():
    """With residual + zero_init an untrained network returns the trilinear LR intensity exactly."""
    net = tiny_net(zero_init=True, cross_input=True)
    batch = tiny_batch(b=2, k=30)
    out = net(**batch, aux=False)
    for m in ("t1", "t2"):
        tri = sample_at_world(batch[m], batch[f"{m}_affine"], batch["query_world"])[:, 0]
        assert torch.allclose(out[m], tri, atol=1e-6)
    loss = NexusINRLoss()(net(**batch, aux=True), torch.rand(2, 30), torch.rand(2, 30))
    loss["loss"].backward()
    last = [p for p in net.decoders["t1"].modules() if isinstance(p, torch.nn.Linear)][-1]
    assert last.weight.grad.abs().sum() > 0  # the zero layer is trained first, then everything else

