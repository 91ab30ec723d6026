"""The lesion-aware objective end to end: configs/experiments/lesion_*.yaml merge over train.yaml and
over the paper form, and train.yaml + lesion_full.yaml trains (tiny network, tiny subjects with
lesion instance maps) with every lesion term logged, then validates with the lesion-fidelity scores.
Without the overlays the lesion maps never reach training."""

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from nexus_monai.keys import QUERY_LESION

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "bundles" / "nexus_inr" / "configs"
TINY = {"network_def#features": 4, "network_def#encoder_options": {"blocks": 1, "layers": 1, "growth": 4},
        "network_def#decoder_hidden": 16, "network_def#attn_heads": 2, "patch_size": [16, 16, 16], "num_points": 256,
        "batch_size": 1}


@pytest.fixture(scope="module")
def lesion_data(tmp_path_factory, tiny_bundle_dataset):
    """The tiny bundle dataset with a T2w-only and a T1w-only lesion per subject (the images carry them)."""
    root = tiny_bundle_dataset(tmp_path_factory.mktemp("lesiondata") / "data", n=3)
    dl = json.loads((root / "dataset.json").read_text())
    for split in ("training", "validation", "test"):
        for item in dl[split]:
            sid = item["subject"]
            t1, t2 = (nib.load(str(root / item[c])) for c in ("t1", "t2"))
            lab = np.zeros(t1.shape, np.int16)
            lab[10:13, 17:20, 8:11] = 1001  # T2w-only: brighter on T2w
            lab[23:26, 14:17, 13:16] = 2002  # T1w-only: darker on T1w
            path = root / sid / f"{sid}_lesions.nii.gz"
            if not path.exists():
                a1, a2 = np.asarray(t1.dataobj).copy(), np.asarray(t2.dataobj).copy()
                a2[lab == 1001] *= 1.6
                a1[lab == 2002] *= 0.5
                nib.save(nib.Nifti1Image(a1, t1.affine), str(root / item["t1"]))
                nib.save(nib.Nifti1Image(a2, t2.affine), str(root / item["t2"]))
                nib.save(nib.Nifti1Image(lab, t1.affine), str(path))
            item["lesions"] = str(path)
    (root / "dataset.json").write_text(json.dumps(dl))
    return root


def _parser(*overlays, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.yaml")] + [str(CONFIGS / o) for o in overlays])
    for k, v in overrides.items():
        parser[k] = v
    return parser


@pytest.mark.parametrize("form", [(), ("paper.yaml",)], ids=["default", "paper"])
@pytest.mark.parametrize("variant", ["lesion_sampling", "lesion_weighted", "lesion_full"])
def test_overlays_merge_over_the_default_and_the_paper_form(form, variant):
    p = _parser(*form, f"experiments/{variant}.yaml")
    patches, points = p.get_parsed_content("train#random_transforms")[:2]
    loss, net = p.get_parsed_content("loss"), p.get_parsed_content("network_def")
    assert patches.lesion_patch_prob == 0.5 and points.lesion_point_fraction == 0.25 and points.lesion_key == "lesions"
    assert loss.lesion_aware is (variant != "lesion_sampling")
    assert net.cross_null_space is (variant == "lesion_full")
    assert net.cross_input is (variant != "lesion_full" and not form)  # the null-space head replaces cross_input
    assert net.residual is (not form)  # the form underneath is untouched
    plain = _parser(*form)
    assert type(plain.get_parsed_content("train#random_transforms")[0]).__name__ == "DeleteItemsd"
    assert not plain.get_parsed_content("loss").lesion_aware


def test_train_yaml_with_lesion_full_trains_logs_lesion_terms_and_validates(lesion_data, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    p = _parser("experiments/lesion_full.yaml", dataset_dir=str(lesion_data), max_epochs=2, val_interval=2,
                ckpt_interval=1, bundle_root=str(tmp_path), ckpt_dir=str(tmp_path / "models"),
                output_dir=str(tmp_path / "eval"), **TINY)
    sample = p.get_parsed_content("train#dataset")[0]  # one training sample through the train transforms
    assert QUERY_LESION in sample and "lesions" not in sample and int((sample[QUERY_LESION] != 0).sum()) > 0
    p.get_parsed_content("initialize")
    trainer = p.get_parsed_content("train#trainer")
    trainer.run()
    metrics = trainer.state.metrics  # LossTermsHandler: epoch means of every loss term
    assert trainer.state.iteration == 6  # 3 subjects x 2 epochs
    for term in ("train_loss_sr_t1", "train_loss_sr_t2", "train_loss_lesion_contrast", "train_loss_sr_lesion_t1",
                 "train_loss_sr_lesion_t2"):
        assert math.isfinite(metrics[term]), term
    assert hasattr(trainer.network, "cross_heads")
    val = p.get_parsed_content("validate#evaluator").state.metrics
    assert math.isfinite(val["val_psnr_avg"]) and math.isfinite(val["val_lesion_contrast_t2"])
    assert (tmp_path / "models" / "model.pt").is_file()
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=False)
    state = state.get("model", state)
    assert any(k.startswith("cross_heads.t2") for k in state)
