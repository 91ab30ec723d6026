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
from monai.data import MetaTensor
from scipy import ndimage

from nexus_monai.cli import main
from nexus_monai.data.io import save_volume
from nexus_monai.geometry import make_affine

REPO = Path(__file__).resolve().parents[1]
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
