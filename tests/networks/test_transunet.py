"""3D TransUNet: shapes, gradients, input/argument validation, fitting a tiny batch, transformer wiring."""

import pytest
import torch
from monai.losses import DiceCELoss
from torch import nn

from nexus_monai.networks import TransUNet

TINY = dict(
    in_channels=2,
    out_channels=3,
    img_size=(16, 16, 16),
    feature_size=4,
    depth=2,
    hidden_size=16,
    num_layers=2,
    num_heads=2,
    mlp_dim=32,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # These tiny networks are overhead-bound: one intra-op thread is several times faster than
    # two on a shared CPU, and keeps the file well under 20 s.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _net(seed=0, **overrides):
    torch.manual_seed(seed)
    return TransUNet(**{**TINY, **overrides})


def _batch(seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, TINY["in_channels"], *TINY["img_size"], generator=g)


def test_forward_shape_and_bottleneck_tokens():
    net = _net()
    y = net(_batch())
    assert y.shape == (2, 3, 16, 16, 16)
    assert torch.isfinite(y).all()
    assert net.channels == (4, 8, 16)
    assert net.feature_grid == (4, 4, 4) and net.num_tokens == 64
    assert net.patch_embedding.position_embeddings.shape == (1, 64, 16)

    # depth 3 on a non-cubic volume: 2x2x1 bottleneck grid.
    net3 = _net(img_size=(16, 16, 8), depth=3, num_layers=1)
    assert net3(torch.randn(1, 2, 16, 16, 8)).shape == (1, 3, 16, 16, 8)
    assert net3.feature_grid == (2, 2, 1) and net3.num_tokens == 4


def test_2d_variant():
    net = _net(img_size=16, spatial_dims=2)
    assert net(torch.randn(1, 2, 16, 16)).shape == (1, 3, 16, 16)


def test_backward_reaches_encoder_transformer_decoder():
    net = _net()
    y = net(_batch())
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name

    def norm(module):
        return sum(float(p.grad.abs().sum()) for p in module.parameters())

    for part in ("encoder", "patch_embedding", "transformer", "bottleneck", "decoder", "out"):
        assert norm(getattr(net, part)) > 0, part
    # Each transformer block's attention and MLP are in the gradient path.
    for block in net.transformer:
        assert float(block.attn.qkv.weight.grad.abs().sum()) > 0
        assert float(block.mlp.linear1.weight.grad.abs().sum()) > 0
    assert float(net.encoder[0].conv1.conv.weight.grad.abs().sum()) > 0
    assert float(net.patch_embedding.position_embeddings.grad.abs().sum()) > 0


@pytest.mark.parametrize(
    "shape",
    [(1, 2, 32, 32, 32), (1, 2, 16, 16, 8), (1, 1, 16, 16, 16), (2, 16, 16, 16)],
)
def test_wrong_input_shape_raises_clear_error(shape):
    net = _net()
    with pytest.raises(ValueError, match=r"img_size=\(16, 16, 16\).*got \(") as info:
        net(torch.zeros(shape))
    assert str(tuple(shape)) in str(info.value)
    assert "SlidingWindowInferer" in str(info.value)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(img_size=(16, 16, 10)), "divisible by 2\\*\\*depth = 4"),
        (dict(img_size=(16, 16)), "must have 3 entries"),
        (dict(hidden_size=15, num_heads=2), "hidden_size \\(15\\) must be divisible by num_heads \\(2\\)"),
        (dict(depth=0), "depth must be a positive int"),
        (dict(feature_size=0), "feature_size must be a positive int"),
        (dict(num_layers=0), "num_layers must be a positive int"),
        (dict(dropout_rate=1.5), "dropout_rate must be in \\[0, 1\\]"),
        (dict(spatial_dims=4), "spatial_dims must be 2 or 3"),
        (dict(img_size=(8, 8, 8), depth=3), "single-voxel bottleneck"),
    ],
)
def test_bad_constructor_args_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        TransUNet(**{**TINY, **overrides})


def test_fits_a_tiny_batch():
    # One output channel: MONAI's DiceCELoss applies BCE only to single-channel logits (with more
    # channels its CE term is a softmax cross-entropy even when sigmoid=True).
    net = _net(seed=1, out_channels=1)
    x = _batch(seed=3)
    # A target that needs spatial context: the sign of a 5x5x5 local mean of channel 0.
    target = (nn.functional.avg_pool3d(x[:, :1], 5, stride=1, padding=2) > 0).float()
    loss_fn = DiceCELoss(sigmoid=True)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    with torch.no_grad():
        start = float(loss_fn(net(x), target))
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn(net(x), target)
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits = net(x)
    end = float(loss_fn(logits, target))
    assert end < 0.7 * start, (start, end)
    assert float(((logits > 0) == (target > 0)).float().mean()) > 0.8


def test_transformer_receives_deepest_features_and_matters():
    net = _net().eval()
    x = _batch(b=1)
    seen = {}
    h1 = net.encoder[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("deepest", o))
    h2 = net.patch_embedding.register_forward_hook(lambda m, i, o: seen.__setitem__("embed_in", i[0]))
    h3 = net.transformer.register_forward_hook(lambda m, i, o: seen.__setitem__("tokens", o))
    with torch.no_grad():
        ref = net(x)
    for h in (h1, h2, h3):
        h.remove()
    assert seen["embed_in"] is seen["deepest"]
    assert seen["deepest"].shape == (1, 16, 4, 4, 4)
    assert seen["tokens"].shape == (1, 64, 16)

    # Zeroing every block's residual branches (attention out_proj, MLP linear2) makes the
    # transformer an identity map; that is what swapping in nn.Identity gives, and both differ.
    zeroed = _net().eval()
    for block in zeroed.transformer:
        for lin in (block.attn.out_proj, block.mlp.linear2):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
    identity = _net().eval()
    identity.transformer = nn.Identity()
    with torch.no_grad():
        out_zeroed, out_identity = zeroed(x), identity(x)
    torch.testing.assert_close(out_zeroed, out_identity)
    assert (out_zeroed - ref).abs().max() > 1e-3

    # The decoder sees the deepest features only through the tokens: perturbing one feature of
    # one token at the transformer's input changes the output. (A constant shift of a whole token
    # would not: the pre-norm blocks and the final LayerNorm remove it.)
    bumped = {}

    def bump(module, inputs, output):
        output = output.clone()
        output[:, 0, 0] += 5.0
        bumped["done"] = True
        return output

    h = net.patch_embedding.register_forward_hook(bump)
    with torch.no_grad():
        out_bumped = net(x)
    h.remove()
    assert bumped["done"] and (out_bumped - ref).abs().max() > 1e-3


def test_bundle_target_resolves():
    from monai.bundle import ConfigParser

    parser = ConfigParser({"net": {"_target_": "nexus_monai.networks.TransUNet", **TINY}})
    net = parser.get_parsed_content("net")
    assert isinstance(net, TransUNet)
    assert net(_batch(b=1)).shape == (1, 3, 16, 16, 16)
