"""Registration accuracy over several motion draws (docs/registration.md, "accuracy").

Motion is applied to the HR T2w object BEFORE its thick-slice scan is simulated (T1w z x 2, T2w y x 4,
Gaussian profiles), with a random direction and sizes drawn uniformly up to ``--max-mm`` / ``--max-deg``;
:func:`nexus_monai.transforms.registration.register_rigid` then registers the T2w scan to the T1w scan
and the error is the mean distance, over the T1w brain voxels, between where the estimated and the true
motion put them. Subjects: the MNI152 2009 brain at 2 mm (the test's, T2w-like contrast from its tissue
maps) and the embedded dataset's test subjects (2 mm, generator contrasts). Writes a CSV and prints a summary.

    OMP_NUM_THREADS=1 python scripts/registration_accuracy.py --draws 5 --out docs/results/registration_accuracy.csv
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from nexus_monai.data.brats import load_datalist, resolve_datalist  # noqa: E402
from nexus_monai.data.io import load_volume, write_text_atomic  # noqa: E402
from nexus_monai.transforms import SimulateAnisotropicAcquisition  # noqa: E402
from nexus_monai.transforms.motion import RigidMotion, axis_angle_rotation  # noqa: E402
from nexus_monai.transforms.registration import RegistrationOptions, register_rigid  # noqa: E402


def error_mm(estimate, truth, volume) -> float:
    idx = np.argwhere(volume[0].numpy() > 0)
    a = volume.affine.numpy()
    pts = idx @ a[:3, :3].T + a[:3, 3]
    e, t = np.asarray(estimate), np.asarray(truth)
    return float(np.linalg.norm(pts @ (e[:3, :3] - t[:3, :3]).T + (e[:3, 3] - t[:3, 3]), axis=1).mean())


def subjects(n_embedded: int):
    from transforms.test_registration import mni_pair

    yield "mni152_2009", mni_pair()
    for s in load_datalist(resolve_datalist("embedded"), "test")[:n_embedded]:
        yield s["subject"], {c: load_volume(s[c]) for c in ("t1", "t2")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--embedded", type=int, default=3, help="embedded test subjects besides the MNI brain")
    p.add_argument("--max-mm", type=float, default=4.0)
    p.add_argument("--max-deg", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iterations", type=int, default=None)
    p.add_argument("--sampling", type=float, default=None)
    p.add_argument("--bins", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    opts = {k: getattr(args, k) for k in ("iterations", "sampling", "bins") if getattr(args, k) is not None}
    options = RegistrationOptions(**opts)
    rng = np.random.default_rng(args.seed)
    rows = []
    for name, hr in subjects(args.embedded):
        t1_lr = SimulateAnisotropicAcquisition("z", 2)(hr["t1"])
        for k in range(args.draws):
            d = rng.standard_normal(3)
            mm, deg = rng.uniform(0, args.max_mm), rng.uniform(0, args.max_deg)
            moved = RigidMotion(axis_angle_rotation(rng.standard_normal(3), deg), d / np.linalg.norm(d) * mm)(hr["t2"])
            truth = np.asarray(moved.meta["motion"])
            t2_lr = SimulateAnisotropicAcquisition("y", 4)(moved)
            t0 = time.perf_counter()
            res = register_rigid(t1_lr, t2_lr, options)
            est = res.matrix if res.accepted else np.eye(4)
            rows.append({"subject": name, "draw": k, "motion_mm": mm, "rotation_deg": deg,
                         "true_mean_displacement_mm": error_mm(np.eye(4), truth, hr["t1"]),
                         "error_mm": error_mm(est, truth, hr["t1"]), "accepted": res.accepted,
                         "reason": res.reason, "seconds": time.perf_counter() - t0})
            print({k2: (round(v, 3) if isinstance(v, float) else v) for k2, v in rows[-1].items()}, flush=True)
    frame = pd.DataFrame(rows)
    if args.out:
        write_text_atomic(args.out, frame.to_csv(index=False))
    print(f"options {options}")
    print(f"n {len(frame)}: error mean {frame.error_mm.mean():.3f} mm, max {frame.error_mm.max():.3f} mm; "
          f"below 0.5 mm: {(frame.error_mm < 0.5).sum()}; accepted {int(frame.accepted.sum())}; "
          f"seconds mean {frame.seconds.mean():.1f}")
    print(frame.groupby("subject").error_mm.agg(["mean", "max"]).round(3).to_string())


if __name__ == "__main__":
    main()
