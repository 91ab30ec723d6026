#!/usr/bin/env bash
# The measurements of one short GPU session (a machine with a CUDA torch and no internet), from the
# repository root with .gpu_carry/ beside it (python -m nexus_monai.ops.gpu_run pack; plus the MNI152 T1 file
# as .gpu_carry/data/mni152_t1.nii.gz for the benchmark):
#   OUT=DIR bash scripts/gpu_session.sh smoke   # install, benchmark --device cuda at both widths, 4 runs x 45 s
#   OUT=DIR BUDGET=240 LIMIT=480 bash scripts/gpu_session.sh main [PLAN ...]
#       the plans of scripts/gpu_plans (default: all but smoke) side by side, each its trainings under BUDGET s;
#       whatever happens, OUT/raw.tgz holds every finished per-subject row, training record and log tail, so
#       the tables can be rebuilt elsewhere (python -m nexus_monai.ops.gpu_run tables) if a driver ran out of time.
set -uo pipefail
PHASE=${1:?usage: gpu_session.sh smoke|main [plan ...]}
shift
OUT=${OUT:?set OUT}
BUDGET=${BUDGET:-240}
LIMIT=${LIMIT:-480}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv,noheader || true
log "install"
python3 scripts/wheelhouse.py install .gpu_carry/wheels --target /tmp/site > /tmp/install.log 2>&1 \
  || { tail -20 /tmp/install.log; exit 3; }
export PYTHONPATH=/tmp/site:$PWD NEXUS_MNI152_T1=$PWD/.gpu_carry/data/mni152_t1.nii.gz NEXUS_MONAI_CACHE=/tmp/nxcache
DATA=$PWD/.gpu_carry/$(python3 -c "import json; print(json.load(open('.gpu_carry/carry.json'))['datalist'])")
log "installed; data $DATA"
# CUDA MPS lets the many small trainings' kernels run beside the big ones instead of time-slicing the GPU
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mpslog
mkdir -p /tmp/mps /tmp/mpslog
if [ "${MPS:-1}" = 1 ] && command -v nvidia-cuda-mps-control >/dev/null && nvidia-cuda-mps-control -d; then
  if timeout 60 python3 -c "import torch; x = torch.randn(2048, 2048, device='cuda'); print('mps ok', float((x @ x).abs().sum()) > 0)"; then
    log "MPS on"
  else
    echo quit | nvidia-cuda-mps-control; log "MPS failed: off"
  fi
else
  log "MPS not available"
fi

collect() {  # every finished row, record and log tail of every plan, small enough for one file
  (cd /tmp/nx 2>/dev/null && find . \( -name per_subject.csv -o -name table5_per_subject.csv \
      -o -name training_run.json -o -name wall_clock_budget.json -o -name overrides.yaml -o -name 'evaluate*.json' \
      -o -name 'table*.md' -o -name 'table*.csv' -o -name 'summary.*' -o -name timings.json -o -name '*.log' \) \
      -size -3M -print0 | tar czf "$OUT/raw.tgz" --null -T -) || true
  ls -la "$OUT"
}

if [ "$PHASE" = smoke ]; then
  log "benchmark default width"
  timeout 150 python3 -m nexus_monai benchmark --device cuda --random-weights --train-steps 10 \
    --json "$OUT/bench_default.json" 2>&1 | tail -25
  log "benchmark paper width"
  timeout 200 python3 -m nexus_monai benchmark --device cuda --random-weights --train-steps 10 \
    --config bundles/nexus_inr/configs/paper.yaml --json "$OUT/bench_paper.json" 2>&1 | tail -25
  log "smoke plan"
  timeout 240 python3 -m nexus_monai.ops.gpu_run run --plan scripts/gpu_plans/smoke.yaml --data "$DATA" \
    --work /tmp/nx/smoke --out /tmp/gout/smoke --max-files 3 --grace-s 40 2>&1 | tail -20
  grep -h -E "Epoch|it/s|s/it" /tmp/nx/smoke/runs/*/train.log 2>/dev/null | tail -5
  cp /tmp/gout/smoke/timings.json "$OUT/smoke_timings.json" 2>/dev/null
  nvidia-smi --query-gpu=memory.used --format=csv,noheader || true
  collect
  log "smoke done"
  exit 0
fi

PLANS=("$@")
[ ${#PLANS[@]} -eq 0 ] && PLANS=(paper_table2 default_lesion default_table3 default_table4 paper_cpu_table2)
mkdir -p /tmp/nx /tmp/gout
pids=()
for p in "${PLANS[@]}"; do
  python3 -m nexus_monai.ops.gpu_run run --plan "scripts/gpu_plans/$p.yaml" --data "$DATA" --work "/tmp/nx/$p" \
    --out "/tmp/gout/$p" --max-files $([ "$p" = paper_table2 ] && echo 4 || echo 3) --budget-s "$BUDGET" --grace-s 60 > "/tmp/nx/$p.log" 2>&1 &
  pids+=($!)
  log "started $p (pid $!)"
done
# wait for every driver, at most until LIMIT s after the start of this script (then stop them and collect)
while :; do
  alive=0
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
  [ $alive = 0 ] && break
  if [ $(( $(date +%s) - T0 )) -ge "$LIMIT" ]; then
    log "limit reached: stopping the drivers"
    pkill -f "nexus_monai.ops.gpu_run" ; pkill -f "monai.bundle run training"; pkill -f "nexus_monai.experiments"
    sleep 3
    break
  fi
  sleep 5
done
for p in "${PLANS[@]}"; do log "$p: $(tail -1 /tmp/nx/$p.log)"; done
# the lesion-variant models (CPU width, fp32, a few MiB each) and the best paper-width model (fp16 parts)
(cd /tmp/nx/default_lesion/runs 2>/dev/null && tar czf "$OUT/lesion_models.tgz" */models/model.pt) || true
for f in /tmp/gout/paper_table2/*.fp16.*.pt; do [ -f "$f" ] && cp "$f" "$OUT/"; done
collect
log "main done"
