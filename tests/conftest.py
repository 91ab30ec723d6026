"""Shared test fixtures: tiny BraTS-like datasets on disk, and the ``integration`` marker.

* ``tiny_dataset`` / ``tiny_bundle_dataset`` (session-scoped factories, usable from module-scoped
  fixtures): ``tiny_dataset(root, n=3)`` writes ``n`` subjects of 36 x 36 x 24 voxels at 6 mm (t1, t1ce,
  t2, flair, seg) and a ``dataset.json`` with every subject in ``test``; ``tiny_bundle_dataset`` puts every
  subject in every split (bundle tests train, validate and test on the same subjects).
* ``one_torch_thread`` (module-scoped): torch at one intra-op thread while a module's tiny tensors run
  (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``).
* ``integration``: tests that run a whole MONAI bundle (``monai.bundle run`` in-process or in a
  subprocess) or the installed console script. CI runs everything; ``pytest -m "not integration"`` is
  the quick loop. Tests are marked where they are defined; every test under ``tests/integration/``
  (whole modules of bundle runs) is marked here.

Test modules mirror the package (``tests/networks/``, ``tests/engines/``, ...); helpers shared across
folders that are not fixtures are in ``tests/helpers.py``.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from nexus_monai.data.brats import discover_brats, make_datalist, write_datalist
from nexus_monai.geometry import make_affine


def _brain(shape, seed):
    rng = np.random.default_rng(seed)
    c = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"), -1)
    mask = (c**2).sum(-1) < 0.8
    tissue = ndimage.gaussian_filter(rng.random(shape), 1.5)
    return mask, tissue


def make_tiny_dataset(root: Path, n: int = 3) -> Path:
    """``n`` tiny subjects (t1, t1ce, t2, flair, seg) under ``root`` and a ``dataset.json`` (all in ``test``)."""
    affine = make_affine((6.0, 6.0, 6.0), (-105, -105, -75)).numpy()
    shape = (36, 36, 24)
    for i in range(n):
        sid = f"BraTS20_Training_{i:03d}"
        mask, tissue = _brain(shape, i)
        t1 = np.where(mask, 100 + 400 * tissue, 0).astype(np.float32)
        t2 = np.where(mask, 900 - 500 * tissue, 0).astype(np.float32)
        seg = np.zeros(shape, np.uint8)
        seg[15:19, 15:19, 10:13] = 2
        seg[16:18, 16:18, 11] = 4
        for mod, data in (("t1", t1), ("t1ce", t1), ("t2", t2), ("flair", t2), ("seg", seg)):
            (root / sid).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data, affine), str(root / sid / f"{sid}_{mod}.nii.gz"))
    subjects = discover_brats(root)
    write_datalist(root / "dataset.json", make_datalist(subjects, seed=0, proportions=(0, 0, 1), base_dir=root))
    return root


def make_tiny_bundle_dataset(root: Path, n: int = 3) -> Path:
    """:func:`make_tiny_dataset` with every subject in every split."""
    root = make_tiny_dataset(root, n=n)
    dl = make_datalist(discover_brats(root), seed=0, base_dir=root)
    everyone = sorted(dl["training"] + dl["validation"] + dl["test"], key=lambda s: s["subject"])
    dl["training"] = dl["validation"] = dl["test"] = everyone
    write_datalist(root / "dataset.json", dl)
    return root


@pytest.fixture(scope="session")
def tiny_dataset():
    """The :func:`make_tiny_dataset` factory."""
    return make_tiny_dataset


@pytest.fixture(scope="session")
def tiny_bundle_dataset():
    """The :func:`make_tiny_bundle_dataset` factory."""
    return make_tiny_bundle_dataset


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: intra-op threads only add contention (40x slower 3D convs on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = Path(str(item.fspath))
        if path.parent.name == "integration":
            item.add_marker(pytest.mark.integration)
