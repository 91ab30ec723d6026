"""Counterfactual imprint wiring: the subject is re-rendered with the per-class switch, written with the same entry,
prepared, and every method re-run; a method that leaks T2w into T1w gets the hand-computed imprint, one that
does not gets 0; a subject without generator parameters gets NaN. The generator is replaced by a tiny fake
(the real one takes ~20 s per render) that honours the same switch."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from nexus_monai.data.brats import brats_loader
from nexus_monai.data.io import save_volume
from nexus_monai.data.synth import lesions as synth_lesions
from nexus_monai.evaluation import lesion_counterfactual as cf
from nexus_monai.keys import LESION_CLASS_STRIDE, LESION_T1_ONLY, LESION_T2_ONLY, LESIONS

SHAPE = (16, 16, 16)
T2L = LESION_T2_ONLY * LESION_CLASS_STRIDE + 1
T1L = LESION_T1_ONLY * LESION_CLASS_STRIDE + 2


def _fake_subject(**_):
    """Brain = box minus a 2-voxel border; a T2w-only cube (+0.3 x 100 on T2w) and a T1w-only one (-0.2 x 100 on
    T1w), each absent when its class is switched off (the contextvar the generator's lesion_signals reads)."""
    off = synth_lesions._CLASSES_OFF.get()
    brain = np.zeros(SHAPE, bool)
    brain[2:-2, 2:-2, 2:-2] = True
    lab = np.zeros(SHAPE, np.int16)
    lab[4:7, 4:7, 4:7] = T2L
    lab[9:12, 9:12, 9:12] = T1L
    t1, t2 = np.where(brain, 50.0, 0.0).astype(np.float32), np.where(brain, 60.0, 0.0).astype(np.float32)
    if LESION_T2_ONLY not in off:
        t2[lab == T2L] += 30.0
    if LESION_T1_ONLY not in off:
        t1[lab == T1L] -= 20.0
    images = {"t1": t1, "t1ce": t1, "t2": t2, "flair": t2}
    return SimpleNamespace(images=images, clean=images, seg=np.zeros(SHAPE, np.uint8), lesions=lab,
                           affine=np.eye(4))


def _entry(tmp_path, params=True):
    s = _fake_subject()
    d = tmp_path / "SynBraTS_0001"
    d.mkdir()
    entry = {"subject": "SynBraTS_0001", "t2_lr_noise": 0.01}
    for key, vol, dtype in (("t1", s.images["t1"], np.float32), ("t2", s.images["t2"], np.float32),
                            ("t2_clean", s.images["t2"], np.float32), (LESIONS, s.lesions, np.int16)):
        entry[key] = str(save_volume(vol, d / f"SynBraTS_0001_{key}.nii.gz", affine=np.eye(4), dtype=dtype))
    if params:
        params_json = {"seed": 3, "subject_index": 1, "family": "test_anatomy"}
        (d / "SynBraTS_0001_params.json").write_text(json.dumps(params_json))
    return entry


def _prepare(entry):
    """Load t1 / t2 / lesions and make 'LR' scans (here: the HR volumes themselves, enough for the wiring)."""
    assert entry["t2_lr_noise"] == 0.01  # the drawn acquisition keys travel with the re-rendered entry
    data = brats_loader(["t1", "t2", LESIONS])({k: entry[k] for k in ("t1", "t2", LESIONS)})
    for c in ("t1", "t2"):
        data[f"{c}_lr"] = data[c]
    return data


def _leaky(data, grid, leak=0.1):
    """T1w output = T1w + leak x T2w (a cross-contrast method imprinting T2w structure), T2w unchanged."""
    t1, t2 = data["t1"].as_subclass(torch.Tensor), data["t2"].as_subclass(torch.Tensor)
    return {"t1": MetaTensor(t1 + leak * t2, affine=grid.affine), "t2": MetaTensor(t2.clone(), affine=grid.affine)}


def test_counterfactual_imprint_of_a_leaking_method_by_hand(tmp_path, monkeypatch):
    monkeypatch.setattr(cf, "simulate_subject", _fake_subject)
    monkeypatch.setattr(cf, "SIZES", {"tiny": (SHAPE, 1.0)})
    entry = _entry(tmp_path)
    assert cf.generator_arguments(entry) == {"seed": 3, "index": 1, "size": "tiny", "held_out": False,
                                             "test_anatomy": True}
    subject = cf.CounterfactualSubject(entry, _prepare)
    assert subject.available
    # the per-class switch reached the renders: T2w-only lesion gone from the "t2" render, T1w-only from "t1"
    lab = subject.data["with"][LESIONS][0].numpy()
    assert float(subject.data["t2"]["t2"][0].numpy()[lab == T2L].mean()) == pytest.approx(60.0)
    assert float(subject.data["t1"]["t1"][0].numpy()[lab == T1L].mean()) == pytest.approx(50.0)
    row = subject.imprint(_leaky)
    # hand: the T1w output moves by 0.1 x 30 = 3 raw at the T2w-only lesion; scales = 99.5th brain percentile
    s = _fake_subject()
    brain = s.images["t1"] > 0
    scale_t1 = float(np.percentile(s.images["t1"][brain], 99.5))
    scale_t2 = float(np.percentile(s.images["t2"][brain], 99.5))
    expected = (3.0 / scale_t1) / (30.0 / scale_t2)
    assert row["imprint_cf_t1"] == pytest.approx(expected, rel=1e-5) and row["n_imprint_cf_t1"] == 1
    assert row["imprint_cf_t2"] == 0.0  # the leak is one way: nothing of T1w enters T2w
    none = subject.imprint(_leaky, {"leak": 0.0})
    assert none["imprint_cf_t1"] == 0.0


def test_no_generator_parameters_gives_nan(tmp_path):
    entry = _entry(tmp_path, params=False)
    subject = cf.CounterfactualSubject(entry, _prepare)
    assert not subject.available and cf.generator_arguments(entry) is None
    row = subject.imprint(_leaky)
    assert math.isnan(row["imprint_cf_t1"]) and math.isnan(row["imprint_cf_t2"])
