#!/usr/bin/env bash
# On a GPU server without internet that has a CUDA torch: install the carried wheelhouse (no network),
# train the plan's configurations side by side under its wall-clock budget, evaluate them, pack the
# results into OUT (at most 8 files of at most 15 MiB). Prepared here with
#   python -m nexus_monai.ops.gpu_run pack          # -> .gpu_carry/{wheels,data} (+ the size breakdown)
# then, on the server, from the repository root (with .gpu_carry beside it):
#   bash scripts/gpu_run.sh OUT [PLAN] [extra args of `python -m nexus_monai.ops.gpu_run run`, e.g. --budget-s 300]
set -euo pipefail
OUT=${1:?usage: scripts/gpu_run.sh OUT [PLAN] [args...]}
PLAN=${2:-scripts/gpu_plan.yaml}
shift $(( $# >= 2 ? 2 : 1 ))
REPO=$(cd "$(dirname "$0")/.." && pwd)
CARRY=${NEXUS_CARRY:-$REPO/.gpu_carry}
WORK=${NEXUS_WORK:-/tmp/nexus_gpu_run}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$WORK"
SECONDS=0
# 1. install: pip --no-index --no-deps into a folder on PYTHONPATH (nothing downloaded, the system untouched)
"$PY" "$REPO/scripts/wheelhouse.py" install "$CARRY/wheels" --target "$WORK/site"
export PYTHONPATH="$WORK/site:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export MLFLOW_DISABLE_TELEMETRY=true NEXUS_MONAI_CACHE="$WORK/cache"
export NEXUS_INSTALL_SECONDS=$SECONDS
echo "install: $SECONDS s"
# 2.-4. train side by side under the budget, evaluate, tables + fp16 weights + timings into OUT
DATA=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['datalist'])" "$CARRY/carry.json")
cd "$REPO"
"$PY" -m nexus_monai.ops.gpu_run run --plan "$PLAN" --data "$CARRY/$DATA" --work "$WORK" --out "$OUT" "$@" \
  2>&1 | tee "$WORK/gpu_run.log"
