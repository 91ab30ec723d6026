"""RandomProtocold: per-contrast random acquisitions whose header tells where each slab lies, whole slabs inside
the padded patch, query plates on whole lines, and the nominal operator of the consistency step read from the
header (it reproduces a Gaussian, full-thickness, noise-free scan exactly)."""

import math

import pytest
import torch
from monai.data import MetaTensor

from nexus_monai.geometry import WorldNormalizer, make_affine, spacing, voxel_to_world, world_to_voxel
from nexus_monai.transforms.random_protocol import PAD, ProtocolDraw, RandomProtocold, downsample_world

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CORE = 12


def _sample(seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (CORE + PAD,) * 3
    aff = make_affine((2.0, 2.0, 2.0), (-11.0, 4.0, 9.0))
    vol = lambda: MetaTensor(torch.rand(1, *shape, generator=g) + 0.5, affine=aff)  # noqa: E731
    d = {"t1": vol(), "t2": vol(), "seg": MetaTensor(torch.zeros(1, *shape), affine=aff),
         "brain": MetaTensor(torch.ones(1, *shape), affine=aff)}
    d["world_norm"] = WorldNormalizer.from_grids([(shape, aff)]).to_dict()
    return d, aff


def _transform(draws=None, seed=0, **kw):
    t = RandomProtocold(core=CORE, num_points=300, **kw)
    t.set_random_state(seed)
    if draws is not None:
        it = iter(draws)
        t.draw_one = lambda: next(it)
    return t


def test_header_places_every_slab_and_the_nominal_operator_reproduces_a_nominal_scan():
    d, aff = _sample()
    draws = [ProtocolDraw(2, 2.5, "gaussian", 1.0, 0.4, 0.0), ProtocolDraw(1, 4.0, "gaussian", 1.0, 0.7, 0.0)]
    out = _transform(draws)(d)
    for c, dr in zip(("t1", "t2"), draws):
        lr = out[f"{c}_lr"]
        m = lr.shape[dr.axis + 1]
        assert m >= math.ceil(CORE / dr.factor)  # whole slabs covering the core
        centre = torch.zeros(3, dtype=torch.float64)
        centre[dr.axis] = 1.0  # LR voxel 1: HR index offset + k + (k - 1) / 2 along the thick axis
        hr_index = world_to_voxel(voxel_to_world(centre[None], lr.affine), out[c].affine)[0]
        assert float(hr_index[dr.axis]) == pytest.approx(dr.offset + dr.factor + (dr.factor - 1) / 2, abs=1e-5)
        assert float(spacing(lr.affine)[dr.axis]) == pytest.approx(2.0 * dr.factor)
        # the consistency step's y is the header's nominal operator applied to the HR plates (exact: same draw)
        n_p, n_u, n_v = out["plate_shape"].tolist()
        f = out[f"query_{c}"][:, 0].reshape(n_p, n_u, n_v).double()
        dim = int(out[f"dc_{c}_dim"])
        ay = (f.movedim(dim, -1) @ out[f"dc_{c}_op"].double().T).movedim(-1, dim)
        assert torch.allclose(ay.float(), out[f"dc_{c}_y"], atol=1e-5)
    # the plates span both thick axes (y, z) and hold every voxel of the padded patch along them
    assert out["plate_shape"].tolist()[1:] == [out["t1"].shape[2], out["t1"].shape[3]]
    idx = world_to_voxel(out["query_world"].double(), out["t1"].affine).round().long()
    vals = out["t1"][0][idx[:, 0], idx[:, 1], idx[:, 2]]
    assert torch.allclose(vals, out["query_t1"][:, 0])


def test_draws_are_independent_per_contrast_and_cover_the_range_with_whole_slab_padding():
    t = _transform(seed=3)
    factors, axes, noisy = [], set(), 0
    for i in range(30):
        d, _ = _sample(i)
        out = t(d)
        for c in ("t1", "t2"):
            dr = t.draws[c]
            factors.append(dr.factor)
            axes.add((c, dr.axis))
            assert 0.7 <= dr.ratio <= 1.3 and 0.0 <= dr.noise <= 0.03
            size = out[c].shape[dr.axis + 1]
            assert CORE <= size <= CORE + PAD
            if dr.factor > 1:
                assert out[f"{c}_lr"].shape[dr.axis + 1] >= math.ceil(CORE / dr.factor)
            noisy += int(dr.noise > 0)
        assert t.draws["t1"] != t.draws["t2"]
    assert 1.0 in factors and any(abs(f - round(f)) > 0.05 for f in factors) and max(factors) <= 6.0
    assert len(axes) == 6 and noisy > 0  # every axis for both contrasts


def test_noise_goes_to_the_lr_only_and_the_zero_background_stays_zero():
    d, _ = _sample()
    d["t1"][:, :3] = 0.0
    draws = [ProtocolDraw(2, 2.0, "boxcar", 0.8, 0.0, 0.03), ProtocolDraw(0, 1.0, "gaussian", 1.0, 0.0, 0.0)]
    out = _transform(draws)(d)
    lr = out["t1_lr"][0]
    assert float(lr[:3].abs().max()) == 0.0
    assert out["dc_t1_sigma"] > 0.01
    assert torch.equal(out["t2_lr"].as_tensor(), out["t2"].as_tensor())  # isotropic, noise 0: the HR itself


def test_world_downsampling_is_anti_aliased_and_keeps_world_positions():
    aff = make_affine((1.0, 1.0, 1.0), (3.0, -2.0, 5.0))
    x = torch.ones(1, 12, 12, 12)
    out = downsample_world(x, aff, 2.0)
    assert tuple(out.shape) == (1, 6, 6, 6)
    assert torch.allclose(out, torch.ones_like(out))
    first = voxel_to_world(torch.zeros(1, 3, dtype=torch.float64), out.affine)[0]
    assert torch.allclose(first, voxel_to_world(torch.full((1, 3), 0.5, dtype=torch.float64), aff)[0])
    checker = (torch.arange(12)[:, None, None] + torch.arange(12)[None, :, None] + torch.arange(12)) % 2
    smooth = downsample_world(checker[None].float(), aff, 2.0)
    assert float(smooth[0, 1:-1, 1:-1, 1:-1].std()) < 0.05  # the Nyquist pattern is filtered, not aliased
