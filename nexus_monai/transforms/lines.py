"""Random HR lines along a scan's thick axis, with the acquisition operator that maps them to its LR voxels.

For a paired HR patch ``(1, X, Y, Z)`` and LR patch ``(1, x, y, z)`` (thick along one axis ``a``
with factor ``k``, e.g. from :class:`~nexus_monai.transforms.patches.RandPairedPatchd`), a draw
picks ``num_lines`` in-plane positions and takes every HR voxel along ``a`` at each of them.
Per line this gives the query points (world mm), the HR values and the LR values of the same
line, plus ``operator`` ``(M, n)``: the rows of
:func:`~nexus_monai.transforms.acquisition.slice_profile_matrix` (the SAME operator that
simulated the LR scan) placed on the LR slices they produce, so ``operator @ hr_line`` is that
line's thick-slice acquisition. Rows whose profile would reach past the patch border are not
exact (the LR voxel saw HR voxels outside the patch) and are flagged invalid (zero rows).

This is what CycleINR's cycle-consistency loss needs: an SR line re-degraded with ``operator``
must reproduce ``lr`` on the valid rows.
"""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable

from nexus_monai.geometry import as_affine, voxel_to_world
from nexus_monai.transforms.acquisition import PROFILES, slice_profile_matrix
from nexus_monai.transforms.patches import hr_to_lr_index_map

__all__ = ["thick_axis_operator", "SampleThickAxisLines", "SampleThickAxisLinesd", "LINE_FIELDS"]

LINE_FIELDS = ("world", "hr", "lr", "operator", "valid")


def thick_axis_operator(n_hr: int, n_lr: int, factor: float, lr_offset: float,
                        profile: str = "gaussian") -> tuple[torch.Tensor, torch.Tensor]:
    """``(operator (n_lr, n_hr) float64, valid (n_lr,) bool)`` along the thick axis of a patch pair.

    ``lr_offset``: the LR index of HR index 0 along the thick axis (``lr = i / factor + lr_offset``,
    from :func:`hr_to_lr_index_map`). Row ``m`` is the acquisition profile of LR slice ``m`` over
    the ``n_hr`` HR voxels when that slice's whole profile lies inside the patch, else zeros.
    """
    k = float(factor)
    weights = slice_profile_matrix(n_hr, k, profile)  # row r centred at HR index r k + (k - 1) / 2
    shift = lr_offset + (k - 1.0) / (2.0 * k)  # LR slice m <-> profile row r = m - shift
    operator = torch.zeros(n_lr, n_hr, dtype=torch.float64)
    valid = torch.zeros(n_lr, dtype=torch.bool)
    if abs(shift - round(shift)) > 1e-4:  # slabs not aligned with the patch: no exact rows
        return operator, valid
    for m in range(n_lr):
        r = m - int(round(shift))
        if 0 <= r < weights.shape[0] and weights[r, 0] == 0 and weights[r, -1] == 0:
            operator[m], valid[m] = weights[r], True
    return operator, valid


class SampleThickAxisLines(Randomizable):
    """``(hr (1, X, Y, Z), lr (1, x, y, z))`` MetaTensors -> dict of ``num_lines`` thick-axis lines.

    Output (plain tensors, ``L = num_lines``, ``n`` HR and ``M`` LR voxels along the thick axis):
    ``world (L * n, 3)`` float32 mm (line-major), ``hr (L, n)``, ``lr (L, M)``,
    ``operator (M, n)`` float32 and ``valid (M,)`` float32 (1 for exact rows).

    Args:
        num_lines: in-plane positions drawn per call (without replacement when possible).
        profile: slice profile of the acquisition (``gaussian`` | ``boxcar`` | ``none``).
        foreground_fraction: share of lines drawn among positions whose HR line has signal.
    """

    def __init__(self, num_lines: int = 64, profile: str = "gaussian", foreground_fraction: float = 0.75):
        if profile not in PROFILES:
            raise ValueError(f"slice profile must be one of {PROFILES}, got {profile!r}")
        self.num_lines, self.profile = int(num_lines), profile
        self.foreground_fraction = float(foreground_fraction)
        self._picks: np.ndarray | None = None

    def randomize(self, foreground: np.ndarray) -> None:
        """Draw line positions (flat in-plane indices) from a boolean in-plane foreground map."""
        total = foreground.size
        fg = np.flatnonzero(foreground.ravel())
        n_fg = min(len(fg), int(round(self.num_lines * self.foreground_fraction)))
        picks = list(self.R.choice(fg, n_fg, replace=len(fg) < n_fg)) if n_fg else []
        rest = self.num_lines - len(picks)
        picks += list(self.R.choice(total, rest, replace=total < rest))
        self._picks = np.asarray(picks, dtype=np.int64)

    def __call__(self, hr: torch.Tensor, lr: torch.Tensor, randomize: bool = True) -> dict[str, torch.Tensor]:
        scale, offset = hr_to_lr_index_map(hr.affine, lr.affine)
        axis = int(np.argmin(scale))
        factor = 1.0 / float(scale[axis])
        if not factor > 1.0 + 1e-6:
            raise ValueError("the LR patch is not thicker than the HR patch along any axis")
        inplane = [a for a in range(3) if a != axis]
        for a in inplane:
            if abs(scale[a] - 1.0) > 1e-4 or abs(offset[a] - round(offset[a])) > 1e-4:
                raise ValueError(f"LR in-plane axis {a} is not the HR grid (scale {scale[a]:.4g}, offset "
                                 f"{offset[a]:.4g})")
        h = hr.as_subclass(torch.Tensor)[0].movedim(axis, -1)  # (P, Q, n): in-plane, then thick axis
        l = lr.as_subclass(torch.Tensor)[0].movedim(axis, -1)  # (p, q, M)
        if randomize:
            self.randomize((h != 0).any(-1).numpy())
        p_idx, q_idx = np.unravel_index(self._picks, h.shape[:2])
        n, m = h.shape[-1], l.shape[-1]
        lp, lq = p_idx + int(round(offset[inplane[0]])), q_idx + int(round(offset[inplane[1]]))
        if lp.min() < 0 or lq.min() < 0 or lp.max() >= l.shape[0] or lq.max() >= l.shape[1]:
            raise ValueError("the LR patch does not cover the HR patch in-plane")
        index = torch.zeros(len(p_idx), n, 3, dtype=torch.float64)
        index[..., inplane[0]] = torch.as_tensor(p_idx, dtype=torch.float64)[:, None]
        index[..., inplane[1]] = torch.as_tensor(q_idx, dtype=torch.float64)[:, None]
        index[..., axis] = torch.arange(n, dtype=torch.float64)[None, :]
        world = voxel_to_world(index.reshape(-1, 3), as_affine(hr.affine))
        operator, valid = thick_axis_operator(n, m, factor, float(offset[axis]), self.profile)
        return {
            "world": world.float(),
            "hr": h[p_idx, q_idx].float(),
            "lr": l[lp, lq].float(),
            "operator": operator.float(),
            "valid": valid.float(),
        }


class SampleThickAxisLinesd(Randomizable, MapTransform):
    """Dict twin: for each ``(hr_key, lr_key)`` pair writes ``<hr_key>_lines_<field>`` (see :data:`LINE_FIELDS`).

    Args:
        keys: HR patch keys (e.g. ``[t1, t2]``).
        lr_keys: the matching LR patch keys (e.g. ``[t1_lr, t2_lr]``).
        profiles: slice profile per key (one string for all, or one per key).
        num_lines, foreground_fraction: as in :class:`SampleThickAxisLines`.
    """

    def __init__(self, keys: KeysCollection, lr_keys: Sequence[str], profiles: str | Sequence[str] = "gaussian",
                 num_lines: int = 64, foreground_fraction: float = 0.75, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.lr_keys = [lr_keys] if isinstance(lr_keys, str) else list(lr_keys)
        profiles = [profiles] * len(self.keys) if isinstance(profiles, str) else list(profiles)
        if len(self.lr_keys) != len(self.keys) or len(profiles) != len(self.keys):
            raise ValueError("keys, lr_keys and profiles must have the same length")
        self.samplers = {k: SampleThickAxisLines(num_lines, p, foreground_fraction) for k,
                         p in zip(self.keys, profiles)}

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        for sampler in self.samplers.values():
            sampler.set_random_state(state=self.R)
        return self

    def randomize(self, data=None) -> None:  # each sampler draws in its own call (shapes differ per key)
        pass

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key, lr_key in zip(self.keys, self.lr_keys):
            if key not in d and self.allow_missing_keys:
                continue
            self.samplers[key].R = self.R
            for field, value in self.samplers[key](d[key], d[lr_key]).items():
                d[f"{key}_lines_{field}"] = value
        return d
