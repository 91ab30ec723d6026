"""docs/any_protocol.md's tables from a protocol-grid output folder (``nexus-sr evaluate --protocol ... --out DIR``).

    python scripts/any_protocol_table.py DIR [SPLIT]

Per protocol: n subjects; masked PSNR gain over trilinear (T1w / T2w, mean over subjects) of ``ibp``, the shipped
default raw (``nexus_inr``) and guarded (``nexus_inr_guarded``) and ``nexus_inr_any_protocol``; the smallest
per-subject margin of the any-protocol model over ``ibp``; single-contrast lesion contrast recovered (capped, v2)
with its exaggerated share, and false-positive blobs per subject. Rows come from ``DIR/<entry>/<split>/rows``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

METHODS = ("ibp", "nexus_inr", "nexus_inr_guarded", "nexus_inr_any_protocol")


def _rows(folder: Path) -> dict:
    out: dict = {}
    for f in sorted(folder.glob("*.json")):
        r = json.loads(f.read_text())
        if not r.get("error"):
            out.setdefault(r["subject"], {})[r["method"]] = r
    return out


def _mean(v):
    v = [x for x in v if x is not None]
    return sum(v) / len(v) if v else float("nan")


def main(root: str, split: str = "test_anatomy") -> str:
    gain = ["| protocol | n | " + " | ".join(f"{m} T1w / T2w" for m in METHODS) + " | any - ibp, worst subject |",
            "|---" * (len(METHODS) + 3) + "|"]
    lesion = ["| protocol | " + " | ".join(f"{m}: T2w-only / T1w-only (exagg. T2w), FP T1w / T2w"
                                           for m in ("trilinear",) + METHODS) + " |", "|---" * (len(METHODS) + 2) + "|"]
    for entry in sorted(p for p in Path(root).iterdir() if (p / split / "rows").is_dir()):
        rows = _rows(entry / split / "rows")
        subjects = [s for s, r in rows.items() if all(m in r for m in ("trilinear",) + METHODS)]
        if not subjects:
            continue
        cells, worst = [], []
        for m in METHODS:
            g = [_mean([rows[s][m][f"psnr_{c}"] - rows[s]["trilinear"][f"psnr_{c}"] for s in subjects])
                 for c in ("t1", "t2")]
            cells.append(f"{g[0]:+.2f} / {g[1]:+.2f}")
        for c in ("t1", "t2"):
            worst.append(min(rows[s]["nexus_inr_any_protocol"][f"psnr_{c}"] - rows[s]["ibp"][f"psnr_{c}"]
                             for s in subjects))
        gain.append(f"| {entry.name} | {len(subjects)} | " + " | ".join(cells)
                    + f" | {worst[0]:+.2f} / {worst[1]:+.2f} |")
        lcells = []
        for m in ("trilinear",) + METHODS:
            r = [rows[s][m] for s in subjects]
            lcells.append(f"{_mean([x.get('lesion_contrast_t2') for x in r]):.2f} / "
                          f"{_mean([x.get('lesion_contrast_t1') for x in r]):.2f} "
                          f"({_mean([x.get('lesion_exaggerated_t2') for x in r]):.2f}), "
                          f"{_mean([x.get('false_positives_t1') for x in r]):.0f} / "
                          f"{_mean([x.get('false_positives_t2') for x in r]):.0f}")
        lesion.append(f"| {entry.name} | " + " | ".join(lcells) + " |")
    return "\n".join(gain) + "\n\n" + "\n".join(lesion) + "\n"


if __name__ == "__main__":
    print(main(*sys.argv[1:]))
