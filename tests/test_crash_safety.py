"""Crash safety: kills at the moment that matters, bad parameters caught before any work.

Kill cases run the real code in a subprocess whose ``torch.save`` / ``os.replace`` is replaced by
a deliberately slow writer (``_HANG``): it writes half of the bytes, touches a signal file and
sleeps; the test then SIGKILLs the process, exactly while a checkpoint is being written or
between two output renames. Each case is one row of the crash-safety issue's table.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from nexus_monai.cli import main
from nexus_monai.geometry import make_affine

from helpers import BUNDLE, REPO, fit_args, live_server, make_tiny_pair, predict_args

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}

# Prelude of every subprocess: the N-th call of torch.save / os.replace (counted separately) hangs
# half-way (torch.save: half the bytes written to its target) after touching $HANG_SIGNAL.
_HANG = r'''
import io, os, sys, time, pathlib, torch
_real_save, _real_replace, _n = torch.save, os.replace, {"save": 0, "replace": 0}
def _hang(kind):
    _n[kind] += 1
    if _n[kind] != int(os.environ.get("HANG_" + kind.upper(), "0")):
        return False
    return True
def _signal_and_sleep():
    pathlib.Path(os.environ["HANG_SIGNAL"]).touch()
    time.sleep(600)
def _save(obj, f, *a, **k):
    if not _hang("save"):
        return _real_save(obj, f, *a, **k)
    buf = io.BytesIO(); _real_save(obj, buf, *a, **k); data = buf.getvalue()
    fh = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f
    fh.write(data[: len(data) // 2]); fh.flush(); os.fsync(fh.fileno())
    _signal_and_sleep()
def _replace(src, dst, *a, **k):
    if _hang("replace"):
        _signal_and_sleep()
    return _real_replace(src, dst, *a, **k)
torch.save, os.replace = _save, _replace
'''

_TRAIN = _HANG + r'''
import logging, yaml
logging.basicConfig(level=logging.INFO)
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from pydoc import locate
from nexus_monai.engines.inr_handlers import TrainingCheckpoint
ckpt_dir, max_epochs = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 1))
opt = torch.optim.SGD(net.parameters(), lr=1e-3)
data = [{"image": torch.randn(4, 64), "label": torch.randn(4, 1)} for _ in range(3)]
trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=max_epochs, train_data_loader=data, network=net,
                            optimizer=opt, loss_function=torch.nn.MSELoss(),
                            train_handlers=[TrainingCheckpoint(ckpt_dir, {"network": net, "optimizer": opt}, save_interval=1)])
trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(m=float(e.state.epoch)))
# model.pt through the saver class the nexus_inr bundle configures (its key_metric_filename entry)
cfg = yaml.safe_load(open("bundles/nexus_inr/configs/train.yaml"))
entry = next(h for h in cfg["validate"]["handlers"] if h.get("key_metric_filename") == "model.pt")
saver = {"CheckpointSaver": "monai.handlers.CheckpointSaver"}.get(entry["_target_"], entry["_target_"])
locate(saver)(save_dir=ckpt_dir, save_dict={"model": net}, save_key_metric=True, key_metric_name="m",
              key_metric_filename="model.pt").attach(trainer)
trainer.run()
print("finished at epoch", trainer.state.epoch)
'''


def _run(script, args, tmp, hang=None, timeout=240):
    """Run ``script``; with ``hang={"save": N}`` wait for the hang signal and SIGKILL. Returns (rc, output)."""
    env = {**ENV, "HANG_SIGNAL": str(tmp / "hang.signal")}
    for kind, n in (hang or {}).items():
        env[f"HANG_{kind.upper()}"] = str(n)
    (tmp / "hang.signal").unlink(missing_ok=True)
    log = tmp / f"log_{time.monotonic_ns()}.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        if hang:
            deadline = time.time() + timeout
            while not (tmp / "hang.signal").exists():
                assert proc.poll() is None, f"finished before the hang point:\n{log.read_text()[-3000:]}"
                assert time.time() < deadline, "hang point never reached"
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, log.read_text()


def test_rows_1_2_kills_while_writing_checkpoints_and_resume_from_the_newest_that_loads(tmp_path):
    ckpt = tmp_path / "models"
    rc, out = _run(_TRAIN, [ckpt, 2], tmp_path)
    assert rc == 0, out[-3000:]
    # row 1: killed half-way through writing its first checkpoint (epoch 3): the previous one is intact
    rc, _ = _run(_TRAIN, [ckpt, 4], tmp_path, hang={"save": 1})
    assert rc == -signal.SIGKILL
    assert sorted(p.name for p in ckpt.iterdir() if not p.name.startswith(".")) == ["checkpoint_epoch=2.pt", "model.pt"]
    torch.load(ckpt / "checkpoint_epoch=2.pt", weights_only=True)
    # row 2 (model.pt): torch.save calls per epoch are checkpoint_epoch=N.pt then model.pt; kill in epoch 3's model.pt
    before = torch.load(ckpt / "model.pt", weights_only=True)
    rc, _ = _run(_TRAIN, [ckpt, 4], tmp_path, hang={"save": 2})
    assert rc == -signal.SIGKILL
    after = torch.load(ckpt / "model.pt", weights_only=True)  # the previous model.pt, complete
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the temporaries of the killed runs are removed and the run resumes from epoch 3's checkpoint
    rc, out = _run(_TRAIN, [ckpt, 4], tmp_path)
    assert rc == 0, out[-3000:]
    assert f"resumed from {ckpt / 'checkpoint_epoch=3.pt'} at epoch 3" in out and "finished at epoch 4" in out
    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoint_epoch=4.pt", "model.pt"]
    # row 2: the newest checkpoint truncated (disk full), an older intact one present
    state = torch.load(ckpt / "checkpoint_epoch=4.pt", weights_only=True)
    trainer = state["trainer"]  # ignite stores either the iteration or the epoch
    trainer.update({k: v for k, v in (("epoch", 3), ("iteration", 9)) if k in trainer})
    torch.save(state, ckpt / "checkpoint_epoch=3.pt")
    raw = (ckpt / "checkpoint_epoch=4.pt").read_bytes()
    (ckpt / "checkpoint_epoch=4.pt").write_bytes(raw[: len(raw) // 3])
    rc, out = _run(_TRAIN, [ckpt, 5], tmp_path)
    assert rc == 0, out[-3000:]
    line = next(ln for ln in out.splitlines() if "resumed from" in ln)  # one line: which one and why
    assert f"resumed from {ckpt / 'checkpoint_epoch=3.pt'} at epoch 3" in line
    assert "skipped newer checkpoint_epoch=4.pt: unreadable" in line and "finished at epoch 5" in out
    # row 12: the stale (skipped) checkpoint is gone once the resumed run saved its own
    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoint_epoch=5.pt", "model.pt"]


# --- outputs of predict / fit-subject: kill between the output renames (row 3) ------------------
@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_tiny_pair(tmp_path_factory.mktemp("crash_pair"))


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


_CLI = _HANG + "\nfrom nexus_monai.cli import main\nsys.exit(main(sys.argv[1:]))\n"


@pytest.mark.parametrize("command", ["predict", "fit-subject"])
def test_row3_kill_between_the_output_renames_leaves_the_previous_output_whole(command, pair, tmp_path):
    args = predict_args if command == "predict" else fit_args
    out = tmp_path / "out"
    assert main(args(pair, out, "--spacing", "2")) == 0
    before = _snapshot(out)
    # the next run (another grid) is killed just before its second file rename
    rc, log = _run(_CLI, args(pair, out, "--spacing", "1"), tmp_path, hang={"replace": 2})
    assert rc == -signal.SIGKILL, log[-2000:]
    assert _snapshot(out) == before  # the previous complete output, not a mix
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # the killed run's staging folder
    # the next run replaces the output as a whole and removes the killed run's temporaries
    assert main(args(pair, out, "--spacing", "1")) == 0
    after = _snapshot(out)
    assert set(after) == set(before)
    assert all(nib.load(str(out / n)).shape == (16, 16, 16) for n in after if n.endswith(".nii.gz"))
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]


# --- parameters and paths checked before any work (rows 4, 5, 7, 8, 9, 12) -----------------------
def _nan_affine_nifti(path: Path) -> Path:
    """A NIfTI whose sform has a NaN (nibabel refuses to write one, so the header bytes are patched)."""
    import struct

    img = nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4))
    img.set_qform(None, code=0)
    img.set_sform(np.eye(4), code=1)
    nib.save(img, str(path))
    raw = bytearray(path.read_bytes())
    raw[280:284] = struct.pack("<f", float("nan"))  # srow_x[0]
    path.write_bytes(bytes(raw))
    return path


def _no_work(monkeypatch):
    """Fail the test if the long work starts (prediction, fitting, resampling)."""
    import nexus_monai.baselines.interpolation as interp
    import nexus_monai.engines.predict as predict
    import nexus_monai.engines.subject_fit as subject_fit

    def boom(*_a, **_k):
        raise AssertionError("work started before the bad parameter was caught")

    monkeypatch.setattr(predict, "predict_volumes", boom)
    monkeypatch.setattr(predict, "load_bundle", boom)
    monkeypatch.setattr(subject_fit.SubjectFitter, "fit", boom)
    monkeypatch.setattr(interp, "upsample", boom)


def _bad_cli_cases(pair, tmp):
    hr = str(pair["hr"])
    (tmp / "a_file").write_text("x")
    (tmp / "a_dir").mkdir()
    nan_like = str(_nan_affine_nifti(tmp / "nan_like.nii"))
    deg = ["degrade", "--image", hr, "--axis", "z", "--factor", "2"]
    up = ["upsample", "--image", hr]
    return {
        "row4 degrade noise nan": ([*deg, "--noise", "nan", "--out", str(tmp / "o.nii.gz")], "--noise must be a finite number"),
        "row4 degrade noise -1": ([*deg, "--noise", "-1", "--out", str(tmp / "o.nii.gz")], "--noise must be a finite number"),
        "row4 degrade factor inf": (["degrade", "--image", hr, "--axis", "z", "--factor", "inf", "--out", str(tmp / "o.nii.gz")], "--factor"),
        "row5 out parent is a file": ([*deg, "--out", str(tmp / "a_file" / "o.nii.gz")], "is a file, not a folder"),
        "row5 out is a folder": ([*deg, "--out", str(tmp / "a_dir")], "is an existing folder"),
        "row5 out png": ([*up, "--spacing", "1", "--out", str(tmp / "x.png")], "must be a .nii.gz or .nii file"),
        "row5 out unwritable": ([*up, "--spacing", "1", "--out", "/proc/nexus_out.nii.gz"], "cannot write the output"),
        "row5 predict out is a file": (predict_args(pair, tmp / "a_file", "--spacing", "1"), "is an existing file"),
        "row5 predict out unwritable": (predict_args(pair, "/proc/nexus_out", "--spacing", "1"), "not writable"),
        "row5 fit out unwritable (default 14 min budget)": (["fit-subject", "--t1", str(pair["t1"]), "--t2", str(pair["t2"]),
                                                             "--spacing", "1", "--out", "/proc/nexus_out"], "not writable"),
        "row7 predict like NaN affine": (predict_args(pair, tmp / "p", "--like", nan_like), "not finite"),
        "row7 upsample like NaN affine": ([*up, "--like", nan_like, "--out", str(tmp / "o.nii.gz")], "not finite"),
        "row8 spacing nan": ([*up, "--spacing", "nan", "--out", str(tmp / "o.nii.gz")], "--spacing must be a finite number"),
        "row8 spacing inf predict": (predict_args(pair, tmp / "p", "--spacing", "inf"), "--spacing must be a finite number"),
        "row8 spacing 1e308 fit": (fit_args(pair, tmp / "p", "--spacing", "1e308"), "--spacing must be a finite number"),
        "row9 upsample spacing 1e-4": ([*up, "--spacing", "0.0001", "--out", str(tmp / "o.nii.gz")], "above the limit of 150,000,000"),
        "row12 upsample onto a grid that misses the scan": ([*up, "--like", str(_far_grid(tmp)), "--out", str(tmp / "o.nii.gz")],
                                                          "does not overlap"),
        "fit epochs 0": (fit_args(pair, tmp / "p", "--spacing", "1") + ["--epochs", "0"], "--epochs must be an integer"),
        "fit lr nan": (fit_args(pair, tmp / "p", "--spacing", "1") + ["--lr", "nan"], "--lr must be a finite number"),
        "fit max-minutes -1": (fit_args(pair, tmp / "p", "--spacing", "1") + ["--max-minutes", "-1"], "--max-minutes"),
        "predict chunk-size 0": (predict_args(pair, tmp / "p", "--spacing", "1") + ["--chunk-size", "0"], "--chunk-size"),
    }


def _far_grid(tmp: Path) -> Path:
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), make_affine((1.0, 1.0, 1.0), (900.0, 0.0, 0.0)).numpy()),
             str(tmp / "far.nii.gz"))
    return tmp / "far.nii.gz"


CASE_NAMES = ["row4 degrade noise nan", "row4 degrade noise -1", "row4 degrade factor inf", "row5 out parent is a file",
              "row5 out is a folder", "row5 out png", "row5 out unwritable", "row5 predict out is a file",
              "row5 predict out unwritable", "row5 fit out unwritable (default 14 min budget)", "row7 predict like NaN affine",
              "row7 upsample like NaN affine", "row8 spacing nan", "row8 spacing inf predict", "row8 spacing 1e308 fit",
              "row9 upsample spacing 1e-4", "row12 upsample onto a grid that misses the scan", "fit epochs 0", "fit lr nan",
              "fit max-minutes -1", "predict chunk-size 0"]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_parameters_are_one_line_exit_2_before_any_work(name, pair, tmp_path, capsys, monkeypatch):
    argv, message = _bad_cli_cases(pair, tmp_path)[name]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    _no_work(monkeypatch)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written


def test_row8_spacing_bounds_in_server_params():
    from nexus_monai.serving.params import ServingError, parse_params

    for raw in ('{"spacing": 1e308}', '{"spacing": [1, 1, NaN]}', '{"spacing": true}', '{"spacing": Infinity}'):
        with pytest.raises(ServingError) as err:
            parse_params(raw)
        assert err.value.status == 400


# --- evaluate (rows 6, 10) ---------------------------------------------------------------------
def test_row6_evaluate_checks_every_file_up_front_and_keeps_finished_rows(tiny_dataset, tmp_path, capsys):
    import pandas as pd

    data = tiny_dataset(tmp_path / "data", n=3)
    subjects = json.loads((data / "dataset.json").read_text())["test"]
    third = data / subjects[2]["t2"]
    raw = third.read_bytes()
    third.write_bytes(raw[: len(raw) // 2])  # truncated: found before any subject runs
    argv = ["evaluate", "--data", str(data), "--methods", "trilinear", "--out", str(tmp_path / "r"), "--quiet", "--no-mlflow",
            "--no-lpips"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(third.name) in err[0] and ("truncated" in err[0] or "corrupt" in err[0])
    assert not (tmp_path / "r" / "per_subject.csv").exists()
    # a subject that still fails mid-run (NaN voxels: readable file, unusable data) is marked; the others' rows are kept
    third.write_bytes(raw)
    img = nib.load(str(third))
    vol = np.asarray(img.dataobj, np.float32).copy()
    vol[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(vol, img.affine), str(third))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "NaN" in err[0] and subjects[2]["subject"] in err[0]
    rows = pd.read_csv(tmp_path / "r" / "per_subject.csv")
    assert len(rows) == 3 and rows["error"].fillna("").str.startswith("input:").sum() == 1
    assert np.isfinite(rows.loc[rows["error"].isna(), "psnr_t1"]).all()
    assert int(pd.read_csv(tmp_path / "r" / "table1.csv")["failed"].iloc[0]) == 1


@pytest.mark.parametrize("kind", ["list", "protocol"])
def test_row10_evaluate_datalist_list_and_non_yaml_protocol_are_one_line(kind, tmp_path, capsys):
    (tmp_path / "list.json").write_text('[{"t1": "a.nii.gz", "t2": "b.nii.gz"}]')
    (tmp_path / "dl.json").write_text('{"test": [{"subject": "s", "t1": "a.nii.gz", "t2": "b.nii.gz"}]}')
    (tmp_path / "p.bin").write_bytes(b"\x00\x01binary\xff")
    argv = ["evaluate", "--data", str(tmp_path / ("list.json" if kind == "list" else "dl.json")), "--out", str(tmp_path / "r"),
            "--no-mlflow", "--quiet"] + (["--protocol", str(tmp_path / "p.bin")] if kind == "protocol" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("not a datalist" in err[0] if kind == "list" else "not a protocol YAML" in err[0])


# --- server: a client that disconnects mid-inference frees the worker (row 11) -------------------
def test_row11_disconnected_client_job_is_cancelled_and_the_worker_freed(pair, tmp_path):
    import socket
    import threading

    import requests
    import uvicorn

    from nexus_monai.serving.app import create_app
    from nexus_monai.serving.models import BundleModel
    from nexus_monai.serving.server import bind_socket

    model = BundleModel(BUNDLE, [str(pair["overlay"])], weights=pair["weights"], device="cpu")
    slow = {"on": True}
    # a deliberately slow network: every child module sleeps, so whatever path inference takes (whole
    # network, tiled encoders, chunked decoders) the job lasts minutes unless it is cancelled
    for child in model.network.children():
        child.register_forward_pre_hook(lambda *_: time.sleep(0.5) if slow["on"] else None)
    app = create_app({"nexus_inr": model}, workers=1, max_queue=4, workdir=tmp_path / "work")
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="critical"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while not srv.started and time.time() < deadline:
            time.sleep(0.05)
        files = {"t1": ("t1.nii.gz", pair["t1"].read_bytes()), "t2": ("t2.nii.gz", pair["t2"].read_bytes())}
        body, ctype = requests.models.RequestEncodingMixin._encode_files(files, {"params": '{"spacing": 0.5}'})
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall(f"POST /infer/nexus_inr HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
                       f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.time() + 60
        while requests.get(f"{url}/info/", timeout=30).json()["queue"]["pending"] == 0:  # the job is running
            assert time.time() < deadline
            time.sleep(0.05)
        client.close()  # the client goes away mid-inference
        deadline = time.time() + 60  # the slow job alone would take minutes; cancelled, it ends within one module call
        while (q := requests.get(f"{url}/info/", timeout=30).json()["queue"])["pending"] != 0:
            assert time.time() < deadline, q
            time.sleep(0.1)
        assert q["cancelled"] == 1
        slow["on"] = False
        r = requests.post(f"{url}/infer/nexus_inr", files=files, data={"params": '{"spacing": 2}'}, params={"output": "json"},
                          timeout=120)
        assert r.status_code == 200  # the worker is free for the next request
        deadline = time.time() + 10
        while any((tmp_path / "work").iterdir()) and time.time() < deadline:
            time.sleep(0.1)
        assert not any((tmp_path / "work").iterdir())
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
        sock.close()


def test_rows_7_8_server_bad_grids_are_4xx(pair, tmp_path):
    import requests

    from nexus_monai.serving.app import create_app
    from nexus_monai.serving.models import BundleModel

    model = BundleModel(BUNDLE, [str(pair["overlay"])], weights=pair["weights"], device="cpu")
    files = {"t1": ("t1.nii.gz", pair["t1"].read_bytes()), "t2": ("t2.nii.gz", pair["t2"].read_bytes())}
    nan_like = _nan_affine_nifti(tmp_path / "nan_like.nii").read_bytes()
    with live_server(create_app({"nexus_inr": model}, workdir=tmp_path / "work")) as url:
        for output in ("json", "zip"):
            for extra, params in (({}, '{"spacing": 1e308}'), ({}, '{"spacing": 1e-300}'),
                                  ({"like": ("like.nii", nan_like)}, '{"like": "like"}')):
                r = requests.post(f"{url}/infer/nexus_inr", files={**files, **extra}, data={"params": params},
                                  params={"output": output}, timeout=120)
                assert 400 <= r.status_code < 500, (params, output, r.status_code, r.text[:300])
                assert set(r.json()) == {"detail", "status", "source", "problem"}
