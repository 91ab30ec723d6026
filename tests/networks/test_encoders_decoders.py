"""Encoders keep the LR grid, decoders map the last dimension per point; unknown names raise."""

from __future__ import annotations

import pytest
import torch

from nexus_monai.networks import FourierFeatures, MLPDecoder, NexusINR, SIRENDecoder, build_decoder, build_encoder

from helpers import TINY_ENCODERS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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

