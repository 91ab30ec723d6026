"""``nexus-sr benchmark``: speed and memory of Nexus-INR against trilinear interpolation.

For ONE whole output volume (default 240 x 240 x 160 at 1 mm, both contrasts) on this machine's
CPU it measures

* Nexus-INR whole-volume inference (:func:`~nexus_monai.engines.predict.predict_volumes`, i.e.
  intensity scaling + encode once + chunked decode with ``skip_empty``), split into the encoders,
  the two decoder MLPs and the rest (lookups, attention, SEL, positional encoding, empty test),
  and the number of query points actually decoded;
* trilinear interpolation of both contrasts onto the same grid (SimpleITK,
  :func:`~nexus_monai.baselines.interpolation.upsample`), the ratio and output voxels/s;
* memory: the process RSS before inference, the peak RSS during inference (the kernel's
  high-water mark is reset through ``/proc/self/clear_refs`` where allowed) and the peak RSS of
  the whole process;
* a matmul bound for the decoder: GEMM FLOP/s measured with ``torch.addmm`` at the decoder's
  own layer shapes (rows = the largest number of points decoded at once), the decoder FLOPs per
  point ``2 * sum(in * out)`` counted over the ``nn.Linear`` layers of both decoders (multiply-adds
  only: no bias, activation or any other part of the network), the time
  ``points * FLOPs/point / FLOP/s`` and how far the whole inference is from it;
* training steps/s at the bundle's default (CPU) setting: a random batch shaped like a training
  batch (``batch_size`` HR patches of ``patch_size``, T1 LR patch ``patch / (1, 1, 2)``, T2 LR
  patch ``patch / (1, 4, 1)``, ``num_points`` query points, affines, labels), the bundle's loss and
  Adam at its learning rate, the training step :class:`~nexus_monai.engines.inr.INRTrainStep`;
  2 warm-up steps are not timed.

Input subject: nilearn's MNI152 2009 T1 template (1 mm, skull-stripped, zero background; shipped
in the nilearn wheel, no download), cropped to its brain and zero-padded onto the output frame
(affine kept right by MONAI's ``ResizeWithPadOrCrop``). T1 LR = thick-slice acquisition z x 2,
T2 LR = y x 4 of a synthetic second contrast: the intensity-inverted T1 inside the brain mask
(``1.05 - T1`` where T1 > 0, 0 outside), which gives CSF-bright / WM-dark contrast and the same
zero background. Timing does not depend on the image content beyond that background.

Network: ``network_def`` of ``<bundle>/configs/train.yaml`` (+ ``--config`` overlays), with the
trained weights ``<bundle>/models/model.pt`` when present, otherwise a seeded random
initialisation (identical cost; the numbers are speed, not quality).

The hidden CLI option ``--size X Y Z`` (for tests) changes the output volume; the voxel size is
then the smallest whole number of mm at which the template brain fits that many voxels (1 mm for
the default 240 x 240 x 160, 7 mm for 32 x 32 x 24), by block averaging.
"""

from __future__ import annotations

import copy
import gc
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from nexus_monai.errors import NexusInputError

__all__ = [
    "DEFAULT_SIZE",
    "benchmark_inputs",
    "load_benchmark_network",
    "decoder_linears",
    "decoder_flops_per_point",
    "measure_gemm",
    "time_inference",
    "time_trilinear",
    "training_batch",
    "time_training",
    "machine_info",
    "run_benchmark",
    "format_report",
]

DEFAULT_SIZE = (240, 240, 160)
T1_ACQUISITION = ("z", 2)
T2_ACQUISITION = ("y", 4)
_GIB = 1024.0**3


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------


def benchmark_inputs(size: Sequence[int] = DEFAULT_SIZE) -> dict:
    """The subject: ``{"t1_lr", "t2_lr" (MetaTensors), "grid" (TargetGrid), "spacing_mm", "brain_voxels"}``.

    MNI152 2009 T1 template, cropped to the brain, block-averaged to an integer voxel size when the
    brain would not fit ``size`` voxels at 1 mm, zero-padded (symmetrically) to ``size`` voxels;
    T2 = ``1.05 - T1`` inside the brain mask. LR scans: T1 z x 2, T2 y x 4 (Gaussian profile).
    """
    from monai.data import MetaTensor
    from nilearn import datasets

    from nexus_monai.geometry import TargetGrid
    from nexus_monai.transforms.acquisition import SimulateAnisotropicAcquisition
    from nexus_monai.transforms.frame import PadToFramed

    size = tuple(int(s) for s in size)
    if len(size) != 3 or min(size) < 8:
        raise NexusInputError(None, f"--size needs 3 voxel counts of at least 8, got {list(size)}")
    img = datasets.load_mni152_template(resolution=1)
    arr = np.asarray(img.dataobj, dtype=np.float32)
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
    return {"t1_lr": t1_lr, "t2_lr": t2_lr, "grid": grid, "spacing_mm": float(s), "brain_voxels": int((t1_hr > 0).sum())}


# ----------------------------------------------------------------------------------------------
# network and bundle settings
# ----------------------------------------------------------------------------------------------


def load_benchmark_network(bundle: str | os.PathLike = "bundles/nexus_inr", overlays: Sequence[str] = (),
                           weights: str | os.PathLike | None = None, random_weights: bool = False, seed: int = 0) -> tuple[nn.Module, nn.Module, dict, str]:
    """``(network, loss, settings, weights description)`` from ``<bundle>/configs/train.yaml`` (+ overlays).

    ``settings``: ``patch_size``, ``num_points``, ``batch_size``, ``learning_rate``, ``config_files``.
    Weights: ``weights`` if given, else ``<bundle>/models/model.pt`` if present, else (or with
    ``random_weights``) a random initialisation seeded with ``seed``.
    """
    from nexus_monai.engines.predict import bundle_config, load_weights

    with bundle_config(bundle, "train.yaml", overlays) as (parser, root, files):
        torch.manual_seed(seed)
        network = parser.get_parsed_content("network_def")
        loss = parser.get_parsed_content("loss")
        settings = {k: parser.get_parsed_content(k) for k in ("patch_size", "num_points", "batch_size", "learning_rate")}
    settings = {
        "patch_size": [int(v) for v in settings["patch_size"]],
        "num_points": int(settings["num_points"]),
        "batch_size": int(settings["batch_size"]),
        "learning_rate": float(settings["learning_rate"]),
        "config_files": [_short_path(f) for f in files],
    }
    path = Path(weights) if weights is not None else root / "models" / "model.pt"
    if random_weights:
        described = f"random initialisation, seed {seed} (--random-weights; same cost as trained weights)"
    elif weights is not None or path.is_file():
        load_weights(network, path, "cpu")
        described = f"trained ({_short_path(path)})"
    else:
        described = f"random initialisation, seed {seed} (no {_short_path(path)}; same cost as trained weights)"
    return network.cpu().eval(), loss, settings, described


def _short_path(path) -> str:
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


# ----------------------------------------------------------------------------------------------
# machine and memory
# ----------------------------------------------------------------------------------------------


def machine_info() -> dict:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:
        available = os.cpu_count()
    return {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "cpus_available": available,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
    }


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _rss_gib() -> float:
    kib = _proc_status_kib("VmRSS")
    if kib is None:  # not Linux: fall back to the peak, the best number available
        return _ru_maxrss_gib()
    return kib * 1024.0 / _GIB


def _ru_maxrss_gib() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru / _GIB if sys.platform == "darwin" else ru * 1024.0 / _GIB  # bytes on macOS, KiB on Linux


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0, ``echo 5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------
# measurements
# ----------------------------------------------------------------------------------------------


class _InferenceProbe:
    """While active: times ``encode``, ``decode``, the decoder MLPs and the KD-Attn modules, and
    counts the points decoded (rows entering the T1 decoder; both decoders see the same points)."""

    def __init__(self, network: nn.Module):
        self.net = network.module if hasattr(network, "module") else network
        self.seconds = {"encode": 0.0, "decode": 0.0, "decoder_mlp": 0.0, "attention": 0.0}
        self.points = 0
        self.max_rows = 0
        self.calls = 0
        self._start: dict[int, float] = {}
        self._handles: list = []
        self._wrapped: list[str] = []

    def _timed_module(self, module: nn.Module, key: str, count_points: bool = False) -> None:
        def pre(mod, inputs):
            if count_points:
                x = inputs[0]
                rows = x.numel() // max(x.shape[-1], 1)
                self.points += rows
                self.max_rows = max(self.max_rows, rows)
                self.calls += 1
            self._start[id(mod)] = time.perf_counter()

        def post(mod, inputs, output):
            self.seconds[key] += time.perf_counter() - self._start.pop(id(mod))

        self._handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def _timed_method(self, name: str) -> None:
        method = getattr(self.net, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = method(*args, **kwargs)
            self.seconds[name] += time.perf_counter() - t0
            return out

        setattr(self.net, name, timed)  # an instance attribute over the method, removed on exit
        self._wrapped.append(name)

    def __enter__(self) -> "_InferenceProbe":
        for name, dec in self.net.decoders.items():
            self._timed_module(dec, "decoder_mlp", count_points=name == next(iter(self.net.decoders)))
        for name in ("attn_t2", "attn_t1"):
            if isinstance(getattr(self.net, name, None), nn.Module):
                self._timed_module(getattr(self.net, name), "attention")
        self._timed_method("encode")
        self._timed_method("decode")
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for name in self._wrapped:
            delattr(self.net, name)
        self._wrapped.clear()


def _warm_up(network: nn.Module) -> None:
    """One small forward pass (kernels, thread pools, allocator) before anything is timed."""
    from nexus_monai.geometry import thick_slice_affine

    hr = torch.eye(4, dtype=torch.float64)
    batch = {
        "t1": torch.rand(1, 1, 12, 12, 6), "t2": torch.rand(1, 1, 12, 3, 12),
        "t1_affine": thick_slice_affine(hr, T1_ACQUISITION[0], T1_ACQUISITION[1])[None],
        "t2_affine": thick_slice_affine(hr, T2_ACQUISITION[0], T2_ACQUISITION[1])[None],
        "query_world": torch.rand(1, 256, 3) * 11, "query_norm": torch.rand(1, 256, 3) * 2 - 1,
    }
    with torch.no_grad():
        network.eval()(**batch, aux=False)


def time_inference(network: nn.Module, inputs: Mapping, chunk_size: int = 32768) -> dict:
    """Whole-volume Nexus-INR inference on ``inputs["grid"]``, with its breakdown and memory."""
    from nexus_monai.engines.inr import ImplicitGridInferer
    from nexus_monai.engines.predict import predict_volumes

    grid = inputs["grid"]
    inferer = ImplicitGridInferer(chunk_size=chunk_size, progress=False, skip_empty=True)
    _warm_up(network)
    gc.collect()
    rss_before = _rss_gib()
    peak_before = _ru_maxrss_gib()
    exact = _reset_peak_rss()
    with _InferenceProbe(network) as probe:
        t0 = time.perf_counter()
        pred = predict_volumes(network, inputs["t1_lr"], inputs["t2_lr"], grid, inferer)
        seconds = time.perf_counter() - t0
    hwm = _proc_status_kib("VmHWM")
    peak_inference = hwm * 1024.0 / _GIB if hwm is not None else _ru_maxrss_gib()
    if tuple(pred["t1"].shape[1:]) != grid.shape or not all(bool(torch.isfinite(pred[c]).all()) for c in pred):
        raise RuntimeError("inference produced a wrong shape or non-finite values")
    del pred
    gc.collect()
    voxels = grid.num_voxels
    return {
        "output_shape": list(grid.shape),
        "output_voxels": voxels,
        "chunk_size": int(chunk_size),
        "nexus_s": seconds,
        "encode_s": probe.seconds["encode"],
        "decode_s": probe.seconds["decode"],
        "decoder_mlp_s": probe.seconds["decoder_mlp"],
        "attention_s": probe.seconds["attention"],
        "outside_network_s": seconds - probe.seconds["encode"] - probe.seconds["decode"],
        "decoded_points": int(probe.points),
        "decoder_calls": int(probe.calls),
        "max_points_per_call": int(probe.max_rows),
        "decoded_fraction": probe.points / voxels,
        "voxels_per_s": voxels / seconds,
        "decoded_points_per_s": probe.points / seconds,
        "rss_before_inference_gib": rss_before,
        "rss_peak_inference_gib": peak_inference,
        "rss_peak_inference_exact": exact,  # False: VmHWM could not be reset, the value is the peak so far
        "rss_increase_inference_gib": peak_inference - rss_before,
        "_ru_maxrss_before_reset_gib": peak_before,
    }


def time_trilinear(inputs: Mapping) -> dict:
    """Trilinear (SimpleITK) upsampling of both LR scans onto ``inputs["grid"]``."""
    from nexus_monai.baselines.interpolation import upsample

    t0 = time.perf_counter()
    outs = [upsample(inputs[k], inputs["grid"], "trilinear") for k in ("t1_lr", "t2_lr")]
    seconds = time.perf_counter() - t0
    if any(tuple(o.shape[1:]) != inputs["grid"].shape for o in outs):
        raise RuntimeError("trilinear output has a wrong shape")
    del outs
    return {"trilinear_s": seconds}


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    fn()
    once = time.perf_counter() - t0
    inner = max(1, int(0.02 / max(once, 1e-9)))  # each repeat lasts >= ~20 ms
    best = math.inf
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def measure_gemm(network: nn.Module, rows: int, repeats: int = 5, seed: int = 0) -> dict:
    """GEMM FLOP/s with ``torch.addmm`` at the decoders' layer shapes ``(rows, in) x (in, out)``.

    ``gemm_flops_per_s``: all the decoders' layers in sequence (sum of FLOPs / sum of best times),
    the rate the bound uses; ``gemm_hidden_flops_per_s``: the ``(rows, hidden) x (hidden, hidden)``
    product alone (the most efficient shape).
    """
    rows = max(1, int(rows))
    gen = torch.Generator().manual_seed(seed)
    best: dict[tuple[int, int], float] = {}
    for layer in decoder_linears(network):
        shape = (layer.in_features, layer.out_features)
        if shape in best:
            continue
        x = torch.randn(rows, shape[0], generator=gen)
        w = torch.randn(shape[1], shape[0], generator=gen)
        b = torch.randn(shape[1], generator=gen)
        with torch.no_grad():
            best[shape] = _best_seconds(lambda: torch.addmm(b, x, w.t()), repeats)
    layers = [(m.in_features, m.out_features) for m in decoder_linears(network)]
    flops = sum(2 * rows * i * o for i, o in layers)
    seconds = sum(best[s] for s in layers)
    square = max(best, key=lambda s: s[0] * s[1])  # the hidden x hidden shape (largest weight)
    return {
        "gemm_rows": rows,
        "gemm_shapes": [f"({rows},{i})x({i},{o})" for i, o in best],
        "gemm_flops_per_s": flops / seconds,
        "gemm_hidden_shape": f"({rows},{square[0]})x({square[0]},{square[1]})",
        "gemm_hidden_flops_per_s": 2 * rows * square[0] * square[1] / best[square],
    }


def training_batch(batch_size: int, patch_size: Sequence[int], num_points: int, seed: int = 0) -> dict:
    """A random collated batch shaped like the bundle's training batches (1 mm HR patches)."""
    from monai.data import MetaTensor

    from nexus_monai.geometry import WorldNormalizer, make_affine, parse_axis, thick_slice_affine, voxel_to_world
    from nexus_monai.transforms.acquisition import num_thick_slices

    gen = torch.Generator().manual_seed(seed)
    patch = [int(p) for p in patch_size]
    hr_affine = make_affine((1.0, 1.0, 1.0), (-20.0, -30.0, -10.0))
    lr = {}
    for key, (axis, factor) in (("t1_lr", T1_ACQUISITION), ("t2_lr", T2_ACQUISITION)):
        shape = list(patch)
        a = parse_axis(axis)
        shape[a] = num_thick_slices(patch[a], factor)
        lr[key] = MetaTensor(torch.rand(batch_size, 1, *shape, generator=gen), affine=thick_slice_affine(hr_affine, axis, factor))
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


def time_training(network: nn.Module, loss: nn.Module, batch_size: int, patch_size: Sequence[int], num_points: int,
                  learning_rate: float, steps: int = 20, warmup: int = 2, seed: int = 0) -> dict:
    """Training steps/s (forward, every loss term, backward, Adam step) on a copy of ``network``."""
    from nexus_monai.engines.inr import INRTrainStep

    net = copy.deepcopy(network).cpu().train()
    engine = SimpleNamespace(network=net, optimizer=torch.optim.Adam(net.parameters(), lr=learning_rate),
                             loss_function=loss, state=SimpleNamespace(device=torch.device("cpu")),
                             fire_event=lambda event: None)  # no handlers to notify outside a trainer
    batch = training_batch(batch_size, patch_size, num_points, seed)
    step = INRTrainStep()
    for _ in range(warmup):
        step(engine, batch)
    t0 = time.perf_counter()
    last = {}
    for _ in range(steps):
        last = step(engine, batch)
    seconds = time.perf_counter() - t0
    if steps and not math.isfinite(last["loss"]):
        raise RuntimeError("training loss is not finite")
    return {
        "train_steps": int(steps),
        "train_warmup_steps": int(warmup),
        "train_s": seconds,
        "train_steps_per_s": steps / seconds if seconds > 0 else float("nan"),
        "train_batch_size": int(batch_size),
        "train_patch_size": [int(p) for p in patch_size],
        "train_t1_lr_patch": list(batch["t1_lr"].shape[-3:]),
        "train_t2_lr_patch": list(batch["t2_lr"].shape[-3:]),
        "train_num_points": int(num_points),
        "train_learning_rate": float(learning_rate),
        "train_loss_terms": sorted(k[5:] for k in last if k.startswith("loss_")),
    }


# ----------------------------------------------------------------------------------------------
# the whole benchmark
# ----------------------------------------------------------------------------------------------


def run_benchmark(bundle: str | os.PathLike = "bundles/nexus_inr", overlays: Sequence[str] = (),
                  weights: str | os.PathLike | None = None, random_weights: bool = False, size: Sequence[int] = DEFAULT_SIZE,
                  chunk_size: int = 32768, threads: int = 0, train_steps: int = 20, skip_train: bool = False,
                  network: nn.Module | None = None, loss: nn.Module | None = None, settings: Mapping | None = None,
                  gemm_repeats: int = 5, log: Callable[[str], None] | None = None) -> dict:
    """Every measurement of the module docstring; a flat JSON-serialisable dict.

    ``network`` / ``loss`` / ``settings`` replace the bundle's (tests use a tiny network);
    ``settings`` then needs ``patch_size``, ``num_points``, ``batch_size``, ``learning_rate``.
    """
    log = log or (lambda msg: None)
    if chunk_size < 1:
        raise NexusInputError(None, f"--chunk-size must be >= 1, got {chunk_size}")
    if train_steps < 1 and not skip_train:
        raise NexusInputError(None, f"--train-steps must be >= 1, got {train_steps}")
    if threads:
        torch.set_num_threads(int(threads))
    result: dict = {"machine": machine_info()}
    if network is None:
        network, bundle_loss, bundle_settings, weights_desc = load_benchmark_network(bundle, overlays, weights, random_weights)
        loss = loss if loss is not None else bundle_loss
        settings = {**bundle_settings, **(settings or {})}
    else:
        weights_desc = "given network"
        settings = dict(settings or {})
        settings.setdefault("config_files", [])
    network = network.cpu().eval()
    log(f"inputs: MNI152 template on a {'x'.join(str(s) for s in size)} grid")
    inputs = benchmark_inputs(size)
    gc.collect()
    result.update({
        "input": "nilearn MNI152 2009 T1 template (skull-stripped, zero background); T2 = 1.05 - T1 inside the brain mask",
        "spacing_mm": inputs["spacing_mm"],
        "brain_voxels": inputs["brain_voxels"],
        "t1_lr_shape": list(inputs["t1_lr"].shape[1:]),
        "t2_lr_shape": list(inputs["t2_lr"].shape[1:]),
        "t1_acquisition": f"{T1_ACQUISITION[0]} x {T1_ACQUISITION[1]}",
        "t2_acquisition": f"{T2_ACQUISITION[0]} x {T2_ACQUISITION[1]}",
        "network": describe_network(network),
        "network_params": int(sum(p.numel() for p in network.parameters())),
        "weights": weights_desc,
        "config_files": list(settings.get("config_files", [])),
        "device": "cpu",
    })
    log("inference: Nexus-INR, whole volume")
    inf = time_inference(network, inputs, chunk_size)
    peak_before_reset = inf.pop("_ru_maxrss_before_reset_gib")
    result.update(inf)
    log("inference: trilinear")
    result.update(time_trilinear(inputs))
    result["ratio_nexus_to_trilinear"] = result["nexus_s"] / result["trilinear_s"]
    del inputs
    gc.collect()
    log("GEMM FLOP/s at the decoder shapes")
    result.update(measure_gemm(network, result["max_points_per_call"] or chunk_size, gemm_repeats))
    result["decoder_flops_per_point"] = decoder_flops_per_point(network)
    result["matmul_bound_s"] = result["decoded_points"] * result["decoder_flops_per_point"] / result["gemm_flops_per_s"]
    bound = result["matmul_bound_s"]
    result["ratio_nexus_to_matmul_bound"] = result["nexus_s"] / bound if bound > 0 else float("nan")
    result["ratio_decoder_mlp_to_matmul_bound"] = result["decoder_mlp_s"] / bound if bound > 0 else float("nan")
    if skip_train:
        result.update({"train_steps": 0, "train_steps_per_s": None})
    else:
        log(f"training: {train_steps} steps at batch {settings['batch_size']}, patch {settings['patch_size']}, {settings['num_points']} points")
        if loss is None:
            from nexus_monai.losses import NexusINRLoss

            loss = NexusINRLoss()
        result.update(time_training(network, loss, settings["batch_size"], settings["patch_size"], settings["num_points"],
                                    settings["learning_rate"], steps=train_steps))
    result["rss_peak_process_gib"] = max(peak_before_reset, _ru_maxrss_gib())
    result["machine"]["torch_threads"] = torch.get_num_threads()
    return result


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:.2f} {unit}"


def format_report(r: Mapping) -> str:
    """The human-readable table printed by ``nexus-sr benchmark``."""
    m = r["machine"]
    shape = "x".join(str(s) for s in r["output_shape"])
    sp = r["spacing_mm"]
    rows: list[tuple[str, str] | str] = []
    add = rows.append
    add(f"Nexus-INR benchmark: one {shape} output volume ({sp:g} mm, both contrasts), {r['device']}")
    add(f"machine  : {m['cpu_model']}, {m['cpus_available']} CPUs available (os.cpu_count {m['cpu_count']}), "
        f"torch {m['torch_version']} with {m['torch_threads']} threads (OMP_WAIT_POLICY {m['omp_wait_policy']}), "
        f"Python {m['python_version']}")
    if m.get("load_average_1min") is not None:
        add(f"           load average at start {m['load_average_1min']:.2f} (other processes share these CPUs: "
            f"{m['load_average_1min']:.1f} busy of {m['cpus_available']})")
    add(f"input    : {r['input']}")
    add(f"           T1 LR {r['t1_acquisition']} {tuple(r['t1_lr_shape'])}, T2 LR {r['t2_acquisition']} {tuple(r['t2_lr_shape'])}, "
        f"target grid {tuple(r['output_shape'])}, brain {r['brain_voxels']:,} voxels")
    add(f"network  : {r['network']}")
    add(f"weights  : {r['weights']}")
    if r.get("config_files"):
        add(f"config   : {' + '.join(r['config_files'])}")
    add("")
    v = r["output_voxels"]
    add(("inference, whole volume", ""))
    add(("  Nexus-INR (predict_volumes: encode + decode)", f"{r['nexus_s']:.2f} s"))
    add(("    encode: encoders on the LR grids + KD-Attn keys", f"{r['encode_s']:.2f} s"))
    add(("    decode: all chunks (network.decode)", f"{r['decode_s']:.2f} s"))
    add(("      decoder MLPs (both contrasts)", f"{r['decoder_mlp_s']:.2f} s"))
    add(("      KD-Attn (local-window cross-attention)", f"{r['attention_s']:.2f} s"))
    add(("      rest: feature lookups, MMF/SEL MLPs, PE, concatenations",
         f"{r['decode_s'] - r['decoder_mlp_s'] - r['attention_s']:.2f} s"))
    add(("    outside the network: coordinates, empty test, scaling, output", f"{r['outside_network_s']:.2f} s"))
    add(("  points decoded (skip_empty)", f"{r['decoded_points']:,} of {v:,} ({100 * r['decoded_fraction']:.1f} %), "
                                          f"{r['decoder_calls']} chunks of <= {r['chunk_size']:,}"))
    add(("  trilinear, both contrasts (SimpleITK)", f"{r['trilinear_s']:.2f} s"))
    add(("  ratio Nexus-INR / trilinear", f"{r['ratio_nexus_to_trilinear']:.1f} x"))
    add(("  output voxels/s, Nexus-INR", f"{_si(r['voxels_per_s'], 'voxel/s')} ({_si(r['decoded_points_per_s'], 'point/s')} decoded)"))
    add(("  output voxels/s, trilinear", _si(v / r["trilinear_s"], "voxel/s")))
    add(("memory (RSS)", ""))
    add(("  before inference (inputs + network loaded)", f"{r['rss_before_inference_gib']:.2f} GiB"))
    exact = "" if r["rss_peak_inference_exact"] else " (VmHWM not resettable: peak so far)"
    add(("  peak during inference", f"{r['rss_peak_inference_gib']:.2f} GiB (+{r['rss_increase_inference_gib']:.2f} GiB){exact}"))
    add(("  peak of the process (ru_maxrss)", f"{r['rss_peak_process_gib']:.2f} GiB"))
    add(("decoder matmul bound", ""))
    add((f"  GEMM FLOP/s, addmm at the decoder shapes ({r['gemm_rows']:,} rows)", _si(r["gemm_flops_per_s"], "FLOP/s")))
    add((f"  GEMM FLOP/s, {r['gemm_hidden_shape']} alone", _si(r["gemm_hidden_flops_per_s"], "FLOP/s")))
    add(("  decoder FLOPs/point (2 * sum in*out, both decoders)", f"{r['decoder_flops_per_point']:,}"))
    add(("  matmul-bound decoder time (points * FLOPs / FLOP/s)", f"{r['matmul_bound_s']:.2f} s"))
    add(("  whole inference / matmul bound", f"{r['ratio_nexus_to_matmul_bound']:.1f} x"))
    add(("  decoder MLPs measured / matmul bound", f"{r['ratio_decoder_mlp_to_matmul_bound']:.2f} x"))
    if r.get("train_steps_per_s") is None:
        add(("training", "skipped (--skip-train)"))
    else:
        p = "x".join(str(s) for s in r["train_patch_size"])
        add((f"training at the bundle setting (batch {r['train_batch_size']}, patch {p}, {r['train_num_points']:,} points)", ""))
        add(("  steps/s (forward + all losses + backward + Adam)",
             f"{r['train_steps_per_s']:.3f} ({r['train_s'] / r['train_steps']:.2f} s/step, "
             f"{r['train_steps']} steps after {r['train_warmup_steps']} warm-up)"))
        add(("  loss terms", ", ".join(r["train_loss_terms"])))
    width = max(len(row[0]) for row in rows if isinstance(row, tuple)) + 2
    lines = [row if isinstance(row, str) else (row[0].ljust(width) + row[1]).rstrip() for row in rows]
    return "\n".join(lines)
