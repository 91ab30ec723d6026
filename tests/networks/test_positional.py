"""Fourier features (networks/positional.py) against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nexus_monai.networks import FourierFeatures

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("include_input", [False, True])
def test_fourier_log_linear_hand_computed(include_input):
    levels = 4
    ff = FourierFeatures(3, levels, "log_linear", include_input=include_input)
    p = np.array([[0.1, -0.3, 0.77], [-1.0, 0.0, 0.5], [0.33, 0.9, -0.61]])
    sin = [math.sin(2 * math.pi * 2**lv * row[d]) for row in p for d in range(3) for lv in range(levels)]
    cos = [math.cos(2 * math.pi * 2**lv * row[d]) for row in p for d in range(3) for lv in range(levels)]
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

