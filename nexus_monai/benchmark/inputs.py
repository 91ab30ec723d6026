"""Benchmark inputs: the MNI152 subject on the output grid, the bundle's network and settings, training batches.

Input subject: nilearn's MNI152 2009 T1 template (1 mm, skull-stripped, zero background; shipped
in the nilearn wheel, no download), cropped to its brain and zero-padded onto the output frame.
T1 LR = thick-slice acquisition z x 2, T2 LR = y x 4 of a synthetic second contrast: the
intensity-inverted T1 inside the brain mask (``1.05 - T1`` where T1 > 0, 0 outside).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from torch import nn

from nexus_monai.engines.predict import bundle_config, load_weights
from nexus_monai.errors import NexusInputError
from nexus_monai.geometry import (
    TargetGrid,
    WorldNormalizer,
    make_affine,
    parse_axis,
    thick_slice_affine,
    voxel_to_world,
)
from nexus_monai.transforms.acquisition import SimulateAnisotropicAcquisition, num_thick_slices
from nexus_monai.transforms.frame import PadToFramed

__all__ = ["DEFAULT_SIZE", "T1_ACQUISITION", "T2_ACQUISITION", "benchmark_inputs", "load_benchmark_network",
           "decoder_linears", "decoder_flops_per_point", "describe_network", "training_batch", "short_path"]

DEFAULT_SIZE = (240, 240, 160)
T1_ACQUISITION = ("z", 2)
T2_ACQUISITION = ("y", 4)


def _mni152_t1():
    """The MNI152 2009 T1 template at 1 mm scaled to [0, 1], as nilearn's ``load_mni152_template`` gives it;
    where nilearn is not installed (an offline GPU server), the same file read with nibabel from the path in
    ``NEXUS_MNI152_T1`` (nilearn's ``mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz``)."""
    try:
        from nilearn import datasets
    except ImportError:
        import nibabel as nib

        path = os.environ.get("NEXUS_MNI152_T1")
        if not path or not os.path.isfile(path):
            raise NexusInputError(path, "nilearn is not installed: set NEXUS_MNI152_T1 to nilearn's "
                                        "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz") from None
        img = nib.load(path)
        arr = np.asarray(img.dataobj, dtype=np.float32)
        return img, arr / arr.max()
    img = datasets.load_mni152_template(resolution=1)
    return img, np.asarray(img.dataobj, dtype=np.float32)


def benchmark_inputs(size: Sequence[int] = DEFAULT_SIZE) -> dict:
    """The subject: ``{"t1_lr", "t2_lr" (MetaTensors), "grid" (TargetGrid), "spacing_mm", "brain_voxels"}``.

    MNI152 2009 T1 template, cropped to the brain, block-averaged to an integer voxel size when the
    brain would not fit ``size`` voxels at 1 mm, zero-padded (symmetrically) to ``size`` voxels;
    T2 = ``1.05 - T1`` inside the brain mask. LR scans: T1 z x 2, T2 y x 4 (Gaussian profile).
    """
    size = tuple(int(s) for s in size)
    if len(size) != 3 or min(size) < 8:
        raise NexusInputError(None, f"--size needs 3 voxel counts of at least 8, got {list(size)}")
    img, arr = _mni152_t1()
    affine = torch.as_tensor(np.asarray(img.affine, dtype=np.float64))
    nz = np.nonzero(arr > 0)
    lo = np.array([int(a.min()) for a in nz])
    hi = np.array([int(a.max()) + 1 for a in nz])
    arr = arr[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    shift = torch.eye(4, dtype=torch.float64)
    shift[:3, 3] = torch.as_tensor(lo, dtype=torch.float64)
    affine = affine @ shift  # voxel 0 of the crop is voxel `lo` of the template
    s = max(1, max(math.ceil(e / n) for e, n in zip(arr.shape, size)))
    t1 = torch.from_numpy(np.ascontiguousarray(arr))[None]
    if s > 1:  # block average s x s x s (zero-padded to a multiple of s), voxel centres follow
        pad = [(-n) % s for n in arr.shape]
        t1 = torch.nn.functional.pad(t1, (0, pad[2], 0, pad[1], 0, pad[0]))
        t1 = torch.nn.functional.avg_pool3d(t1[None], s)[0]
        block = torch.eye(4, dtype=torch.float64)
        block[:3, :3] *= s
        block[:3, 3] = (s - 1) / 2.0
        affine = affine @ block
    mask = t1 > 0
    t2 = torch.where(mask, 1.05 - t1, torch.zeros_like(t1))
    framed = PadToFramed(["t1", "t2"], frame_mm=[n * s for n in size])(
        {"t1": MetaTensor(t1, affine=affine.clone()), "t2": MetaTensor(t2, affine=affine.clone())}
    )
    t1_hr, t2_hr = framed["t1"], framed["t2"]
    if tuple(t1_hr.shape[1:]) != size:
        raise RuntimeError(f"framing gave {tuple(t1_hr.shape[1:])}, expected {size}")
    grid = TargetGrid(size, t1_hr.affine)
    t1_lr = SimulateAnisotropicAcquisition(*T1_ACQUISITION)(t1_hr)
    t2_lr = SimulateAnisotropicAcquisition(*T2_ACQUISITION)(t2_hr)
    return {"t1_lr": t1_lr, "t2_lr": t2_lr, "grid": grid, "spacing_mm": float(s),
            "brain_voxels": int((t1_hr > 0).sum())}


def load_benchmark_network(bundle: str | os.PathLike = "bundles/nexus_inr", overlays: Sequence[str] = (),
                           weights: str | os.PathLike | None = None, random_weights: bool = False,
                           seed: int = 0) -> tuple[nn.Module, nn.Module, dict, str]:
    """``(network, loss, settings, weights description)`` from ``<bundle>/configs/train.yaml`` (+ overlays).

    ``settings``: ``patch_size``, ``num_points``, ``batch_size``, ``learning_rate``, ``config_files``.
    Weights: ``weights`` if given, else ``<bundle>/models/model.pt`` if present, else (or with
    ``random_weights``) a random initialisation seeded with ``seed``.
    """
    with bundle_config(bundle, "train.yaml", overlays) as (parser, root, files):
        torch.manual_seed(seed)
        network = parser.get_parsed_content("network_def")
        loss = parser.get_parsed_content("loss")
        settings = {
            k: parser.get_parsed_content(k) for k in ("patch_size", "num_points", "batch_size", "learning_rate")
        }
    settings = {
        "patch_size": [int(v) for v in settings["patch_size"]],
        "num_points": int(settings["num_points"]),
        "batch_size": int(settings["batch_size"]),
        "learning_rate": float(settings["learning_rate"]),
        "config_files": [short_path(f) for f in files],
    }
    path = Path(weights) if weights is not None else root / "models" / "model.pt"
    if random_weights:
        described = f"random initialisation, seed {seed} (--random-weights; same cost as trained weights)"
    elif weights is not None or path.is_file():
        load_weights(network, path, "cpu")
        described = f"trained ({short_path(path)})"
    else:
        described = f"random initialisation, seed {seed} (no {short_path(path)}; same cost as trained weights)"
    return network.cpu().eval(), loss, settings, described


def short_path(path) -> str:
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def decoder_linears(network: nn.Module) -> list[nn.Linear]:
    """Every ``nn.Linear`` of both per-modality decoders (``network.decoders``), in call order."""
    net = network.module if hasattr(network, "module") else network
    return [m for dec in net.decoders.values() for m in dec.modules() if isinstance(m, nn.Linear)]


def decoder_flops_per_point(network: nn.Module) -> int:
    """``2 * sum(in * out)`` over the decoders' Linear layers: matmul FLOPs to decode one point (both contrasts)."""
    return int(sum(2 * m.in_features * m.out_features for m in decoder_linears(network)))


def describe_network(network: nn.Module) -> str:
    net = network.module if hasattr(network, "module") else network
    params = sum(p.numel() for p in net.parameters())
    dec = next(iter(net.decoders.values()))
    widths = [m.in_features for m in dec.modules() if isinstance(m, nn.Linear)][:1]
    widths += [m.out_features for m in dec.modules() if isinstance(m, nn.Linear)]
    encoder = type(next(iter(net.encoders.values()))).__name__ if hasattr(net, "encoders") else "?"
    return (f"{type(net).__name__}: {len(getattr(net, 'encoders', {}))} x {encoder} encoders, "
            f"C={getattr(net, 'features', '?')}, decoders 2 x {type(dec).__name__} "
            f"[{'-'.join(str(w) for w in widths)}], {params / 1e6:.3f} M parameters")


def training_batch(batch_size: int, patch_size: Sequence[int], num_points: int, seed: int = 0) -> dict:
    """A random collated batch shaped like the bundle's training batches (1 mm HR patches)."""
    gen = torch.Generator().manual_seed(seed)
    patch = [int(p) for p in patch_size]
    hr_affine = make_affine((1.0, 1.0, 1.0), (-20.0, -30.0, -10.0))
    lr = {}
    for key, (axis, factor) in (("t1_lr", T1_ACQUISITION), ("t2_lr", T2_ACQUISITION)):
        shape = list(patch)
        a = parse_axis(axis)
        shape[a] = num_thick_slices(patch[a], factor)
        lr[key] = MetaTensor(torch.rand(batch_size, 1, *shape, generator=gen),
                             affine=thick_slice_affine(hr_affine, axis, factor))
    index = torch.stack([torch.randint(0, p, (batch_size, num_points), generator=gen) for p in patch], dim=-1)
    world = voxel_to_world(index.to(torch.float64), hr_affine)
    norm = WorldNormalizer.from_grids([(lr[k].shape[-3:], lr[k].affine) for k in lr])
    labels = torch.tensor([0, 1, 2, 4])[torch.randint(0, 4, (batch_size, num_points), generator=gen)]
    return {
        **lr,
        "query_world": world.float(),
        "query_norm": norm(world).float(),
        "query_t1": torch.rand(batch_size, num_points, 1, generator=gen),
        "query_t2": torch.rand(batch_size, num_points, 1, generator=gen),
        "query_label": labels,
    }
