"""The any-protocol model's engine pieces: the protocol line and range check before inference (refuse outside
the trained range, resample a finer in-plane grid first), and one consistency-trained step end to end."""

import pytest
import torch
from monai.data import MetaTensor, list_data_collate

from nexus_monai.engines.any_protocol import ConsistencyTrainStep, conform_protocol, describe_scan
from nexus_monai.engines.predict import predict_volumes
from nexus_monai.errors import NexusInputError
from nexus_monai.geometry import TargetGrid, WorldNormalizer, field_of_view, make_affine, spacing
from nexus_monai.losses import NexusINRLoss
from nexus_monai.networks import NexusINR
from nexus_monai.transforms.random_protocol import PAD, RandomProtocold

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RANGE = {"x": [2.0, 12.0], "y": [2.0, 12.0], "z": [2.0, 12.0], "factor": [1.0, 6.0], "in_plane": [2.0, 2.0]}


def _net(**kw):
    torch.manual_seed(0)
    return NexusINR(encoder="rdn", features=4, encoder_options={"blocks": 1, "layers": 1, "growth": 4},
                    decoder_hidden=8, decoder_layers=2, attn_heads=2, pe=False, zero_init=False, **kw)


def _scan(sp, shape=(16, 16, 6)):
    return MetaTensor(torch.rand(1, *shape) + 0.1, affine=make_affine(sp, (1.0, -2.0, 3.0)))


def test_refuses_outside_the_trained_range_naming_the_file_and_prints_one_line_per_scan(capsys):
    net = _net(protocol_range_mm=RANGE)
    lr = {"t1": _scan((2.0, 2.0, 4.0)), "t2": _scan((2.0, 16.0, 2.0), (16, 3, 16))}
    with pytest.raises(NexusInputError, match="t2w_scan.nii.gz.*outside the protocol range.*16.00 mm"):
        conform_protocol(net, lr, {"t1": "t1w_scan.nii.gz", "t2": "t2w_scan.nii.gz"})
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "protocol t1 (t1w_scan.nii.gz): 2.00 x 2.00 x 4.00 mm, thick z, factor 2.00"
    with pytest.raises(NexusInputError, match="outside the protocol range"):  # predict_volumes checks before work
        predict_volumes(net, lr["t1"], lr["t2"], TargetGrid((4, 4, 4), torch.eye(4, dtype=torch.float64)))
    coarse = {"t1": _scan((3.0, 3.0, 6.0)), "t2": lr["t1"]}
    with pytest.raises(NexusInputError, match="in-plane spacing 3.00 mm is coarser"):
        conform_protocol(net, coarse, quiet=True)
    # a network that states no range: the same scans pass unchanged
    plain = conform_protocol(_net(), lr, quiet=True)
    assert plain["t2"] is lr["t2"]


def test_a_finer_in_plane_grid_is_resampled_first_not_refused():
    net = _net(protocol_range_mm=RANGE)
    tse = _scan((0.5, 0.5, 5.0), (32, 24, 6))  # an axial TSE at 0.5 x 0.5 x 5 mm
    out = conform_protocol(net, {"t1": _scan((2.0, 2.0, 2.0), (8, 8, 8)), "t2": tse}, quiet=True)["t2"]
    assert spacing(out.affine).tolist() == pytest.approx([2.0, 2.0, 5.0])
    assert tuple(out.shape) == (1, 8, 6, 6)
    # the field of view stays where it was (edges of the 0.5 mm grid = edges of the 2 mm grid)
    assert torch.allclose(field_of_view(out.shape[1:], out.affine).mean(0),
                          field_of_view(tse.shape[1:], tse.affine).mean(0), atol=1e-4)
    assert "thick z, factor 2.50" in describe_scan("t2", out)


def test_one_consistency_trained_step_runs_and_trains_the_layer():
    shape = (10 + PAD,) * 3
    aff = make_affine((2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    g = torch.Generator().manual_seed(0)
    sample = {c: MetaTensor(torch.rand(1, *shape, generator=g) + 0.2, affine=aff) for c in ("t1", "t2")}
    sample.update(seg=MetaTensor(torch.zeros(1, *shape), affine=aff),
                  brain=MetaTensor(torch.ones(1, *shape), affine=aff),
                  world_norm=WorldNormalizer.from_grids([(shape, aff)]).to_dict())
    t = RandomProtocold(core=10, num_points=200)
    t.set_random_state(1)
    item = t(sample)
    for k in ("t1", "t2", "seg", "brain", "protocol_t1", "protocol_t2"):
        item.pop(k)
    batch = list_data_collate([item])
    net = _net(acquisition_input=True, data_consistency=True)

    class Engine:
        network, loss_function = net, NexusINRLoss()
        optimizer = torch.optim.Adam(net.parameters(), 1e-2)
        state = type("S", (), {"device": "cpu"})()

        def fire_event(self, *a):
            pass

    before = {c: float(net.consistency.log_tau[c]) for c in ("t1", "t2")}
    out = ConsistencyTrainStep()(Engine(), batch)
    assert all(torch.isfinite(torch.tensor(v)) for k, v in out.items() if k.startswith("loss"))
    assert any(float(net.consistency.log_tau[c]) != before[c] for c in before)
