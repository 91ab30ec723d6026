"""SSMCSR fitting throughput: ``nexus-sr fit-subject``'s :class:`~nexus_monai.engines.subject_fit.SubjectFitter`
timed on the 2 mm embedded subject, with the GEMM bound of its MLP.

Subject: the first test subject of the embedded simulated dataset (2 mm, 120 x 120 x 78; generated on
first use), LR scans T1w z x 2 and T2w y x 4 (Gaussian profile), as the Nexus protocol simulates them.

One epoch = one pass over every LR observation (both scans shuffled together), as ``fit-subject``
runs it (split-head, no early stopping, no warm-up switch inside the timed epoch: the ``point`` and
the ``profile`` forward models are timed separately). Throughput: observations/s and INR samples/s
(an observation of the ``profile`` model renders ``taps`` samples). GEMM bound: training costs about
3 x the forward multiply-adds (forward, gradient w.r.t. inputs, gradient w.r.t. weights), so
``bound_s = samples x 3 x 2 x MACs/sample / peak FLOP/s``.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from nexus_monai.data.brats import resolve_datalist
from nexus_monai.data.io import load_volume
from nexus_monai.engines.subject_fit import SubjectFitter
from nexus_monai.networks.ssmcsr import SSMCSRNet
from nexus_monai.transforms.acquisition import SimulateAnisotropicAcquisition

__all__ = ["embedded_subject", "inr_macs_per_sample", "time_fit", "AUTHORS"]

# McGinnis et al. (MICCAI 2023), their released code on this machine kind, 2 mm pair: 7 of 50 epochs in 14 minutes
AUTHORS = {"hidden": 1024, "trunk_layers": 5, "head_hidden": 512, "batch_size": 1000, "epochs_in_14_min": 7}


def embedded_subject() -> tuple:
    """``(t1_lr, t2_lr, subject id)`` of the embedded dataset's first test subject (T1 z x 2, T2 y x 4)."""
    datalist = resolve_datalist("embedded")
    root = datalist.parent
    entry = json.loads(datalist.read_text())["test"][0]
    hr = {c: load_volume(root / entry[c]) for c in ("t1", "t2")}
    return (SimulateAnisotropicAcquisition("z", 2)(hr["t1"]), SimulateAnisotropicAcquisition("y", 4)(hr["t2"]),
            entry["subject"])


def inr_macs_per_sample(network: nn.Module) -> int:
    """Forward multiply-adds of one INR sample: every Linear layer plus the Fourier projection (3 x rows)."""
    macs = sum(m.in_features * m.out_features for m in network.modules() if isinstance(m, nn.Linear))
    enc = getattr(network, "encoding", None)
    if enc is not None:
        macs += 3 * (enc.out_features // 2)
    return int(macs)


def time_fit(t1_lr, t2_lr, forward_model: str, peak_flops_per_s: float, max_seconds: float | None = None,
             **options) -> dict:
    """One epoch (or as much as ``max_seconds`` allows, then extrapolated) of a split-head fit.

    ``options`` go to :class:`SubjectFitter` (e.g. the authors' ``hidden=1024, batch_size=1000``).
    """
    fitter = SubjectFitter(variant="split_head", forward_model=forward_model, point_warmup=0.0, epochs=1,
                           max_seconds=max_seconds, early_stopping=False, mi_points=1024, **options)
    fit = fitter.fit(t1_lr, t2_lr)
    log = fit.log
    o = fitter.options
    per_epoch = int(log["iterations_per_epoch"])
    iterations = int(log["iterations"])
    if log["epochs"]:
        loop_s = float(log["epochs"][0]["seconds"]) - float(log["seconds_setup"])
    else:  # stopped by max_seconds inside the epoch: the loop up to the last MI check
        loop_s = float(log["mi_curve"][-1]["seconds"]) - float(log["seconds_setup"])
    epoch_s = loop_s * per_epoch / max(iterations, 1)
    observations = sum(int(v["voxels"]) for v in log["observations"].values())
    taps = {c: int(v["taps"]) if forward_model == "profile" else 1 for c, v in log["observations"].items()}
    samples = sum(int(v["voxels"]) * taps[c] for c, v in log["observations"].items())
    net = SSMCSRNet("split_head", o["num_frequencies"], o["sigma"], o["hidden"], o["trunk_layers"], o["head_hidden"])
    macs = inr_macs_per_sample(net)
    bound_s = samples * 3 * 2 * macs / peak_flops_per_s
    return {
        "forward_model": forward_model, "hidden": o["hidden"], "trunk_layers": o["trunk_layers"],
        "head_hidden": o["head_hidden"],
        "batch_size": o["batch_size"], "iterations_timed": iterations, "iterations_per_epoch": per_epoch,
        "extrapolated": iterations < per_epoch, "epoch_s": epoch_s, "observations_per_epoch": observations,
        "inr_samples_per_epoch": samples, "taps": taps, "observations_per_s": observations / epoch_s,
        "inr_samples_per_s": samples / epoch_s, "macs_per_sample_forward": macs,
        "gemm_bound_epoch_s": bound_s, "ratio_to_gemm_bound": epoch_s / bound_s,
        "epochs_in_14_min": 840.0 / epoch_s, "threads": torch.get_num_threads(),
    }
