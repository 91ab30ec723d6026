"""Guard settings on the lesion-aware models trained on the H200 (docs/lesion_objective.md): test-only family, CPU.

Weights: the fp32 models of the GPU run (scripts/gpu_session.sh main: OUT/lesion_models.tgz, not committed),
unpacked under /tmp/lesmodels. Results: /tmp/guardexp/<model>_<guard>/ (copied to
docs/results/gpu_2026-12-04/guard_settings).
"""
import json
import os
from pathlib import Path
from nexus_monai.evaluation.table1 import evaluate_methods, select_subjects
from nexus_monai.transforms.protocols import load_protocol
from nexus_monai.data.brats import resolve_datalist

CONF = Path("/work/main/bundles/nexus_inr/configs")
datalist = resolve_datalist("embedded", seed=0)
subjects = select_subjects(str(datalist), "test_anatomy")
guards = {"k3": {"k": 3, "floor": 0.01, "iterations": 5}, "it3": {"iterations": 3}}
for run in ["lesion_full", "lesion_weighted"]:
    for gname, g in guards.items():
        out = Path(f"/tmp/guardexp/{run}_{gname}")
        if (out / "manifest.json").exists():
            continue
        os.environ["NEXUS_GUARD_OPTIONS"] = json.dumps(g)
        opts = {"bundle": str(CONF.parent), "weights": f"/tmp/lesmodels/gpu_default_{run}_seed0/models/model.pt",
                "overlays": [str(CONF / "experiments" / f"{run}.yaml")]}
        evaluate_methods(subjects, ["nexus_inr_guarded"], load_protocol("nexus"), out, lpips=False, progress=False,
                         method_options={"nexus_inr_guarded": opts}, panel_subjects=0)
        print("done", run, gname, flush=True)
