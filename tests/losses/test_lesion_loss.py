"""Lesion-aware Nexus-INR loss on a hand-made batch: the lesion weights change L_SR by exactly the
weighted error of the points they cover, the lesion-contrast term equals its hand value, the
defaults give the plain loss, and the per-term epoch means skip batches without the term."""

import pytest
import torch
import torch.nn.functional as F
from helpers import fake_inr_out
from ignite.engine import Engine, Events

from nexus_monai.engines.inr_handlers import LossTermsHandler
from nexus_monai.losses import NexusINRLoss
from nexus_monai.losses.nexus_inr import lesion_contrast_term, lesion_point_weights

# one item, 6 points: T2w-only lesion 1001 (2 inside, 1 ring), T1w-only lesion 2002 (1 inside, 1 ring), background
LESION = torch.tensor([[1001, 1001, -1001, 2002, -2002, 0]])
T2W_ONLY, T1W_ONLY = [0, 1, 2], [3, 4]


def _batch(seed=0):
    out = fake_inr_out(b=1, k=6, seed=seed)
    g = torch.Generator().manual_seed(seed + 10)
    return out, torch.randn(1, 6, generator=g), torch.randn(1, 6, generator=g)


def _loss(**kw):
    base = dict(w_kd=0.0, w_t2self=0.0, w_cmfa=0.0, w_fdl=0.0, w_seg=0.0)
    return NexusINRLoss(**{**base, **kw})


@pytest.mark.parametrize("sr", ["l1", "mse"])
def test_lesion_weights_change_sr_by_the_weighted_error_of_their_points(sr):
    out, t1, t2 = _batch()
    err = {"t1": F.l1_loss(out["t1"], t1, reduction="none")[0], "t2": F.l1_loss(out["t2"], t2, reduction="none")[0]}
    if sr == "mse":
        err = {c: e**2 for c, e in err.items()}
    plain = _loss(sr=sr)(out, t1, t2, lesion=LESION)
    torch.testing.assert_close(plain["sr_t1"], err["t1"].mean())  # defaults: the plain term, lesions or not
    torch.testing.assert_close(plain["sr_t2"], err["t2"].mean())
    seen = _loss(sr=sr, w_lesion=3.0)(out, t1, t2, lesion=LESION)
    # w_lesion: T2w-only points in L_SR(t2), T1w-only points in L_SR(t1)
    torch.testing.assert_close(seen["sr_t2"] - plain["sr_t2"], 2.0 * err["t2"][T2W_ONLY].sum() / 6)
    torch.testing.assert_close(seen["sr_t1"] - plain["sr_t1"], 2.0 * err["t1"][T1W_ONLY].sum() / 6)
    torch.testing.assert_close(seen["loss"] - plain["loss"], seen["sr_t1"] + seen["sr_t2"] - plain["sr_t1"] - plain["sr_t2"])
    other = _loss(sr=sr, w_lesion_other=5.0)(out, t1, t2, lesion=LESION)
    # w_lesion_other: T1w-only points in L_SR(t2) (where T2w must not imprint them) and vice versa
    torch.testing.assert_close(other["sr_t2"] - plain["sr_t2"], 4.0 * err["t2"][T1W_ONLY].sum() / 6)
    torch.testing.assert_close(other["sr_t1"] - plain["sr_t1"], 4.0 * err["t1"][T2W_ONLY].sum() / 6)
    # diagnostics: unweighted error over the lesion + ring points, never in the total
    torch.testing.assert_close(seen["sr_lesion_t2"], err["t2"][:5].mean())
    torch.testing.assert_close(seen["loss"], seen["sr_t1"] + seen["sr_t2"])


def test_point_weights_by_visibility_class():
    code = torch.tensor([[1001, -1001, 2002, -2002, 3003, -3003, 0]])
    torch.testing.assert_close(lesion_point_weights(code, "t2", 2.0, 7.0), torch.tensor([[2.0, 2, 7, 7, 2, 2, 1]]))
    torch.testing.assert_close(lesion_point_weights(code, "t1", 2.0, 7.0), torch.tensor([[7.0, 7, 2, 2, 2, 2, 1]]))


def test_lesion_contrast_term_hand_value_and_gradient():
    pred = torch.tensor([[1.0, 3.0, 0.5, 2.0, 1.0, 9.0], [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]], requires_grad=True)
    target = torch.tensor([[0.0, 2.0, 0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]])
    # item 0: lesion 1001 (inside 0, 1; ring 2), lesion 2002 (inside 3; ring 4), lesion 1003 inside only (skipped);
    # item 1: the same instance value 1001 is another lesion (inside 0, 1; ring 2)
    code = torch.tensor([[1001, 1001, -1001, 2002, -2002, 1003], [1001, 1001, -1001, 0, 0, 0]])
    d = (pred - target).detach()
    expected = torch.stack([((d[0, 0] + d[0, 1]) / 2 - d[0, 2]).abs(), (d[0, 3] - d[0, 4]).abs(),
                            ((d[1, 0] + d[1, 1]) / 2 - d[1, 2]).abs()]).mean()
    value = lesion_contrast_term(pred, target, code)
    torch.testing.assert_close(value, expected)
    value.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad[0, 5] == 0 and pred.grad[0, 0] != 0
    assert lesion_contrast_term(pred, target, torch.zeros_like(code)) is None


def test_lesion_contrast_weight_enters_the_total():
    out, t1, t2 = _batch(1)
    terms = _loss(w_lesion_contrast=0.5)(out, t1, t2, lesion=LESION)
    expected = (lesion_contrast_term(out["t1"], t1, LESION) + lesion_contrast_term(out["t2"], t2, LESION)) / 2
    torch.testing.assert_close(terms["lesion_contrast"], expected)
    torch.testing.assert_close(terms["loss"], terms["sr_t1"] + terms["sr_t2"] + 0.5 * expected)
    none = _loss(w_lesion_contrast=0.5)(out, t1, t2, lesion=torch.zeros_like(LESION))
    assert float(none["lesion_contrast"]) == 0.0 and "sr_lesion_t1" not in none


def test_lesion_weights_need_the_lesion_code_and_reject_negative_weights():
    out, t1, t2 = _batch()
    assert "lesion_contrast" not in _loss()(out, t1, t2)  # plain loss: no lesion code needed, no lesion term
    with pytest.raises(ValueError, match="query_lesion"):
        _loss(w_lesion=2.0)(out, t1, t2)
    with pytest.raises(ValueError, match=">= 0"):
        _loss(w_lesion_other=-1.0)


def test_loss_terms_handler_averages_each_term_over_the_iterations_that_report_it():
    outputs = iter([{"loss": 1.0, "loss_sr_lesion_t2": 0.4}, {"loss": 3.0}, {"loss": 2.0, "loss_sr_lesion_t2": 0.2}])
    engine = Engine(lambda e, b: next(outputs))
    LossTermsHandler().attach(engine)
    seen = {}
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.update(e.state.metrics))
    engine.run([0, 1, 2], max_epochs=1)
    assert seen["train_loss"] == pytest.approx(2.0) and seen["train_loss_sr_lesion_t2"] == pytest.approx(0.3)
