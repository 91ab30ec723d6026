"""Helpers shared by test modules in different folders (fixtures live in ``conftest.py``).

``tests/`` is on ``sys.path`` (``pythonpath = tests`` in ``setup.cfg``), so test modules anywhere
under it ``from helpers import ...``.

* The repository, the default bundle and a tiny ``network_def`` overlay for it.
* A tiny subject on disk for ``predict`` / ``fit-subject`` (:func:`make_tiny_pair`) with the
  matching command lines, and a live uvicorn server in a thread (:func:`live_server`).
* A tiny Nexus-INR world: an 8^3 HR grid at 2 mm, its T1w (z x2) and T2w (y x4) LR grids,
  :func:`tiny_net`, :func:`tiny_batch` and :func:`fake_inr_out` (network outputs for the loss).
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import numpy as np
import torch
import uvicorn
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from scipy import ndimage

from nexus_monai.data.io import save_volume
from nexus_monai.geometry import WorldNormalizer, make_affine, thick_slice_affine, voxel_to_world
from nexus_monai.networks import NexusINR
from nexus_monai.serving.server import bind_socket
from nexus_monai.transforms import SimulateAnisotropicAcquisition

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "nexus_inr"

# a tiny network_def replacing the bundle's (inference.yaml refers to train.yaml's network_def by a macro)
TINY_OVERLAY = """network_def:
  _target_: nexus_monai.networks.NexusINR
  encoder: rdn
  features: 4
  encoder_options: {blocks: 1, layers: 1, growth: 4}
  decoder: mlp
  decoder_hidden: 8
  decoder_layers: 2
  attn_heads: 2
  pe_frequencies: 2
"""


# --- a tiny subject on disk and the commands that use it ------------------------------------------
def make_tiny_pair(d: Path) -> dict:
    """A 16^3 phantom's T1w (z x2) / T2w (y x4) LR scans, a tiny network overlay and seeded weights."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    vol = (ndimage.gaussian_filter(rng.standard_normal((16, 16, 16)), 2.0) > 0) * 80.0 + 100
    hr = MetaTensor(torch.as_tensor(vol, dtype=torch.float32)[None],
                    affine=make_affine((1.0, 1.0, 1.0), (-8.0, -8.0, -8.0)))
    save_volume(hr, d / "hr.nii.gz")
    save_volume(SimulateAnisotropicAcquisition("z", 2)(hr), d / "t1_lr.nii.gz")
    save_volume(SimulateAnisotropicAcquisition("y", 4)(hr), d / "t2_lr.nii.gz")
    (d / "tiny.yaml").write_text(TINY_OVERLAY)
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / "inference.yaml"), str(d / "tiny.yaml")])
    torch.manual_seed(0)
    torch.save({"model": parser.get_parsed_content("network_def").state_dict()}, d / "w.pt")
    return {"dir": d, "hr": d / "hr.nii.gz", "t1": d / "t1_lr.nii.gz", "t2": d / "t2_lr.nii.gz",
            "overlay": d / "tiny.yaml", "weights": d / "w.pt"}


def predict_args(pair, out, *grid):
    """``nexus-sr predict`` of :func:`make_tiny_pair`'s subject onto ``grid`` options, into ``out``."""
    return ["predict", "--bundle", str(BUNDLE), "--config", str(pair["overlay"]), "--weights", str(pair["weights"]),
            "--t1", str(pair["t1"]), "--t2", str(pair["t2"]), *grid, "--out", str(out), "--threads", "1", "--quiet",
            "--keep-background"]  # the phantom's background is 100, not 0


def fit_args(pair, out, *grid):
    """``nexus-sr fit-subject`` of :func:`make_tiny_pair`'s subject with a tiny network and one epoch."""
    return ["fit-subject", "--t1", str(pair["t1"]), "--t2", str(pair["t2"]), *grid, "--out", str(out), "--epochs", "1",
            "--hidden", "8", "--trunk-layers", "1", "--head-hidden", "8", "--batch-size", "512", "--threads", "1",
            "--quiet", "--keep-background"]  # the phantom's background is 100, not 0


@contextlib.contextmanager
def live_server(app):
    """``app`` on uvicorn in a thread, 127.0.0.1 and a free port; yields its URL."""
    sock = bind_socket("127.0.0.1", 0)
    srv = uvicorn.Server(uvicorn.Config(app, log_level="critical"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 60
        while not srv.started and time.time() < deadline:
            time.sleep(0.05)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
        sock.close()


# --- a tiny Nexus-INR world -------------------------------------------------------------------------
HR_AFFINE = make_affine((2.0, 2.0, 2.0), (-7.0, 3.0, 11.0))
HR_SHAPE = (8, 8, 8)
T1_AFFINE = thick_slice_affine(HR_AFFINE, "z", 2)  # LR (8, 8, 4)
T2_AFFINE = thick_slice_affine(HR_AFFINE, "y", 4)  # LR (8, 2, 8)
T1_SHAPE, T2_SHAPE = (8, 8, 4), (8, 2, 8)
TINY_ENCODERS = {"rdn": {"blocks": 1, "layers": 2, "growth": 4}, "srresnet": {"blocks": 1}, "rescnn": {"depth": 2}}


def tiny_net(seed: int = 0, **kwargs) -> NexusINR:
    """A seeded NexusINR with 8 features (``kwargs`` override the switches)."""
    torch.manual_seed(seed)
    opts = dict(encoder="rdn", features=8, encoder_options=TINY_ENCODERS["rdn"], decoder_hidden=16, decoder_layers=2,
                attn_heads=2, pe_frequencies=2, zero_init=False)  # zero_init would stop gradients at step 0
    opts.update(kwargs)
    return NexusINR(**opts)


def tiny_batch(b: int = 2, k: int = 64, seed: int = 0) -> dict:
    """LR T1/T2 of B items with batched affines, K world points inside the HR field of view."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(b, k, 3, generator=g, dtype=torch.float64) * 8.0 - 0.5  # HR voxel edges are -0.5 .. 7.5
    world = voxel_to_world(idx, HR_AFFINE)
    norm = WorldNormalizer.from_grids([(T1_SHAPE, T1_AFFINE), (T2_SHAPE, T2_AFFINE)])
    return {
        "t1": torch.rand(b, 1, *T1_SHAPE, generator=g),
        "t2": torch.rand(b, 1, *T2_SHAPE, generator=g),
        "t1_affine": T1_AFFINE.expand(b, 4, 4).clone(),
        "t2_affine": T2_AFFINE.expand(b, 4, 4).clone(),
        "query_world": world.float(),
        "query_norm": norm(world).float(),
    }


def fake_inr_out(b=2, k=6, c=4, seed=0, kd=True, mmf=True, sel=True) -> dict:
    """Random network outputs with the auxiliaries the Nexus-INR loss reads (``(B, K)`` / ``(B, K, C)``)."""
    g = torch.Generator().manual_seed(seed)
    out = {"t1": torch.randn(b, k, generator=g), "t2": torch.randn(b, k, generator=g),
           "z_t1_shared": torch.randn(b, k, c, generator=g), "z_t2_shared": torch.randn(b, k, c, generator=g),
           "z_t2_fused": torch.randn(b, k, c, generator=g)}
    if kd:
        out["t2_self"] = torch.randn(b, k, generator=g)
    if mmf:
        out["modality_logits_t1"] = torch.randn(b, k, 2, generator=g)
        out["modality_logits_t2"] = torch.randn(b, k, 2, generator=g)
    if sel:
        out["seg_logits_t1"] = torch.randn(b, k, 4, generator=g)
        out["seg_logits_t2"] = torch.randn(b, k, 4, generator=g)
    return out


def add_t2_lesion(root: Path) -> Path:
    """Give the first ``test`` subject of the dataset at ``root`` a T2w-only lesion: its T2w gets a +300 ball of
    radius 2 voxels around voxel (12, 20, 12) (33 voxels of 6 mm: d = 23.9 mm, 1.0 T2w slab of 4 x 6 mm) and
    the datalist a lesion instance map (T2w-only code 1001). Returns ``root``."""
    import json

    import nibabel as nib

    from nexus_monai.keys import LESIONS

    root = Path(root)
    dl = json.loads((root / "dataset.json").read_text())
    entry = dl["test"][0]
    t2 = nib.load(str(root / entry["t2"]))
    lesion = sum((g - c) ** 2 for g, c in zip(np.indices(t2.shape), (12, 20, 12))) <= 4
    nib.save(nib.Nifti1Image(np.where(lesion, t2.get_fdata() + 300, t2.get_fdata()).astype(np.float32), t2.affine),
             str(root / entry["t2"]))
    path = root / "lesions.nii.gz"
    nib.save(nib.Nifti1Image(np.where(lesion, 1001, 0).astype(np.int16), t2.affine), str(path))
    entry[LESIONS] = str(path)
    (root / "dataset.json").write_text(json.dumps(dl))
    return root
