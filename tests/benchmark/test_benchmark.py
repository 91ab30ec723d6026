"""``nexus-sr benchmark`` on a tiny configuration: every field present, finite, arithmetically consistent.

No timing assertions: only that the numbers exist, are positive and agree with each other.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from nexus_monai.benchmark import benchmark_inputs, decoder_flops_per_point, format_report, run_benchmark
from nexus_monai.cli import main
from nexus_monai.geometry import sample_at_world, thick_slice_affine
from nexus_monai.losses import NexusINRLoss
from nexus_monai.networks import NexusINR

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "nexus_inr"
TINY_SIZE = (32, 32, 24)
TINY = dict(encoder="rdn", features=4, encoder_options={"blocks": 1, "layers": 1, "growth": 4},
            decoder="mlp", decoder_hidden=8, decoder_layers=2, attn_heads=2, pe_frequencies=2)
TINY_SETTINGS = {"patch_size": [8, 8, 8], "num_points": 32, "batch_size": 1, "learning_rate": 1e-3}

TIME_FIELDS = ["nexus_s", "encode_s", "decode_s", "decoder_mlp_s", "attention_s", "trilinear_s", "train_s"]
POSITIVE_FIELDS = TIME_FIELDS + [
    "output_voxels", "decoded_points", "decoder_calls", "max_points_per_call", "decoded_fraction", "voxels_per_s",
    "decoded_points_per_s", "ratio_nexus_to_trilinear", "rss_before_inference_gib", "rss_peak_inference_gib",
    "rss_peak_process_gib", "gemm_rows", "gemm_flops_per_s", "gemm_hidden_flops_per_s", "decoder_flops_per_point",
    "matmul_bound_s", "ratio_nexus_to_matmul_bound", "ratio_decoder_mlp_to_matmul_bound", "train_steps",
    "train_steps_per_s", "network_params", "spacing_mm", "brain_voxels", "peak_gemm_flops_per_s", "flops", "attainable_s",
    "whole_inference_ratio_to_attainable", "peak_rss_gib", "speedup_before_to_after", "memory_bandwidth_bytes_per_s",
    "whole_inference_ratio_to_bound",
]
OTHER_FIELDS = ["machine", "output_shape", "t1_lr_shape", "t2_lr_shape", "chunk_size", "outside_network_s", "network", "weights",
                "rss_increase_inference_gib", "rss_peak_inference_exact", "train_batch_size", "train_patch_size",
                "train_num_points", "train_t1_lr_patch", "train_t2_lr_patch", "train_loss_terms", "config_files", "parts",
                "op_kinds", "plan", "before", "max_abs_diff_before_after", "attention_probe"]


def _close(a, b):
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _check_result(r, size=TINY_SIZE, train_steps=2):
    missing = [k for k in POSITIVE_FIELDS + OTHER_FIELDS if k not in r]
    assert not missing, missing
    for k in POSITIVE_FIELDS:
        assert isinstance(r[k], (int, float)) and math.isfinite(r[k]) and r[k] > 0, (k, r[k])
    assert math.isfinite(r["outside_network_s"]) and math.isfinite(r["rss_increase_inference_gib"])
    for k in ("cpu_model", "cpu_count", "cpus_available", "torch_threads", "torch_version"):
        assert r["machine"][k]
    assert r["output_shape"] == list(size)
    assert r["output_voxels"] == size[0] * size[1] * size[2]
    assert r["t1_lr_shape"] == [size[0], size[1], size[2] // 2] and r["t2_lr_shape"] == [size[0], size[1] // 4, size[2]]
    # arithmetic
    assert _close(r["voxels_per_s"], r["output_voxels"] / r["nexus_s"])
    assert _close(r["decoded_points_per_s"], r["decoded_points"] / r["nexus_s"])
    assert _close(r["decoded_fraction"], r["decoded_points"] / r["output_voxels"])
    assert _close(r["ratio_nexus_to_trilinear"], r["nexus_s"] / r["trilinear_s"])
    assert _close(r["encode_s"] + r["decode_s"] + r["outside_network_s"], r["nexus_s"])
    # the parts are timed by their own hooks inside the decode stage: an accounting check, not a speed
    # assertion, with room for the timers' own overhead on a tiny, millisecond-scale network
    assert r["decoder_mlp_s"] + r["attention_s"] <= 1.25 * r["decode_s"] + 0.05
    assert _close(r["matmul_bound_s"], r["decoded_points"] * r["decoder_flops_per_point"] / r["gemm_flops_per_s"])
    assert _close(r["ratio_nexus_to_matmul_bound"], r["nexus_s"] / r["matmul_bound_s"])
    assert _close(r["ratio_decoder_mlp_to_matmul_bound"], r["decoder_mlp_s"] / r["matmul_bound_s"])
    assert _close(r["train_steps_per_s"], r["train_steps"] / r["train_s"])
    assert r["train_steps"] == train_steps and r["train_warmup_steps"] == 2
    assert r["max_points_per_call"] <= r["chunk_size"] and r["gemm_rows"] == r["max_points_per_call"]
    assert _close(r["rss_increase_inference_gib"], r["rss_peak_inference_gib"] - r["rss_before_inference_gib"])
    # RSS readings, not exact accounting: the allocator may hand pages back between the "before"
    # reading and the sampled peak, so allow a few MiB (a clean-clone CI run saw 0.1 MiB less)
    assert r["rss_peak_inference_gib"] >= r["rss_before_inference_gib"] - 0.01
    assert r["rss_peak_process_gib"] >= r["rss_peak_inference_gib"] - 0.01
    assert {"sr_t1", "sr_t2", "seg"} <= set(r["train_loss_terms"])
    # every FLOP: the parts add up to the whole, each ratio is time / (FLOPs / peak GEMM)
    peak = r["peak_gemm_flops_per_s"]
    assert r["plan"]["tiled"] and r["max_abs_diff_before_after"] <= 1e-4  # tiled "after" == untiled "before"
    for result in (r, r["before"]):
        parts = result["parts"]
        assert set(parts) == {"encoders", "attention", "fusion_mlps", "decoder_mlps", "other"}
        assert _close(sum(p["flops"] for p in parts.values()), result["flops"])
        assert _close(sum(p["seconds"] for p in parts.values()), result["nexus_s"])
        assert _close(result["attainable_s"], result["flops"] / peak)
        assert _close(result["whole_inference_ratio_to_attainable"], result["nexus_s"] / result["attainable_s"])
        for p in parts.values():
            assert _close(p["attainable_s"], p["flops"] / peak)
            # each part's own bound: the larger of its FLOPs at the GEMM peak and its bytes at the bandwidth
            memory_s = p["bytes"] / r["memory_bandwidth_bytes_per_s"]
            assert _close(p["bound_s"], max(p["attainable_s"], memory_s))
            assert p["bound_kind"] == ("memory" if memory_s > p["attainable_s"] else "gemm")
            assert _close(p["ratio_to_bound"], p["seconds"] / p["bound_s"])
        assert parts["attention"]["bytes"] > 0 and parts["other"]["bound_kind"] == "memory"
        assert parts["encoders"]["bytes"] == 0 and parts["encoders"]["bound_kind"] == "gemm"
        assert _close(result["bound_s"], sum(p["bound_s"] for p in parts.values()))
        assert parts["encoders"]["flops"] > 0 and parts["attention"]["flops"] > 0 and parts["decoder_mlps"]["flops"] > 0
        assert parts["other"]["flops"] == 0
    # the untiled run computes every LR voxel; the tiled one skips background tiles and recomputes halos
    assert _close(r["speedup_before_to_after"], r["before"]["nexus_s"] / r["nexus_s"])
    assert r["before"]["decoded_points"] == r["decoded_points"]
    assert r["peak_rss_gib"] == r["rss_peak_inference_gib"]
    assert any(k["kind"].startswith("conv3d 3x3x3") for k in r["op_kinds"])
    assert any(k["kind"] == "window attention q.k + attn.v" for k in r["op_kinds"])
    json.dumps(r)  # serialisable as written by --json


def test_inputs_geometry():
    inputs = benchmark_inputs(TINY_SIZE)
    grid, t1, t2 = inputs["grid"], inputs["t1_lr"], inputs["t2_lr"]
    assert grid.shape == TINY_SIZE and inputs["spacing_mm"] == 7.0  # the template brain fits 32x32x24 at 7 mm
    assert tuple(t1.shape[1:]) == (32, 32, 12) and tuple(t2.shape[1:]) == (32, 8, 24)
    assert torch.allclose(t1.affine.double(), thick_slice_affine(grid.affine, "z", 2))
    assert torch.allclose(t2.affine.double(), thick_slice_affine(grid.affine, "y", 4))
    # zero background around the brain (x faces; the thick y slabs of T2 blur into its y faces), brain in the middle
    for v in (t1[0], t2[0]):
        assert float(v[0].abs().max()) == 0 and float(v[-1].abs().max()) == 0
    assert float(t1[0, :, 0].abs().max()) == 0 and float(t1[0, :, -1].abs().max()) == 0
    assert float(t1[0, 16, 16, 6]) > 0 and float(t2[0, 16, 4, 12]) > 0
    assert 0 < inputs["brain_voxels"] < grid.num_voxels


@pytest.fixture
def one_thread():
    """Run with 1 torch thread (quick also on a busy machine) and give torch's process-wide value back."""
    threads = torch.get_num_threads()
    yield 1
    torch.set_num_threads(threads)


def test_benchmark_tiny_network(one_thread):
    torch.manual_seed(0)
    net = NexusINR(**TINY)
    r = run_benchmark(size=TINY_SIZE, threads=one_thread, train_steps=2, network=net, loss=NexusINRLoss(), settings=TINY_SETTINGS)
    assert r["machine"]["torch_threads"] == 1
    _check_result(r)
    # the probe left the network as it was: no timing wrappers, no hooks
    assert "encode" not in vars(net) and "decode" not in vars(net)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())
    # decoder FLOPs counted from the modules agree with the architecture written out by hand
    d_in = 4 + 3 * 2 * 2 + 3 + 1  # C + Fourier features + rel. coordinate + LR intensity
    assert r["decoder_flops_per_point"] == decoder_flops_per_point(net) == 2 * 2 * (d_in * 8 + 8 * 8 + 8 * 1)
    # the points counted as decoded are exactly those where either LR scan has signal (skip_empty)
    inputs = benchmark_inputs(TINY_SIZE)
    world = inputs["grid"].world_coords().reshape(-1, 3)
    signal = sum(sample_at_world(inputs[k].as_subclass(torch.Tensor).float(), inputs[k].affine, world)[0].abs()
                 for k in ("t1_lr", "t2_lr"))
    assert r["decoded_points"] == int((signal > 0).sum())
    assert r["decoded_points"] < r["output_voxels"]  # the zero background was skipped
    assert r["train_batch_size"] == 1 and r["train_t1_lr_patch"] == [8, 8, 4] and r["train_t2_lr_patch"] == [8, 2, 8]
    text = format_report(r)
    for line in ("Nexus-INR (predict_volumes", "trilinear", "peak fp32 GEMM", "whole inference", "speed-up before / after", "ratio Nexus-INR / trilinear", "peak of the process",
                 "matmul-bound decoder time", "whole inference / matmul bound", "steps/s", "torch"):
        assert line in text


def test_cli_benchmark_tiny(tmp_path, capsys, one_thread):
    overlay = tmp_path / "tiny.yaml"
    overlay.write_text(
        "patch_size: [8, 8, 8]\nnum_points: 32\nbatch_size: 1\n"
        "network_def#features: 4\nnetwork_def#encoder_options: {blocks: 1, layers: 1, growth: 4}\n"
        "network_def#decoder_hidden: 8\nnetwork_def#decoder_layers: 2\nnetwork_def#attn_heads: 2\n"
        "network_def#pe: true\nnetwork_def#bidirectional: false\nnetwork_def#cross_input: false\n"
    )
    out = tmp_path / "bench.json"
    rc = main(["benchmark", "--bundle", str(BUNDLE), "--config", str(overlay), "--random-weights", "--size", *map(str, TINY_SIZE),
               "--train-steps", "1", "--threads", str(one_thread), "--json", str(out), "--quiet"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "whole inference / matmul bound" in stdout and "steps/s" in stdout and f"wrote {out}" in stdout
    r = json.loads(out.read_text())
    _check_result(r, train_steps=1)
    assert r["machine"]["torch_threads"] == 1
    assert r["config_files"][-1].endswith("tiny.yaml") and r["weights"].startswith("random")
    assert r["network_params"] == sum(p.numel() for p in NexusINR(**{**TINY, "pe_frequencies": 6}).parameters())


def test_cli_benchmark_bad_overlay(tmp_path, capsys):
    rc = main(["benchmark", "--bundle", str(BUNDLE), "--config", str(tmp_path / "missing.yaml"), "--size", *map(str, TINY_SIZE)])
    assert rc == 2
    assert "config overlay not found" in capsys.readouterr().err


def test_benchmark_amp_path_on_cpu(one_thread):
    """The device / amp code path (the one --device cuda takes, autocast on CPU here): the CPU keys plus
    device, amp and both GEMM peaks measured in the same run; attainable times from the bf16 peak."""
    torch.manual_seed(0)
    net = NexusINR(**TINY)
    r = run_benchmark(size=TINY_SIZE, threads=one_thread, train_steps=2, network=net, loss=NexusINRLoss(),
                      settings=TINY_SETTINGS, amp=True, peak_gemm_n=256, device="cpu")
    _check_result(r)
    assert r["device"] == "cpu" and r["amp"] is True and r["amp_dtype"] == "bfloat16"
    assert r["peak_gemm_dtype"] == "bfloat16" and r["gemm_dtype"] == "bfloat16" and r["train_amp"] is True
    assert r["peak_gemm_bf16_flops_per_s"] > 0 and r["peak_gemm_fp32_flops_per_s"] > 0
    assert r["peak_gemm_flops_per_s"] == r["peak_gemm_bf16_flops_per_s"]
    assert _close(r["attainable_s"], r["flops"] / r["peak_gemm_bf16_flops_per_s"])
    assert r["max_abs_diff_before_after"] <= 0.05 * r["max_abs_before"]  # both amp; tiled vs untiled
    assert r["cuda_peak_memory_gib"] is None
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert "bf16 autocast (amp)" in format_report(r) and "peak bf16 GEMM" in format_report(r)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cli_benchmark_cuda_without_a_gpu_is_one_line(capsys):
    rc = main(["benchmark", "--bundle", str(BUNDLE), "--device", "cuda", "--size", *map(str, TINY_SIZE), "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert "no CUDA device" in err and len(err.splitlines()) == 1
