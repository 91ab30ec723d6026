"""Cohort Nexus-INR vs test-time refinement vs the consistency guard on one subject of a datalist.

    OMP_NUM_THREADS=1 python scripts/refine_one_subject.py --bundle BUNDLE --data DATASET_JSON \
        [--split test] [--index 0] [--seconds 60] [--options '{"anchor_weight": 1}' ...]

The subject's LR scans are simulated with the ``nexus`` protocol (as ``nexus-sr evaluate``); prints
one JSON line with the masked / interior PSNR and SSIM (evaluation protocol) of trilinear, the cohort
model, cohort + guard, then one line per ``--options`` (RefineOptions overrides; none: the defaults)
with refined and refined + guard, the refinement log and its held-out curve.
"""

import argparse
import json
import time

from nexus_monai.baselines.interpolation import upsample
from nexus_monai.engines.consistency import consistency_guard
from nexus_monai.engines.predict import load_bundle, predict_volumes
from nexus_monai.engines.refine import RefineOptions, refine_network
from nexus_monai.evaluation.table1 import prepare_subject, select_subjects
from nexus_monai.geometry import TargetGrid
from nexus_monai.metrics import subject_metric_row
from nexus_monai.transforms.protocols import load_protocol

KEYS = ("psnr_t1", "psnr_t2", "psnr_eroded_t1", "psnr_eroded_t2", "ssim_t1", "ssim_t2")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--index", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--options", action="append", default=[])
    args = ap.parse_args()
    subject = select_subjects(args.data, args.split)[args.index]
    data = prepare_subject(dict(subject), load_protocol("nexus"))
    lr = {c: data[f"{c}_lr"] for c in ("t1", "t2")}
    grid = TargetGrid.like(data["t1"])
    gt = {c: data[c].as_tensor()[0] for c in ("t1", "t2")}
    network, inferer, _ = load_bundle(args.bundle, device="cpu")
    inferer.progress = False

    def score(pred):
        row = subject_metric_row(gt, {c: pred[c].as_tensor()[0] for c in ("t1", "t2")}, None, lpips=False)
        return {k: round(row[k], 3) for k in KEYS}

    cohort = predict_volumes(network, lr["t1"], lr["t2"], grid, inferer)
    guarded, _, report = consistency_guard(cohort, lr, grid)
    print(json.dumps({"subject": subject.get("subject"), "grid": list(grid.shape),
                      "trilinear": score({c: upsample(lr[c], grid, "trilinear") for c in lr}),
                      "cohort": score(cohort), "cohort+guard": score(guarded), "guard": report}, default=float),
          flush=True)
    for options in args.options or ["{}"]:
        cfg = json.loads(options)
        t = time.perf_counter()
        result = refine_network(network, lr["t1"], lr["t2"], RefineOptions(max_seconds=args.seconds, **cfg))
        seconds = round(time.perf_counter() - t, 1)
        refined = predict_volumes(result.network, lr["t1"], lr["t2"], grid, inferer)
        print(json.dumps({"options": cfg, "refine_s": seconds, "refined": score(refined),
                          "refined+guard": score(consistency_guard(refined, lr, grid)[0]),
                          "log": {k: v for k, v in result.log.items() if k != "settings"}}, default=float), flush=True)


if __name__ == "__main__":
    main()
