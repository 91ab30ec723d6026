"""Lesion metric v2 of the shipped default on the world of docs/lesion_objective.md (synth 2.0.0, test-only
family): raw, guarded, ibp, trilinear, with the within-slab part. LR scans made as that world made them (the
nominal operator on the ground truth). One JSON per subject under results/lesion_v2_decomposition/ (resumable; the
2026-12-06 run, without its false-positive columns, which predate the top-hat condition, is in
docs/results/lesion_v2_decomposition/).

    OMP_NUM_THREADS=1 python scripts/lesion_v2_decomposition.py   # needs the cached 2.0.0 embedded dataset
"""
import json
import time
from pathlib import Path

import numpy as np
import torch

from nexus_monai.data.brats import brats_loader
from nexus_monai.data.datalist import default_cache_dir
from nexus_monai.engines.predict import predict_volumes
from nexus_monai.evaluation.methods import _guarded, bundle_model, get_method
from nexus_monai.geometry import TargetGrid
from nexus_monai.metrics.image_quality import intensity_scale, psnr
from nexus_monai.metrics.lesion import lesion_fidelity_row, lesion_geometry
from nexus_monai.transforms.acquisition import SimulateAnisotropicAcquisition

root = default_cache_dir() / 'synbrats_small_n24_ta5_s0_v2.0.0'
dl = json.loads((root / 'dataset.json').read_text())
out = Path('results/lesion_v2_decomposition')
out.mkdir(parents=True, exist_ok=True)
network, inferer = bundle_model('bundles/nexus_inr', (), None)
for e in dl['test_anatomy']:
    dst = out / f"{e['subject']}.json"
    if dst.exists():
        continue
    t0 = time.time()
    keys = ['t1', 't2', 'seg', 'lesions']
    data = brats_loader(keys)({k: str(root / e[k]) for k in keys})
    for c, (ax, k) in {'t1': (2, 2), 't2': (1, 4)}.items():  # the old world: the nominal operator on the GT
        data[f'{c}_lr'] = SimulateAnisotropicAcquisition(ax, k)(data[c])
    grid = TargetGrid.like(data['t1'])
    gt = {c: data[c][0].numpy() for c in ('t1', 't2')}
    mask = gt['t1'] > 0
    scales = {c: intensity_scale(gt[c], mask) for c in gt}
    raw = predict_volumes(network, data['t1_lr'], data['t2_lr'], grid, inferer)
    outs = {'trilinear': get_method('trilinear')(data, grid), 'ibp': get_method('ibp')(data, grid),
            'nexus_inr': raw, 'nexus_inr_guarded': _guarded(raw, data, grid)}
    geo = lesion_geometry({c: data[f'{c}_lr'] for c in gt}, data['t1'])
    geo['exclude'] = data['seg'][0].numpy() > 0
    rows = {}
    for m, p in outs.items():
        pv = {c: p[c].as_subclass(torch.Tensor).reshape(grid.shape).numpy() for c in gt}
        row = lesion_fidelity_row({c: gt[c] / scales[c] for c in gt}, {c: pv[c] / scales[c] for c in gt},
                                  data['lesions'][0].numpy(), mask, scales=scales, **geo)
        row.update({f'psnr_{c}': psnr(gt[c] / scales[c], pv[c] / scales[c], mask) for c in gt})
        rows[m] = {k: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) else v) for k, v in row.items()}
    dst.write_text(json.dumps(rows))
    print(e['subject'], time.time() - t0, flush=True)
