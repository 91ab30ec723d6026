"""Skull and background: ``nexus-sr predict`` on a subject rendered with skull, scalp and noisy air
(docs/skull_and_background.md).

One embedded test subject (the protocol's HR frame, ``nexus``: T1w z x 2, T2w y x 4) is wrapped in
the shells of :func:`nexus_monai.data.skull_phantom.add_head` (brain voxels unchanged, Rician noise
outside the brain), and both LR scans are simulated from it with the protocol's slice profiles. Then
the shipped ``bundles/nexus_inr`` runs through the real command (``nexus_monai.cli.main``) on:

* ``stripped``: the subject's own skull-stripped LR scans (the reference run);
* ``head``: the head scans with no option (expected: the one-line refusal, exit 2);
* ``head --skull-strip``: ROBEX on the T1w LR scan;
* ``head --mask``: the true brain mask on the T1w LR grid (the stripped T1w LR scan's non-zero voxels);
* ``head --keep-background``: the head scans as they are (what the refusal prevents).

Each output is scored against the HR ground truth inside the brain mask
(:func:`~nexus_monai.metrics.subject_metric_row`); the table gives each run's PSNR and its difference
to the stripped run. Writes ``OUT/skull_runs.csv`` and ``OUT/skull_table.md``.

    OMP_NUM_THREADS=1 nohup python scripts/skull_measure.py --out docs/results/skull &
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
from pathlib import Path

import pandas as pd
import torch

from nexus_monai.cli import main as cli
from nexus_monai.data.io import load_volume, save_volume, write_text_atomic
from nexus_monai.data.mask import border_share
from nexus_monai.data.skull_phantom import add_head
from nexus_monai.evaluation.table1 import select_subjects
from nexus_monai.metrics import subject_metric_row
from nexus_monai.transforms import SimulateAnisotropicAcquisition
from nexus_monai.transforms.protocols import load_protocol, prepare_subject


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--subject", type=int, default=0, help="index in the embedded test split")
    p.add_argument("--runs", default=None, help="comma-separated run names to (re)do; the others' rows are kept")
    p.add_argument("--robex-mask", default=None,
                   help="a ROBEX mask of the head T1w scan saved earlier: adds the run 'head --mask ROBEX' (the same "
                        "masking as --skull-strip without running ROBEX again)")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    protocol = load_protocol("nexus")
    subject = select_subjects("embedded", "test")[args.subject]
    data = prepare_subject(subject, protocol)
    head = add_head({"t1": data["t1"], "t2": data["t2"]}, seed=0)
    files = {"hr": save_volume(data["t1"], work / "hr_t1.nii.gz")}
    for c in ("t1", "t2"):
        spec = protocol.contrast(c)
        acquire = SimulateAnisotropicAcquisition(spec["axis"], spec["factor"], spec.get("profile", "gaussian"))
        files[f"stripped_{c}"] = save_volume(acquire(data[c]), work / f"stripped_{c}_lr.nii.gz")
        files[f"head_{c}"] = save_volume(acquire(head[c]), work / f"head_{c}_lr.nii.gz")
    t1_lr = load_volume(files["stripped_t1"])
    files["mask"] = save_volume((t1_lr > 0).float(), work / "true_mask_t1_grid.nii.gz")
    shares = {k: border_share(load_volume(files[k])) for k in ("stripped_t1", "stripped_t2", "head_t1", "head_t2")}
    runs = {"stripped": ("stripped", []), "head": ("head", []), "head --skull-strip": ("head", ["--skull-strip"]),
            "head --mask": ("head", ["--mask", str(files["mask"])]),
            "head --keep-background": ("head", ["--keep-background"])}
    if args.robex_mask:
        runs["head --mask ROBEX"] = ("head", ["--mask", str(args.robex_mask)])
    old = pd.read_csv(out / "skull_runs.csv") if (out / "skull_runs.csv").is_file() else pd.DataFrame({"run": []})
    wanted = set(args.runs.split(",")) if args.runs else set(runs)
    gt = {c: data[c][0].as_subclass(torch.Tensor) for c in ("t1", "t2")}
    rows = []
    for name, (inputs, extra) in runs.items():
        if name not in wanted and name in set(old["run"]):
            rows.append(old[old["run"] == name].iloc[0].to_dict())
            continue
        target = work / name.replace(" ", "_").replace("--", "")
        argv = ["predict", "--t1", str(files[f"{inputs}_t1"]), "--t2", str(files[f"{inputs}_t2"]), "--like",
                str(files["hr"]), "--out", str(target), "--threads", "1", "--quiet", *extra]
        buf_out, buf_err = io.StringIO(), io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(buf_out), contextlib.redirect_stderr(buf_err):
            try:
                code = cli(argv)
            except SystemExit as err:
                code = err.code
        row = {"run": name, "exit": code, "seconds": time.perf_counter() - t0,
               "message": " | ".join(buf_err.getvalue().strip().splitlines()[-2:])}
        if code == 0:
            pred = {c: load_volume(target / f"{c}w_sr.nii.gz")[0].as_subclass(torch.Tensor) for c in ("t1", "t2")}
            row.update({k: v for k, v in subject_metric_row(gt, pred, None, lpips=False).items()
                        if k.startswith(("psnr", "ssim"))})
            report = target / "registration.json"
            if report.is_file():
                rep = json.loads(report.read_text())
                row["mask"] = json.dumps(rep.get("mask", {}))
                row["registration_mm"] = rep.get("registration", {}).get("motion_mm")
        rows.append(row)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        write_text_atomic(out / "skull_runs.csv", pd.DataFrame(rows).to_csv(index=False))
    frame = pd.DataFrame(rows).set_index("run")
    ref = frame.loc["stripped"]
    lines = [f"Subject {subject['subject']} (embedded test split); border share of non-zero voxels: "
             + ", ".join(f"{k} {v:.1%}" for k, v in shares.items()), "",
             "| run | exit | PSNR T1w (brain) | Δ vs stripped | PSNR T2w (brain) | Δ vs stripped | PSNR T1w eroded | "
             "PSNR T2w eroded | s |", "|" + "---|" * 9]
    for name, r in frame.iterrows():
        if r["exit"] != 0:
            lines.append(f"| {name} | {r['exit']} | refused: {r['message']} | | | | | | {r['seconds']:.0f} |")
            continue
        lines.append(f"| {name} | 0 | {r['psnr_t1']:.2f} | {r['psnr_t1'] - ref['psnr_t1']:+.2f} | {r['psnr_t2']:.2f} | "
                     f"{r['psnr_t2'] - ref['psnr_t2']:+.2f} | {r['psnr_eroded_t1']:.2f} | {r['psnr_eroded_t2']:.2f} | "
                     f"{r['seconds']:.0f} |")
    write_text_atomic(out / "skull_table.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
