"""Every bundle passes MONAI's own checks offline: verify_metadata against the schema shipped in the
package, verify_net_in_out for the image-to-image bundles, ckpt_export of the INR bundles to a
TorchScript file that predicts what the eager network predicts."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from monai.bundle import ckpt_export, verify_metadata, verify_net_in_out

from nexus_monai.bundle_paths import metadata_schema_path
from nexus_monai.networks import NexusINR
from nexus_monai.networks.export import INRExport

REPO = Path(__file__).resolve().parents[1]
BUNDLES = sorted(p.name for p in (REPO / "bundles").iterdir() if (p / "configs" / "metadata.json").exists())
IMAGE_TO_IMAGE = ["seg_unet", "seg_transunet", "saint", "i3net"]
TINY_INR = {"network_def#features": 8, "network_def#encoder_options": {"blocks": 1, "layers": 2, "growth": 8},
            "network_def#decoder_hidden": 16, "network_def#decoder_layers": 2, "network_def#zero_init": False}


def _meta(name: str) -> Path:
    return REPO / "bundles" / name / "configs" / "metadata.json"


def _pins() -> dict:
    text = (REPO / "requirements.txt").read_text()
    return dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", text, flags=re.M))


def test_bundle_list_is_complete():
    assert {"nexus_inr", "arssr", "ssmcsr", "cycleinr", "seg_unet", "seg_transunet", "saint", "i3net"} <= set(BUNDLES)


@pytest.mark.parametrize("name", BUNDLES)
def test_verify_metadata_offline(name, tmp_path):
    # the vendored schema is passed as the download target: MONAI finds it there and never goes online
    verify_metadata(meta_file=str(_meta(name)), filepath=str(metadata_schema_path()))
    meta = json.loads(_meta(name).read_text())
    assert meta["name"] == name
    # the schema can fail: a metadata file without network_data_format or with a bad input spec is refused
    for broken in (lambda m: m.pop("network_data_format"),
                   lambda m: next(iter(m["network_data_format"]["inputs"].values())).pop("dtype"),
                   lambda m: m["required_packages_version"].pop("nexus_monai")):
        bad = copy.deepcopy(meta)
        broken(bad)
        path = tmp_path / "metadata.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match="Failed validating"):
            verify_metadata(meta_file=str(path), filepath=str(metadata_schema_path()))


@pytest.mark.parametrize("name", BUNDLES)
def test_required_packages_match_requirements(name):
    meta = json.loads(_meta(name).read_text())
    pins = _pins()
    req = meta["required_packages_version"]
    assert {"nexus_monai", "nibabel", "pytorch-ignite", "mlflow", "nilearn", "einops", "fire", "SimpleITK"} <= set(req)
    import nexus_monai

    assert req["nexus_monai"] == nexus_monai.__version__
    for package, version in req.items():
        if package != "nexus_monai":
            assert pins.get(package) == version, f"{name}: {package} {version} != requirements.txt {pins.get(package)}"
    assert (meta["monai_version"], meta["pytorch_version"], meta["numpy_version"]) == (
        pins["monai"], pins["torch"], pins["numpy"])


@pytest.mark.parametrize("name", ["nexus_inr", "arssr", "cycleinr"])
def test_inr_data_format_matches_forward(name):
    """network_data_format names the forward's arguments in order and its two point outputs."""
    fmt = json.loads(_meta(name).read_text())["network_data_format"]
    assert list(fmt["inputs"]) == ["t1", "t2", "t1_affine", "t2_affine", "query_world", "query_norm"]
    assert list(fmt["outputs"]) == ["t1", "t2"]
    net = NexusINR(features=8, encoder_options={"blocks": 1, "layers": 1, "growth": 8}, decoder_hidden=8,
                   decoder_layers=1, pe=True)
    wrapper = INRExport(net, (6, 6, 3), (6, 2, 6), num_points=5)
    args = dict(zip(fmt["inputs"], wrapper.example_inputs(batch=1)))
    out = net(**args, aux=False)
    assert set(fmt["outputs"]) <= set(out) and all(out[k].shape == (1, 5) for k in fmt["outputs"])


@pytest.mark.parametrize("name", IMAGE_TO_IMAGE)
def test_verify_net_in_out(name, monkeypatch):
    monkeypatch.chdir(REPO)
    verify_net_in_out(net_id="network_def", meta_file=str(_meta(name)),
                      config_file=str(REPO / "bundles" / name / "configs" / "train.yaml"), device="cpu", n=1)
    # ... and it fails when the metadata promises a channel count the network does not produce
    meta = json.loads(_meta(name).read_text())
    meta["network_data_format"]["outputs"]["pred"]["num_channels"] += 1
    with pytest.raises(ValueError, match="channel"):
        verify_net_in_out(net_id="network_def", meta_file=[str(_meta(name))],
                          config_file=str(REPO / "bundles" / name / "configs" / "train.yaml"), device="cpu",
                          **{"_meta_#network_data_format": meta["network_data_format"]})


@pytest.mark.parametrize("name", ["nexus_inr", "arssr"])
def test_ckpt_export_torchscript_equals_eager(name, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    configs = REPO / "bundles" / name / "configs"
    shapes = {"export_t1_shape": [8, 8, 4], "export_t2_shape": [8, 2, 8]}
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(configs / "train.yaml"), str(configs / "export.yaml")])
    parser.update(TINY_INR)
    torch.manual_seed(1)
    net = parser.get_parsed_content("network_def")
    ckpt = tmp_path / "model.pt"
    torch.save(net.state_dict(), ckpt)  # what the bundle's CheckpointSaver writes: the plain state dict
    ts_path = tmp_path / "model.ts"
    ckpt_export(net_id="export_def", config_file=[str(configs / "train.yaml"), str(configs / "export.yaml")],
                ckpt_file=str(ckpt), filepath=str(ts_path), meta_file=str(configs / "metadata.json"),
                **TINY_INR, **shapes)
    extra = {"metadata.json": "", "train.json": ""}
    ts = torch.jit.load(str(ts_path), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["name"] == name  # ckpt_export stores the bundle metadata

    wrapper = INRExport(net, shapes["export_t1_shape"], shapes["export_t2_shape"]).eval()
    g = torch.Generator().manual_seed(5)
    t1, t2, a1, a2, _, _ = wrapper.example_inputs(batch=1)
    batch, k = 2, 37  # not the number of points used for the trace
    t1, t2 = torch.rand((batch, *t1.shape[1:]), generator=g), torch.rand((batch, *t2.shape[1:]), generator=g)
    a1, a2 = a1.repeat(batch, 1, 1), a2.repeat(batch, 1, 1)
    a2[1, :3, 3] += 0.4  # a shifted T2w scan for the second item
    world = torch.rand((batch, k, 3), generator=g) * 7
    norm = world / 7 * 2 - 1
    with torch.no_grad():
        eager = net(t1, t2, a1, a2, world, norm, aux=False)
        scripted = ts(t1, t2, a1, a2, world, norm)
        single = ts(t1[1:], t2[1:], a1[1:], a2[1:], world[1:], norm[1:])  # one item: another batch size
    assert scripted.shape == (batch, k, 2)
    assert torch.allclose(scripted[..., 0], eager["t1"], atol=1e-6)
    assert torch.allclose(scripted[..., 1], eager["t2"], atol=1e-6)
    assert torch.allclose(single[0], scripted[1], atol=1e-6)
    assert not torch.allclose(eager["t1"], eager["t2"])  # a non-trivial network
    with pytest.raises((RuntimeError, torch.jit.Error), match="traced for LR shapes"):
        ts(torch.rand(1, 1, 8, 8, 6), t2[:1], a1[:1], a2[:1], world[:1], norm[:1])
