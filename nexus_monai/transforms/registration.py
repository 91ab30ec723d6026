"""Rigid registration of the T2w scan to the T1w scan, applied to the T2w affine only.

Two scans of one exam are acquired minutes apart; the head moves a few millimetres in between.
The network looks each contrast up at a world position through that scan's own affine, so a
header that ignores the motion turns into cross-contrast ghosts. :func:`register_rigid` estimates
the motion and :class:`RegisterToReference` / :class:`RegisterToReferenced` (array / dictionary
twins) write it into the moving scan's affine: the LR voxels are never resampled (resampling a
thick-slice scan would blur it a second time).

Method (SimpleITK): a rigid ``Euler3DTransform`` between the two scans' physical points, started
by a moments initialiser on the two foregrounds (binary masks above 10 % of each scan's 99th
percentile, so the two contrasts' different intensities do not pull the centres apart), then
Mattes mutual information (32 bins, 10 % of the voxels sampled on a regular grid with a fixed
seed) with regular-step gradient descent (60 iterations per level) over
a multi-resolution pyramid. Each level bins voxels together (``BinShrink``, an average) with
per-axis factors that never shrink a thick axis and never make an in-plane axis coarser than the
scan's thickest one (:func:`shrink_factors`): a 2 x 2 x 8 mm scan is shrunk to 8 x 8 x 8 mm and
4 x 4 x 8 mm, never along its 8 mm axis. The scan with the thicker slices is the one ITK samples
(at its voxel centres, never interpolated along its thick axis); the other is interpolated with
cubic B-splines. Both are first blurred to a common resolution (:func:`_matched_resolution`): each
along each of its axes to the other scan's resolution in that direction, so that their different
slice profiles do not pull the mutual-information optimum away from the true alignment
(an embedded 2 mm subject without motion: 1.4 mm / 1.7 degrees estimated without it, 0.1 mm / 0.4
degrees with it).

Conventions: ``matrix`` is a 4x4 float64 map of RAS world mm, fixed (T1w) -> moving (T2w): an
anatomical point at ``x`` in the T1w scan sits at ``matrix @ x`` in the T2w scan; it IS the
estimated head motion between the scans. The corrected T2w affine is ``inv(matrix) @ affine``
(T2w voxel -> T2w world -> T1w world). Motion is reported as the translation of the rotation
centre (the T1w foreground's centre of mass, mm) and the rotation angle (degrees).

A result below ``min_mm`` (0.5 mm mean displacement over the brain) is negligible: within the
estimator's own error, so the header is kept without a warning. A result is implausible (rejected:
the header is kept, a warning says why) when it moves the
head more than ``max_mm`` (20) or rotates it more than ``max_deg`` (15), when the metric at the
result is not better than at the header's alignment (Mattes MI over every voxel, lower is
better), or when ITK fails (no overlap, too few samples).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from scipy import ndimage

from nexus_monai.geometry import as_affine, spacing
from nexus_monai.transforms.interpolation import to_sitk

try:
    import SimpleITK as sitk
except ImportError:  # the minimal GPU run-time wheelhouse has no SimpleITK: registration refuses in one line
    sitk = None

__all__ = ["RegistrationOptions", "RegistrationResult", "register_rigid", "shrink_factors", "corrected_affine",
           "euler_angles_deg", "RegisterToReference", "RegisterToReferenced", "REGISTRATION_KEY"]

REGISTRATION_KEY = "registration"
"""Meta key (array transform) and key suffix (``"<key>_registration"``, dictionary transform) of the result."""
_INTERPOLATOR = sitk.sitkBSpline if sitk else None
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS (its own inverse)


@dataclass(frozen=True)
class RegistrationOptions:
    """Settings of :func:`register_rigid`.

    ``levels``: pyramid shrink factors, coarse to fine (see :func:`shrink_factors`); ``iterations``
    per level; ``max_mm`` / ``max_deg``: plausibility limits (beyond: rejected); ``bins``: Mattes MI
    histogram bins; ``sampling``: share of voxels the metric samples while optimising (fixed ``seed``,
    so a run is reproducible); ``min_voxels``: fewest voxels per axis a scan needs to be registered;
    ``min_mm``: an estimate whose mean displacement over the brain is below this is not applied (it is
    within the estimator's own error, docs/registration.md, and applying it costs more than it gains).
    """

    levels: Sequence[int] = (4, 2, 1)
    iterations: int = 60
    max_mm: float = 20.0
    max_deg: float = 15.0
    bins: int = 32
    sampling: float = 0.1
    seed: int = 0
    min_voxels: int = 8
    min_mm: float = 0.5


@dataclass
class RegistrationResult:
    """What :func:`register_rigid` found. ``matrix``: fixed -> moving world map (4x4 RAS, mm);
    ``translation_mm`` / ``rotation_deg``: the motion of the head (centre translation, Euler angles
    about x, y, z); ``motion_mm`` its length, ``angle_deg`` the total rotation angle,
    ``mean_displacement_mm`` over the fixed foreground; ``metric_before`` / ``metric_after``: Mattes
    MI at the header's alignment and at the result (lower is better); ``accepted``: applied to the
    affine or not, ``reason`` why not."""

    matrix: list = field(default_factory=lambda: np.eye(4).tolist())
    centre_mm: list = field(default_factory=lambda: [0.0, 0.0, 0.0])
    translation_mm: list = field(default_factory=lambda: [0.0, 0.0, 0.0])
    rotation_deg: list = field(default_factory=lambda: [0.0, 0.0, 0.0])
    motion_mm: float = 0.0
    angle_deg: float = 0.0
    mean_displacement_mm: float = 0.0
    metric_before: float = math.nan
    metric_after: float = math.nan
    accepted: bool = False
    reason: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line: the estimated motion and whether it was applied."""
        t = ", ".join(f"{v:+.2f}" for v in self.translation_mm)
        r = ", ".join(f"{v:+.2f}" for v in self.rotation_deg)
        head = (f"registration T2w -> T1w: {self.motion_mm:.2f} mm, {self.angle_deg:.2f} deg "
                f"(translation [{t}] mm, rotation [{r}] deg about x, y, z; mean displacement over the brain "
                f"{self.mean_displacement_mm:.2f} mm; Mattes MI {self.metric_before:.4f} -> {self.metric_after:.4f})")
        return head + ("; applied to the T2w affine" if self.accepted else f"; NOT applied, header kept: {self.reason}")


def shrink_factors(spacing_mm: Sequence[float], level: int) -> list[int]:
    """Per-axis ``BinShrink`` factors of pyramid ``level`` for a scan of voxel size ``spacing_mm``.

    A thick axis (spacing > 1.5 x the finest) is never shrunk; the other axes are shrunk by ``level``
    but not beyond the thickest spacing: ``(2, 2, 8) mm, level 4 -> [4, 4, 1]``; ``(2, 8, 2), 2 ->
    [2, 1, 2]``; ``(2, 2, 4), 4 -> [2, 2, 1]``. An isotropic scan is shrunk by ``level`` along every axis.
    """
    sp = [float(s) for s in spacing_mm]
    thick = [s > 1.5 * min(sp) for s in sp]
    if not any(thick):
        return [int(level)] * 3
    target = min(level * min(sp), max(sp))
    return [1 if t else max(1, int(math.floor(target / s + 1e-6))) for s, t in zip(sp, thick)]


def corrected_affine(affine, matrix) -> torch.Tensor:
    """The moving scan's affine in the fixed scan's world: ``inv(matrix) @ affine`` (float64)."""
    return torch.linalg.inv(as_affine(matrix)) @ as_affine(affine)


def _foreground(img: "sitk.Image") -> "sitk.Image":
    arr = sitk.GetArrayViewFromImage(img)
    nz = arr[arr > 0]
    level = 0.1 * float(np.percentile(nz, 99)) if nz.size else 0.0
    return sitk.Cast(img > level, sitk.sitkFloat64)


def _rigid_to_ras(tx: "sitk.Euler3DTransform") -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = np.asarray(tx.GetMatrix()).reshape(3, 3)
    m[:3, 3] = np.asarray(tx.GetTranslation()) + np.asarray(tx.GetCenter()) - m[:3, :3] @ np.asarray(tx.GetCenter())
    return _LPS @ m @ _LPS


def euler_angles_deg(rot) -> list[float]:
    """x-y-z Euler angles (degrees) of a 3x3 rotation in :func:`~nexus_monai.geometry.rotation_matrix`'s
    convention ``R = Rz @ Ry @ Rx`` (its inverse for |y| < 90 degrees)."""
    r = np.asarray(rot, dtype=np.float64)
    ry = -math.asin(max(-1.0, min(1.0, float(r[2, 0]))))
    return [math.degrees(math.atan2(r[2, 1], r[2, 2])), math.degrees(ry), math.degrees(math.atan2(r[1, 0], r[0, 0]))]


def _angle_deg(rot: np.ndarray) -> float:
    return math.degrees(math.acos(max(-1.0, min(1.0, (float(np.trace(rot)) - 1.0) / 2.0))))


def _method(options: RegistrationOptions, sampling: float | None) -> "sitk.ImageRegistrationMethod":
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=options.bins)
    if sampling is None:
        reg.SetMetricSamplingStrategy(reg.NONE)
    else:
        reg.SetMetricSamplingStrategy(reg.REGULAR)
        reg.SetMetricSamplingPercentage(sampling, options.seed)
    reg.SetInterpolator(_INTERPOLATOR)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3,
                                                 numberOfIterations=options.iterations,
                                                 relaxationFactor=0.5, gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    return reg


def _metric(fixed, moving, transform, options: RegistrationOptions) -> float:
    reg = _method(options, None)
    reg.SetInitialTransform(transform, inPlace=False)
    return float(reg.MetricEvaluate(fixed, moving))


def _matched_resolution(img: MetaTensor, other_affine) -> "sitk.Image":
    """``img`` blurred along each of its axes to the other scan's resolution in that direction.

    Along axis ``a`` (world direction ``d``) the other scan resolves ``r = sqrt(sum_b (d . e_b)^2 s_b^2)``
    mm (its axes ``e_b``, spacings ``s_b``); where ``r`` exceeds this scan's spacing ``s_a``, a Gaussian
    of FWHM ``sqrt(r^2 - s_a^2)`` is applied, so both scans show the head with about the same blur and
    mutual information is not pulled toward a different optimum by their different slice profiles.
    """
    a, b = as_affine(img.affine).numpy()[:3, :3], as_affine(other_affine).numpy()[:3, :3]
    sa, sb = np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=0)
    dirs_a, dirs_b = a / sa, b / sb
    reach = np.sqrt(((dirs_a.T @ dirs_b) ** 2 * sb**2).sum(axis=1))
    sigma_vox = np.sqrt(np.clip(reach**2 - sa**2, 0, None)) / (2 * math.sqrt(2 * math.log(2))) / sa
    arr = img[0].as_subclass(torch.Tensor).double().numpy()
    return to_sitk(ndimage.gaussian_filter(arr, sigma_vox, mode="constant"), img.affine)


def register_rigid(fixed: MetaTensor, moving: MetaTensor,
                   options: RegistrationOptions | None = None) -> RegistrationResult:
    """Estimate the rigid motion of ``moving`` (T2w, ``(1, x, y, z)``) relative to ``fixed`` (T1w).

    In ITK's terms the scan with the thicker slices is the one sampled (its voxel centres, never
    interpolated along its thick axis) and the other is interpolated; both are first blurred to a
    common resolution (:func:`_matched_resolution`). The result is expressed fixed -> moving either way.

    Never raises on a registration that fails or diverges: the result then has ``accepted=False``
    and a one-phrase ``reason`` (the caller keeps the header and warns). Raises ``ImportError``
    only when SimpleITK is missing.
    """
    if sitk is None:
        raise ImportError("registration needs SimpleITK (pip install SimpleITK), or pass --no-register")
    options = options or RegistrationOptions()
    t0 = time.perf_counter()
    result = RegistrationResult()
    shapes = {"T1w": tuple(fixed.shape[-3:]), "T2w": tuple(moving.shape[-3:])}
    small = [f"{k} {'x'.join(map(str, s))}" for k, s in shapes.items() if min(s) < options.min_voxels]
    if small:
        result.reason = f"too few voxels to register ({', '.join(small)}; needs {options.min_voxels} per axis)"
        return result
    sp_f, sp_m = spacing(fixed.affine).tolist(), spacing(moving.affine).tolist()
    swap = max(sp_m) >= max(sp_f)  # sample on the thicker scan: ITK's fixed image is then `moving`
    scans = [(moving, fixed), (fixed, moving)] if swap else [(fixed, moving), (moving, fixed)]
    (a, a_other), (b, b_other) = scans
    try:
        a_img, b_img = _matched_resolution(a, a_other.affine), _matched_resolution(b, b_other.affine)
        init = sitk.CenteredTransformInitializer(_foreground(to_sitk(a, a.affine)), _foreground(to_sitk(b, b.affine)),
                                                 sitk.Euler3DTransform(),
                                                 sitk.CenteredTransformInitializerFilter.MOMENTS)
        tx = sitk.Euler3DTransform(init)
        identity = sitk.Euler3DTransform()
        identity.SetCenter(tx.GetCenter())
        result.metric_before = _metric(a_img, b_img, identity, options)
        sp_a, sp_b = spacing(a.affine).tolist(), spacing(b.affine).tolist()
        for level in options.levels:
            reg = _method(options, options.sampling)
            reg.SetInitialTransform(tx, inPlace=True)
            reg.Execute(sitk.BinShrink(a_img, shrink_factors(sp_a, level)),
                        sitk.BinShrink(b_img, shrink_factors(sp_b, level)))
        result.metric_after = _metric(a_img, b_img, tx, options)
    except RuntimeError as err:  # ITK: no overlap, too few samples inside the moving image, ...
        first = " ".join(str(err).split())
        result.reason = f"ITK failed ({first[-160:]})"
        result.seconds = time.perf_counter() - t0
        return result
    m = _rigid_to_ras(tx)  # ITK fixed -> ITK moving points
    m = np.linalg.inv(m) if swap else m
    fg = np.argwhere(fixed[0].as_subclass(torch.Tensor).numpy() > 0)[::7]
    aff = as_affine(fixed.affine).numpy()
    pts = fg @ aff[:3, :3].T + aff[:3, 3] if len(fg) else aff[:3, 3][None]
    centre = pts.mean(0)
    disp = np.linalg.norm(pts @ m[:3, :3].T + m[:3, 3] - pts, axis=1)
    result.matrix = m.tolist()
    result.centre_mm = centre.tolist()
    result.translation_mm = (m[:3, :3] @ centre + m[:3, 3] - centre).tolist()
    result.rotation_deg = euler_angles_deg(m[:3, :3])
    result.motion_mm = float(np.linalg.norm(result.translation_mm))
    result.angle_deg = _angle_deg(m[:3, :3])
    result.mean_displacement_mm = float(disp.mean())
    problems = []
    if not all(math.isfinite(v) for v in (result.metric_before, result.metric_after, result.motion_mm)):
        problems.append("a non-finite metric or motion")
    if result.motion_mm > options.max_mm:
        problems.append(f"{result.motion_mm:.1f} mm > {options.max_mm:g} mm")
    if result.angle_deg > options.max_deg:
        problems.append(f"{result.angle_deg:.1f} deg > {options.max_deg:g} deg")
    if not result.metric_after < result.metric_before:
        problems.append("no metric gain over the header's alignment")
    result.accepted = not problems and result.mean_displacement_mm >= options.min_mm
    result.reason = "implausible: " + ", ".join(problems) if problems else ""
    if not problems and not result.accepted:
        result.reason = (f"negligible: mean displacement {result.mean_displacement_mm:.2f} mm < {options.min_mm:g} mm, "
                         f"within the registration's own error")
    result.seconds = time.perf_counter() - t0
    return result


class RegisterToReference(Transform):
    """Array transform: ``moving`` (``(1, x, y, z)`` MetaTensor) registered rigidly to ``reference``.

    Returns a MetaTensor with the SAME voxels and, when the result is accepted, the corrected
    affine (:func:`corrected_affine`); ``meta["registration"]`` holds the
    :class:`RegistrationResult` as a dict either way.
    """

    def __init__(self, options: RegistrationOptions | None = None):
        self.options = options or RegistrationOptions()

    def __call__(self, moving: MetaTensor, reference: MetaTensor) -> MetaTensor:
        result = register_rigid(reference, moving, self.options)
        affine = corrected_affine(moving.affine, result.matrix) if result.accepted else as_affine(moving.affine)
        meta = {k: v for k, v in getattr(moving, "meta", {}).items() if k != "affine"}
        meta[REGISTRATION_KEY] = result.to_dict()
        data = moving.as_subclass(torch.Tensor) if isinstance(moving, MetaTensor) else torch.as_tensor(moving)
        return MetaTensor(data, affine=affine, meta=meta)


class RegisterToReferenced(MapTransform):
    """Dictionary twin of :class:`RegisterToReference`: each of ``keys`` registered to ``ref_key``;
    the result dict also under ``"<key>_registration"``."""

    def __init__(self, keys: KeysCollection, ref_key: str = "t1", options: RegistrationOptions | None = None,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.ref_key = ref_key
        self.register = RegisterToReference(options)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.register(d[key], d[self.ref_key])
            d[f"{key}_{REGISTRATION_KEY}"] = d[key].meta[REGISTRATION_KEY]
        return d
