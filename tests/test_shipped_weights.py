"""The default bundle ships trained weights: the file is the one its metadata names, and it is usable."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
from monai.data import MetaTensor

from nexus_monai.engines.predict import load_bundle, predict_volumes
from nexus_monai.geometry import TargetGrid, thick_slice_affine
from nexus_monai.paths import REPO_BUNDLES

BUNDLE = REPO_BUNDLES / "nexus_inr"


def test_sha256_matches_metadata():
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    shipped = meta["shipped_weights"]
    data = (BUNDLE / shipped["path"]).read_bytes()
    assert len(data) == shipped["bytes"]
    assert hashlib.sha256(data).hexdigest() == shipped["sha256"]
    assert "research software" in shipped["note"]


def test_loads_into_inference_network_and_is_not_trilinear():
    """Every tensor of the checkpoint lands in inference.yaml's network (strict load), and the
    trained model departs from trilinear (zero_init makes an untrained one exactly trilinear)."""
    network, inferer, _ = load_bundle(BUNDLE, device="cpu")
    state = torch.load(BUNDLE / "models" / "model.pt", map_location="cpu", weights_only=True)
    state = state.get("model", state)
    own = network.state_dict()
    assert set(state) == set(own)
    for k, v in state.items():
        assert torch.equal(own[k], v), k

    rng = np.random.default_rng(0)
    hr = torch.from_numpy(rng.random((24, 24, 24), dtype=np.float32))
    hr[:4] = 0
    hr_affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64))
    t1 = MetaTensor(hr.reshape(24, 24, 12, 2).mean(-1)[None], affine=thick_slice_affine(hr_affine, 2, 2))
    t2 = MetaTensor(hr.reshape(24, 6, 4, 24).mean(2)[None], affine=thick_slice_affine(hr_affine, 1, 4))
    grid = TargetGrid(shape=(24, 24, 24), affine=hr_affine)
    pred = predict_volumes(network, t1, t2, grid, inferer)
    assert pred["t1"].shape == (1, 24, 24, 24) and pred["t2"].shape == (1, 24, 24, 24)
    assert torch.allclose(pred["t1"].affine.double(), hr_affine)
    assert torch.isfinite(pred["t1"]).all() and torch.isfinite(pred["t2"]).all()
    from nexus_monai.transforms.interpolation import upsample

    tri = upsample(t2, grid, "trilinear")
    assert (pred["t2"] - tri).abs().max() > 1e-3
