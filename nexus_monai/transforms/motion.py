"""Head motion between two scans, simulated on the HR object BEFORE a scan is acquired.

Real motion moves the anatomy inside the scanner's fixed frame: the scan's header is the same,
its content is moved. :class:`RigidMotion` therefore resamples the HR volume of the moved head on
its own grid (``out(x) = in(inv(M) x)``, trilinear, zero outside), and the acquisition that
follows sees a moved head under an unchanged affine. Only a registration can tell.

``M`` (4x4 float64, RAS world mm) moves an anatomical point ``y`` to ``M y = R (y - c) + c + t``:
a rotation ``R`` about the centre ``c`` (default: the volume's foreground centre of mass) and the
translation ``t`` of that centre. It is the same map
:func:`~nexus_monai.transforms.registration.register_rigid` estimates (fixed -> moving), so a
test compares the two directly. :class:`RandRigidMotiond` draws a random direction of fixed
size (``translation_mm``, ``rotation_deg``), or sizes up to those with ``uniform=True``, per
subject from ``seed`` and the subject's file name (reproducible whatever the order).
"""

from __future__ import annotations

import math
import zlib
from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable, Transform

from nexus_monai.geometry import as_affine, sample_at_world, voxel_centres

__all__ = ["motion_matrix", "axis_angle_rotation", "RigidMotion", "RandRigidMotiond", "MOTION_KEY"]

MOTION_KEY = "motion"
"""Meta key and key suffix (``"<output_key>_motion"``) of the applied 4x4 motion matrix."""


def axis_angle_rotation(axis: Sequence[float], angle_deg: float) -> np.ndarray:
    """3x3 rotation of ``angle_deg`` about the unit vector ``axis`` (Rodrigues' formula)."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / max(np.linalg.norm(a), 1e-12)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    th = math.radians(angle_deg)
    return np.eye(3) + math.sin(th) * k + (1 - math.cos(th)) * (k @ k)


def motion_matrix(rotation: np.ndarray, translation_mm: Sequence[float], centre_mm: Sequence[float]) -> torch.Tensor:
    """``M`` with ``M y = R (y - c) + c + t`` (4x4 float64)."""
    m = np.eye(4)
    r, c = np.asarray(rotation, np.float64), np.asarray(centre_mm, np.float64)
    m[:3, :3] = r
    m[:3, 3] = c + np.asarray(translation_mm, np.float64) - r @ c
    return torch.as_tensor(m)


def _centre_of_mass(img: torch.Tensor, affine) -> np.ndarray:
    fg = img[0] > 0
    if not bool(fg.any()):
        fg = torch.ones_like(fg)
    idx = torch.nonzero(fg).to(torch.float64).mean(0)
    a = as_affine(affine).numpy()
    return a[:3, :3] @ idx.numpy() + a[:3, 3]


class RigidMotion(Transform):
    """Array transform: the head in ``img`` (``(C, X, Y, Z)`` MetaTensor) moved by ``rotation`` (3x3)
    about ``centre_mm`` and by ``translation_mm``, resampled on the same grid (trilinear, zeros
    outside). ``meta["motion"]`` holds ``M`` as a nested list."""

    def __init__(self, rotation=None, translation_mm: Sequence[float] = (0.0, 0.0, 0.0),
                 centre_mm: Sequence[float] | None = None):
        self.rotation = np.eye(3) if rotation is None else np.asarray(rotation, np.float64)
        self.translation_mm, self.centre_mm = list(translation_mm), centre_mm

    def __call__(self, img: MetaTensor) -> MetaTensor:
        data = img.as_subclass(torch.Tensor)
        centre = _centre_of_mass(data, img.affine) if self.centre_mm is None else self.centre_mm
        m = motion_matrix(self.rotation, self.translation_mm, centre)
        world = voxel_centres(data.shape[-3:], img.affine, dtype=torch.float64).reshape(-1, 3)
        source = world @ torch.linalg.inv(m)[:3, :3].T + torch.linalg.inv(m)[:3, 3]
        out = sample_at_world(data.double(), img.affine, source, padding_mode="zeros")
        out = out.reshape(data.shape).to(data.dtype)
        meta = {k: v for k, v in img.meta.items() if k != "affine"}
        meta[MOTION_KEY] = m.tolist()
        return MetaTensor(out, affine=as_affine(img.affine).clone(), meta=meta)


class RandRigidMotiond(Randomizable, MapTransform):
    """Dictionary transform: ``keys`` moved by a random rigid motion into ``output_keys`` (default: in place).

    The translation has length ``translation_mm`` in a uniformly random direction and the rotation
    angle ``rotation_deg`` about a uniformly random axis (``uniform=True``: lengths drawn uniformly
    up to those). With ``seed`` the draw is seeded per subject by ``seed`` and the CRC32 of the
    first key's file name, so the same subject always moves the same way. The matrix is also stored
    under ``"<output_key>_motion"``.
    """

    def __init__(self, keys: KeysCollection, translation_mm: float = 0.0, rotation_deg: float = 0.0,
                 output_keys: KeysCollection | None = None, seed: int | None = None, uniform: bool = False,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.output_keys = list(output_keys) if isinstance(output_keys, (list, tuple)) else (
            [output_keys] if output_keys else list(self.keys))
        self.translation_mm, self.rotation_deg = float(translation_mm), float(rotation_deg)
        self.seed, self.uniform = seed, uniform
        self._draw: tuple[np.ndarray, np.ndarray] | None = None

    def randomize(self, data=None) -> None:
        u = self.R.standard_normal(3)
        v = self.R.standard_normal(3)
        scale_t = self.R.uniform(0, 1) if self.uniform else 1.0
        scale_r = self.R.uniform(0, 1) if self.uniform else 1.0
        t = u / max(np.linalg.norm(u), 1e-12) * self.translation_mm * scale_t
        self._draw = (axis_angle_rotation(v, self.rotation_deg * scale_r), t)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if self.seed is not None and keys:
            name = str(getattr(d[keys[0]], "meta", {}).get("filename_or_obj", ""))
            self.set_random_state(seed=(int(self.seed) + zlib.crc32(name.encode())) % (2**32))
        self.randomize()
        rotation, translation = self._draw
        for key, out_key in zip(keys, self.output_keys):
            d[out_key] = RigidMotion(rotation, translation)(d[key])
            d[f"{out_key}_{MOTION_KEY}"] = d[out_key].meta[MOTION_KEY]
        return d
