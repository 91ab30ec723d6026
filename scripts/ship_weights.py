"""Replace the shipped default weights of ``bundles/nexus_inr`` with a training run's: the one command that does.

    python scripts/ship_weights.py runs/nexus_inr            # the run folder of README command (a)
    python scripts/ship_weights.py runs/nexus_inr/models --trained-on "..." --command "..."

Copies ``model.pt`` and ``training_run.json`` from the run's checkpoint folder (``RUN/models`` or ``RUN``)
into ``bundles/nexus_inr/models/`` and rewrites ``configs/metadata.json#shipped_weights`` (sha256, bytes,
the training record; ``--trained-on`` / ``--command`` replace those texts when the run differs from the
recorded one). Refuses (exit 2, nothing written) a run without both files, a checkpoint that does not load
strictly into the bundle's inference network, or a run whose record says it did not finish. Commit the three
files afterwards; ``tests/test_shipped_weights.py`` checks the sha256 and that the weights load.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

from nexus_monai.data.io import write_text_atomic
from nexus_monai.engines.predict import load_bundle
from nexus_monai.engines.run_record import RUN_RECORD, read_run_record
from nexus_monai.errors import NexusInputError
from nexus_monai.paths import REPO_BUNDLES


def ship(run: Path, bundle: Path, trained_on: str | None = None, command: str | None = None) -> dict:
    """Copy the run's weights into ``bundle/models`` and update the bundle's metadata; returns the new entry."""
    folder = run / "models" if (run / "models" / "model.pt").is_file() else run
    model = folder / "model.pt"
    record = read_run_record(folder)
    if not model.is_file() or record is None:
        raise NexusInputError(run, f"needs model.pt and {RUN_RECORD} (in RUN or RUN/models)")
    if not record.get("finished"):
        raise NexusInputError(folder / RUN_RECORD, "the training did not finish (finished: false); ship a finished run")
    load_bundle(bundle, weights=str(model), device="cpu")  # strict load into inference.yaml's network
    meta_path = bundle / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    data = model.read_bytes()
    entry = dict(meta.get("shipped_weights", {}))
    entry.update({
        "path": "models/model.pt",
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "training": (f"{record.get('epochs')} epochs, {record.get('steps')} steps, batch {record.get('batch_size')}, "
                     f"{record.get('seconds')} s wall clock over {record.get('sessions')} session(s)"),
        "note": "research software, not for clinical use",
    })
    if trained_on:
        entry["trained_on"] = trained_on
    if command:
        entry["command"] = command
    meta["shipped_weights"] = entry
    (bundle / "models").mkdir(exist_ok=True)
    shutil.copyfile(model, bundle / "models" / "model.pt.tmp")
    (bundle / "models" / "model.pt.tmp").replace(bundle / "models" / "model.pt")
    write_text_atomic(bundle / "models" / RUN_RECORD, json.dumps(record, indent=2) + "\n")
    write_text_atomic(meta_path, json.dumps(meta, indent=4) + "\n")
    return entry


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="training run folder (holding models/model.pt + training_run.json) or its models/")
    p.add_argument("--bundle", default=str(REPO_BUNDLES / "nexus_inr"), help="bundle whose shipped weights change")
    p.add_argument("--trained-on", default=None, help="replace metadata's trained_on text (data, seed, split)")
    p.add_argument("--command", default=None, help="replace metadata's command text (how the run was trained)")
    args = p.parse_args(argv)
    try:
        entry = ship(Path(args.run), Path(args.bundle), args.trained_on, args.command)
    except NexusInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"shipped {entry['sha256'][:12]}... ({entry['bytes']} bytes) into {args.bundle}/models; commit "
          f"models/model.pt, models/{RUN_RECORD} and configs/metadata.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
