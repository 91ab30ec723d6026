"""Ignite/MONAI engine pieces for implicit multi-contrast SR networks (Nexus-INR and peers).

* :func:`inr_inputs` -- a collated training batch -> the network's keyword inputs (LR volumes,
  their ``(B, 4, 4)`` affines, query points) and targets.
* :class:`INRTrainStep` -- ``iteration_update`` for MONAI's ``SupervisedTrainer``: forward,
  every loss term, backward, step. ``engine.state.output``: ``{"subject", "loss", "loss_<term>"}``.
* :class:`ImplicitGridInferer` -- a MONAI ``Inferer``: both LR scans of ONE subject -> both
  contrasts on any :class:`~nexus_monai.geometry.TargetGrid`, encoding once and decoding in
  chunks of ``chunk_size`` points (peak memory bounded whatever the output size).
* :class:`INRValidationStep` -- ``iteration_update`` for ``SupervisedEvaluator``: predicts each
  validation subject on its HR grid and puts prediction, trilinear and ground truth in the output.
* :class:`SubjectImageMetric` -- ignite metric: mean over subjects of one column of
  :func:`~nexus_monai.metrics.subject_metric_row` (the same metric code as the tables).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from ignite.metrics import Metric
from monai.data import MetaTensor
from monai.engines.utils import IterationEvents
from monai.inferers import Inferer
from tqdm.auto import tqdm

from nexus_monai.engines.amp import amp_autocast
from nexus_monai.engines.tiled import AUTO, MAX_HALO_OVERHEAD, tiled_decode
from nexus_monai.geometry import TargetGrid, WorldNormalizer, as_affine, batched_affine, plain_tensor, sample_at_world
from nexus_monai.keys import CONTRASTS, LESIONS, QUERY_LABEL, QUERY_LESION, QUERY_NORM, QUERY_WORLD, lr_key, query_key
from nexus_monai.metrics.image_quality import as_mask, erode_mask, intensity_scale, psnr, ssim3d
from nexus_monai.metrics.lesion import lesion_fidelity_row
from nexus_monai.metrics.subject_row import ERODE_VOXELS, SCALE_PERCENTILE, SSIM_SIGMA, SSIM_WIN_SIZE
from nexus_monai.networks.encoders import channels_last_convs
from nexus_monai.transforms.intensity import INTENSITY_NORMS
from nexus_monai.transforms.query import iter_query_chunks

__all__ = ["inr_inputs", "backward_and_step",
           "INRTrainStep", "ImplicitGridInferer", "INRValidationStep", "SubjectImageMetric", "CONTRASTS",
           "unnormalise", "normalised_zero"]


def inr_inputs(batch: Mapping, device: torch.device | str = "cpu") -> tuple[dict, dict]:
    """``(network kwargs, targets)`` from a collated batch of paired patches and query points."""
    b = batch[lr_key("t1")].shape[0]
    kwargs = {}
    for c in CONTRASTS:
        kwargs[c] = plain_tensor(batch[lr_key(c)]).float().to(device)
        kwargs[f"{c}_affine"] = batched_affine(batch[lr_key(c)], b).to(device)
    kwargs[QUERY_WORLD] = plain_tensor(batch[QUERY_WORLD]).float().to(device)
    kwargs[QUERY_NORM] = plain_tensor(batch[QUERY_NORM]).float().to(device)
    targets = {f"target_{c}": plain_tensor(batch[query_key(c)])[..., 0].float().to(device) for c in CONTRASTS}
    if QUERY_LABEL in batch:
        targets["label"] = plain_tensor(batch[QUERY_LABEL]).to(device)
    if QUERY_LESION in batch:  # lesion-aware training only (the loss's lesion weights); never at inference
        targets["lesion"] = plain_tensor(batch[QUERY_LESION]).to(device)
    return kwargs, targets



def backward_and_step(engine, terms: dict, grad_clip: float | None) -> None:
    """Fire LOSS_COMPLETED, back-propagate ``terms["loss"]``, fire BACKWARD_COMPLETED, clip (if set) and step."""
    engine.fire_event(IterationEvents.LOSS_COMPLETED)
    terms["loss"].backward()
    engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(engine.network.parameters(), grad_clip)
    engine.optimizer.step()

class INRTrainStep:
    """``SupervisedTrainer(iteration_update=INRTrainStep())``: one optimisation step on a batch.

    ``amp``: the network's parts under bf16 autocast (:func:`~nexus_monai.engines.amp.amp_autocast`;
    coordinates, lookups and the loss in fp32, fp32 master weights, no loss scaling).
    ``channels_last``: the encoders' convolutions in channels-last layout
    (:func:`~nexus_monai.networks.encoders.channels_last_convs`; a switch for GPUs, off by default).
    """

    def __init__(self, grad_clip: float | None = None, amp: bool = False, channels_last: bool = False):
        self.grad_clip = grad_clip
        self.amp = bool(amp)
        self.channels_last = bool(channels_last)

    def __call__(self, engine, batch: Mapping) -> dict:
        engine.network.train()
        device = engine.state.device if hasattr(engine.state, "device") else engine.device
        kwargs, targets = inr_inputs(batch, device)
        engine.optimizer.zero_grad(set_to_none=True)
        with amp_autocast(engine.network, self.amp, device), channels_last_convs(self.channels_last):
            out = engine.network(**kwargs, aux=True)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        terms = engine.loss_function(out, **targets)
        backward_and_step(engine, terms, self.grad_clip)
        b = kwargs["t1"].shape[0]
        subject = batch.get("subject", list(range(b)))
        # A per-item key makes MONAI's decollation turn the output into one dict per item with the
        # scalar losses replicated (its usual shape), so from_engine(["loss"], first=True) works.
        engine.state.output = {"subject": list(subject) if isinstance(subject, (list, tuple)) else [subject] * b,
                               "loss": float(terms["loss"].detach()),
                               **{f"loss_{k}": float(v.detach()) for k, v in terms.items() if k != "loss"}}
        engine.fire_event(IterationEvents.MODEL_COMPLETED)  # MONAI's decollation / postprocessing hook
        return engine.state.output


class ImplicitGridInferer(Inferer):
    """Both contrasts of one subject on a target grid, decoded in bounded chunks.

    ``inferer(t1_lr, t2_lr, network, grid, normalizer=None)``:
        ``t1_lr`` / ``t2_lr``: ``(1, x, y, z)`` or ``(1, 1, x, y, z)`` MetaTensors in the network's
        intensity space, each with its own affine. ``grid``: a ``TargetGrid``. ``normalizer``:
        the subject's ``WorldNormalizer`` (default: from the two LR grids, as in training).
        Returns ``{"t1": (X, Y, Z), "t2": (X, Y, Z)}`` float32 CPU tensors.

    With ``skip_empty`` (default) points where BOTH LR scans interpolate to exactly their
    ``background`` value (default 0; no signal within one LR voxel: the zero background of
    skull-stripped data, or its image under the intensity normalisation) are not decoded and get
    that contrast's background value; data with another background is decoded everywhere.

    Memory: with ``max_memory_gib`` or an explicit ``tile_shape`` (output voxels), the encoders run
    on halo crops of the LR grids per output tile (:mod:`nexus_monai.engines.tiled`; equal to the
    whole-volume result up to float rounding, tiles without a point to decode skipped,
    channels-last convolutions with ``channels_last``); both ``None``: encoders on the whole
    volumes. ``max_memory_gib``: a number (GiB; on CPU the target peak RSS of the process, on CUDA
    the device memory the call may use) is honoured; ``"auto"`` (default) sizes it for the device
    (:func:`~nexus_monai.engines.tiled.memory_budget`: on CUDA the free device memory, on CPU
    ``DEFAULT_MAX_MEMORY_GIB`` grown up to a fraction of the available memory). The halo overhead
    (encoder voxels computed / untiled) is kept within ``max_halo_overhead`` or one warning line
    says so. ``last_plan`` records the tiling of the last call.

    ``amp``: the network's parts under bf16 autocast (:func:`~nexus_monai.engines.amp.amp_autocast`:
    lookups, coordinates and the outputs in fp32).

    ``intensity_norm`` (``"percentile"`` | ``"zscore"``) names the intensity space the network
    was trained in (:func:`~nexus_monai.transforms.intensity_normalizer`);
    :func:`~nexus_monai.engines.predict.predict_volumes` maps raw scans into it and back.
    """

    def __init__(self, chunk_size: int = 32768, progress: bool = False, skip_empty: bool = True,
                 intensity_norm: str = "percentile", max_memory_gib: float | str | None = AUTO,
                 tile_shape: Sequence[int] | None = None, channels_last: bool = True, amp: bool = False,
                 max_halo_overhead: float = MAX_HALO_OVERHEAD):
        super().__init__()
        self.chunk_size = int(chunk_size)
        self.progress = progress
        self.skip_empty = bool(skip_empty)
        # bounded memory (nexus_monai.engines.tiled): encoders on halo crops per output tile, the tile
        # planned from max_memory_gib (target peak RSS, or "auto") or given; both None: whole volumes (untiled)
        self.max_memory_gib = max_memory_gib
        self.max_halo_overhead = float(max_halo_overhead)
        self.amp = bool(amp)
        self.tile_shape = None if tile_shape is None else tuple(int(t) for t in tile_shape)
        self.channels_last = bool(channels_last)
        self.last_plan: dict = {}
        if not self.max_halo_overhead >= 1.0:
            raise ValueError(f"max_halo_overhead must be >= 1, got {max_halo_overhead}")
        if intensity_norm not in INTENSITY_NORMS:
            raise ValueError(f"intensity_norm must be one of {INTENSITY_NORMS}, got {intensity_norm!r}")
        self.intensity_norm = intensity_norm

    @property
    def max_memory_gib(self) -> float | str | None:
        return self._max_memory_gib

    @max_memory_gib.setter
    def max_memory_gib(self, value) -> None:
        if isinstance(value, str) and value.strip().lower() == AUTO:
            self._max_memory_gib = AUTO
        elif value is None:
            self._max_memory_gib = None
        else:
            gib = float(value)
            if not (math.isfinite(gib) and gib > 0):
                raise ValueError(f"max_memory_gib must be > 0 GiB, 'auto' or None, got {value!r}")
            self._max_memory_gib = gib

    @torch.no_grad()
    def __call__(self, t1_lr, t2_lr, network, grid: TargetGrid, normalizer: WorldNormalizer | None = None,
                 background: Mapping[str, float] | None = None) -> dict:
        net = network.module if hasattr(network, "module") else network
        was_training = net.training
        net.eval()
        device = next(net.parameters()).device
        vols = {}
        for c, img in (("t1", t1_lr), ("t2", t2_lr)):
            v = plain_tensor(img).float()
            vols[c] = (v[None] if v.ndim == 4 else v).to(device)
        affines = {c: as_affine(img.affine).reshape(-1, 4, 4)[:1].to(device) for c,
                   img in (("t1", t1_lr), ("t2", t2_lr))}
        if normalizer is None:
            normalizer = WorldNormalizer.from_grids([(vols[c].shape[-3:], affines[c][0].cpu()) for c in CONTRASTS])
        bg = {c: float((background or {}).get(c, 0.0)) for c in CONTRASTS}
        out = {c: torch.full((grid.num_voxels,), bg[c], dtype=torch.float32) for c in CONTRASTS}
        bar = tqdm(total=grid.num_voxels, unit="vox", unit_scale=True, desc="decode", disable=not self.progress)
        if (self.max_memory_gib is not None or self.tile_shape is not None) and tiled_decode(
                self, net, vols, affines, normalizer, grid, bg, out, bar):
            bar.close()
            net.train(was_training)
            return _consistent(net, {c: out[c].reshape(grid.shape) for c in CONTRASTS}, vols, affines, grid)
        self.last_plan = {"tiled": False, "chunk_size": self.chunk_size}
        with amp_autocast(net, self.amp, device):
            maps = net.encode(vols["t1"], vols["t2"])
            for start, stop, world, norm in iter_query_chunks(grid, normalizer, self.chunk_size):
                world, norm = world.to(device), norm.to(device)
                keep = None
                if self.skip_empty:
                    signal = sum(sample_at_world(vols[c] - bg[c], affines[c], world[None])[0, 0].abs()
                                 for c in CONTRASTS)
                    keep = torch.nonzero(signal > 0)[:, 0]
                    if keep.numel() == 0:
                        bar.update(stop - start)
                        continue
                    world, norm = world[keep], norm[keep]
                pred = net.decode(maps, vols["t1"], vols["t2"], affines["t1"], affines["t2"], world[None], norm[None])
                for c in CONTRASTS:
                    values = pred[c][0].float().cpu()
                    if keep is None:
                        out[c][start:stop] = values
                    else:
                        out[c][start:stop][keep.cpu()] = values
                bar.update(stop - start)
        bar.close()
        net.train(was_training)
        return _consistent(net, {c: out[c].reshape(grid.shape) for c in CONTRASTS}, vols, affines, grid)


def _consistent(net, pred: dict, vols: Mapping, affines: Mapping, grid: TargetGrid) -> dict:
    """A network with a consistency layer (``net.consistency``, :mod:`nexus_monai.networks.data_consistency`):
    its step on each stitched output volume against that contrast's LR scan; other networks: ``pred`` as is."""
    layer = getattr(net, "consistency", None)
    if layer is None:
        return pred
    lr = {c: MetaTensor(vols[c][0].float().cpu(), affine=affines[c][0].double().cpu()) for c in CONTRASTS}
    return {c: layer.on_grid(c, pred[c], lr[c], grid) for c in CONTRASTS}


class INRValidationStep:
    """``SupervisedEvaluator(iteration_update=INRValidationStep())`` over whole subjects (batch size 1).

    Output: ``{"pred": {c: (X, Y, Z)}, "gt": {c: ...}, "lr": {c: MetaTensor}, "subject": str}``.
    With z-scored data (``"<c>_lr_zscore"`` in the batch, from ``intensity_normalizer("zscore")``)
    prediction, ground truth and LR are mapped back to the scanner's units (the background, the
    image of 0, back to exactly 0), so the scores follow the evaluation protocol; the percentile
    scaling needs no inversion (every score divides by the GT's own percentile).
    """

    def __call__(self, engine, batch: Mapping) -> dict:
        t1 = batch["t1"]
        grid = TargetGrid(tuple(t1.shape[-3:]), as_affine(t1.affine).reshape(-1, 4, 4)[0])
        lr = {c: batch[f"{c}_lr"][0] for c in CONTRASTS}
        for c in CONTRASTS:
            lr[c].affine = as_affine(batch[f"{c}_lr"].affine).reshape(-1, 4, 4)[0]
        stats = {c: (float(plain_tensor(batch[f"{c}_lr_zscore"]["mean"]).reshape(-1)[0]),
                     float(plain_tensor(batch[f"{c}_lr_zscore"]["std"]).reshape(-1)[0]))
                 for c in CONTRASTS if f"{c}_lr_zscore" in batch}
        background = {c: normalised_zero(m, s) for c, (m, s) in stats.items()}
        pred = engine.inferer(lr["t1"], lr["t2"], engine.network, grid, background=background)
        gt = {c: plain_tensor(batch[c])[0, 0].float() for c in CONTRASTS}
        for c, (m, s) in stats.items():
            pred[c], gt[c] = unnormalise(pred[c], m, s), unnormalise(gt[c], m, s)
            restored = unnormalise(lr[c].as_subclass(torch.Tensor), m, s)
            lr[c] = MetaTensor(restored, affine=lr[c].affine)
        subject = batch.get("subject", ["?"])
        out = {"pred": pred, "gt": gt, "lr": lr, "grid": grid,
               "subject": subject[0] if isinstance(subject, (list, tuple)) else str(subject)}
        if LESIONS in batch:  # the subject's lesion instance map, for the lesion-fidelity scores
            out[LESIONS] = plain_tensor(batch[LESIONS])[0, 0]
        return out


def normalised_zero(offset: float, scale: float) -> float:
    """Where ``x = 0`` lands under ``(x - offset) / scale`` in float32 (as the transform computes it)."""
    return float((torch.zeros((), dtype=torch.float32) - offset) / scale)


def unnormalise(x: torch.Tensor, offset: float, scale: float) -> torch.Tensor:
    """Inverse of ``(x - offset) / scale``; values at the image of 0 (the background) become exactly 0."""
    zero = normalised_zero(offset, scale)
    out = x.double() * scale + offset
    return torch.where((x - zero).abs() <= 1e-6 * max(1.0, abs(zero)), torch.zeros_like(out), out).to(torch.float32)


def metric_device() -> torch.device:
    """Where validation's SSIM filtering runs: the GPU when there is one (float64 either way), else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def subject_scores(gt: Mapping, pred: Mapping, lesions=None, device: str | torch.device | None = None) -> dict:
    """PSNR (brain mask, eroded) and SSIM per contrast with the table protocol
    (docs/evaluation_protocol.md), mask = GT T1 > 0. ``device``: where SSIM's window filters run
    (default :func:`metric_device`; equal values up to float64 rounding).

    With a lesion instance map ``lesions`` also the tables' lesion-fidelity columns
    (``lesion_contrast_t2``, ``lesion_kept_t2``, ``imprint_t1``, ...; :mod:`nexus_monai.metrics.lesion`).
    """
    g0 = gt["t1"].numpy()
    mask = as_mask(g0 > 0, g0.shape)
    eroded = erode_mask(mask, ERODE_VOXELS)
    row = {}
    for c in CONTRASTS:
        g, p = gt[c].numpy().astype("float64"), pred[c].numpy().astype("float64")
        s = intensity_scale(g, mask, SCALE_PERCENTILE)
        row[f"psnr_{c}"] = psnr(g / s, p / s, mask)
        row[f"psnr_eroded_{c}"] = psnr(g / s, p / s, eroded) if eroded.any() else float("nan")
        row[f"ssim_{c}"] = ssim3d(g / s, p / s, mask, win_size=SSIM_WIN_SIZE, sigma=SSIM_SIGMA,
                                  device=device or metric_device())
    row["psnr_avg"] = (row["psnr_t1"] + row["psnr_t2"]) / 2
    row["ssim_avg"] = (row["ssim_t1"] + row["ssim_t2"]) / 2
    if lesions is not None:
        scales = {c: intensity_scale(gt[c].numpy(), mask, SCALE_PERCENTILE) for c in CONTRASTS}
        row.update(lesion_fidelity_row({c: gt[c].numpy() / scales[c] for c in CONTRASTS},
                                       {c: pred[c].numpy() / scales[c] for c in CONTRASTS}, lesions, mask))
    return row


class SubjectImageMetric(Metric):
    """Mean over validation subjects of ``subject_scores(...)[column]`` (e.g. ``psnr_avg``).

    Subjects where the column is absent or NaN (a lesion column on a subject without a lesion map,
    or without lesions of that class) are left out; NaN when no subject has it.
    """

    def __init__(self, column: str = "psnr_avg", output_transform=lambda x: (x,), device="cpu"):
        # ignite turns a dict output into (y_pred, y); wrapped in a tuple the whole dict reaches update()
        self.column = column
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self._values: list[float] = []

    def update(self, output) -> None:
        output = output[0] if isinstance(output, (tuple, list)) else output
        scores = output.get("scores") if isinstance(output, dict) else None
        if scores is None:
            scores = subject_scores(output["gt"], output["pred"], output.get(LESIONS))
            output["scores"] = scores
        value = float(scores.get(self.column, math.nan))
        if math.isfinite(value):
            self._values.append(value)

    def compute(self) -> float:
        return float(sum(self._values) / len(self._values)) if self._values else math.nan
