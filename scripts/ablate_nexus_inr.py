"""Short Nexus-INR ablations: train N steps with overrides of bundles/nexus_inr/configs/train.yaml,
then score the validation subjects against trilinear (masked PSNR, table metric code).

    python scripts/ablate_nexus_inr.py baseline 400 network_def#mmf=False network_def#kd_attn=False network_def#sel=False
    python scripts/ablate_nexus_inr.py aux_from_step0 400 --aux-warmup-steps 0 loss#w_kd=0.1 loss#w_cmfa=0.1 loss#w_fdl=0.01 loss#w_seg=0.1

This is how the ablation tables in bundles/nexus_inr/docs/README.md were measured (one thread,
400 steps, batch 2, cosine schedule over the steps). Each step's L1 is printed every 50 steps next
to trilinear's L1 at the same points, so a run stuck at trilinear is visible early. Overrides are
``key=value`` with a Python literal value; ``--aux-warmup-steps`` holds L_KD / L_CMFA / L_FDL /
L_seg at 0 for that many steps (the config's ``aux_warmup_epochs`` is ignored here).
"""

import argparse
import ast
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import list_data_collate
from monai.utils import set_determinism

from nexus_monai.baselines.interpolation import upsample
from nexus_monai.engines.inr import ImplicitGridInferer, inr_inputs, subject_scores
from nexus_monai.geometry import TargetGrid, as_affine, sample_at_world

AUX = ("kd", "cmfa", "fdl", "seg")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("steps", type=int)
    ap.add_argument("overrides", nargs="*", help="key=value (Python literal) overrides of train.yaml")
    ap.add_argument("--aux-warmup-steps", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--jsonl", help="append the result line to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.chdir(Path(__file__).resolve().parents[1])  # configs include transforms/ relative to the repository root
    parser = ConfigParser()
    parser.read_config("bundles/nexus_inr/configs/train.yaml")
    overrides = {}
    for item in args.overrides:
        key, _, value = item.partition("=")
        parser[key] = overrides[key] = ast.literal_eval(value)
    set_determinism(0)
    train, val = parser.get_parsed_content("train#dataset"), parser.get_parsed_content("validate#dataset")
    net, loss = parser.get_parsed_content("network"), parser.get_parsed_content("loss")
    opt = torch.optim.Adam(net.parameters(), lr=parser.get_parsed_content("learning_rate"))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    loader = torch.utils.data.DataLoader(train, batch_size=parser.get_parsed_content("batch_size"), shuffle=True, collate_fn=list_data_collate)
    weights = dict(loss.w)
    if args.aux_warmup_steps:
        loss.w.update({k: 0.0 for k in AUX})
    t0, step, hist = time.time(), 0, []
    while step < args.steps:
        for batch in loader:
            if args.aux_warmup_steps and step == args.aux_warmup_steps:
                loss.w.update(weights)
            kw, tg = inr_inputs(batch)
            opt.zero_grad()
            terms = loss(net(**kw, aux=True), **tg)
            terms["loss"].backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                tri = {f"tri_{c}": float((sample_at_world(kw[c], kw[f"{c}_affine"], kw["query_world"])[:, 0] - tg[f"target_{c}"]).abs().mean())
                       for c in ("t1", "t2")}
            hist.append({**{k: float(v) for k, v in terms.items()}, **tri})
            step += 1
            if step % 50 == 0:
                mean = {k: np.mean([h[k] for h in hist[-50:]]) for k in hist[-1]}
                print(args.name, step, f"{time.time() - t0:.0f}s", " ".join(f"{k}={v:.4f}" for k, v in mean.items()), flush=True)
            if step >= args.steps:
                break
    train_s = time.time() - t0
    inferer, rows = ImplicitGridInferer(chunk_size=65536), []
    for i in range(len(val)):
        item = val[i]
        grid = TargetGrid(tuple(item["t1"].shape[-3:]), as_affine(item["t1"].affine))
        gt = {c: item[c][0].as_subclass(torch.Tensor).float() for c in ("t1", "t2")}
        tri = {c: upsample(item[f"{c}_lr"], grid, "trilinear")[0].as_subclass(torch.Tensor) for c in ("t1", "t2")}
        rows.append((subject_scores(gt, inferer(item["t1_lr"], item["t2_lr"], net, grid)), subject_scores(gt, tri)))
    res = {"name": args.name, "steps": args.steps, "train_s": round(train_s, 1), "overrides": overrides, "aux_warmup_steps": args.aux_warmup_steps}
    for c in ("t1", "t2"):
        res[f"psnr_{c}"] = float(np.mean([m[f"psnr_{c}"] for m, _ in rows]))
        res[f"trilinear_{c}"] = float(np.mean([t[f"psnr_{c}"] for _, t in rows]))
        res[f"gain_{c}"] = res[f"psnr_{c}"] - res[f"trilinear_{c}"]
    print("RESULT", json.dumps(res), flush=True)
    if args.jsonl:
        with open(args.jsonl, "a") as f:
            f.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
