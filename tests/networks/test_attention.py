"""KD-Attn local-window cross attention (networks/attention.py) against hand-computed windows."""

from __future__ import annotations

import math

import pytest
import torch

from nexus_monai.networks import LocalWindowCrossAttention

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    assert attn(query[:, :0], key_map, index[:, :0]).shape == (2, 0, 8)
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
    attn.to_q.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    for k, shape in ((16, (5, 4, 3)), (32, (5, 4, 3)), (32, (10, 8, 6))):
        query, key_map, index = _attn_inputs(k=k, shape=shape)
        assert attn(query, key_map, index).shape == query.shape
    assert seen == [(2, 16, 8), (2, 32, 8), (2, 32, 8)]


def _reference(attn, query, key_map, key_index):
    """The per-point evaluation KD-Attn shipped with (before issue 31): every point gathers its 27 key /
    value rows and runs the positional MLP on each window voxel's offset."""
    b, k, c = query.shape
    shape = torch.tensor(key_map.shape[-3:])
    kv = attn.project_keys(key_map)
    centre = torch.round(key_index).long()
    voxels = (centre[:, :, None, :] + attn.offsets).clamp(min=torch.zeros_like(shape), max=shape - 1)
    flat = (voxels[..., 0] * shape[1] + voxels[..., 1]) * shape[2] + voxels[..., 2]
    w, n = flat.shape[-1], kv.shape[1]
    flat = flat + (torch.arange(b) * n).view(b, 1, 1)
    gathered = kv.reshape(b * n, 2 * c).index_select(0, flat.reshape(-1)).reshape(b, k, w, 2 * c)
    keys, values = gathered.chunk(2, dim=-1)
    keys = keys + attn.pos(voxels.to(key_index.dtype) - key_index[:, :, None, :])
    h, d = attn.heads, c // attn.heads
    q = attn.to_q(attn.norm_q(query)).reshape(b, k, h, 1, d)
    keys = keys.reshape(b, k, w, h, d).transpose(2, 3)
    values = values.reshape(b, k, w, h, d).transpose(2, 3)
    weights = torch.softmax((q @ keys.transpose(-1, -2)) / d**0.5, dim=-1)
    return query + attn.out((weights @ values).reshape(b, k, c))


def _trained_like(attn, seed=0):
    """Weights of trained size (N(0, 0.5)): the zero-init output projection would hide every difference."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return attn


def _aligned_index(factor=(1, 1, 2), start=(0.0, 0.0, -0.25), out=(6, 5, 8)):
    """Continuous key-grid indices of a 1 mm output grid of ``out`` voxels from ``start`` over a key grid of
    ``factor`` mm voxels (a few sub-voxel phases; by default at the key grid's low border: clamped windows)."""
    axes = [torch.arange(n, dtype=torch.float32) / f + s for n, f, s in zip(out, factor, start)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(1, -1, 3)


@pytest.mark.parametrize("window", [(3, 3, 3), (1, 3, 5)])
def test_attention_equals_the_per_point_reference(window):
    """Random indices (inside, at and beyond the border: one positional-table row per point) and a
    grid-aligned set (few sub-voxel phases: the table path), batch 2: the reference's values within 1e-5."""
    attn = _trained_like(LocalWindowCrossAttention(8, heads=2, window=window))
    query, key_map, index = _attn_inputs(k=40, shape=(5, 4, 6))
    with torch.no_grad():
        assert (attn(query, key_map, index) - _reference(attn, query, key_map, index)).abs().max() < 1e-5
        aligned = _aligned_index(start=(1.0, 1.0, -0.25), out=(3, 2, 8)).expand(2, -1, -1).contiguous()
        q2 = torch.randn(2, aligned.shape[1], 8, generator=torch.Generator().manual_seed(3))
        got = attn(q2, key_map, aligned)
        # 2 phases x z border patterns: centre 0 and interior (half-window 1), or centres 0, 1 and interior (2)
        assert attn.last_phases == (4 if window[2] == 3 else 6)
        assert (got - _reference(attn, q2, key_map, aligned)).abs().max() < 1e-5


def test_attention_positional_mlp_runs_once_per_phase_and_offset():
    """On a 1 mm grid over a 1 x 1 x 2 key grid away from the border the positional MLP sees 2 phases x
    27 offsets, whatever the number of points; the values still equal the reference."""
    attn = _trained_like(LocalWindowCrossAttention(8, heads=2))
    seen, new = [], []
    attn.pos.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    key_map = torch.randn(1, 8, 12, 12, 12, generator=torch.Generator().manual_seed(1))
    for out in ((4, 4, 6), (8, 8, 12)):
        index = _aligned_index(start=(2.0, 2.0, 1.75), out=out)
        query = torch.randn(1, index.shape[1], 8, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            got = attn(query, key_map, index)
            new.append(seen[-1])
            assert (got - _reference(attn, query, key_map, index)).abs().max() < 1e-5
    assert new == [(2, 27, 3), (2, 27, 3)]


def test_attention_gradients_equal_the_reference():
    """Training goes through the same path: gradients w.r.t. every parameter and the query match."""
    a1 = _trained_like(LocalWindowCrossAttention(8, heads=2))
    query, key_map, index = _attn_inputs(k=30, shape=(5, 4, 6))
    index = torch.cat([index, _aligned_index().expand(2, -1, -1)], 1)
    query = torch.randn(2, index.shape[1], 8, generator=torch.Generator().manual_seed(4))
    grads = []
    for fn in (lambda q: a1(q, key_map, index), lambda q: _reference(a1, q, key_map, index)):
        q = query.clone().requires_grad_(True)
        a1.zero_grad()
        (fn(q) ** 2).sum().backward()
        grads.append([q.grad.clone()] + [p.grad.clone() for p in a1.parameters()])
    for new, ref in zip(*grads):
        assert torch.allclose(new, ref, rtol=1e-4, atol=1e-4)


def test_attention_blocks_equal_one_block(monkeypatch):
    """Inference runs the points in blocks: block boundaries do not change the values."""
    import nexus_monai.networks.attention as attention

    attn = _trained_like(LocalWindowCrossAttention(8, heads=2))
    query, key_map, index = _attn_inputs(k=50, shape=(5, 4, 6))
    with torch.no_grad():
        whole = attn(query, key_map, index)
        monkeypatch.setattr(attention, "BLOCK_POINTS", 7)
        assert torch.allclose(attn(query, key_map, index), whole, atol=1e-6)


@pytest.mark.parametrize("window", [(2, 3, 3), (3, 3, 4), (0, 1, 1)])
def test_attention_even_window_raises(window):
    with pytest.raises(ValueError):
        LocalWindowCrossAttention(8, heads=2, window=window)



def test_attention_heads_must_divide_dim():
    with pytest.raises(ValueError):
        LocalWindowCrossAttention(10, heads=4)



def test_shipped_checkpoint_gives_the_reference_output(monkeypatch):
    """The shipped weights load unchanged (same parameters) and predict the same volume as the per-point
    reference attention, within 1e-5, on a small 2 mm volume (tiled inference, its default)."""
    import numpy as np
    from monai.data import MetaTensor

    from nexus_monai.engines.predict import load_bundle, predict_volumes
    from nexus_monai.geometry import TargetGrid, thick_slice_affine
    from nexus_monai.paths import REPO_BUNDLES

    network, inferer, _ = load_bundle(REPO_BUNDLES / "nexus_inr", device="cpu")
    rng = np.random.default_rng(0)
    hr = torch.from_numpy(rng.random((20, 20, 16), dtype=np.float32))
    hr_affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64))
    t1 = MetaTensor(hr.reshape(20, 20, 8, 2).mean(-1)[None], affine=thick_slice_affine(hr_affine, 2, 2))
    t2 = MetaTensor(hr.reshape(20, 5, 4, 16).mean(2)[None], affine=thick_slice_affine(hr_affine, 1, 4))
    grid = TargetGrid(shape=(20, 20, 16), affine=hr_affine)
    new = predict_volumes(network, t1, t2, grid, inferer)
    monkeypatch.setattr(LocalWindowCrossAttention, "forward",
                        lambda self, q, km, ki, projected=None: _reference(self, q, km, ki))
    ref = predict_volumes(network, t1, t2, grid, inferer)
    for c in ("t1", "t2"):
        assert (new[c] - ref[c]).abs().max() < 1e-5
