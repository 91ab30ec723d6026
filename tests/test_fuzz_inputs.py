"""Seeded fuzzing of every face that takes a user's files and numbers: ``degrade``, ``upsample``,
``predict``, ``fit-subject`` (tiny budget) and the REST server.

Corrupt and odd NIfTI files (truncated, garbage, empty, NaN/Inf voxels, 4D, 2D, complex, singular
or NaN affines, a header declaring a huge volume, ...) meet odd parameters (NaN, Inf, negative,
zero, 1e308, 1e-4, ...). Every case must end with exit 0 or 2 (HTTP 2xx or 4xx), never a
traceback; exit 2 prints exactly one ``error:`` line and leaves no file in the output folder.
"""

import contextlib
import io
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from nexus_monai.cli import main

from dicom_helpers import make_bad_series, write_series
from helpers import BUNDLE, fit_args, live_server, make_tiny_pair, predict_args

SEED = 13
N_CLI = 190
N_SERVER = 40


def _nifti(path: Path, data, affine=None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def _patched_sform(path: Path, data, srow_x) -> Path:
    """A .nii whose sform's first row is ``srow_x`` (NaN or singular: nibabel refuses to write those)."""
    img = nib.Nifti1Image(data, np.eye(4))
    img.set_qform(None, code=0)
    img.set_sform(np.eye(4), code=1)
    nib.save(img, str(path))
    raw = bytearray(path.read_bytes())
    raw[280:296] = struct.pack("<4f", *srow_x)
    path.write_bytes(bytes(raw))
    return path


def make_odd_files(d: Path, pair: dict) -> dict:
    """name -> path of odd inputs (valid ones included so that some cases do real work)."""
    rng = np.random.default_rng(SEED)
    good = np.asarray(nib.load(str(pair["t1"])).dataobj, np.float32)
    files = {"t1": pair["t1"], "t2": pair["t2"], "hr": pair["hr"]}
    raw = pair["t1"].read_bytes()
    (d / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    (d / "garbage.nii.gz").write_bytes(rng.integers(0, 256, 2000, dtype=np.uint8).tobytes())
    (d / "empty.nii").write_bytes(b"")
    (d / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    nan = good.copy()
    nan[1, 1, 1] = np.nan
    inf = good.copy()
    inf[2, 2, 2] = np.inf
    aff = np.asarray(nib.load(str(pair["t1"])).affine)
    files.update({
        "truncated": d / "truncated.nii.gz", "garbage": d / "garbage.nii.gz", "empty": d / "empty.nii", "png": d / "image.png",
        "missing": d / "missing.nii.gz",
        "nan_voxels": _nifti(d / "nan.nii.gz", nan, aff), "inf_voxels": _nifti(d / "inf.nii.gz", inf, aff),
        "4d": _nifti(d / "4d.nii.gz", np.stack([good, good], -1), aff), "2d": _nifti(d / "2d.nii.gz", good[:, :, 0], aff),
        "complex": _nifti(d / "complex.nii.gz", good.astype(np.complex64), aff),
        "singular_affine": _patched_sform(d / "singular.nii", good, (0.0, 0.0, 0.0, -8.0)),
        "one_voxel": _nifti(d / "one.nii.gz", np.ones((1, 1, 1), np.float32), aff),
        "int16": _nifti(d / "int16.nii.gz", good.astype(np.int16), aff),
        "zeros": _nifti(d / "zeros.nii.gz", np.zeros_like(good), aff),
        "flipped": _nifti(d / "flipped.nii.gz", good, aff @ np.diag([-1.0, 1.0, 1.0, 1.0])),
    })
    files["nan_affine"] = _patched_sform(d / "nan_affine.nii", np.zeros((4, 4, 4), np.float32), (float("nan"), 0.0, 0.0, 0.0))
    huge = bytearray((d / "nan_affine.nii").read_bytes()[:352])  # header claiming 30000^3 voxels, no data
    huge[42:48] = struct.pack("<hhh", 30000, 30000, 30000)
    (d / "huge.nii").write_bytes(bytes(huge))
    files["huge_header"] = d / "huge.nii"
    return files


NUMBERS = ["nan", "inf", "-inf", "-1", "0", "1e308", "1e-4", "0.5", "1", "2", "2.5", "3"]


def _cli_case(rng, files: dict, pair: dict, out: Path) -> list[str]:
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    good_bias = lambda: pick(["t1", "t2", "hr"]) if rng.random() < 0.5 else pick(sorted(files))  # noqa: E731
    command = pick(["degrade", "upsample", "upsample", "predict", "predict", "fit-subject"])
    grid = ["--like", str(files[good_bias()])] if rng.random() < 0.2 else [f"--spacing={pick(NUMBERS)}"]
    if command == "degrade":
        return ["degrade", "--image", str(files[good_bias()]), "--axis", pick(["x", "y", "z", "w"]), f"--factor={pick(NUMBERS)}",
                f"--noise={pick(['0', '0.05', 'nan', '-1', '1e3'])}", "--out", str(out / pick(["d.nii.gz", "d.nii", "d.png"]))]
    if command == "upsample":
        return ["upsample", "--image", str(files[good_bias()]), "--method", pick(["trilinear", "cubic", "nearest"]), *grid,
                "--out", str(out / "u.nii.gz")]
    inputs = {"t1": files[good_bias() if rng.random() < 0.5 else "t1"], "t2": files[good_bias() if rng.random() < 0.5 else "t2"]}
    if grid[0] == "--spacing=1e-4":
        grid[0] = "--spacing=0.5"  # a legal but 100-million-voxel grid would test the machine, not the checks (the limit is tested)
    if command == "predict":
        argv = predict_args({**pair, **inputs}, out / "p", *grid)
        return argv + ([f"--chunk-size={pick(['0', '-5', '4096'])}"] if rng.random() < 0.2 else [])
    argv = fit_args({**pair, **inputs}, out / "f", *grid)
    return argv + ([f"--epochs={pick(['0', '1', '-3'])}"] if rng.random() < 0.3 else []) + [f"--max-minutes={pick(['0.01', 'nan', '-1'])}"]


def _files_in(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


@pytest.fixture(scope="module")
def fuzz_setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    pair = make_tiny_pair(d / "pair")
    return d, pair, make_odd_files(d, pair)


def test_fuzz_cli_exit_0_or_2_never_a_traceback(fuzz_setup, tmp_path):
    _, pair, files = fuzz_setup
    rng = np.random.default_rng(SEED)
    seen = {0: 0, 2: 0}
    for i in range(N_CLI):
        out = tmp_path / f"case{i:03d}"
        argv = _cli_case(rng, files, pair, out)
        err, std = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
            try:
                rc = main(argv)
            except SystemExit as exc:  # argparse refusing a value (e.g. an unknown --method) exits 2 itself
                rc = exc.code
            except BaseException as exc:  # noqa: BLE001 - the point: report which case raised
                pytest.fail(f"case {i} {argv}: traceback {type(exc).__name__}: {exc}")
        assert rc in (0, 2), (i, argv, rc, err.getvalue()[-500:])
        seen[rc] += 1
        if rc == 2:
            lines = [ln for ln in err.getvalue().splitlines() if "error:" in ln]
            assert len(lines) == 1, (i, argv, err.getvalue()[-800:])
            assert not _files_in(out), (i, argv, _files_in(out))
        else:
            assert _files_in(out), (i, argv)
    assert seen[0] >= 10 and seen[2] >= 50, seen  # both outcomes exercised


def test_fuzz_server_2xx_or_4xx_never_500(fuzz_setup, tmp_path):
    _, pair, files = fuzz_setup
    from nexus_monai.serving.app import create_app
    from nexus_monai.serving.models import BundleModel

    model = BundleModel(BUNDLE, [str(pair["overlay"])], weights=pair["weights"], device="cpu")
    app = create_app({"nexus_inr": model}, workdir=tmp_path / "work")
    rng = np.random.default_rng(SEED + 1)
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    spacings = ["1", "2", "[1, 2, 3]", "0", "-1", "1e308", "1e-4", "NaN", "Infinity", "true", '"a"', "[1, 2]", "null"]
    statuses = []
    with live_server(app) as url:
        for i in range(N_SERVER):
            t1 = files[pick(["t1", "t1", *sorted(files)])]
            t2 = files[pick(["t2", "t2", *sorted(files)])]
            upload = {"t1": ("t1.nii.gz", t1.read_bytes() if t1.exists() else b""),
                      "t2": ("t2.nii.gz", t2.read_bytes() if t2.exists() else b"")}
            params = f'{{"spacing": {pick(spacings)}}}'
            if rng.random() < 0.2:
                like = files[pick(sorted(files))]
                upload["like"] = ("like.nii", like.read_bytes() if like.exists() else b"")
                params = '{"like": "like"}'
            r = requests.post(f"{url}/infer/nexus_inr", files=upload, data={"params": params},
                              params={"output": pick(["json", "zip", "image"])}, timeout=120)
            assert r.status_code < 500, (i, params, r.status_code, r.text[:300])
            if r.status_code >= 400:
                body = r.json()
                assert set(body) == {"detail", "status", "source", "problem"} and "Traceback" not in r.text
            statuses.append(r.status_code)
    assert any(s == 200 for s in statuses) and any(400 <= s < 500 for s in statuses), statuses
    assert not any((tmp_path / "work").iterdir())


def test_fuzz_dicom_series_exit_2_one_line_nothing_written(fuzz_setup, tmp_path):
    """Corrupt, mixed, non-uniform ... DICOM series folders as --t1 / --t2 / --like of predict (NIfTI or DICOM out)
    and fit-subject: exit 2, one ``error:`` line naming the folder, no file in the output folder."""
    d, pair, _ = fuzz_setup
    img = nib.load(str(pair["t1"]))
    data, affine = np.asarray(img.dataobj, np.float32), img.affine
    bad = make_bad_series(d / "bad_series", data, affine)
    good = write_series(d / "good_series", data, affine, slope=0.01)
    rng = np.random.default_rng(SEED + 2)
    for i in range(24):
        name = sorted(bad)[i % len(bad)]
        slot = ["t1", "t2", "like"][int(rng.integers(3))]
        inputs = {**pair, "t1": good, slot: bad[name]} if slot != "like" else {**pair, "t1": good}
        grid = ["--like", str(bad[name])] if slot == "like" else ["--spacing", "2"]
        out = tmp_path / f"case{i:02d}"
        if rng.random() < 0.25 and slot != "like":
            argv = fit_args(inputs, out, *grid) + ["--max-minutes=0.005"]
        else:
            argv = predict_args(inputs, out, *grid) + (["--out-format", "dicom"] if rng.random() < 0.5 else [])
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(argv)
        lines = [ln for ln in err.getvalue().splitlines() if "error:" in ln]
        assert rc == 2 and len(lines) == 1 and str(bad[name]) in lines[0], (i, name, slot, err.getvalue()[-500:])
        assert not _files_in(out), (i, name, _files_in(out))


def _zip_bytes(entries) -> bytes:
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries:
            z.writestr(name, data)
    return buf.getvalue()


def test_fuzz_server_series_zips_never_500(fuzz_setup, tmp_path):
    """Zip uploads of good and bad series (zip-slip, absolute paths, mixed, truncated, garbage, empty, a
    decompression bomb, not a zip at all) mixed with NIfTI: 2xx or one-line 4xx JSON, no file left behind."""
    d, pair, _ = fuzz_setup
    from nexus_monai.serving.app import create_app
    from nexus_monai.serving.models import BundleModel

    img = nib.load(str(pair["t1"]))
    data, affine = np.asarray(img.dataobj, np.float32), img.affine
    series = make_bad_series(d / "zip_series", data, affine)
    series["good"] = write_series(d / "zip_series" / "good", data, affine, slope=0.01)
    zips = {k: _zip_bytes([(f"s/{f.name}", f.read_bytes()) for f in sorted(v.iterdir())]) for k, v in series.items()}
    zips.update({"slip": _zip_bytes([("../../x.dcm", b"x")]), "absolute": _zip_bytes([("/tmp/x.dcm", b"x")]),
                 "bomb": _zip_bytes([("big.dcm", bytes(4 << 20))]), "not_zip": b"PK\x03\x04" + bytes(64)})
    model = BundleModel(BUNDLE, [str(pair["overlay"])], weights=pair["weights"], device="cpu", max_output_voxels=1e5)
    app = create_app({"nexus_inr": model}, workdir=tmp_path / "work")
    rng = np.random.default_rng(SEED + 3)
    statuses = []
    with live_server(app) as url:
        for i, key in enumerate(rng.permutation(sorted(zips))):  # every kind once, in a seeded order
            upload = {"t1": ("t1.zip", zips[key]), "t2": ("t2.nii.gz", pair["t2"].read_bytes())}
            r = requests.post(f"{url}/infer/nexus_inr", files=upload, data={"params": '{"spacing": 2}'},
                              params={"output": "json"}, timeout=120)
            assert r.status_code < 500 and (r.status_code == 200) == (key == "good"), (i, key, r.text[:300])
            if r.status_code >= 400:
                body = r.json()
                assert set(body) == {"detail", "status", "source", "problem"} and "\n" not in body["detail"], body
            statuses.append(r.status_code)
    assert not any((tmp_path / "work").iterdir()) and not (tmp_path / "x.dcm").exists()
    assert len(set(statuses)) >= 3, statuses  # 200 and several refusals (400 / 413 / 422)
