"""``serve`` with DICOM series uploaded as zips: the same answer as the NIfTI uploads, zip-slip and size limits
refused with one-line 4xx JSON, nothing left in the work folder, no patient data in the log."""

import gzip
import io
import logging
import stat
import zipfile

import nibabel as nib
import numpy as np
import pytest
import requests

from nexus_monai.serving.params import ServingError
from nexus_monai.serving.uploads import store_series_zip, store_upload

from dicom_helpers import PATIENT, quantised, write_series
from helpers import BUNDLE, live_server, make_tiny_pair

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _zip(entries) -> bytes:
    """``entries``: (name, bytes) or (ZipInfo, bytes)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries:
            z.writestr(name, data)
    return buf.getvalue()


def _series_zip(folder, prefix="T1/") -> bytes:
    files = sorted(folder.iterdir())
    return _zip([(f"{prefix}{f.name}", f.read_bytes()) for f in files]
                + [("__MACOSX/._x", b"junk"), (f"{prefix}.DS_Store", b"junk")])


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_dicom")
    pair = make_tiny_pair(d / "pair")
    for c in ("t1", "t2"):
        img = nib.load(str(pair[c]))
        q = quantised(np.asarray(img.dataobj), 0.01)
        nib.save(nib.Nifti1Image(q, img.affine), str(d / f"{c}_q.nii.gz"))
        write_series(d / f"{c}_series", q, img.affine, slope=0.01)
    return d, pair


def test_zip_is_extracted_flat_without_junk(subject, tmp_path):
    d, _ = subject
    path = store_upload(io.BytesIO(_series_zip(d / "t1_series")), tmp_path, "t1", "t1 upload")
    assert path == tmp_path / "t1_series" and sorted(p.name for p in path.iterdir()) == [
        f"{i:05d}.dcm" for i in range(1, 9)]  # the 8 slices, renamed; __MACOSX and hidden files skipped


@pytest.mark.parametrize("entries,status,words", [
    ([("../evil.dcm", b"x")], 400, "unsafe path"),
    ([("ok/../../evil.dcm", b"x")], 400, "unsafe path"),
    ([("/etc/evil.dcm", b"x")], 400, "unsafe path"),
    ([("C:\\evil.dcm", b"x")], 400, "unsafe path"),
    ([(f"s/{i}.dcm", b"x") for i in range(5)], 413, "above the limit of 4"),
    ([("big.dcm", bytes(3_000_000))], 413, "decompresses to more than"),
    ([("__MACOSX/._a", b"x")], 422, "no files"),
])
def test_bad_zips_refused_before_reading(tmp_path, entries, status, words):
    with pytest.raises(ServingError) as err:
        store_series_zip(io.BytesIO(_zip(entries)), tmp_path, "t1", "t1 upload", max_voxels=1000, max_members=4)
    assert err.value.status == status and words in str(err.value) and "\n" not in str(err.value)
    assert not any(p.name == "evil.dcm" for p in tmp_path.rglob("*")) and not (tmp_path.parent / "evil.dcm").exists()


def test_symlink_and_corrupt_zip_refused(tmp_path):
    link = zipfile.ZipInfo("s/link.dcm")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with pytest.raises(ServingError) as err:
        store_series_zip(io.BytesIO(_zip([(link, b"/etc/passwd")])), tmp_path, "t1", "t1 upload")
    assert err.value.status == 400 and "symbolic link" in str(err.value)
    with pytest.raises(ServingError) as err:
        store_upload(io.BytesIO(b"PK\x03\x04" + bytes(200)), tmp_path, "t2", "t2 upload")
    assert err.value.status == 422 and "corrupt zip" in str(err.value)


def test_serve_series_zip_equals_nifti_upload(subject, tmp_path, caplog):
    from nexus_monai.serving.app import create_app
    from nexus_monai.serving.models import BundleModel

    d, pair = subject
    model = BundleModel(BUNDLE, [str(pair["overlay"])], weights=pair["weights"], device="cpu")
    work = tmp_path / "work"
    app = create_app({"nexus_inr": model}, workdir=work)
    caplog.set_level(logging.DEBUG)
    nifti = {c: (f"{c}.nii.gz", (d / f"{c}_q.nii.gz").read_bytes()) for c in ("t1", "t2")}
    zips = {c: (f"{c}.zip", _series_zip(d / f"{c}_series")) for c in ("t1", "t2")}
    mixed = _zip([(f"a/{f.name}", f.read_bytes()) for f in sorted((d / "t1_series").iterdir())]
                 + [(f"b/{f.name}", f.read_bytes()) for f in sorted((d / "t2_series").iterdir())])
    with live_server(app) as url:
        post = lambda files: requests.post(f"{url}/infer/nexus_inr", files=files, data={"params": '{"spacing": 2}'},  # noqa: E731
                                           params={"output": "image"}, timeout=120)
        ref, got = post(nifti), post(zips)
        slip = post({**zips, "t2": ("t2.zip", _zip([("../../evil.dcm", b"x")]))})
        bad = post({**zips, "t2": ("t2.zip", mixed)})
    assert ref.status_code == got.status_code == 200, got.text[:300]
    a, b = (zipfile.ZipFile(io.BytesIO(r.content)) for r in (ref, got))
    for name in ("t1w_sr.nii.gz", "t2w_sr.nii.gz"):
        va = nib.Nifti1Image.from_bytes(gzip.decompress(a.read(name)))
        vb = nib.Nifti1Image.from_bytes(gzip.decompress(b.read(name)))
        np.testing.assert_allclose(vb.affine, va.affine, atol=1e-4)
        np.testing.assert_allclose(vb.get_fdata(), va.get_fdata(), atol=1e-3 * np.abs(va.get_fdata()).max())
    assert slip.status_code == 400 and "unsafe path" in slip.json()["detail"]
    assert bad.status_code == 422 and "mixed series" in bad.json()["detail"]
    assert "nexus-req" not in bad.json()["detail"] and str(work) not in bad.json()["detail"]
    assert not any(work.iterdir()) and not (work.parent / "evil.dcm").exists()
    assert all(str(v) not in caplog.text for v in PATIENT.values())
