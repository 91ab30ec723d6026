"""Timed runs: whole-volume Nexus-INR inference (profiled, with its memory), trilinear, training steps."""

from __future__ import annotations

import copy
import gc
import math
import time
from types import SimpleNamespace
from typing import Mapping, Sequence

import torch
from torch import nn

from nexus_monai.baselines.interpolation import upsample
from nexus_monai.benchmark.flops import NetworkProfile
from nexus_monai.benchmark.inputs import T1_ACQUISITION, T2_ACQUISITION, training_batch
from nexus_monai.benchmark.machine import (peak_rss_since_reset_gib, reset_peak_rss, rss_gib, ru_maxrss_gib,
                                           synchronizer)
from nexus_monai.engines.amp import amp_autocast
from nexus_monai.engines.inr import INRTrainStep
from nexus_monai.engines.predict import predict_volumes
from nexus_monai.geometry import thick_slice_affine

__all__ = ["warm_up", "time_inference", "time_trilinear", "time_training"]


def warm_up(network: nn.Module, amp: bool = False) -> None:
    """One small forward pass (kernels, thread pools, allocator) on the network's device before anything is timed."""
    device = next(network.parameters()).device
    hr = torch.eye(4, dtype=torch.float64)
    batch = {
        "t1": torch.rand(1, 1, 12, 12, 6), "t2": torch.rand(1, 1, 12, 3, 12),
        "t1_affine": thick_slice_affine(hr, T1_ACQUISITION[0], T1_ACQUISITION[1])[None],
        "t2_affine": thick_slice_affine(hr, T2_ACQUISITION[0], T2_ACQUISITION[1])[None],
        "query_world": torch.rand(1, 256, 3) * 11, "query_norm": torch.rand(1, 256, 3) * 2 - 1,
    }
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.no_grad(), amp_autocast(network, amp, device):
        network.eval()(**batch, aux=False)
    sync = synchronizer(device)
    if sync is not None:
        sync()


def time_inference(network: nn.Module, inputs: Mapping, inferer, peak_flops_per_s: float,
                   keep_output: bool = False) -> dict:
    """Whole-volume inference (``predict_volumes`` with ``inferer``) on ``inputs["grid"]``: time, the
    profile of every part (:class:`~nexus_monai.benchmark.flops.NetworkProfile`) and memory.

    Memory: RSS before, and the peak during the call (the kernel's high-water mark reset just before,
    where Linux allows; ``rss_peak_inference_exact`` False: the value is the process peak so far);
    on CUDA also the device's peak allocated memory (``cuda_peak_memory_gib``).
    With ``keep_output`` the prediction is returned under ``"_pred"``. On CUDA every timer read
    follows a synchronize (the parts' times too).
    """
    grid = inputs["grid"]
    device = next(network.parameters()).device
    sync = synchronizer(device)
    warm_up(network, bool(getattr(inferer, "amp", False)))
    gc.collect()
    if sync is not None:
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = rss_gib()
    peak_before = ru_maxrss_gib()
    exact = reset_peak_rss()
    with NetworkProfile(network, sync) as probe:
        t0 = time.perf_counter()
        pred = predict_volumes(network, inputs["t1_lr"], inputs["t2_lr"], grid, inferer)
        if sync is not None:
            sync()
        seconds = time.perf_counter() - t0
    peak = peak_rss_since_reset_gib()
    if tuple(pred["t1"].shape[1:]) != grid.shape or not all(bool(torch.isfinite(pred[c]).all()) for c in pred):
        raise RuntimeError("inference produced a wrong shape or non-finite values")
    profile = probe.summary(seconds, peak_flops_per_s)
    ms = profile.pop("method_seconds")
    encode_s = ms.get("encode", 0.0) or (profile["parts"]["encoders"]["seconds"] + ms.get("add_attention_keys", 0.0))
    voxels = grid.num_voxels
    result = {
        "seconds": seconds,
        "encode_s": encode_s,
        "decode_s": ms.get("decode", 0.0),
        "decoder_mlp_s": profile["parts"]["decoder_mlps"]["seconds"],
        "attention_s": profile["parts"]["attention"]["seconds"],
        "consistency_s": ms.get("consistency", 0.0),  # data-consistency step (inside "other"), 0 without one
        "decoded_points": profile["points"],
        "decoder_calls": profile["calls"],
        "max_points_per_call": profile["max_rows"],
        "profile": profile,
        "plan": dict(getattr(inferer, "last_plan", {}) or {}),
        "rss_before_inference_gib": rss_before,
        "rss_peak_inference_gib": peak,
        "rss_peak_inference_exact": exact,
        "rss_increase_inference_gib": peak - rss_before,
        "_ru_maxrss_before_reset_gib": peak_before,
        "output_voxels": voxels,
    }
    if sync is not None:
        result["cuda_peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 1024.0**3
    if keep_output:
        result["_pred"] = {c: pred[c].as_subclass(torch.Tensor).clone() for c in pred}
    del pred
    gc.collect()
    return result


def time_trilinear(inputs: Mapping) -> dict:
    """Trilinear (SimpleITK) upsampling of both LR scans onto ``inputs["grid"]``."""
    t0 = time.perf_counter()
    outs = [upsample(inputs[k], inputs["grid"], "trilinear") for k in ("t1_lr", "t2_lr")]
    seconds = time.perf_counter() - t0
    if any(tuple(o.shape[1:]) != inputs["grid"].shape for o in outs):
        raise RuntimeError("trilinear output has a wrong shape")
    del outs
    return {"trilinear_s": seconds}


def time_training(network: nn.Module, loss: nn.Module, batch_size: int, patch_size: Sequence[int], num_points: int,
                  learning_rate: float, steps: int = 20, warmup: int = 2, seed: int = 0,
                  device: torch.device | str = "cpu", amp: bool = False) -> dict:
    """Training steps/s (forward, every loss term, backward, Adam step) on a copy of ``network`` on
    ``device`` (``amp``: :class:`~nexus_monai.engines.inr.INRTrainStep`'s bf16 autocast). The batch
    starts on the host each step, as from a data loader."""
    device = torch.device(device)
    net = copy.deepcopy(network).to(device).train()
    loss = loss.to(device) if isinstance(loss, nn.Module) else loss
    engine = SimpleNamespace(network=net, optimizer=torch.optim.Adam(net.parameters(), lr=learning_rate),
                             loss_function=loss, state=SimpleNamespace(device=device),
                             fire_event=lambda event: None)  # no handlers to notify outside a trainer
    batch = training_batch(batch_size, patch_size, num_points, seed)
    step = INRTrainStep(amp=amp)
    sync = synchronizer(device) or (lambda: None)
    for _ in range(warmup):
        step(engine, batch)
    sync()
    t0 = time.perf_counter()
    last = {}
    for _ in range(steps):
        last = step(engine, batch)
    sync()
    seconds = time.perf_counter() - t0
    if steps and not math.isfinite(last["loss"]):
        raise RuntimeError("training loss is not finite")
    return {
        "train_steps": int(steps),
        "train_warmup_steps": int(warmup),
        "train_s": seconds,
        "train_steps_per_s": steps / seconds if seconds > 0 else float("nan"),
        "train_step_s": seconds / steps if steps else float("nan"),
        "train_amp": bool(amp),
        "train_batch_size": int(batch_size),
        "train_patch_size": [int(p) for p in patch_size],
        "train_t1_lr_patch": list(batch["t1_lr"].shape[-3:]),
        "train_t2_lr_patch": list(batch["t2_lr"].shape[-3:]),
        "train_num_points": int(num_points),
        "train_learning_rate": float(learning_rate),
        "train_loss_terms": sorted(k[5:] for k in last if k.startswith("loss_")),
    }


