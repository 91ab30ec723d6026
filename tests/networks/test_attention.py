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

