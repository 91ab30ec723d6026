"""Lesion metric v2 with the counterfactual imprint on the new world (synth 3.0.0, test-only family): trilinear, ibp
and the shipped default raw / guarded, one evaluate run per subject (resumable: a finished subject has manifest.json).

    OMP_NUM_THREADS=1 python scripts/lesion_v2_new_world.py [N_SUBJECTS] [OUT]

Needs the cached 3.0.0 embedded dataset (``nexus-sr synth`` / first use of ``--data embedded``). About 17 min per
subject on a shared 2-core machine (three generator renders and 16 method runs).
"""
import sys
from pathlib import Path

from nexus_monai.data.brats import resolve_datalist
from nexus_monai.evaluation.table1 import evaluate_methods, select_subjects
from nexus_monai.transforms.protocols import load_protocol

n = int(sys.argv[1]) if len(sys.argv) > 1 else 3
root = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("results/lesion_v2_new_world")
subjects = select_subjects(str(resolve_datalist("embedded", seed=0)), "test_anatomy")[:n]
for s in subjects:
    out = root / s["subject"]
    if (out / "manifest.json").exists():
        continue
    evaluate_methods([s], ["trilinear", "ibp", "nexus_inr", "nexus_inr_guarded"], load_protocol("nexus"), out,
                     lpips=False, progress=False, panel_subjects=0, counterfactual_imprint=True)
    print("done", s["subject"], flush=True)
