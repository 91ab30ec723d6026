"""Table 1 under head motion of the T2w scan, with and without registration (docs/registration.md).

Per test subject of the embedded dataset: the protocol's HR frame (``nexus``: T1w z x 2, T2w y x 4),
the T2w HR object (its noise-free render) moved by a rigid motion of ``L`` mm and ``1.25 L`` degrees
(random direction and axis, seeded per subject and level) BEFORE its scan is simulated with the
protocol's own T2w acquisition and the subject's drawn scan parameters; the ground truth stays the unmoved head (the output lies on the T1w grid). Methods from the evaluate
registry (``trilinear``, ``ibp``, ``nexus_inr_guarded`` = ``nexus-sr predict``'s default output of the
shipped ``bundles/nexus_inr``), each run on the scans as read ("none") and after
:class:`~nexus_monai.transforms.registration.RegisterToReference` ("registered"); scored with
:func:`~nexus_monai.metrics.subject_metric_row` (brain-masked PSNR etc., no LPIPS). Rows are appended
to ``OUT/per_subject.csv`` as they finish (a re-run skips finished rows); ``OUT/table.md`` at the end.

    OMP_NUM_THREADS=1 nohup python scripts/motion_table1.py --out docs/results/motion_table1 &
"""

from __future__ import annotations

import argparse
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from nexus_monai.data.io import write_text_atomic
from nexus_monai.evaluation.methods import get_method
from nexus_monai.evaluation.table1 import select_subjects
from nexus_monai.geometry import TargetGrid
from nexus_monai.metrics import subject_metric_row
from nexus_monai.transforms.motion import RigidMotion, axis_angle_rotation
from nexus_monai.transforms.protocols import load_protocol, prepare_subject
from nexus_monai.transforms.registration import RegisterToReference

METHODS = ("trilinear", "ibp", "nexus_inr_guarded")
LEVELS_MM = (0.0, 2.0, 4.0)
DEG_PER_MM = 1.25


def moved_t2_scan(data: dict, protocol, level_mm: float, subject: str) -> tuple[object, list]:
    """The T2w scan of the head moved by ``level_mm`` mm and ``1.25 level_mm`` degrees, and the motion matrix.

    The protocol's own T2w acquisition (the subject's drawn slice profile, thickness, slab offset, LR
    noise and noise seed) is applied to the moved noise-free HR T2w (``data["t2"]``, the ground truth),
    so level 0 reproduces ``data["t2_lr"]``. The rotation is about the T1w brain's centre of mass.
    """
    acquire = [t for t in protocol.parser.get_parsed_content("acquisition", instantiate=True)
               if "t2" in list(t.keys)][0]
    scalars = {k: v for k, v in data.items() if k.startswith("t2_") and not isinstance(v, torch.Tensor)}
    if level_mm == 0:
        return acquire({"t2": data["t2"], **scalars})["t2_lr"], np.eye(4).tolist()
    rng = np.random.default_rng(zlib.crc32(f"{subject}-{level_mm}".encode()))
    d = rng.standard_normal(3)
    fg = torch.nonzero(data["t1"][0] > 0).double().mean(0).numpy()
    a = data["t1"].affine.numpy()
    moved = RigidMotion(axis_angle_rotation(rng.standard_normal(3), DEG_PER_MM * level_mm),
                        d / np.linalg.norm(d) * level_mm, centre_mm=a[:3, :3] @ fg + a[:3, 3])(data["t2"])
    return acquire({"t2": moved, **scalars})["t2_lr"], moved.meta["motion"]


def summary(frame: pd.DataFrame) -> str:
    ok = frame[frame["error"].fillna("") == ""]
    lines = ["| motion | method | registration | n | PSNR T1w | PSNR T2w | SSIM T1w | SSIM T2w |", "|" + "---|" * 8]
    for (lvl, m, reg), part in ok.groupby(["motion_mm", "method", "registration"], sort=True):
        cells = [f"{part[k].mean():.2f} ± {part[k].std(ddof=0):.2f}" for k in ("psnr_t1", "psnr_t2")]
        cells += [f"{part[k].mean():.4f} ± {part[k].std(ddof=0):.4f}" for k in ("ssim_t1", "ssim_t2")]
        lines.append(f"| {lvl:g} mm / {DEG_PER_MM * lvl:g} deg | {m} | {reg} | {len(part)} | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences, registered - none (dB, mean ± std over subjects, [min, max]):", "",
              "| motion | method | n | ΔPSNR T1w | ΔPSNR T2w |", "|---|---|---|---|---|"]
    for (lvl, m), part in ok.groupby(["motion_mm", "method"], sort=True):
        piv = part.pivot(index="subject", columns="registration", values=["psnr_t1", "psnr_t2"]).dropna()
        if piv.empty or "registered" not in piv["psnr_t1"] or "none" not in piv["psnr_t1"]:
            continue
        cells = []
        for k in ("psnr_t1", "psnr_t2"):
            d = piv[k]["registered"] - piv[k]["none"]
            cells.append(f"{d.mean():+.2f} ± {d.std(ddof=0):.2f} [{d.min():+.2f}, {d.max():+.2f}]")
        lines.append(f"| {lvl:g} mm / {DEG_PER_MM * lvl:g} deg | {m} | {len(piv)} | " + " | ".join(cells) + " |")
    reg = ok.drop_duplicates(["subject", "motion_mm"])
    lines += ["", "Registration per subject and level (estimated motion, error of the estimate over the brain):", "",
              "| motion | n | accepted | estimated mm (mean) | estimated deg (mean) | error mm (mean, max) |",
              "|---|---|---|---|---|---|"]
    for lvl, part in reg.groupby("motion_mm"):
        lines.append(f"| {lvl:g} mm | {len(part)} | {int(part.reg_accepted.sum())} | {part.reg_motion_mm.mean():.2f} | "
                     f"{part.reg_angle_deg.mean():.2f} | {part.reg_error_mm.mean():.2f}, {part.reg_error_mm.max():.2f} |")
    return "\n".join(lines) + "\n"


def error_mm(estimate, truth, t1) -> float:
    idx = np.argwhere(t1[0].numpy() > 0)
    a = t1.affine.numpy()
    pts = idx @ a[:3, :3].T + a[:3, 3]
    e, t = np.asarray(estimate), np.asarray(truth)
    return float(np.linalg.norm(pts @ (e[:3, :3] - t[:3, :3]).T + (e[:3, 3] - t[:3, 3]), axis=1).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--subjects", type=int, default=None, help="first N test subjects (default all)")
    p.add_argument("--split", default="test")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv = out / "per_subject.csv"
    frame = pd.read_csv(csv) if csv.is_file() else pd.DataFrame()
    done = set(zip(frame.get("subject", []), frame.get("motion_mm", []), frame.get("method", []),
                   frame.get("registration", [])))
    protocol = load_protocol("nexus")
    rows = frame.to_dict("records")
    for subject in select_subjects("embedded", args.split, max_subjects=args.subjects):
        sid = subject["subject"]
        data = None
        for lvl in LEVELS_MM:
            if all((sid, lvl, m, r) in done for m in METHODS for r in ("none", "registered")):
                continue
            data = data or prepare_subject(subject, protocol)
            t2_lr, truth = moved_t2_scan(data, protocol, lvl, sid)
            if lvl == 0:  # the re-acquisition is the protocol's own scan
                assert torch.allclose(t2_lr.as_tensor(), data["t2_lr"].as_tensor(), atol=1e-4 * float(t2_lr.max()))
            t0 = time.perf_counter()
            t2_reg = RegisterToReference()(t2_lr, data["t1_lr"])
            reg = t2_reg.meta["registration"]
            est = reg["matrix"] if reg["accepted"] else np.eye(4)
            info = {"reg_accepted": reg["accepted"], "reg_motion_mm": reg["motion_mm"], "reg_angle_deg": reg["angle_deg"],
                    "reg_error_mm": error_mm(est, truth, data["t1"]), "reg_reason": reg["reason"],
                    "reg_seconds": time.perf_counter() - t0, "true_displacement_mm": error_mm(np.eye(4), truth, data["t1"])}
            grid = TargetGrid.like(data["t1"])
            gt = {c: data[c][0].as_subclass(torch.Tensor) for c in ("t1", "t2")}
            for m in METHODS:
                for name, t2 in (("none", t2_lr), ("registered", t2_reg)):
                    if (sid, lvl, m, name) in done:
                        continue
                    if name == "registered" and not reg["accepted"] and rows and rows[-1]["method"] == m \
                            and rows[-1]["subject"] == sid and rows[-1]["motion_mm"] == lvl:
                        rows.append({**rows[-1], "registration": name})  # header kept: the same inputs, same output
                        write_text_atomic(csv, pd.DataFrame(rows).to_csv(index=False))
                        continue
                    row = {"subject": sid, "motion_mm": lvl, "method": m, "registration": name, **info, "error": ""}
                    t0 = time.perf_counter()
                    try:
                        pred = get_method(m)({"t1_lr": data["t1_lr"], "t2_lr": t2, "subject": sid}, grid)
                        pv = {c: pred[c].as_subclass(torch.Tensor).reshape(grid.shape) for c in ("t1", "t2")}
                        row.update(subject_metric_row(gt, pv, None, lpips=False))
                    except Exception as err:  # noqa: BLE001 - a failed run is a row
                        row["error"] = f"{type(err).__name__}: {err}"
                    row["seconds"] = time.perf_counter() - t0
                    rows.append(row)
                    write_text_atomic(csv, pd.DataFrame(rows).to_csv(index=False))
                    print(sid, lvl, m, name, round(row.get("psnr_t1", float("nan")), 2),
                          round(row.get("psnr_t2", float("nan")), 2), f"{row['seconds']:.0f}s", flush=True)
    frame = pd.DataFrame(rows)
    write_text_atomic(out / "table.md", summary(frame))
    print(summary(frame))


if __name__ == "__main__":
    main()
