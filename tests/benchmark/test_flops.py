"""The benchmark's FLOP counter (``nexus_monai.benchmark.flops``) against multiply-adds counted by hand."""

import torch
from torch import nn

from nexus_monai.benchmark.flops import NetworkProfile, attention_macs, module_macs, part_of
from nexus_monai.networks import NexusINR
from nexus_monai.networks.attention import LocalWindowCrossAttention


def _macs(module, *inputs):
    with torch.no_grad():
        out = module(*inputs)
    return module_macs(module, inputs, out)


def test_conv3d_macs_by_hand():
    # 2 -> 3 channels, 3x3x3, 'same' on 4x5x6: every output voxel x 27 taps x 2 inputs x 3 outputs
    assert _macs(nn.Conv3d(2, 3, 3, padding=1), torch.rand(1, 2, 4, 5, 6)) == 4 * 5 * 6 * 27 * 2 * 3
    # groups 2, batch 2, no padding on 5^3 -> 3^3 outputs: 2 items x 27 voxels x 27 taps x (4 / 2) inputs x 6 outputs
    assert _macs(nn.Conv3d(4, 6, 3, groups=2), torch.rand(2, 4, 5, 5, 5)) == 2 * 27 * 27 * 2 * 6
    assert _macs(nn.Conv3d(8, 4, 1), torch.rand(1, 8, 2, 3, 4)) == 24 * 8 * 4


def test_linear_macs_by_hand():
    assert _macs(nn.Linear(5, 7), torch.rand(3, 11, 5)) == 3 * 11 * 5 * 7
    assert _macs(nn.ReLU(), torch.rand(4)) == 0  # not a multiply-add product


def test_window_attention_macs_by_hand():
    torch.manual_seed(0)
    attn = LocalWindowCrossAttention(8, heads=2, window=(3, 3, 3))
    query, key_map = torch.rand(1, 10, 8), torch.rand(1, 8, 4, 4, 4)
    index = torch.rand(1, 10, 3) * 3
    assert attention_macs(attn, query) == 2 * 10 * 27 * 8  # q.k and attn.v: points x window x heads x head dims, twice

    class Holder(nn.Module):  # named like NexusINR's attention so the profile files it under "attention"
        def __init__(self):
            super().__init__()
            self.attn_t2 = attn

    holder = Holder()
    with NetworkProfile(holder) as prof, torch.no_grad():
        attn(query, key_map, index)  # projects the 64 key voxels itself
    by_hand = (2 * 10 * 27 * 8  # q.k + attn.v
               + 10 * 8 * 8  # to_q
               + 64 * 8 * 16  # to_kv on every key voxel
               + 10 * 27 * (3 * 8 + 8 * 8)  # positional MLP on every window voxel
               + 10 * 8 * 8)  # out
    assert prof.macs["attention"] == by_hand and sum(prof.macs.values()) == by_hand
    summary = prof.summary(1.0, 1e9)
    assert summary["parts"]["attention"]["flops"] == 2 * by_hand
    assert summary["whole"]["attainable_s"] == 2 * by_hand / 1e9
    assert not attn._forward_hooks and "project_keys" not in vars(attn)  # the profile left no trace


def test_profile_of_a_small_nexus_inr_by_hand():
    """Baseline Nexus-INR (no MMF / KD-Attn / SEL / PE), ResCNN encoders of one body layer, 2-layer decoders."""
    torch.manual_seed(0)
    net = NexusINR(encoder="rescnn", features=4, encoder_options={"depth": 1}, decoder_hidden=8, decoder_layers=2,
                   mmf=False, kd_attn=False, sel=False, pe=False).eval()
    k = 50
    hr = torch.eye(4, dtype=torch.float64)[None]
    batch = dict(t1=torch.rand(1, 1, 6, 6, 4), t2=torch.rand(1, 1, 6, 3, 6), t1_affine=hr, t2_affine=hr,
                 query_world=torch.rand(1, k, 3) * 3, query_norm=torch.rand(1, k, 3))
    with NetworkProfile(net) as prof, torch.no_grad():
        net(**batch, aux=False)
    per_voxel = 27 * 1 * 4 + 27 * 4 * 4  # head 1 -> 4, one body conv 4 -> 4
    assert prof.macs["encoders"] == per_voxel * (6 * 6 * 4 + 6 * 3 * 6)
    d_in = 4 + 3 + 1  # feature + offset inside the LR voxel + LR intensity
    assert prof.macs["decoder_mlps"] == 2 * k * (d_in * 8 + 8 * 8 + 8 * 1)
    assert prof.points == k and prof.calls == 1
    kinds = {e["kind"]: e for e in prof.summary(1.0, 1e9)["op_kinds"]}
    body = kinds["conv3d 3x3x3 4->4"]
    assert body["macs"] == 27 * 16 * (6 * 6 * 4 + 6 * 3 * 6) and body["calls"] == 2
    assert part_of("encoders.t1_shared.body.0") == "encoders" and part_of("seg_fuse.t1.0") == "fusion_mlps"
    assert part_of("attn_t1.pos.0") == "attention" and part_of("decoders.t2.net.0") == "decoder_mlps"


def test_bytes_and_own_bounds_by_hand():
    """KD-Attn reads points x window x 2C floats of window rows per call; the rest's lookups points x (maps x 8 x C
    + 2 images x 8) floats; a part's bound is the larger of FLOPs / peak and bytes / bandwidth."""
    torch.manual_seed(0)
    net = NexusINR(encoder="rescnn", features=4, encoder_options={"depth": 1}, decoder_hidden=8, decoder_layers=2,
                   attn_heads=2, sel=False, pe=False).eval()
    k = 40
    hr = torch.eye(4, dtype=torch.float64)[None]
    batch = dict(t1=torch.rand(1, 1, 6, 6, 4), t2=torch.rand(1, 1, 6, 3, 6), t1_affine=hr, t2_affine=hr,
                 query_world=torch.rand(1, k, 3) * 3, query_norm=torch.rand(1, k, 3))
    with NetworkProfile(net) as prof, torch.no_grad():
        net(**batch, aux=False)
    assert prof.bytes["attention"] == k * 27 * 2 * 4 * 4  # one attention (T2 from T1), C = 4
    summary = prof.summary(2.0, peak_flops_per_s=1e9, bandwidth_bytes_per_s=1e6)
    other = summary["parts"]["other"]
    assert other["bytes"] == k * (4 * 8 * 4 + 2 * 8) * 4  # 4 maps (shared + specific per contrast)
    assert other["bound_kind"] == "memory" and other["bound_s"] == other["bytes"] / 1e6
    enc = summary["parts"]["encoders"]
    assert enc["bound_kind"] == "gemm" and enc["bound_s"] == enc["flops"] / 1e9
    assert enc["ratio_to_bound"] == enc["seconds"] / enc["bound_s"]


def test_profile_times_the_consistency_step():
    """The any-protocol soft data-consistency step (a network with ``consistency``) is timed by the profile."""
    from monai.data import MetaTensor

    from nexus_monai.engines.inr import ImplicitGridInferer
    from nexus_monai.geometry import TargetGrid, thick_slice_affine

    torch.manual_seed(0)
    net = NexusINR(encoder="rescnn", features=4, encoder_options={"depth": 1}, decoder_hidden=8, decoder_layers=2,
                   attn_heads=2, sel=False, pe=False, data_consistency=True).eval()
    hr = torch.eye(4, dtype=torch.float64)
    x = torch.rand(1, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    t1 = MetaTensor(x[:, :, :, ::2].clone(), affine=thick_slice_affine(hr, "z", 2))
    t2 = MetaTensor(x[:, :, ::4, :].clone(), affine=thick_slice_affine(hr, "y", 4))
    with NetworkProfile(net) as prof:
        ImplicitGridInferer(max_memory_gib=None, chunk_size=256)(t1, t2, net, TargetGrid((8, 8, 8), hr))
    assert prof.method_seconds["consistency"] > 0
    assert "on_grid" not in vars(net.consistency)  # the timer is removed on exit
