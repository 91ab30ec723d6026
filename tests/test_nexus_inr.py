"""Nexus-INR (networks, losses, grid inferer) against independent computations; all tiny and CPU-fast."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor

from nexus_monai.engines.inr import ImplicitGridInferer
from nexus_monai.geometry import (
    TargetGrid,
    WorldNormalizer,
    make_affine,
    sample_at_world,
    thick_slice_affine,
    voxel_centres,
    voxel_to_world,
)
from nexus_monai.losses import NexusINRLoss, brats_label_to_class
from nexus_monai.networks import (
    FourierFeatures,
    LocalWindowCrossAttention,
    MLPDecoder,
    NexusINR,
    SIRENDecoder,
    build_decoder,
    build_encoder,
    lookup,
)

HR_AFFINE = make_affine((2.0, 2.0, 2.0), (-7.0, 3.0, 11.0))
HR_SHAPE = (8, 8, 8)
T1_AFFINE = thick_slice_affine(HR_AFFINE, "z", 2)  # LR (8, 8, 4)
T2_AFFINE = thick_slice_affine(HR_AFFINE, "y", 4)  # LR (8, 2, 8)
T1_SHAPE, T2_SHAPE = (8, 8, 4), (8, 2, 8)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add contention (40x slower 3D convs on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY_ENCODERS = {"rdn": {"blocks": 1, "layers": 2, "growth": 4}, "srresnet": {"blocks": 1}, "rescnn": {"depth": 2}}


def tiny_net(seed: int = 0, **kwargs) -> NexusINR:
    torch.manual_seed(seed)
    opts = dict(encoder="rdn", features=8, encoder_options=TINY_ENCODERS["rdn"], decoder_hidden=16, decoder_layers=2,
                attn_heads=2, pe_frequencies=2, zero_init=False)  # zero_init would stop gradients at step 0
    opts.update(kwargs)
    return NexusINR(**opts)


def tiny_batch(b: int = 2, k: int = 64, seed: int = 0) -> dict:
    """LR T1/T2 of B items with batched affines, K world points inside the HR field of view."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(b, k, 3, generator=g, dtype=torch.float64) * 8.0 - 0.5  # HR voxel edges are -0.5 .. 7.5
    world = voxel_to_world(idx, HR_AFFINE)
    norm = WorldNormalizer.from_grids([(T1_SHAPE, T1_AFFINE), (T2_SHAPE, T2_AFFINE)])
    return {
        "t1": torch.rand(b, 1, *T1_SHAPE, generator=g),
        "t2": torch.rand(b, 1, *T2_SHAPE, generator=g),
        "t1_affine": T1_AFFINE.expand(b, 4, 4).clone(),
        "t2_affine": T2_AFFINE.expand(b, 4, 4).clone(),
        "query_world": world.float(),
        "query_norm": norm(world).float(),
    }


# ---------------------------------------------------------------------------------------------
# 1. every switch combination: forward, auxiliaries, backward into every encoder
# ---------------------------------------------------------------------------------------------
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


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: "-".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in s.items()))
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


# ---------------------------------------------------------------------------------------------
# 2. encoders / decoders
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["rdn", "srresnet", "rescnn", "RDN"])
def test_encoders_keep_shape(name):
    torch.manual_seed(0)
    enc = build_encoder(name, in_channels=2, features=12, **TINY_ENCODERS[name.lower()])
    x = torch.randn(2, 2, 6, 5, 4)
    y = enc(x)
    assert y.shape == (2, 12, 6, 5, 4)
    assert enc.out_channels == 12
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name,cls", [("mlp", MLPDecoder), ("siren", SIRENDecoder)])
@pytest.mark.parametrize("lead", [(5,), (2, 7), (2, 3, 4)])
def test_decoders_map_last_dim(name, cls, lead):
    torch.manual_seed(0)
    dec = build_decoder(name, in_features=10, out_features=1, hidden=16, hidden_layers=2)
    assert isinstance(dec, cls)
    x = torch.randn(*lead, 10)
    y = dec(x)
    assert y.shape == (*lead, 1)
    # per-point: decoding the flattened points gives the same values
    assert torch.allclose(dec(x.reshape(-1, 10)).reshape(*lead, 1), y, atol=1e-6)
    assert len([m for m in dec.modules() if isinstance(m, torch.nn.Linear)]) == 3


def test_unknown_names_raise():
    with pytest.raises(ValueError):
        build_encoder("unet")
    with pytest.raises(ValueError):
        build_decoder("transformer", 4)
    with pytest.raises(ValueError):
        FourierFeatures(mode="spherical")
    with pytest.raises(ValueError):
        NexusINR(encoder="vit", features=8)
    with pytest.raises(ValueError):
        NexusINR(decoder="kan", features=8, encoder_options=TINY_ENCODERS["rdn"])


# ---------------------------------------------------------------------------------------------
# 3. Fourier features
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("include_input", [False, True])
def test_fourier_log_linear_hand_computed(include_input):
    levels = 4
    ff = FourierFeatures(3, levels, "log_linear", include_input=include_input)
    p = np.array([[0.1, -0.3, 0.77], [-1.0, 0.0, 0.5], [0.33, 0.9, -0.61]])
    sin = [math.sin(2 * math.pi * 2**l * row[d]) for row in p for d in range(3) for l in range(levels)]
    cos = [math.cos(2 * math.pi * 2**l * row[d]) for row in p for d in range(3) for l in range(levels)]
    sin, cos = np.array(sin).reshape(3, 3 * levels), np.array(cos).reshape(3, 3 * levels)
    expected = np.concatenate([sin, cos] + ([p] if include_input else []), axis=1)
    out = ff(torch.tensor(p, dtype=torch.float32))
    assert ff.out_features == expected.shape[1] == 6 * levels + 3 * include_input
    assert out.shape == (3, ff.out_features)
    assert np.allclose(out.numpy(), expected, atol=2e-5)


def test_fourier_gaussian_deterministic_per_seed():
    p = torch.rand(2, 9, 3)
    a, b, c = (FourierFeatures(3, 16, "gaussian", sigma=2.0, seed=s) for s in (5, 5, 6))
    assert a.out_features == 32
    assert a(p).shape == (2, 9, 32)
    assert torch.equal(a.B, b.B) and torch.equal(a(p), b(p))
    assert not torch.allclose(a.B, c.B)
    # [sin(2 pi B p), cos(2 pi B p)] with the stored matrix
    proj = 2 * math.pi * p.double() @ a.B.double().T
    assert torch.allclose(a(p).double(), torch.cat((proj.sin(), proj.cos()), -1), atol=1e-4)
    assert "B" in a.state_dict()  # buffer: saved with the checkpoint, not trained
    assert not list(a.parameters())


# ---------------------------------------------------------------------------------------------
# 4. lookup == "upsample to the HR grid, then grid-sample" (paper eq. 4-5)
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# 5. local-window cross-attention
# ---------------------------------------------------------------------------------------------
def _attn_inputs(b=2, k=9, c=8, shape=(5, 4, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(b, k, c, generator=g)
    key_map = torch.randn(b, c, *shape, generator=g)
    # continuous key-grid indices, some outside the grid to exercise the border clamp
    index = torch.rand(b, k, 3, generator=g) * (torch.tensor(shape) + 1.0) - 1.0
    return query, key_map, index


def test_attention_shape():
    attn = LocalWindowCrossAttention(8, heads=2, window=(3, 3, 3))
    query, key_map, index = _attn_inputs()
    assert attn(query, key_map, index).shape == query.shape
    assert attn.project_keys(key_map).shape == (2, 5 * 4 * 3, 16)


@pytest.mark.parametrize("window", [(3, 3, 3), (1, 3, 5)])
def test_attention_uniform_weights_average_window_values(window):
    """Zero query projection -> uniform attention -> output = query + out(mean of the window's values)."""
    torch.manual_seed(0)
    attn = LocalWindowCrossAttention(8, heads=4, window=window)
    with torch.no_grad():
        attn.to_q.weight.zero_()
        attn.to_q.bias.zero_()
    query, key_map, index = _attn_inputs(shape=(5, 4, 3))
    got = attn(query, key_map, index)
    kv = attn.project_keys(key_map).detach()
    values = kv[..., 8:].reshape(2, 5, 4, 3, 8)  # back on the key grid (C-order flatten)
    nx, ny, nz = 5, 4, 3
    for bi in range(2):
        for qi in range(query.shape[1]):
            ci = [int(round(float(v))) for v in index[bi, qi]]
            acc, count = torch.zeros(8), 0
            for dx in range(-(window[0] // 2), window[0] // 2 + 1):
                for dy in range(-(window[1] // 2), window[1] // 2 + 1):
                    for dz in range(-(window[2] // 2), window[2] // 2 + 1):
                        x = min(max(ci[0] + dx, 0), nx - 1)
                        y = min(max(ci[1] + dy, 0), ny - 1)
                        z = min(max(ci[2] + dz, 0), nz - 1)
                        acc += values[bi, x, y, z]
                        count += 1
            assert count == math.prod(window)
            expected = query[bi, qi] + attn.out(acc / count)
            assert torch.allclose(got[bi, qi], expected, atol=1e-5)


def test_attention_window_one_picks_nearest_voxel():
    """A 1x1x1 window has attention weight 1 on the nearest key voxel, whatever the query."""
    torch.manual_seed(0)
    attn = LocalWindowCrossAttention(8, heads=2, window=(1, 1, 1))
    query, key_map, index = _attn_inputs(shape=(4, 4, 4), seed=2)
    got = attn(query, key_map, index)
    values = attn.project_keys(key_map)[..., 8:].reshape(2, 4, 4, 4, 8)
    nearest = torch.round(index).long().clamp(0, 3)
    v = torch.stack([values[b, nearest[b, :, 0], nearest[b, :, 1], nearest[b, :, 2]] for b in range(2)])
    assert torch.allclose(got, query + attn.out(v), atol=1e-5)


def test_attention_cost_is_linear_in_query_points():
    """Gathered window elements scale with K (and the window), not with the key map's size."""
    attn = LocalWindowCrossAttention(8, heads=2, window=(3, 3, 3))
    seen = []
    attn.pos.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    for k, shape in ((16, (5, 4, 3)), (32, (5, 4, 3)), (32, (10, 8, 6))):
        query, key_map, index = _attn_inputs(k=k, shape=shape)
        attn(query, key_map, index)
    assert seen[0] == (2, 16, 27, 3)
    assert seen[1] == (2, 32, 27, 3)
    assert math.prod(seen[1]) == 2 * math.prod(seen[0])
    assert seen[2] == seen[1]  # an 8x bigger key map gathers the same number of elements


@pytest.mark.parametrize("window", [(2, 3, 3), (3, 3, 4), (0, 1, 1)])
def test_attention_even_window_raises(window):
    with pytest.raises(ValueError):
        LocalWindowCrossAttention(8, heads=2, window=window)


def test_attention_heads_must_divide_dim():
    with pytest.raises(ValueError):
        LocalWindowCrossAttention(10, heads=4)


# ---------------------------------------------------------------------------------------------
# 6. losses
# ---------------------------------------------------------------------------------------------
def _fake_out(b=2, k=6, c=4, seed=0, kd=True, mmf=True, sel=True):
    g = torch.Generator().manual_seed(seed)
    out = {"t1": torch.randn(b, k, generator=g), "t2": torch.randn(b, k, generator=g),
           "z_t1_shared": torch.randn(b, k, c, generator=g), "z_t2_shared": torch.randn(b, k, c, generator=g),
           "z_t2_fused": torch.randn(b, k, c, generator=g)}
    if kd:
        out["t2_self"] = torch.randn(b, k, generator=g)
    if mmf:
        out["modality_logits_t1"] = torch.randn(b, k, 2, generator=g)
        out["modality_logits_t2"] = torch.randn(b, k, 2, generator=g)
    if sel:
        out["seg_logits_t1"] = torch.randn(b, k, 4, generator=g)
        out["seg_logits_t2"] = torch.randn(b, k, 4, generator=g)
    return out


def _ce_numpy(logits: np.ndarray, target: np.ndarray) -> float:
    logits = logits.reshape(-1, logits.shape[-1]).astype(np.float64)
    target = target.reshape(-1)
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(target)), target].mean())


def test_loss_kd_zero_for_identical_features_and_hand_value_otherwise():
    loss = NexusINRLoss()
    out = _fake_out()
    t1, t2 = torch.randn(2, 6), torch.randn(2, 6)
    same = dict(out, z_t2_fused=out["z_t1_shared"].clone())
    terms = loss(same, t1, t2)
    assert float(terms["kd"]) == 0.0
    assert float(terms["cmfa"]) == 0.0
    terms = loss(out, t1, t2)
    d = (out["z_t2_fused"] - out["z_t1_shared"]).numpy()
    assert np.isclose(float(terms["kd"]), (d**2).sum(-1).mean(), rtol=1e-5)
    assert np.isclose(float(terms["t2self"]), ((out["t2_self"] - t2).numpy() ** 2).mean(), rtol=1e-5)


def test_loss_kd_teacher_is_detached():
    out = _fake_out()
    z1 = out["z_t1_shared"].clone().requires_grad_(True)
    z2 = out["z_t2_fused"].clone().requires_grad_(True)
    terms = NexusINRLoss()(dict(out, z_t1_shared=z1, z_t2_fused=z2), torch.zeros(2, 6), torch.zeros(2, 6))
    terms["kd"].backward()
    assert z1.grad is None
    assert z2.grad is not None and float(z2.grad.abs().sum()) > 0


def test_loss_cmfa_hand_value():
    """Eq. 18: || Mean(z_1) - Mean(z_2) ||_1, the L1 norm = SUM over channels; "mean" divides by C."""
    out = _fake_out(c=5)
    terms = NexusINRLoss()(out, torch.zeros(2, 6), torch.zeros(2, 6))
    z1 = out["z_t1_shared"].numpy().reshape(-1, 5)
    z2 = out["z_t2_fused"].numpy().reshape(-1, 5)
    assert np.isclose(float(terms["cmfa"]), np.abs(z1.mean(0) - z2.mean(0)).sum(), rtol=1e-5)
    # a constant per-channel offset: |0.5| + |-1| + |2| + |0| + |-0.25| = 3.75 (mean option: 3.75 / 5)
    offset = torch.tensor([0.5, -1.0, 2.0, 0.0, -0.25])
    shifted = dict(out, z_t2_fused=out["z_t1_shared"] + offset)
    assert np.isclose(float(NexusINRLoss()(shifted, torch.zeros(2, 6), torch.zeros(2, 6))["cmfa"]), 3.75, rtol=1e-5)
    mean = NexusINRLoss(cmfa_reduction="mean")(shifted, torch.zeros(2, 6), torch.zeros(2, 6))["cmfa"]
    assert np.isclose(float(mean), 0.75, rtol=1e-5)
    # hand-computed: 2 items x 2 points x 2 channels
    z1 = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]])  # channel means 4, 5
    z2 = torch.tensor([[[0.0, 1.0], [0.0, 1.0]], [[2.0, 1.0], [2.0, 1.0]]])  # channel means 1, 1
    hand = dict(_fake_out(k=2, c=2), z_t1_shared=z1, z_t2_fused=z2)
    assert float(NexusINRLoss()(hand, torch.zeros(2, 2), torch.zeros(2, 2))["cmfa"]) == pytest.approx(3.0 + 4.0)
    with pytest.raises(ValueError, match="cmfa_reduction"):
        NexusINRLoss(cmfa_reduction="max")


def test_loss_fdl_and_seg_cross_entropy():
    out = _fake_out()
    label = torch.tensor([[0, 1, 2, 4, 4, 0], [2, 2, 1, 0, 4, 1]])
    terms = NexusINRLoss()(out, torch.zeros(2, 6), torch.zeros(2, 6), label)
    fdl = _ce_numpy(out["modality_logits_t1"].numpy(), np.zeros(12, int)) + _ce_numpy(out["modality_logits_t2"].numpy(), np.ones(12, int))
    assert np.isclose(float(terms["fdl"]), fdl, rtol=1e-5)
    fdl_torch = F.cross_entropy(out["modality_logits_t1"].reshape(-1, 2), torch.zeros(12, dtype=torch.long)) + \
        F.cross_entropy(out["modality_logits_t2"].reshape(-1, 2), torch.ones(12, dtype=torch.long))
    assert torch.allclose(terms["fdl"], fdl_torch)
    cls = np.array([[0, 1, 2, 3, 3, 0], [2, 2, 1, 0, 3, 1]])
    seg = _ce_numpy(out["seg_logits_t1"].numpy(), cls) + _ce_numpy(out["seg_logits_t2"].numpy(), cls)
    assert np.isclose(float(terms["seg"]), seg, rtol=1e-5)


@pytest.mark.parametrize("sr", ["l1", "mse"])
def test_loss_sr_hand_value(sr):
    out = _fake_out()
    t1, t2 = torch.randn(2, 6), torch.randn(2, 6)
    terms = NexusINRLoss(sr=sr)(out, t1, t2)
    err1, err2 = (out["t1"] - t1).numpy(), (out["t2"] - t2).numpy()
    f = np.abs if sr == "l1" else np.square
    assert np.isclose(float(terms["sr_t1"]), f(err1).mean(), rtol=1e-6)
    assert np.isclose(float(terms["sr_t2"]), f(err2).mean(), rtol=1e-6)


def test_loss_unknown_sr_raises():
    with pytest.raises(ValueError):
        NexusINRLoss(sr="huber")


@pytest.mark.parametrize("kd,mmf,sel,with_label", [(False, False, False, True), (True, False, False, True),
                                                   (False, True, False, True), (False, False, True, True),
                                                   (True, True, True, False), (True, True, True, True)])
def test_loss_terms_absent_when_switch_off(kd, mmf, sel, with_label):
    out = _fake_out(kd=kd, mmf=mmf, sel=sel)
    label = torch.zeros(2, 6, dtype=torch.long) if with_label else None
    terms = NexusINRLoss()(out, torch.zeros(2, 6), torch.zeros(2, 6), label)
    expected = {"loss", "sr_t1", "sr_t2"} | ({"kd", "t2self"} if kd else set()) | ({"cmfa", "fdl"} if mmf else set())
    expected |= {"seg"} if sel and with_label else set()
    assert set(terms) == expected


def test_loss_total_is_weighted_sum():
    w = dict(w_t1=0.7, w_t2=1.3, w_kd=0.2, w_t2self=0.4, w_cmfa=0.3, w_fdl=0.05, w_seg=0.6)
    out = _fake_out()
    label = torch.tensor([0, 1, 2, 4, 1, 2]).repeat(2, 1)
    terms = NexusINRLoss(**w)(out, torch.randn(2, 6), torch.randn(2, 6), label)
    key = {"sr_t1": "w_t1", "sr_t2": "w_t2", "kd": "w_kd", "t2self": "w_t2self", "cmfa": "w_cmfa", "fdl": "w_fdl", "seg": "w_seg"}
    assert set(terms) - {"loss"} == set(key)
    total = sum(w[key[k]] * float(v) for k, v in terms.items() if k != "loss")
    assert np.isclose(float(terms["loss"]), total, rtol=1e-6)


def test_brats_label_to_class():
    label = torch.tensor([[0, 1], [2, 4]], dtype=torch.uint8)
    out = brats_label_to_class(label)
    assert out.dtype == torch.long
    assert out.tolist() == [[0, 1], [2, 3]]
    assert brats_label_to_class(torch.tensor([4.0, 0.0])).tolist() == [3, 0]


@pytest.mark.parametrize("bad", [3, 5, -1])
def test_brats_label_to_class_rejects_other_labels(bad):
    with pytest.raises(ValueError):
        brats_label_to_class(torch.tensor([0, 1, bad, 4]))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_zero_init_starts_the_full_network_as_the_baseline(bidirectional):
    """zero_init: KD-Attn, the MMF projection and the residual SEL fusion start as identities, so
    the decoders first see exactly the per-modality shared features (the Baseline's), yet every
    fusion branch receives gradient once the decoders move."""
    net = tiny_net(zero_init=True, mmf=True, kd_attn=True, sel=True, sel_residual=True, bidirectional=bidirectional, cross_input=True)
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
    torch.testing.assert_close(seen["t1"], out["z_t1_shared"])  # MMF + SEL + (bidirectional) attention pass z_shared through
    torch.testing.assert_close(seen["t2"], out["z_t2_shared"])
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(2):  # step 1 moves the decoders' zero layer; step 2 reaches the branches behind it
        opt.zero_grad()
        o = net(**batch, aux=True)
        ((o["t1"] - 1.0) ** 2 + (o["t2"] - 1.0) ** 2).mean().backward()
        opt.step()
    for name in ["attn_t2.out.weight", "proj.t1.2.weight", "seg_fuse.t2.2.weight"] + (["attn_t1.out.weight"] if bidirectional else []):
        assert dict(net.named_parameters())[name].abs().sum() > 0, name
    plain = tiny_net(zero_init=True, sel=True, sel_residual=False)
    assert dict(plain.named_parameters())["seg_fuse.t1.2.weight"].abs().sum() > 0  # eq. 22 fusion is not residual: not zeroed


# ---------------------------------------------------------------------------------------------
# 7. training lowers the loss
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# 8. ImplicitGridInferer
# ---------------------------------------------------------------------------------------------
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


def test_zero_init_starts_at_trilinear_and_then_learns():
    """With residual + zero_init an untrained network returns the trilinear LR intensity exactly."""
    from nexus_monai.geometry import sample_at_world

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


def test_feature_norm_makes_kd_and_cmfa_scale_free():
    out = _fake_out()
    plain, normed = NexusINRLoss(), NexusINRLoss(feature_norm=True)
    t1, t2 = torch.rand(2, 6), torch.rand(2, 6)
    big = dict(out, z_t1_shared=out["z_t1_shared"] * 100, z_t2_fused=out["z_t2_fused"] * 100)
    a, b = normed(out, t1, t2), normed(big, t1, t2)
    assert torch.allclose(a["kd"], b["kd"]) and torch.allclose(a["cmfa"], b["cmfa"])
    assert plain(big, t1, t2)["kd"] > 1000 * plain(out, t1, t2)["kd"] * 0.99
    # hand value: unit vectors u, v -> |u - v|^2 = 2 - 2 cos
    u = torch.nn.functional.normalize(out["z_t2_fused"], dim=-1)
    v = torch.nn.functional.normalize(out["z_t1_shared"], dim=-1)
    assert torch.allclose(a["kd"], (2 - 2 * (u * v).sum(-1)).mean(), atol=1e-6)


def test_aux_loss_warmup_holds_aux_weights_at_zero_then_restores_them():
    from ignite.engine import Engine

    from nexus_monai.engines.inr_handlers import AuxLossWarmup

    loss = NexusINRLoss(w_kd=0.1, w_t2self=0.5, w_cmfa=0.2, w_fdl=0.01, w_seg=0.3)
    seen = []
    engine = Engine(lambda e, b: seen.append((e.state.epoch, dict(loss.w))))
    AuxLossWarmup(loss, warmup_epochs=2).attach(engine)
    engine.run([0], max_epochs=4)
    for epoch, w in seen:
        aux = {k: w[k] for k in ("kd", "cmfa", "fdl", "seg")}
        assert aux == ({"kd": 0.0, "cmfa": 0.0, "fdl": 0.0, "seg": 0.0} if epoch <= 2 else {"kd": 0.1, "cmfa": 0.2, "fdl": 0.01, "seg": 0.3})
        assert w["sr_t1"] == w["sr_t2"] == 1.0 and w["t2self"] == 0.5  # always on
    with pytest.raises(ValueError, match="unknown loss terms"):
        AuxLossWarmup(loss, 1, terms=("kd", "nope"))
    # the zeroed terms are still computed (and logged), they just do not count
    out = _fake_out()
    terms = loss(out, torch.zeros(2, 6), torch.zeros(2, 6), torch.zeros(2, 6, dtype=torch.long))
    loss.w.update(kd=0.0, cmfa=0.0, fdl=0.0, seg=0.0)
    zeroed = loss(out, torch.zeros(2, 6), torch.zeros(2, 6), torch.zeros(2, 6, dtype=torch.long))
    assert set(zeroed) == set(terms) and zeroed["loss"] < terms["loss"]
    torch.testing.assert_close(zeroed["loss"], zeroed["sr_t1"] + zeroed["sr_t2"] + 0.5 * zeroed["t2self"])
