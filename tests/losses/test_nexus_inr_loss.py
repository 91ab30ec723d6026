"""The Nexus-INR loss (losses/nexus_inr.py): every term against a hand computation, switches, weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nexus_monai.losses import NexusINRLoss, brats_label_to_class

from helpers import fake_inr_out

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ce_numpy(logits: np.ndarray, target: np.ndarray) -> float:
    logits = logits.reshape(-1, logits.shape[-1]).astype(np.float64)
    target = target.reshape(-1)
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(target)), target].mean())



def test_loss_kd_zero_for_identical_features_and_hand_value_otherwise():
    loss = NexusINRLoss()
    out = fake_inr_out()
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
    out = fake_inr_out()
    z1 = out["z_t1_shared"].clone().requires_grad_(True)
    z2 = out["z_t2_fused"].clone().requires_grad_(True)
    terms = NexusINRLoss()(dict(out, z_t1_shared=z1, z_t2_fused=z2), torch.zeros(2, 6), torch.zeros(2, 6))
    terms["kd"].backward()
    assert z1.grad is None
    assert z2.grad is not None and float(z2.grad.abs().sum()) > 0



def test_loss_cmfa_hand_value():
    """Eq. 18: || Mean(z_1) - Mean(z_2) ||_1, the L1 norm = SUM over channels; "mean" divides by C."""
    out = fake_inr_out(c=5)
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
    hand = dict(fake_inr_out(k=2, c=2), z_t1_shared=z1, z_t2_fused=z2)
    assert float(NexusINRLoss()(hand, torch.zeros(2, 2), torch.zeros(2, 2))["cmfa"]) == pytest.approx(3.0 + 4.0)
    with pytest.raises(ValueError, match="cmfa_reduction"):
        NexusINRLoss(cmfa_reduction="max")



def test_loss_fdl_and_seg_cross_entropy():
    out = fake_inr_out()
    label = torch.tensor([[0, 1, 2, 4, 4, 0], [2, 2, 1, 0, 4, 1]])
    terms = NexusINRLoss()(out, torch.zeros(2, 6), torch.zeros(2, 6), label)
    fdl = (_ce_numpy(out["modality_logits_t1"].numpy(), np.zeros(12, int))
           + _ce_numpy(out["modality_logits_t2"].numpy(), np.ones(12, int)))
    assert np.isclose(float(terms["fdl"]), fdl, rtol=1e-5)
    fdl_torch = F.cross_entropy(out["modality_logits_t1"].reshape(-1, 2), torch.zeros(12, dtype=torch.long)) + \
        F.cross_entropy(out["modality_logits_t2"].reshape(-1, 2), torch.ones(12, dtype=torch.long))
    assert torch.allclose(terms["fdl"], fdl_torch)
    cls = np.array([[0, 1, 2, 3, 3, 0], [2, 2, 1, 0, 3, 1]])
    seg = _ce_numpy(out["seg_logits_t1"].numpy(), cls) + _ce_numpy(out["seg_logits_t2"].numpy(), cls)
    assert np.isclose(float(terms["seg"]), seg, rtol=1e-5)



@pytest.mark.parametrize("sr", ["l1", "mse"])
def test_loss_sr_hand_value(sr):
    out = fake_inr_out()
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
    out = fake_inr_out(kd=kd, mmf=mmf, sel=sel)
    label = torch.zeros(2, 6, dtype=torch.long) if with_label else None
    terms = NexusINRLoss()(out, torch.zeros(2, 6), torch.zeros(2, 6), label)
    expected = {"loss", "sr_t1", "sr_t2"} | ({"kd", "t2self"} if kd else set()) | ({"cmfa", "fdl"} if mmf else set())
    expected |= {"seg"} if sel and with_label else set()
    assert set(terms) == expected



def test_loss_total_is_weighted_sum():
    w = dict(w_t1=0.7, w_t2=1.3, w_kd=0.2, w_t2self=0.4, w_cmfa=0.3, w_fdl=0.05, w_seg=0.6)
    out = fake_inr_out()
    label = torch.tensor([0, 1, 2, 4, 1, 2]).repeat(2, 1)
    terms = NexusINRLoss(**w)(out, torch.randn(2, 6), torch.randn(2, 6), label)
    key = {"sr_t1": "w_t1", "sr_t2": "w_t2", "kd": "w_kd", "t2self": "w_t2self", "cmfa": "w_cmfa", "fdl": "w_fdl",
           "seg": "w_seg"}
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



def test_feature_norm_makes_kd_and_cmfa_scale_free():
    out = fake_inr_out()
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

