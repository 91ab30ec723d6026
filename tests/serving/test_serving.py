"""``nexus-sr serve``: the real server in a subprocess on 127.0.0.1 (free port), a real HTTP client.

Outputs are compared with ``nexus-sr predict`` on the same tiny pair, overlay and seeded random
weights (same numbers, same grid, same affine); bad requests must get one-line 4xx JSON and
leave the server serving with no temporary file behind. Parsing and upload checks are tested
against files nibabel writes (independent of the code under test).
"""

import email
import email.policy
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import nibabel as nib
import numpy as np
import pytest
import requests
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from scipy import ndimage

from nexus_monai.cli import main
from nexus_monai.data.io import save_volume
from nexus_monai.geometry import make_affine
from nexus_monai.serving.limits import InferenceQueue
from nexus_monai.serving.params import ServingError, parse_params
from nexus_monai.serving.uploads import check_filename, nifti_suffix
from nexus_monai.transforms import SimulateAnisotropicAcquisition

from helpers import BUNDLE, REPO, TINY_OVERLAY, live_server

MAX_UPLOAD_MB = 0.25


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A 16^3 phantom's T1w (z x2) and T2w (y x4) LR scans, an oblique reference grid, tiny overlay + seeded weights."""
    d = tmp_path_factory.mktemp("serve_pair")
    rng = np.random.default_rng(0)
    vol = ndimage.gaussian_filter(rng.standard_normal((16, 16, 16)), 2.0)
    vol = (vol > 0) * 80.0 + ndimage.gaussian_filter(rng.standard_normal((16, 16, 16)), 1.5) * 40 + 100
    vol[:2] = 0
    hr = MetaTensor(torch.as_tensor(vol, dtype=torch.float32)[None], affine=make_affine((1.0, 1.0, 1.0), (-8.0, -8.0, -8.0)))
    save_volume(SimulateAnisotropicAcquisition("z", 2)(hr), d / "t1_lr.nii.gz")
    save_volume(SimulateAnisotropicAcquisition("y", 4)(hr), d / "t2_lr.nii.gz")
    oblique = make_affine((1.3, 1.2, 1.1), (-6.0, -7.0, -5.0), rotation_deg=(8.0, 0.0, 12.0)).numpy()
    nib.save(nib.Nifti1Image(np.zeros((9, 10, 11), np.float32), oblique), str(d / "like.nii.gz"))
    (d / "tiny.yaml").write_text(TINY_OVERLAY)
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / "inference.yaml"), str(d / "tiny.yaml")])
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    torch.save({"model": net.state_dict()}, d / "w.pt")
    return {"dir": d, "t1": d / "t1_lr.nii.gz", "t2": d / "t2_lr.nii.gz", "like": d / "like.nii.gz", "overlay": d / "tiny.yaml",
            "weights": d / "w.pt", "num_parameters": sum(p.numel() for p in net.parameters())}


@pytest.fixture(scope="module")
def server(pair, tmp_path_factory):
    """``python -m nexus_monai serve`` on 127.0.0.1, port 0 (the server prints the one it bound)."""
    work = tmp_path_factory.mktemp("serve_work")
    log = work.parent / "serve.log"
    cmd = [sys.executable, "-m", "nexus_monai", "serve", "--bundle", str(BUNDLE), "--config", str(pair["overlay"]),
           "--weights", str(pair["weights"]), "--host", "127.0.0.1", "--port", "0", "--threads", "1", "--workers", "2",
           "--max-queue", "16", "--max-upload-mb", str(MAX_UPLOAD_MB), "--workdir", str(work), "--log-level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = None
    deadline = time.time() + 180
    while url is None and time.time() < deadline and proc.poll() is None:
        for line in log.read_text().splitlines():
            if line.startswith("serving on http://"):
                url = line.split("serving on ", 1)[1].strip()
        time.sleep(0.2)
    if url is None:
        proc.kill()
        pytest.fail(f"server did not start:\n{log.read_text()}")
    try:
        yield {"url": url, "work": work, "proc": proc, "log": log}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def predicted(pair, tmp_path_factory):
    """``nexus-sr predict`` outputs for the grids the tests ask the server for."""
    def run(tag, *grid_args):
        out = tmp_path_factory.mktemp(f"predict_{tag}")
        rc = main(["predict", "--bundle", str(BUNDLE), "--config", str(pair["overlay"]), "--weights", str(pair["weights"]),
                   "--t1", str(pair["t1"]), "--t2", str(pair["t2"]), *grid_args, "--out", str(out), "--threads", "1", "--quiet",
                   "--keep-background"])  # the server takes the scans as they are
        assert rc == 0
        return {c: nib.load(str(out / f"{c}w_sr.nii.gz")) for c in ("t1", "t2")}

    return {"default": run("default", "--spacing", "1"), "aniso": run("aniso", "--spacing", "0.8", "1.0", "1.6"),
            "like": run("like", "--like", str(pair["like"]))}


def _files(pair, **extra):
    return {"t1": ("t1_lr.nii.gz", pair["t1"].read_bytes()), "t2": ("t2_lr.nii.gz", pair["t2"].read_bytes()), **extra}


def _post(server, files, params=None, output=None, model="nexus_inr"):
    query = f"?output={output}" if output else ""
    data = {"params": json.dumps(params)} if params is not None else None
    return requests.post(f"{server['url']}/infer/{model}{query}", files=files, data=data, timeout=120)


def _nifti(raw: bytes) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(raw))


def _same(img, ref):
    assert img.shape == ref.shape
    np.testing.assert_array_equal(img.affine, ref.affine)
    np.testing.assert_array_equal(np.asarray(img.dataobj), np.asarray(ref.dataobj))


def _zip_members(raw: bytes) -> dict:
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


# --- the running service ---------------------------------------------------------------------

def test_info_lists_models(server, pair):
    r = requests.get(f"{server['url']}/info/", timeout=30)
    assert r.status_code == 200
    info = r.json()
    assert list(info["models"]) == ["nexus_inr"]
    m = info["models"]["nexus_inr"]
    assert set(m["inputs"]) == {"t1", "t2"} and m["outputs"] == {"t1": "t1w_sr.nii.gz", "t2": "t2w_sr.nii.gz"}
    assert m["dimension"] == 3 and m["type"] == "others" and m["labels"] == [] and m["description"]
    assert m["weights"]["sha256"] == hashlib.sha256(pair["weights"].read_bytes()).hexdigest()
    assert m["network_parameters"] == pair["num_parameters"]
    meta = BUNDLE / "configs" / "metadata.json"
    assert m["version"] == (json.loads(meta.read_text())["version"] if meta.is_file() else "unversioned")
    assert info["version"] and info["versions"]["monai"] and info["limits"]["max_upload_bytes"] == int(MAX_UPLOAD_MB * 2**20)


@pytest.mark.parametrize("grid", ["default", "aniso", "like"])
def test_infer_matches_nexus_sr_predict(server, pair, predicted, grid):
    files, params = _files(pair), {}
    if grid == "aniso":
        params = {"spacing": [0.8, 1.0, 1.6]}
    if grid == "like":
        files["like"] = ("ref.nii.gz", pair["like"].read_bytes())
        params = {"like": "like"}
    r = _post(server, files, params, output="zip")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/zip"
    members = _zip_members(r.content)
    assert set(members) == {"t1w_sr.nii.gz", "t2w_sr.nii.gz", "result.json"}
    for c in ("t1", "t2"):
        _same(_nifti(members[f"{c}w_sr.nii.gz"]), predicted[grid][c])
    meta = json.loads(members["result.json"])
    assert meta["grid"]["shape"] == list(predicted[grid]["t1"].shape)
    np.testing.assert_allclose(meta["grid"]["affine"], predicted[grid]["t1"].affine)
    if grid == "like":  # the oblique reference grid itself, not the T1's field of view
        np.testing.assert_allclose(predicted["like"]["t1"].affine, nib.load(str(pair["like"])).affine, atol=1e-6)


def test_output_kinds_and_file_parts(server, pair, predicted):
    ref = predicted["default"]
    # one contrast, output=image: the NIfTI itself, metadata in a header
    r = _post(server, _files(pair), {"contrast": "t2"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/gzip"
    assert 'filename="t2w_sr.nii.gz"' in r.headers["content-disposition"]
    _same(_nifti(r.content), ref["t2"])
    assert json.loads(r.headers["x-nexus-result"])["contrasts"] == ["t2"]
    # output=json: metadata only
    r = _post(server, _files(pair), output="json")
    meta = r.json()
    assert r.status_code == 200 and meta["grid"]["shape"] == list(ref["t1"].shape) and meta["files"] == {"t1": "t1w_sr.nii.gz", "t2": "t2w_sr.nii.gz"}
    assert meta["inputs"]["t2"]["shape"] == [16, 4, 16] and meta["inputs"]["t1"]["spacing_mm"] == [1.0, 1.0, 2.0]
    assert meta["latency_s"]["inference"] > 0
    # output=all: MONAI Label's multipart (params JSON + one part per contrast), read with the stdlib parser;
    # the scans sent as MONAI Label does, every scan a `file` part, their order in params.modalities
    files = [("file", ("b.nii.gz", pair["t2"].read_bytes())), ("file", ("a.nii.gz", pair["t1"].read_bytes()))]
    r = requests.post(f"{server['url']}/infer/nexus_inr?output=all", files=files,
                      data={"params": json.dumps({"modalities": ["t2", "t1"], "device": "cuda"})}, timeout=120)
    assert r.status_code == 200 and r.headers["content-type"].startswith("multipart/form-data")
    msg = email.message_from_bytes(b"content-type: " + r.headers["content-type"].encode() + b"\r\n\r\n" + r.content,
                                   policy=email.policy.HTTP)
    parts = {p.get_param("name", header="content-disposition"): p for p in msg.iter_parts()}
    assert set(parts) == {"params", "t1", "t2", "t1_consistency", "t2_consistency"}  # + the guard's residual maps
    assert json.loads(parts["params"].get_payload(decode=True))["ignored_params"] == ["device"]
    for c in ("t1", "t2"):
        assert parts[c].get_filename() == f"{c}w_sr.nii.gz"
        _same(_nifti(parts[c].get_payload(decode=True)), ref[c])
        assert parts[f"{c}_consistency"].get_filename() == f"{c}w_consistency.nii.gz"
        residual = _nifti(parts[f"{c}_consistency"].get_payload(decode=True))
        assert residual.shape == ref[c].shape and np.allclose(residual.affine, ref[c].affine)


def test_eight_concurrent_clients(server, pair, predicted):
    body = {"t1": pair["t1"].read_bytes(), "t2": pair["t2"].read_bytes()}

    def one(_):
        files = {c: (f"{c}.nii.gz", b) for c, b in body.items()}
        start = time.perf_counter()
        r = requests.post(f"{server['url']}/infer/nexus_inr?output=zip", files=files, timeout=300)
        return r, time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    wall = time.perf_counter() - start
    assert [r.status_code for r, _ in results] == [200] * 8
    for r, _ in results:
        members = _zip_members(r.content)
        for c in ("t1", "t2"):
            _same(_nifti(members[f"{c}w_sr.nii.gz"]), predicted["default"][c])
    print(f"\n8 concurrent clients: {8 / wall:.2f} requests/s, wall {wall:.2f} s, "
          f"latency min/max {min(t for _, t in results):.2f}/{max(t for _, t in results):.2f} s")


def _bad_cases(pair, tmp):
    t1, t2 = pair["t1"].read_bytes(), pair["t2"].read_bytes()
    raw_t1 = gzip.decompress(t1)
    img = nib.load(str(pair["t1"]))
    nan = np.asarray(img.dataobj).copy()
    nan[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(nan, img.affine), str(tmp / "nan.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.float32), img.affine), str(tmp / "four_d.nii.gz"))
    png = b"\x89PNG\r\n\x1a\n" + bytes(600)
    far = make_affine((1.0, 1.0, 1.0), (500.0, 500.0, 500.0)).numpy()
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), far), str(tmp / "far.nii.gz"))
    header = nib.Nifti1Header()
    header.set_data_shape((2000, 2000, 2000))
    header.set_data_dtype(np.float32)
    huge = gzip.compress(header.binaryblock + bytes(4) + bytes(4096))  # a few KB that would decompress-and-allocate 32 GB
    big = gzip.compress(raw_t1[:352] + os.urandom(int(MAX_UPLOAD_MB * 2**20)), compresslevel=1)  # incompressible: over the limit
    return [
        # (name, files, params, status, source)
        ("truncated gzip NIfTI", {"t1": ("t1.nii.gz", t1[: len(t1) // 2]), "t2": ("t2.nii.gz", t2)}, None, 422, "t1 upload 't1.nii.gz'"),
        ("gzip magic, corrupt stream", {"t1": ("t1.nii.gz", b"\x1f\x8b" + os.urandom(600)), "t2": ("t2.nii.gz", t2)}, None, 422, "t1 upload 't1.nii.gz'"),
        ("raw NIfTI, data cut", {"t1": ("t1.nii", raw_t1[:400]), "t2": ("t2.nii.gz", t2)}, None, 422, "t1 upload 't1.nii'"),
        ("PNG named .nii.gz", {"t1": ("t1.nii.gz", png), "t2": ("t2.nii.gz", t2)}, None, 415, "t1 upload 't1.nii.gz'"),
        ("text file", {"t1": ("t1.nii.gz", t1), "t2": ("notes.nii", b"hello " * 200)}, None, 415, "t2 upload 'notes.nii'"),
        ("NaN voxel", {"t1": ("t1.nii.gz", (tmp / "nan.nii.gz").read_bytes()), "t2": ("t2.nii.gz", t2)}, None, 422, "t1 upload 't1.nii.gz'"),
        ("4D volume", {"t1": ("t1.nii.gz", t1), "t2": ("t2.nii.gz", (tmp / "four_d.nii.gz").read_bytes())}, None, 422, "t2 upload 't2.nii.gz'"),
        ("oversized upload", {"t1": ("t1.nii.gz", big), "t2": ("t2.nii.gz", t2)}, None, 413, "request"),
        ("header declares 8e9 voxels", {"t1": ("huge.nii.gz", huge), "t2": ("t2.nii.gz", t2)}, None, 413, "t1 upload 'huge.nii.gz'"),
        ("missing modality", {"t1": ("t1.nii.gz", t1)}, None, 400, "t2"),
        ("../ filename", {"t1": ("../../escape.nii.gz", t1), "t2": ("t2.nii.gz", t2)}, None, 400, "t1"),
        ("absolute filename", {"t1": ("t1.nii.gz", t1), "t2": ("/tmp/t2.nii.gz", t2)}, None, 400, "t2"),
        ("backslash filename", {"t1": ("..\\t1.nii.gz", t1), "t2": ("t2.nii.gz", t2)}, None, 400, "t1"),
        ("like is a path", {"t1": ("t1.nii.gz", t1), "t2": ("t2.nii.gz", t2)}, {"like": "/etc/hostname"}, 400, "params"),
        ("bad spacing", {"t1": ("t1.nii.gz", t1), "t2": ("t2.nii.gz", t2)}, {"spacing": [1, -1, 1]}, 400, "params"),
        ("unreachable grid", {"t1": ("t1.nii.gz", t1), "t2": ("t2.nii.gz", t2), "like": ("far.nii.gz", (tmp / "far.nii.gz").read_bytes())},
         {"like": "like"}, 422, "t1 upload 't1.nii.gz'"),
        ("unexpected field", {"t1": ("t1.nii.gz", t1), "t2": ("t2.nii.gz", t2), "label": ("l.nii.gz", t1)}, None, 400, "label"),
    ]


def test_bad_requests_get_4xx_json_and_server_keeps_serving(server, pair, tmp_path):
    for name, files, params, status, source in _bad_cases(pair, tmp_path):
        r = _post(server, files, params)
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        body = r.json()
        assert body["status"] == status and body["source"] == source, (name, body)
        assert "\n" not in body["detail"] and "Traceback" not in r.text and str(server["work"]) not in r.text, (name, body)
    # other refusals: not JSON params, unknown model, not multipart, a chunked body over the limit
    r = requests.post(f"{server['url']}/infer/nexus_inr", files=_files(pair), data={"params": "{spacing: 1"}, timeout=60)
    assert r.status_code == 400 and r.json()["source"] == "params"
    r = _post(server, _files(pair), model="no_such_model")
    assert r.status_code == 404 and "nexus_inr" in r.json()["detail"]
    r = requests.post(f"{server['url']}/infer/nexus_inr", data=b"{}", headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 415
    def chunked_upload():  # a well-formed multipart body streamed without content-length, larger than the limit
        yield b'--xyz\r\ncontent-disposition: form-data; name="t1"; filename="t1.nii.gz"\r\ncontent-type: application/gzip\r\n\r\n'
        for _ in range(int(MAX_UPLOAD_MB * 16) + 4):
            yield bytes(64 << 10)
        yield b"\r\n--xyz--\r\n"

    r = requests.post(f"{server['url']}/infer/nexus_inr", data=chunked_upload(), headers={"content-type": "multipart/form-data; boundary=xyz"}, timeout=60)
    assert "content-length" not in {k.lower() for k in r.request.headers} and r.request.headers["transfer-encoding"] == "chunked"
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    assert not (pair["dir"].parent / "escape.nii.gz").exists() and not (server["work"].parent / "escape.nii.gz").exists()
    # still serving, and nothing left in the work folder
    assert requests.get(f"{server['url']}/info/", timeout=30).status_code == 200
    assert _post(server, _files(pair), {"contrast": "t1"}).status_code == 200
    deadline = time.time() + 10
    while any(server["work"].iterdir()) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(server["work"].iterdir())
    assert server["proc"].poll() is None


# --- pieces, without a server ----------------------------------------------------------------

class _FailingModel:
    """A model whose prediction fails unexpectedly (a bug, not bad input)."""

    inputs, outputs, version, weights_sha256 = ("t1", "t2"), ("t1", "t2"), "test", None

    def info(self):
        return {"type": "others", "labels": [], "dimension": 3, "description": "fails", "version": self.version}

    def predict(self, scans, out_dir, params):
        raise RuntimeError(f"secret internal state at {out_dir}")


def test_unexpected_failure_is_500_without_traceback(pair, tmp_path):
    from nexus_monai.serving.app import create_app

    app = create_app({"fails": _FailingModel()}, workdir=tmp_path / "work")
    with live_server(app) as url:
        r = requests.post(f"{url}/infer/fails", files=_files(pair), timeout=60)
        assert r.status_code == 500
        assert set(r.json()) == {"detail", "status", "source", "problem"} and "reference" in r.json()["detail"]
        assert "secret" not in r.text and "Traceback" not in r.text and "RuntimeError" not in r.text
        assert requests.get(f"{url}/info/", timeout=30).json()["models"]["fails"]["description"] == "fails"
        assert not any((tmp_path / "work").iterdir())


def test_queue_is_bounded():
    queue = InferenceQueue(workers=1, max_pending=2)
    gate = threading.Event()
    first, second = queue.submit(gate.wait), queue.submit(lambda: 7)
    with pytest.raises(ServingError) as err:
        queue.submit(lambda: 8)
    assert err.value.status == 503 and queue.stats()["rejected"] == 1
    gate.set()
    assert first.result(timeout=10) is True and second.result(timeout=10) == 7
    deadline = time.time() + 10
    while queue.stats()["pending"] and time.time() < deadline:
        time.sleep(0.01)
    assert queue.submit(lambda: 9).result(timeout=10) == 9  # slots come back
    queue.shutdown()


@pytest.mark.parametrize("raw,expected", [
    (None, dict(spacing_mm=None, like=None, contrasts=("t1", "t2"), output="image")),
    ('{"spacing": 0.5}', dict(spacing_mm=(0.5, 0.5, 0.5))),
    ({"target_spacing": [1, 2, 3], "contrast": "T2", "output": "zip"}, dict(spacing_mm=(1.0, 2.0, 3.0), contrasts=("t2",), output="zip")),
    ('{"like": "t2", "modalities": ["t2", "t1"], "result_extension": ".nii"}', dict(like="t2", modalities=("t2", "t1"), ignored=("result_extension",))),
])
def test_parse_params(raw, expected):
    p = parse_params(raw)
    for key, value in expected.items():
        assert getattr(p, key) == value


@pytest.mark.parametrize("raw", ['[1, 2]', "{bad", '{"spacing": [1, 2]}', '{"spacing": 0}', '{"spacing": "a"}',
                                 '{"like": "../ref.nii.gz"}', '{"like": "t1", "spacing": 1}', '{"contrast": "flair"}',
                                 '{"contrast": ["t1", "t1"]}', '{"output": "dicom_seg"}'])
def test_parse_params_refuses(raw):
    with pytest.raises(ServingError) as err:
        parse_params(raw)
    assert err.value.status == 400 and err.value.source == "params"


@pytest.mark.parametrize("name,ok", [("scan.nii.gz", True), ("BraTS20_001_t1.nii", True), ("", True), ("../scan.nii.gz", False),
                                     ("a/b.nii", False), ("/etc/passwd", False), ("..", False), ("c:\\x.nii", False),
                                     ("x\x00.nii", False), ("x\n.nii", False)])
def test_check_filename(name, ok):
    if ok:
        assert check_filename(name, "t1") == name
    else:
        with pytest.raises(ServingError) as err:
            check_filename(name, "t1")
        assert err.value.status == 400


@pytest.mark.parametrize("kind", ["nifti1", "nifti1_gz", "nifti2", "nifti2_gz", "nifti1_big_endian"])
def test_nifti_magic_from_nibabel_files(kind, tmp_path):
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    cls = nib.Nifti2Image if kind.startswith("nifti2") else nib.Nifti1Image
    if kind == "nifti1_big_endian":
        img = nib.Nifti1Image(data.astype(">f4"), np.eye(4), header=nib.Nifti1Header(endianness=">"))
    else:
        img = cls(data, np.eye(4))
    path = tmp_path / ("x.nii.gz" if kind.endswith("_gz") else "x.nii")
    nib.save(img, str(path))
    with open(path, "rb") as f:
        assert nifti_suffix(f, "t1") == (".nii.gz" if kind.endswith("_gz") else ".nii")
        assert f.tell() == 0


def test_not_nifti_by_content_whatever_the_name(tmp_path):
    hdr_img = nib.Nifti1Pair(np.zeros((2, 2, 2), np.float32), np.eye(4))  # .hdr/.img pair: magic "ni1", not single-file
    nib.save(hdr_img, str(tmp_path / "pair.hdr"))
    for content in [(tmp_path / "pair.hdr").read_bytes(), b"\x89PNG\r\n\x1a\n" + bytes(600), b"", gzip.compress(b"not a header" * 100)]:
        with pytest.raises(ServingError) as err:
            nifti_suffix(io.BytesIO(content), "t1")
        assert err.value.status == 415


def test_cli_serve_bad_bundle_is_one_line(tmp_path, capsys):
    rc = main(["serve", "--bundle", str(tmp_path / "nope"), "--port", "0"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "not a bundle folder" in err


# --- the MONAI Label app: its plain-Python request handling (monailabel itself is not installable here) ---

APP_DIR = REPO / "nexus_monai" / "serving" / "monailabel_app"


@pytest.mark.parametrize("name,contrast", [("BraTS20_Training_001_t1.nii.gz", "t1"), ("BraTS20_Training_001_t2.nii.gz", "t2"),
                                           ("BraTS-GLI-00001-000-t1n.nii.gz", "t1"), ("BraTS-GLI-00001-000-t2w.nii.gz", "t2"),
                                           ("sub-01_T1w.nii", "t1"), ("subj_t1_lr.nii.gz", "t1"), ("BraTS20_001_t1ce.nii.gz", None),
                                           ("BraTS20_001_flair.nii.gz", None), ("t1_registered_to_t2.nii.gz", "t2")])
def test_scan_contrast(name, contrast):
    from nexus_monai.serving.monailabel_app.lib.infers.sr_request import scan_contrast

    assert scan_contrast(name) == contrast


@pytest.mark.parametrize("image,other,expected", [("s01_t1_lr.nii.gz", "t2", "s01_t2_lr.nii.gz"), ("sub-01_T1w.nii.gz", "t2", "sub-01_T2w.nii.gz"),
                                                  ("X-001-t2w.nii.gz", "t1", "X-001-t1n.nii.gz"), ("s02_t1.nii.gz", "t2", None)])
def test_companion_scan(tmp_path, image, other, expected):
    from nexus_monai.serving.monailabel_app.lib.infers.sr_request import companion_scan

    for name in ("s01_t1_lr.nii.gz", "s01_t2_lr.nii.gz", "sub-01_T1w.nii.gz", "sub-01_T2w.nii.gz", "X-001-t1n.nii.gz", "X-001-t2w.nii.gz",
                 "s02_t1.nii.gz", "s02_t2.nii"):  # s02: different suffix is not the same subject's scan
        (tmp_path / name).write_bytes(b"")
    found = companion_scan(tmp_path / image, other)
    assert (found.name if found else None) == expected


@pytest.fixture(scope="module")
def bundle_model(pair):
    from nexus_monai.serving.models import BundleModel

    torch.set_num_threads(1)
    return BundleModel(BUNDLE, [str(pair["overlay"])], pair["weights"], device="cpu")


@pytest.mark.parametrize("image,request_params,grid,contrast", [
    ("subj_t1.nii.gz", {"spacing": [0.8, 1.0, 1.6]}, "aniso", "t1"),
    ("subj_t2.nii.gz", {"device": "cuda", "spacing": "", "like": ""}, "default", "t2"),  # MONAI Label's empty config values
    ("subj_t1.nii.gz", {"contrast": "t2"}, "default", "t2"),
])
def test_monailabel_request_steps_match_predict(pair, predicted, bundle_model, tmp_path, image, request_params, grid, contrast):
    from nexus_monai.serving.monailabel_app.lib.infers.sr_request import PrepareSRRequest, predict_request, write_result

    studies = tmp_path / "studies"
    studies.mkdir()
    for c in ("t1", "t2"):
        (studies / f"subj_{c}.nii.gz").write_bytes(pair[c].read_bytes())
    data = PrepareSRRequest()({"model": "nexus_inr", "image": str(studies / image), **request_params})
    assert {c: p.name for c, p in data["sr_scans"].items()} == {"t1": "subj_t1.nii.gz", "t2": "subj_t2.nii.gz"}
    data = predict_request(bundle_model, data, workdir=tmp_path)
    path, result = write_result(data, "nexus_inr")
    try:
        _same(nib.load(path), predicted[grid][contrast])
        assert result["contrast"] == contrast and result["grid_shape"] == list(predicted[grid][contrast].shape)
        assert not data["sr_folder"].exists() and sorted(p.name for p in tmp_path.iterdir()) == ["studies"]
    finally:
        os.unlink(path)


@pytest.mark.parametrize("files,request_params,source", [
    (["subj_t1.nii.gz"], {}, "t2"),                                    # no T2 beside the T1
    (["subj_flair.nii.gz", "subj_t2.nii.gz"], {}, "image"),           # contrast not in the name
    (["subj_t1.nii.gz", "subj_t2.nii.gz"], {"contrasts": ["t1", "t2"]}, "params"),  # MONAI Label returns one image
    (["subj_t1.nii.gz", "subj_t2.nii.gz"], {"like": "../x.nii.gz"}, "params"),
])
def test_monailabel_request_refusals(tmp_path, files, request_params, source):
    from nexus_monai.serving.monailabel_app.lib.infers.sr_request import prepare_request

    for name in files:
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ServingError) as err:
        prepare_request({"image": str(tmp_path / files[0]), **request_params})
    assert err.value.status == 400 and err.value.source == source


def test_monailabel_app_files_compile_and_guard_the_import():
    import py_compile

    for rel in ("main.py", "lib/infers/nexus_sr.py", "lib/infers/sr_request.py"):
        py_compile.compile(str(APP_DIR / rel), doraise=True)
    try:
        import monailabel  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs monailabel"):
            import nexus_monai.serving.monailabel_app.lib.infers.nexus_sr  # noqa: F401


def test_monailabel_task_end_to_end(pair, predicted, bundle_model, tmp_path):
    """Only where monailabel is installed: the real BasicInferTask pipeline returns predict's volume."""
    pytest.importorskip("monailabel")
    from nexus_monai.serving.monailabel_app.lib.infers.nexus_sr import NexusSRInfer

    for c in ("t1", "t2"):
        (tmp_path / f"subj_{c}.nii.gz").write_bytes(pair[c].read_bytes())
    path, result = NexusSRInfer(bundle_model)({"model": "nexus_inr", "image": str(tmp_path / "subj_t2.nii.gz"), "device": "cpu"})
    _same(nib.load(path), predicted["default"]["t2"])
    os.unlink(path)
