"""Mixed precision (``nexus_monai.engines.amp``): the bf16 autocast path runs on CPU (the same code as on
CUDA), agrees with fp32 within a stated tolerance, keeps coordinates / lookups in fp32 and the weights fp32.

Tolerance: bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2 %); through a few layers the
outputs may move by a few times that. Stated bound: max |amp - fp32| <= 2 % of max |fp32| and the
mean <= 0.5 % of it; gradients: cosine similarity >= 0.99 with the fp32 gradient.
"""

import threading

import pytest
import torch
from monai.data import MetaTensor

from nexus_monai.benchmark.inputs import training_batch
from nexus_monai.engines.amp import amp_autocast, amp_parts
from nexus_monai.engines.inr import ImplicitGridInferer, INRTrainStep, inr_inputs
from nexus_monai.geometry import TargetGrid, thick_slice_affine
from nexus_monai.losses import NexusINRLoss
from nexus_monai.networks import NexusINR

SHAPE = (40, 32, 24)
MAX_REL, MEAN_REL = 0.02, 0.005


def _net(**kw):
    torch.manual_seed(0)
    opts = dict(encoder="rdn", features=8, encoder_options={"blocks": 1, "layers": 2, "growth": 4}, decoder_hidden=16,
                decoder_layers=2, attn_heads=2, pe=True, pe_frequencies=4, zero_init=False, residual=False,
                bidirectional=True, cross_input=True, sel_residual=True)
    return NexusINR(**{**opts, **kw}).eval()


@pytest.fixture(scope="module")
def pair():
    hr = torch.eye(4, dtype=torch.float64)
    hr[:3, 3] = torch.tensor([-10.0, 5.0, 3.0])
    x = torch.nn.functional.avg_pool3d(torch.rand(1, 1, *SHAPE, generator=torch.Generator().manual_seed(1)), 3, 1, 1)[0]
    x[:, :6] = 0
    t1 = MetaTensor(x[:, :, :, ::2].clone(), affine=thick_slice_affine(hr, "z", 2))
    t2 = MetaTensor(x[:, :, ::4, :].clone(), affine=thick_slice_affine(hr, "y", 4))
    return t1, t2, TargetGrid(SHAPE, hr)


def _dtypes_seen(net):
    """Output dtypes of every Conv3d / Linear call while active: proof of which precision really ran.
    KD-Attn's key projection (``project_keys``, a method called by ``add_attention_keys`` outside the
    attention module's forward) is recorded apart: it stays fp32."""
    seen, keys, handles = set(), set(), []
    key_linears = {id(m.to_kv) for m in net.modules() if hasattr(m, "to_kv")}
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv3d, torch.nn.Linear)):
            into = keys if id(m) in key_linears else seen
            handles.append(m.register_forward_hook(lambda mod, i, o, into=into: into.add(o.dtype)))
    return seen, keys, handles


@pytest.mark.parametrize("tile", [None, (13, 32, 5)])
def test_amp_inference_agrees_with_fp32(pair, tile):
    t1, t2, grid = pair
    net = _net()
    ref = ImplicitGridInferer(max_memory_gib=None)(t1, t2, net, grid)
    seen, keys, handles = _dtypes_seen(net)
    inferer = ImplicitGridInferer(max_memory_gib=None, tile_shape=tile, amp=True)
    out = inferer(t1, t2, net, grid)
    for h in handles:
        h.remove()
    assert seen == {torch.bfloat16}  # every conv and linear layer ran in bf16
    assert keys == {torch.float32}
    assert inferer.last_plan["tiled"] == (tile is not None)
    for c in ref:
        assert out[c].dtype == torch.float32 and out[c].shape == SHAPE
        scale = float(ref[c].abs().max())
        diff = (out[c] - ref[c]).abs()
        assert scale > 0.1
        assert float(diff.max()) <= MAX_REL * scale and float(diff.mean()) <= MEAN_REL * scale
        assert float(diff.max()) > 0  # the bf16 path really ran (fp32 would agree exactly)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())  # hooks gone after the call
    assert all(p.dtype == torch.float32 for p in net.parameters())


def test_amp_keeps_coordinates_and_lookups_fp32(pair):
    """An untrained residual network returns exactly the trilinear LR intensity (zero-initialised branches):
    under amp too, bit for bit, which needs the world -> voxel lookups, the interpolation and the residual sum
    in fp32 (a whole-forward torch.autocast casts the lookup indices to bf16 and does not)."""
    t1, t2, grid = pair
    net = _net(residual=True, zero_init=True)
    ref = ImplicitGridInferer(max_memory_gib=None)(t1, t2, net, grid)
    out = ImplicitGridInferer(max_memory_gib=None, amp=True)(t1, t2, net, grid)
    for c in ref:
        assert torch.equal(out[c], ref[c])
    # the naive alternative fails this check: the comparison can fail
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        naive = ImplicitGridInferer(max_memory_gib=None)(t1, t2, net, grid)
    assert max(float((naive[c] - ref[c]).abs().max()) for c in ref) > 1e-3


def test_amp_train_step_agrees_with_fp32_and_keeps_fp32_weights():
    net = _net()
    loss = NexusINRLoss()
    batch = training_batch(2, [16, 16, 16], 256, seed=0)
    grads, losses = {}, {}
    for amp in (False, True):
        net.zero_grad(set_to_none=True)
        kwargs, targets = inr_inputs(batch)
        with amp_autocast(net, amp):
            out = net.train()(**kwargs, aux=True)
        terms = loss(out, **targets)
        assert all(v.dtype == torch.float32 for v in terms.values())  # the loss and its reductions in fp32
        terms["loss"].backward()
        losses[amp] = float(terms["loss"].detach())
        grads[amp] = torch.cat([p.grad.reshape(-1) for p in net.parameters() if p.grad is not None])
    assert abs(losses[True] - losses[False]) <= MAX_REL * abs(losses[False])
    cos = torch.nn.functional.cosine_similarity(grads[True], grads[False], dim=0)
    assert float(cos) >= 0.99
    # INRTrainStep(amp=True): a real optimisation step; parameters, optimiser state and state_dict stay fp32
    from types import SimpleNamespace

    engine = SimpleNamespace(network=net, optimizer=torch.optim.Adam(net.parameters(), lr=1e-3), loss_function=loss,
                             state=SimpleNamespace(device=torch.device("cpu")), fire_event=lambda e: None)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    result = INRTrainStep(amp=True)(engine, batch)
    assert torch.isfinite(torch.tensor(result["loss"]))
    state = net.state_dict()
    assert all(v.dtype == before[k].dtype for k, v in state.items())
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    assert any(not torch.equal(state[k], before[k]) for k in state)  # it trained
    for s in engine.optimizer.state.values():
        assert s["exp_avg"].dtype == torch.float32


def test_amp_context_unwinds_on_error_and_is_per_thread():
    net = _net()
    parts = amp_parts(net)
    assert net.encoders["t1_shared"] in parts and net.decoders["t2"] in parts and net.attn_t2 in parts
    assert net.pe not in parts  # the positional encoding (coordinates) stays fp32
    x = torch.rand(1, 1, 6, 6, 6)
    with pytest.raises(RuntimeError, match="boom"):
        with amp_autocast(net):
            def fail(mod, inputs, output):
                raise RuntimeError("boom")
            h = net.encoders["t1_shared"].shallow2.register_forward_hook(fail)
            try:
                net.encoders["t1_shared"](x)
            finally:
                h.remove()
    assert not torch.is_autocast_enabled("cpu")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())
    # another thread calling the same network during an amp context runs in fp32
    seen = []
    conv = net.encoders["t1_spec"].shallow1
    h = conv.register_forward_hook(lambda mod, i, o: seen.append((threading.get_ident(), o.dtype)))
    inside, done = threading.Event(), threading.Event()

    def worker():
        inside.wait()
        net.encoders["t1_spec"](x)
        done.set()

    t = threading.Thread(target=worker)
    t.start()
    with amp_autocast(net):
        inside.set()
        assert done.wait(60)
        out = net.encoders["t1_spec"](x)
    t.join()
    h.remove()
    assert dict(seen) == {t.ident: torch.float32, threading.get_ident(): torch.bfloat16}
    assert out.dtype == torch.float32  # a part returns fp32 to its caller
    assert not torch.is_autocast_enabled("cpu")
