"""A TorchScript export path for the implicit (INR) networks: one fixed-signature forward.

:class:`~nexus_monai.networks.NexusINR` (and the ArSSR network, the same class) takes two LR
volumes with their affines and query points and returns a *dict* of point values and training
auxiliaries, with Python-level switches, string-keyed module dicts and optional arguments; it
cannot be scripted, and ``torch.jit.trace`` needs a fixed tensor-in/tensor-out signature.

:class:`INRExport` gives it one::

    forward(t1 (B, 1, *t1_shape), t2 (B, 1, *t2_shape), t1_affine (B, 4, 4), t2_affine (B, 4, 4),
            query_world (B, K, 3), query_norm (B, K, 3)) -> (B, K, 2)   # channel 0 T1w, 1 T2w

and makes MONAI's ``ckpt_export`` work on the bundle unchanged::

    python -m monai.bundle ckpt_export --net_id export_def \\
        --config_file "['<bundle>/configs/train.yaml','<bundle>/configs/export.yaml']" \\
        --ckpt_file <bundle>/models/model.pt --filepath <bundle>/models/model.ts

``ckpt_export`` loads ``model.pt`` (a plain state dict of the network, as the bundle's
``CheckpointSaver`` writes it) through :meth:`INRExport.load_state_dict`, which loads it into
the wrapped network, then calls ``torch.jit.script`` on the wrapper. Scripting first calls
:meth:`INRExport.__prepare_scriptable__`, which traces the wrapped network on example inputs of
the LR shapes given to the constructor and returns a small scriptable module around that trace.

What the TorchScript file keeps dynamic and what it fixes (checked in the tests):

* dynamic: batch size B (traced with 2 items, checked with 1 and 2), number of query points K,
  affines, intensities, query positions;
* fixed: the two LR volume shapes (the trace records the grid sizes used to convert voxel
  indices to ``grid_sample`` coordinates as constants). The scripted forward checks them and
  raises on any other shape instead of returning wrong values; export once per protocol grid
  (``t1_shape`` / ``t2_shape`` in ``export.yaml``).
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import nn

__all__ = ["INRExport", "ScriptedINR"]


class _PointValues(nn.Module):
    """``net(...)`` -> ``(B, K, 2)``: the T1w and T2w point values stacked, auxiliaries dropped (traced)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, t1, t2, t1_affine, t2_affine, query_world, query_norm):
        out = self.net(t1, t2, t1_affine, t2_affine, query_world, query_norm, aux=False)
        return torch.stack((out["t1"], out["t2"]), dim=-1)


class ScriptedINR(nn.Module):
    """Scriptable shell around a traced :class:`_PointValues`: checks the LR shapes, then calls it.

    Shapes as :class:`INRExport`; raises ``RuntimeError`` when an LR volume does not have the shape
    the trace was recorded with.
    """

    def __init__(self, traced: torch.jit.ScriptModule, t1_shape: Sequence[int], t2_shape: Sequence[int]):
        super().__init__()
        self.traced = traced
        self.t1_shape = [int(s) for s in t1_shape]  # non-empty int lists: TorchScript infers List[int]
        self.t2_shape = [int(s) for s in t2_shape]

    def forward(self, t1: torch.Tensor, t2: torch.Tensor, t1_affine: torch.Tensor, t2_affine: torch.Tensor,
                query_world: torch.Tensor, query_norm: torch.Tensor) -> torch.Tensor:
        if list(t1.shape[2:]) != self.t1_shape or list(t2.shape[2:]) != self.t2_shape:
            raise RuntimeError(
                f"this TorchScript export was traced for LR shapes t1 {self.t1_shape}, t2 {self.t2_shape}; "
                f"got t1 {list(t1.shape[2:])}, t2 {list(t2.shape[2:])}: export again with these shapes"
            )
        return self.traced(t1, t2, t1_affine, t2_affine, query_world, query_norm)


class INRExport(nn.Module):
    """Fixed-signature view of an INR network for TorchScript export (see the module docstring).

    Args:
        net: a network with NexusINR's signature ``net(t1, t2, t1_affine, t2_affine, query_world,
            query_norm, aux=False) -> {"t1": (B, K), "t2": (B, K), ...}``.
        t1_shape: spatial shape of the T1w LR volume the export serves, e.g. ``(120, 120, 40)``.
        t2_shape: spatial shape of the T2w LR volume, e.g. ``(120, 30, 80)``.
        num_points: query points of the example inputs used for tracing (any number works after).
    """

    def __init__(self, net: nn.Module, t1_shape: Sequence[int], t2_shape: Sequence[int], num_points: int = 64):
        super().__init__()
        self.net = net
        self.t1_shape = tuple(int(s) for s in t1_shape)
        self.t2_shape = tuple(int(s) for s in t2_shape)
        self.num_points = int(num_points)

    def forward(self, t1: torch.Tensor, t2: torch.Tensor, t1_affine: torch.Tensor, t2_affine: torch.Tensor,
                query_world: torch.Tensor, query_norm: torch.Tensor) -> torch.Tensor:
        """``(B, K, 2)`` point values (channel 0 T1w, 1 T2w) of the wrapped network, in eager mode."""
        out = self.net(t1, t2, t1_affine, t2_affine, query_world, query_norm, aux=False)
        return torch.stack((out["t1"], out["t2"]), dim=-1)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a checkpoint of the WRAPPED network (its own keys, no ``net.`` prefix), as ``model.pt`` holds."""
        return self.net.load_state_dict(state_dict, strict=strict, assign=assign)

    def example_inputs(self, batch: int = 2) -> tuple[torch.Tensor, ...]:
        """Inputs of the export's shapes for tracing: random volumes, thick-slice affines, points inside.

        The trace uses ``batch=2`` on purpose: code paths taken only for batches of more than one
        item (e.g. KD-Attn's per-item row offsets) are then recorded, and hold for one item too.
        """
        gen = torch.Generator().manual_seed(0)
        param = next(self.net.parameters(), None)
        dtype = param.dtype if param is not None else torch.float32
        device = param.device if param is not None else torch.device("cpu")
        t1 = torch.rand((batch, 1, *self.t1_shape), generator=gen, dtype=dtype)
        t2 = torch.rand((batch, 1, *self.t2_shape), generator=gen, dtype=dtype)
        hr = [max(a, b) for a, b in zip(self.t1_shape, self.t2_shape)]
        affines = []
        for shape in (self.t1_shape, self.t2_shape):
            spacing = torch.tensor([h / s for h, s in zip(hr, shape)], dtype=dtype)
            a = torch.eye(4, dtype=dtype)
            a[:3, :3] = torch.diag(spacing)
            a[:3, 3] = (spacing - 1) / 2  # slab centres, as the thick-slice acquisition places them
            affines.append(a[None].repeat(batch, 1, 1))
        hr_t = torch.tensor(hr, dtype=dtype)
        world = torch.rand((batch, self.num_points, 3), generator=gen, dtype=dtype) * (hr_t - 1)
        norm = world / (hr_t - 1) * 2 - 1
        return tuple(x.to(device) for x in (t1, t2, affines[0], affines[1], world, norm))

    def __prepare_scriptable__(self) -> ScriptedINR:
        """Called by ``torch.jit.script``: trace the wrapped network at this export's LR shapes."""
        core = _PointValues(self.net).eval()
        with torch.no_grad(), warnings.catch_warnings():
            # the tracer warns that grid sizes become constants: intended, and guarded by ScriptedINR's shape check
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(core, self.example_inputs(), check_trace=False)
        return ScriptedINR(traced, self.t1_shape, self.t2_shape)
