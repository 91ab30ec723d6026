#!/usr/bin/env bash
# The protocol grid of docs/protocol_grid.md (issue 27), resumable: each pass adds one subject per protocol and
# split (rows already scored are kept), so a run cut short still covers every protocol. CPU, one thread.
#   scripts/protocol_grid_run.sh [PASSES] [OUT]            the 2 mm entries, test + test_anatomy
#   WORLD=full scripts/protocol_grid_run.sh [PASSES] [OUT]   the paper's protocol on the 1 mm world (test split)
set -euo pipefail
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 MLFLOW_DISABLE_TELEMETRY=true
PASSES=${1:-5}
METHODS=${METHODS:-trilinear,ibp,nexus_inr,nexus_inr_guarded}
if [ "${WORLD:-small}" = full ]; then
  OUT=${2:-docs/results/protocol_grid_1mm}; PROTOCOLS=nexus_1mm; SPLITS=test
else
  OUT=${2:-docs/results/protocol_grid}; PROTOCOLS=nexus,t1x2_t2z4,t1z2_t2y6,t1iso_t2z5,t1y4_t2z2,t2z2p5
  SPLITS=test,test_anatomy
fi
for n in $(seq 1 "$PASSES"); do
  echo "$(date -u +%H:%M:%S) pass $n"
  nexus-sr evaluate --data embedded --protocol "$PROTOCOLS" --split "$SPLITS" --methods "$METHODS" \
    --max-subjects "$n" --out "$OUT" --quiet --no-mlflow > /dev/null
done
echo "$(date -u +%H:%M:%S) done"
