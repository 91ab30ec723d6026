"""``run_benchmark``: every measurement of :mod:`nexus_monai.benchmark` in one process, one flat JSON-ready dict."""

from __future__ import annotations

import gc
import math
import os
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from nexus_monai.benchmark.fit import AUTHORS, embedded_subject, time_fit
from nexus_monai.benchmark.flops import attention_probe, part_row
from nexus_monai.benchmark.inputs import (
    DEFAULT_SIZE,
    T1_ACQUISITION,
    T2_ACQUISITION,
    benchmark_inputs,
    decoder_flops_per_point,
    describe_network,
    load_benchmark_network,
)
from nexus_monai.benchmark.machine import (cuda_info, machine_info, measure_gemm, measure_memory_bandwidth,
                                           measure_peak_gemm, ru_maxrss_gib,
                                           synchronizer)
from nexus_monai.benchmark.probes import time_inference, time_training, time_trilinear
from nexus_monai.engines.inr import ImplicitGridInferer
from nexus_monai.engines.tiled import AUTO
from nexus_monai.errors import NexusInputError
from nexus_monai.losses import NexusINRLoss

__all__ = ["run_benchmark", "apply_peak"]


def apply_peak(profile: Mapping, peak: float, bandwidth: float | None = None) -> dict:
    """``profile`` (``NetworkProfile.summary``) with attainable times and ratios at the GEMM rate ``peak``;
    with the memory ``bandwidth`` (bytes/s) also each part's own bound (FLOPs / peak or bytes / bandwidth,
    the larger) and ratio to it; the whole's bound is the sum of the parts' bounds (they run in turn)."""
    out = {"parts": {}, "op_kinds": []}
    for name, row in profile["parts"].items():
        out["parts"][name] = {**row, **part_row(row["seconds"], row["flops"] / 2.0, row.get("bytes", 0), peak,
                                                 bandwidth)}
    whole = profile["whole"]
    out["whole"] = {**whole, **part_row(whole["seconds"], whole["flops"] / 2.0, whole.get("bytes", 0), peak)}
    if bandwidth:
        bound = sum(r["bound_s"] for r in out["parts"].values())
        out["whole"].update({"bound_s": bound, "ratio_to_bound": whole["seconds"] / bound if bound > 0 else None})
    for k in profile["op_kinds"]:
        rate = k["flops_per_s"]
        out["op_kinds"].append({**k, "fraction_of_peak": rate / peak if rate else None})
    return out


def _inference_fields(r: Mapping, peak: float, bandwidth: float | None = None) -> dict:
    prof = apply_peak(r["profile"], peak, bandwidth)
    return {
        "nexus_s": r["seconds"], "encode_s": r["encode_s"], "decode_s": r["decode_s"],
        "decoder_mlp_s": r["decoder_mlp_s"], "attention_s": r["attention_s"],
        "consistency_s": r.get("consistency_s", 0.0),
        "outside_network_s": r["seconds"] - r["encode_s"] - r["decode_s"],
        "flops": prof["whole"]["flops"], "attainable_s": prof["whole"]["attainable_s"],
        "whole_inference_ratio_to_attainable": prof["whole"]["ratio_to_attainable"],
        "bound_s": prof["whole"].get("bound_s"), "whole_inference_ratio_to_bound": prof["whole"].get("ratio_to_bound"),
        "parts": prof["parts"], "op_kinds": prof["op_kinds"], "plan": r["plan"],
        "peak_rss_gib": r["rss_peak_inference_gib"],
    }


def run_benchmark(bundle: str | os.PathLike = "bundles/nexus_inr", overlays: Sequence[str] = (),
                  weights: str | os.PathLike | None = None, random_weights: bool = False,
                  size: Sequence[int] = DEFAULT_SIZE,
                  chunk_size: int = 32768, threads: int = 0, train_steps: int = 20, skip_train: bool = False,
                  network: nn.Module | None = None, loss: nn.Module | None = None, settings: Mapping | None = None,
                  gemm_repeats: int = 5, max_memory_gib: float | str = AUTO, compare_before: bool = True,
                  fit: bool = False, fit_author_seconds: float = 120.0, peak_gemm_n: int | None = None,
                  repeats: int = 1, device: str | torch.device = "cpu", amp: bool | None = None,
                  log: Callable[[str], None] | None = None) -> dict:
    """Every measurement of the package docstring; a flat JSON-serialisable dict.

    ``network`` / ``loss`` / ``settings`` replace the bundle's (tests use a tiny network);
    ``settings`` then needs ``patch_size``, ``num_points``, ``batch_size``, ``learning_rate``.
    ``repeats``: after/before inference pairs, alternating; the fastest of each is reported (all in
    ``inference_runs_s``), memory from the first "after" run.

    ``device``: ``"cpu"`` or a CUDA device (``"cuda"``, ``"cuda:1"``): the network, inference and
    training there, every timer read after a synchronize, the peak GEMM measured on it in fp32 and
    bf16; ``amp`` (default: on for CUDA, off for CPU): bf16 autocast of the network's parts in
    inference and training, attainable times then from the bf16 peak. ``peak_gemm_n`` (default
    2048 on CPU, 8192 on CUDA): the square matmul's size.
    """
    log = log or (lambda msg: None)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NexusInputError(None, f"--device {device}: no CUDA device (torch.cuda.is_available() is False)")
    if dev.type not in ("cpu", "cuda"):
        raise NexusInputError(None, f"--device must be cpu or cuda[:N], got {device}")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    amp = (dev.type == "cuda") if amp is None else bool(amp)
    peak_gemm_n = int(peak_gemm_n or (8192 if dev.type == "cuda" else 2048))
    sync = synchronizer(dev)
    if chunk_size < 1:
        raise NexusInputError(None, f"--chunk-size must be >= 1, got {chunk_size}")
    if train_steps < 1 and not skip_train:
        raise NexusInputError(None, f"--train-steps must be >= 1, got {train_steps}")
    if max_memory_gib != AUTO and not (isinstance(max_memory_gib, (int, float)) and max_memory_gib > 0):
        raise NexusInputError(None, f"--max-memory-gib must be > 0 or 'auto', got {max_memory_gib}")
    if threads:
        torch.set_num_threads(int(threads))
    result: dict = {"machine": {**machine_info(), **cuda_info(dev)}}
    if network is None:
        network, bundle_loss, bundle_settings, weights_desc = load_benchmark_network(bundle, overlays, weights,
                                                                                     random_weights)
        loss = loss if loss is not None else bundle_loss
        settings = {**bundle_settings, **(settings or {})}
    else:
        weights_desc = "given network"
        settings = dict(settings or {})
        settings.setdefault("config_files", [])
    network = network.to(dev).eval()
    log(f"inputs: MNI152 template on a {'x'.join(str(s) for s in size)} grid")
    inputs = benchmark_inputs(size)
    gc.collect()
    result.update({
        "input": "nilearn MNI152 2009 T1 template (skull-stripped, zero background); T2 = 1.05 - T1 inside the brain "
                 "mask",
        "spacing_mm": inputs["spacing_mm"], "brain_voxels": inputs["brain_voxels"],
        "t1_lr_shape": list(inputs["t1_lr"].shape[1:]), "t2_lr_shape": list(inputs["t2_lr"].shape[1:]),
        "t1_acquisition": f"{T1_ACQUISITION[0]} x {T1_ACQUISITION[1]}",
        "t2_acquisition": f"{T2_ACQUISITION[0]} x {T2_ACQUISITION[1]}",
        "network": describe_network(network), "network_params": int(sum(p.numel() for p in network.parameters())),
        "weights": weights_desc, "config_files": list(settings.get("config_files", [])), "device": str(dev),
        "amp": amp, "amp_dtype": "bfloat16" if amp else None,
        "output_shape": list(inputs["grid"].shape), "output_voxels": inputs["grid"].num_voxels,
        "chunk_size": int(chunk_size),
        "max_memory_gib": max_memory_gib if max_memory_gib == AUTO else float(max_memory_gib),
    })

    def peaks() -> dict:
        """The reference peak (bf16 with amp, else fp32) and both dtypes' peaks where bf16 matters."""
        fp32 = measure_peak_gemm(peak_gemm_n, gemm_repeats, device=dev)
        bf16 = measure_peak_gemm(peak_gemm_n, gemm_repeats, device=dev, dtype=torch.bfloat16) \
            if (amp or dev.type == "cuda") else None
        ref = bf16 if amp else fp32
        bandwidth = measure_memory_bandwidth(copy_bytes, gemm_repeats, device=dev)["memory_bandwidth_bytes_per_s"]
        return {**ref, "fp32": fp32["peak_gemm_flops_per_s"], "bf16": bf16["peak_gemm_flops_per_s"] if bf16 else None,
                "bandwidth": bandwidth}

    # the bandwidth copy: 256 MiB, far beyond the caches (32 MiB for volumes under a million voxels: the tests')
    copy_bytes = (256 if math.prod(int(v) for v in size) >= 10**6 else 32) * 1024**2
    log(f"peak GEMM: {peak_gemm_n}^3 matmul on {dev}"
        + (f" at {torch.get_num_threads()} threads" if dev.type == "cpu" else "")
        + (", fp32 and bf16" if amp or dev.type == "cuda" else ""))
    peak_runs = [peaks()]
    after = before = None
    times: dict[str, list[float]] = {"after": [], "before": []}
    for rep in range(max(1, int(repeats))):  # after and before alternate: load drift hits both alike
        log(f"inference (after, {rep + 1}/{repeats}): tiled encoders, max {max_memory_gib} GiB"
            + (", amp" if amp else ""))
        run = time_inference(network, inputs, ImplicitGridInferer(chunk_size=chunk_size, max_memory_gib=max_memory_gib,
                                                                  amp=amp),
                             peak_runs[0]["peak_gemm_flops_per_s"], keep_output=compare_before)
        if rep == 0:
            peak_before_reset = run.pop("_ru_maxrss_before_reset_gib")
            rss_first = {k: run[k] for k in run if k.startswith("rss_")}
        times["after"].append(run["seconds"])
        if after is None or run["seconds"] < after["seconds"]:
            after = {**run, **rss_first}  # memory: the first run (VmHWM reset before it, nothing else ran yet)
        if compare_before:
            log(f"inference (before, {rep + 1}/{repeats}): encoders on the whole volumes, default layout")
            run = time_inference(network, inputs, ImplicitGridInferer(chunk_size=chunk_size, max_memory_gib=None,
                                                                      channels_last=False, amp=amp),
                                 peak_runs[0]["peak_gemm_flops_per_s"], keep_output=True)
            times["before"].append(run["seconds"])
            if before is None or run["seconds"] < before["seconds"]:
                before = run
    result["inference_runs_s"] = times
    peak_runs.append(peaks())
    peak = max(p["peak_gemm_flops_per_s"] for p in peak_runs)
    peak_fp32 = max(p["fp32"] for p in peak_runs)
    result.update({"peak_gemm_n": peak_gemm_n, "peak_gemm_threads": torch.get_num_threads(),
                   "peak_gemm_flops_per_s": peak, "peak_gemm_dtype": "bfloat16" if amp else "float32",
                   "peak_gemm_fp32_flops_per_s": peak_fp32,
                   "peak_gemm_bf16_flops_per_s": max(p["bf16"] for p in peak_runs) if peak_runs[0]["bf16"] else None,
                   "peak_gemm_runs_flops_per_s": [p["peak_gemm_flops_per_s"] for p in peak_runs]})
    bandwidth = max(p["bandwidth"] for p in peak_runs)
    result.update({"memory_bandwidth_bytes_per_s": bandwidth,
                   "memory_bandwidth_runs_bytes_per_s": [p["bandwidth"] for p in peak_runs]})
    result.update(_inference_fields(after, peak, bandwidth))
    for k in ("decoded_points", "decoder_calls", "max_points_per_call", "rss_before_inference_gib",
              "rss_peak_inference_gib",
              "rss_peak_inference_exact", "rss_increase_inference_gib"):
        result[k] = after[k]
    result["cuda_peak_memory_gib"] = after.get("cuda_peak_memory_gib")
    v = result["output_voxels"]
    result.update({"decoded_fraction": after["decoded_points"] / v, "voxels_per_s": v / after["seconds"],
                   "decoded_points_per_s": after["decoded_points"] / after["seconds"]})
    if before is not None:
        b = _inference_fields(before, peak, bandwidth)
        b["decoded_points"] = before["decoded_points"]
        result["before"] = b
        result["speedup_before_to_after"] = before["seconds"] / after["seconds"]
        # the untiled network's FLOPs (no halo recomputation, no skipped tiles) as the reference work
        result["whole_inference_ratio_to_untiled_attainable"] = after["seconds"] / b["attainable_s"]
        b["cuda_peak_memory_gib"] = before.get("cuda_peak_memory_gib")
        result["max_abs_diff_before_after"] = max(
            float((after["_pred"][c] - before["_pred"][c]).abs().max()) for c in ("t1", "t2")
        )
        result["max_abs_before"] = max(float(before["_pred"][c].abs().max()) for c in ("t1", "t2"))
    after.pop("_pred", None)
    del before
    log("inference: trilinear")
    result.update(time_trilinear(inputs))
    result["ratio_nexus_to_trilinear"] = result["nexus_s"] / result["trilinear_s"]
    key_shape = [min(int(s), 64) for s in inputs["t1_lr"].shape[1:]]
    del inputs
    gc.collect()
    log("attention probe and GEMM at the decoder shapes")
    result["attention_probe"] = attention_probe(network, key_shape, min(chunk_size, result["plan"].get("chunk_size",
                                                                                                       chunk_size)),
                                                peak_fp32, gemm_repeats, sync=sync)  # fp32: the probe runs without amp
    result.update(measure_gemm(network, result["max_points_per_call"] or chunk_size, gemm_repeats, device=dev,
                               dtype=torch.bfloat16 if amp else torch.float32))
    result["decoder_flops_per_point"] = decoder_flops_per_point(network)
    result["matmul_bound_s"] = result["decoded_points"] * result["decoder_flops_per_point"] / result["gemm_flops_per_s"]
    bound = result["matmul_bound_s"]
    result["ratio_nexus_to_matmul_bound"] = result["nexus_s"] / bound if bound > 0 else float("nan")
    result["ratio_decoder_mlp_to_matmul_bound"] = result["decoder_mlp_s"] / bound if bound > 0 else float("nan")
    if skip_train:
        result.update({"train_steps": 0, "train_steps_per_s": None})
    else:
        log(f"training: {train_steps} steps at batch {settings['batch_size']}, patch {settings['patch_size']}, "
            f"{settings['num_points']} points")
        if loss is None:
            loss = NexusINRLoss()
        result.update(time_training(network, loss, settings["batch_size"], settings["patch_size"],
                                    settings["num_points"],
                                    settings["learning_rate"], steps=train_steps, device=dev, amp=amp))
    if fit:
        t1_lr, t2_lr, subject = embedded_subject()
        runs = []
        for model in ("point", "profile"):
            log(f"SSMCSR fit-subject: one epoch, split-head, {model} forward model ({subject})")
            runs.append(time_fit(t1_lr, t2_lr, model, peak))
        log(f"SSMCSR fit-subject at the authors' size (4 x 1024 trunk, batch 1000), {fit_author_seconds:g} s "
            f"extrapolated")
        runs.append(time_fit(t1_lr, t2_lr, "point", peak, max_seconds=fit_author_seconds, hidden=AUTHORS["hidden"],
                             trunk_layers=AUTHORS["trunk_layers"], head_hidden=AUTHORS["head_hidden"],
                             batch_size=AUTHORS["batch_size"]))
        result["fit"] = {"subject": subject, "runs": runs, "authors_epochs_in_14_min": AUTHORS["epochs_in_14_min"],
                         "t1_lr_shape": list(t1_lr.shape[1:]), "t2_lr_shape": list(t2_lr.shape[1:])}
    result["rss_peak_process_gib"] = max(peak_before_reset, ru_maxrss_gib())
    result["machine"]["torch_threads"] = torch.get_num_threads()
    result["machine"]["load_average_1min_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return result
