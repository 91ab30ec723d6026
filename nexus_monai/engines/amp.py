"""Mixed precision (bf16 autocast) for implicit SR networks: only the parameterised parts, coordinates in fp32.

``torch.autocast`` over a whole Nexus-INR forward would also run the coordinate arithmetic in
bf16 (8 significant bits): the world -> voxel lookups (``lookup`` casts the index to the feature
map's dtype), the LIIF offsets and the Fourier positional encoding (phases of ``2 pi 2^5 p``)
would lose whole voxels / radians. :func:`amp_autocast` instead autocasts each *part* of the
network -- the top-level children that hold parameters (encoders, attention, MMF / SEL MLPs,
decoders, classifiers; ModuleDict / ModuleList entries one by one) -- and casts each part's
floating outputs back to float32, so everything between the parts (lookups, ``grid_sample`` of
world positions, positional encoding, residual sums, the loss and its reductions) stays fp32.
Methods called outside a part's forward run in fp32 too (KD-Attn's key projection on the key
grid, ``project_keys``, called once per volume by ``add_attention_keys``).

Weights are never cast: the optimiser steps fp32 master weights and the checkpoint stays fp32.
bf16 has fp32's exponent range, so no loss scaling (``GradScaler``) is needed.

Device type: ``"cuda"`` for a network on a GPU, ``"cpu"`` otherwise (CPU autocast runs the same
path, used by the tests). A network may name its own parts with an ``amp_parts()`` method.
The switch is per thread (the serving workers infer on threads sharing one network); the
forward hooks are registered on the parts for the duration of the outermost context only.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

__all__ = ["AMP_DTYPE", "amp_parts", "amp_autocast", "amp_device_type"]

AMP_DTYPE = torch.bfloat16
_STATE = threading.local()  # per thread: device type of the active amp context, entered autocast contexts
_LOCK = threading.Lock()
_INSTALLED: dict[int, tuple[int, list]] = {}  # id(part) -> (users, hook handles)


def amp_device_type(device: torch.device | str) -> str:
    """``"cuda"`` for a CUDA device, else ``"cpu"`` (the autocast device type)."""
    return "cuda" if torch.device(device).type == "cuda" else "cpu"


def amp_parts(network: nn.Module) -> list[nn.Module]:
    """The modules autocast by :func:`amp_autocast`: ``network.amp_parts()`` if defined, else the
    top-level children with parameters (ModuleDict / ModuleList entries one by one)."""
    net = network.module if hasattr(network, "module") and isinstance(network.module, nn.Module) else network
    if hasattr(net, "amp_parts"):
        return list(net.amp_parts())
    parts: list[nn.Module] = []
    for child in net.children():
        subs = child.values() if isinstance(child, nn.ModuleDict) else (
            list(child) if isinstance(child, nn.ModuleList) else [child])
        parts += [m for m in subs if any(True for _ in m.parameters())]
    return parts


def _to_float(x):
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() and x.dtype != torch.float32 and x.dtype != torch.float64 else x
    if isinstance(x, dict):
        return {k: _to_float(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_float(v) for v in x)
    return x


def _pre_hook(module, args):
    device_type = getattr(_STATE, "device_type", None)
    if device_type is None:
        return None
    ctx = torch.autocast(device_type, dtype=AMP_DTYPE)
    ctx.__enter__()
    _STATE.stack.append(ctx)
    return None


def _post_hook(module, args, output):
    if getattr(_STATE, "device_type", None) is None or not _STATE.stack:
        return None
    _STATE.stack.pop().__exit__(None, None, None)
    return _to_float(output)


@contextmanager
def amp_autocast(network: nn.Module, enabled: bool = True, device: torch.device | str | None = None) -> Iterator[None]:
    """While active (in this thread), the parts of ``network`` run under bf16 autocast and return fp32.

    ``enabled=False``: a no-op (nothing registered, bit-for-bit the fp32 path). ``device``: where
    the network runs (default: its first parameter's device).
    """
    if not enabled:
        yield
        return
    if device is None:
        device = next(network.parameters()).device
    parts = amp_parts(network)
    with _LOCK:
        for p in parts:
            users, handles = _INSTALLED.get(id(p), (0, []))
            if not users:
                handles = [p.register_forward_pre_hook(_pre_hook), p.register_forward_hook(_post_hook)]
            _INSTALLED[id(p)] = (users + 1, handles)
    previous = getattr(_STATE, "device_type", None), getattr(_STATE, "stack", None)
    _STATE.device_type, _STATE.stack = amp_device_type(device), []
    try:
        yield
    finally:
        while _STATE.stack:  # a part that raised never reached its post hook
            _STATE.stack.pop().__exit__(None, None, None)
        _STATE.device_type, _STATE.stack = previous
        with _LOCK:
            for p in parts:
                users, handles = _INSTALLED[id(p)]
                if users == 1:
                    for h in handles:
                        h.remove()
                    del _INSTALLED[id(p)]
                else:
                    _INSTALLED[id(p)] = (users - 1, handles)
