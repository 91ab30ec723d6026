"""T2w -> T1w rigid registration (:mod:`nexus_monai.transforms.registration`) and simulated head motion.

The motion is applied to the HR object BEFORE the T2w scan is simulated (the scan's header is the
scanner's, its content moved), on a real brain: the MNI152 2009 template shipped in the nilearn
wheel at 2 mm (its T1w; a T2w-like contrast from its GM/WM/CSF maps). One draw here; more draws in
``scripts/registration_accuracy.py`` (output in docs/registration.md).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from nexus_monai.geometry import make_affine, rotation_matrix
from nexus_monai.transforms import SimulateAnisotropicAcquisition
from nexus_monai.transforms.motion import RandRigidMotiond, RigidMotion, axis_angle_rotation
from nexus_monai.transforms.registration import (
    RegisterToReference,
    RegisterToReferenced,
    corrected_affine,
    euler_angles_deg,
    register_rigid,
    shrink_factors,
)

NILEARN_DATA = Path(importlib.util.find_spec("nilearn").origin).parent / "datasets" / "data"


def mni_pair(step: int = 2) -> dict[str, MetaTensor]:
    """The MNI152 2009 brain at ``step`` mm: its T1w template and a T2w-like image (CSF 1.0, GM 0.55, WM 0.35)."""
    read = lambda name: np.asarray(nib.load(NILEARN_DATA / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz")
                                   .dataobj, np.float32)  # noqa: E731
    t1, gm, wm = read("t1"), read("gm") / 255.0, read("wm") / 255.0
    brain = t1 > 0
    csf = np.clip(brain - gm - wm, 0, 1)
    t2 = (1.0 * csf + 0.55 * gm + 0.35 * wm) * brain
    idx = np.argwhere(brain)
    lo, hi = np.maximum(idx.min(0) - 6, 0), idx.max(0) + 7
    out = {}
    for c, v in (("t1", t1), ("t2", t2)):
        v = v[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        v = v[: v.shape[0] // step * step, : v.shape[1] // step * step, : v.shape[2] // step * step]
        v = v.reshape(v.shape[0] // step, step, v.shape[1] // step, step, v.shape[2] // step, step).mean((1, 3, 5))
        out[c] = MetaTensor(torch.as_tensor(v)[None], affine=make_affine((step,) * 3, (-90.0, -120.0, -70.0)))
    return out


@pytest.fixture(scope="module")
def brain():
    return mni_pair()


def _error_mm(estimate, truth, volume: MetaTensor) -> float:
    """Mean distance (mm) between where two 4x4 maps put the brain's voxel centres."""
    idx = np.argwhere(volume[0].numpy() > 0)
    a = volume.affine.numpy()
    pts = idx @ a[:3, :3].T + a[:3, 3]
    e, t = np.asarray(estimate), np.asarray(truth)
    return float(np.linalg.norm(pts @ (e[:3, :3] - t[:3, :3]).T + (e[:3, 3] - t[:3, 3]), axis=1).mean())


def test_motion_before_the_t2w_scan_is_recovered_within_half_a_millimetre(brain):
    rng = np.random.default_rng(3)
    direction = rng.standard_normal(3)
    moved = RigidMotion(axis_angle_rotation(rng.standard_normal(3), 5.0), direction / np.linalg.norm(direction) * 4.0)(
        brain["t2"])
    truth = np.asarray(moved.meta["motion"])
    t1_lr = SimulateAnisotropicAcquisition("z", 2)(brain["t1"])
    t2_lr = SimulateAnisotropicAcquisition("y", 4)(moved)
    out = RegisterToReferenced("t2", "t1")({"t1": t1_lr, "t2": t2_lr})
    result = out["t2_registration"]
    assert result["accepted"], result["reason"]
    assert _error_mm(result["matrix"], truth, brain["t1"]) < 0.5
    assert _error_mm(np.eye(4), truth, brain["t1"]) > 4.0  # the motion was real
    assert torch.equal(out["t2"].as_tensor(), t2_lr.as_tensor())  # LR voxels untouched: the affine only
    expected = np.linalg.inv(truth) @ t2_lr.affine.numpy()  # the T2w voxels' true positions in the T1w world
    assert np.abs(out["t2"].affine.numpy() - expected)[:3, 3].max() < 2.0
    assert abs(result["motion_mm"] - 4.0) < 0.7 and abs(result["angle_deg"] - 5.0) < 1.0


def test_a_registration_that_diverges_keeps_the_header(brain):
    t1_lr = SimulateAnisotropicAcquisition("z", 2)(brain["t1"])
    t2_lr = SimulateAnisotropicAcquisition("y", 4)(brain["t2"])
    far = t2_lr.affine.clone()
    far[:3, 3] += torch.tensor([400.0, 0.0, 0.0], dtype=far.dtype)  # no overlap with the T1w at all
    t2_far = MetaTensor(t2_lr.as_tensor(), affine=far)
    out = RegisterToReference()(t2_far, t1_lr)
    result = out.meta["registration"]
    assert not result["accepted"] and result["reason"]
    assert torch.equal(out.affine, far)


def test_no_motion_is_not_turned_into_motion(brain):
    t1_lr = SimulateAnisotropicAcquisition("z", 2)(brain["t1"])
    t2_lr = SimulateAnisotropicAcquisition("y", 4)(brain["t2"])
    result = register_rigid(t1_lr, t2_lr)
    moved = corrected_affine(t2_lr.affine, result.matrix) if result.accepted else t2_lr.affine
    assert _error_mm(np.linalg.inv(moved.numpy() @ np.linalg.inv(t2_lr.affine.numpy())), np.eye(4), brain["t1"]) < 0.5


@pytest.mark.parametrize("sp, level, expected", [
    ((2, 2, 8), 4, [4, 4, 1]), ((2, 8, 2), 2, [2, 1, 2]), ((2, 2, 4), 4, [2, 2, 1]), ((1, 1, 1), 4, [4, 4, 4]),
    ((1, 1, 1), 1, [1, 1, 1]), ((0.5, 0.5, 5), 8, [8, 8, 1]),
])
def test_shrink_factors_never_shrink_a_thick_axis(sp, level, expected):
    assert shrink_factors(sp, level) == expected


def test_euler_angles_invert_the_geometry_convention():
    angles = [3.0, -4.0, 7.5]
    assert np.allclose(euler_angles_deg(rotation_matrix(angles).numpy()), angles, atol=1e-9)


def test_rigid_motion_moves_the_centre_of_mass_by_the_translation():
    vol = torch.zeros(1, 24, 24, 24)
    vol[0, 8:14, 9:15, 7:13] = 1.0
    img = MetaTensor(vol, affine=make_affine((2.0, 2.0, 2.0), (-20.0, -20.0, -20.0)))
    moved = RigidMotion(axis_angle_rotation((0, 0, 1), 90.0), (4.0, -2.0, 6.0))(img)

    def com(v):
        w = v[0].as_subclass(torch.Tensor).double()
        idx = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in w.shape], indexing="ij"), -1)
        return (idx * w[..., None]).sum((0, 1, 2)) / w.sum() * 2.0 - 20.0

    assert torch.allclose(com(moved) - com(img), torch.tensor([4.0, -2.0, 6.0], dtype=torch.float64), atol=0.05)
    assert math.isclose(float(moved.sum()), float(img.sum()), rel_tol=0.02)


def test_random_motion_is_reproducible_per_subject_and_of_the_asked_size():
    img = MetaTensor(torch.ones(1, 8, 8, 8), affine=torch.eye(4, dtype=torch.float64),
                     meta={"filename_or_obj": "/data/sub-01_t2.nii.gz"})
    draw = RandRigidMotiond("t2", translation_mm=3.0, rotation_deg=4.0, output_keys="t2_moved", seed=7)
    a, b = draw({"t2": img})["t2_moved_motion"], draw({"t2": img})["t2_moved_motion"]
    assert np.allclose(a, b)
    m = np.asarray(a)
    angle = math.degrees(math.acos((np.trace(m[:3, :3]) - 1) / 2))
    assert math.isclose(angle, 4.0, abs_tol=1e-6)
    other = RandRigidMotiond("t2", translation_mm=3.0, rotation_deg=4.0, seed=7)(
        {"t2": MetaTensor(img.as_tensor(), affine=img.affine, meta={"filename_or_obj": "/data/sub-02_t2.nii.gz"})})
    assert not np.allclose(other["t2_motion"], a)
