#!/usr/bin/env bash
# gpu-check.sh: what a GPU node gives this project, in three stages sized for about 5 minutes each on one
# H100/H200 (an estimate: not yet run on one).
#
#   bash cluster/gpu-check.sh learner   # in-process learner: eager vs compiled vs CUDA graphs, 1,024 and 256 tasks
#   bash cluster/gpu-check.sh service   # the Ray service on one GPU: 1 learner + 3 episode workers, then throughput
#   bash cluster/gpu-check.sh quality   # linreg-paper obs / obs+grad / grad / explicit, MINUTES each, at once
#
# Each stage writes at most 8 files (tables, JSON, logs) to $OUT (default ./gpu-check); the runs themselves go
# to a temporary folder. Knobs (environment): PYTHON (python3), DEVICE (cuda; cpu rehearses the stages at toy
# sizes), BASELINE (a git revision or exported tree for `bench learner --baseline`: its eager step against
# this tree's CUDA-graph step at 1,024 tasks), SERVICE_STEPS (1000 learner steps), MINUTES (3 per quality setting).
set -euo pipefail
stage=${1:?usage: gpu-check.sh learner|service|quality}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
OUT=$(mkdir -p "${OUT:-gpu-check}" && cd "${OUT:-gpu-check}" && pwd)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
if [ "$DEVICE" = cpu ]; then  # a rehearsal: the same commands at sizes a laptop finishes
    tasks='16 8' steps=2 service_steps=${SERVICE_STEPS:-6} rate_steps=8 minutes=${MINUTES:-0.1} gpu=false
else
    tasks='1024 256' steps=20 service_steps=${SERVICE_STEPS:-1000} rate_steps=80 minutes=${MINUTES:-3} gpu=true
fi
gpu_sets=(--set distributed.use_gpu=$gpu --set distributed.learner_gpus=0.25)
ray_state_noise="Failed to query Ray Train Controller actor state"  # every second where Ray lacks its state API

case $stage in
learner)
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
              torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")' | tee "$OUT/learner.log"
    # the larger size first, with every mode and the baseline (the targets); then the smaller, whose
    # tables arrive only if the time limit allows (each compile takes minutes)
    for t in $tasks; do
        if [ "$t" = "${tasks%% *}" ]; then modes=off,step,graphs base=${BASELINE:+--baseline $BASELINE --rounds 1}
        else modes=off,graphs base=; fi
        "$PY" -m iai_dist.bench learner --device "$DEVICE" --tasks "$t" --compile $modes --autocast bf16 \
            --steps $steps --warmup 3 $base --out "$scratch/$t" 2>&1 | tee -a "$OUT/learner.log"
        cp "$scratch/$t/learner-$DEVICE.json" "$OUT/learner-$t.json"
        cp "$scratch/$t/learner-$DEVICE.md" "$OUT/learner-$t.md"
    done
    ;;
service)
    "$PY" -m iai_dist.train --preset linreg-paper --set distributed.num_workers=1 --set distributed.episode_workers=3 \
        "${gpu_sets[@]}" --set train.max_steps=$service_steps --set eval.one_step=false \
        --set tracking.runs_dir="$scratch/runs" 2>&1 | grep --line-buffered -v "$ray_state_noise" | tee "$OUT/service.log"
    cp "$scratch"/runs/linreg-paper-*/summary.json "$OUT/service-summary.json"
    "$PY" -m iai_dist.bench throughput --preset linreg-paper --modes d --steps $rate_steps --minutes 0 "${gpu_sets[@]}" \
        --out "$scratch/throughput" 2>&1 | tee "$OUT/throughput.log"
    cp "$scratch/throughput/throughput.json" "$scratch/throughput/throughput.md" "$OUT/"
    ;;
quality)
    settings=(parametric/obs parametric/obs+grad parametric/grad explicit/obs+grad+pretrain)
    for i in "${!settings[@]}"; do  # one process each, all on the one device at once
        "$PY" -m iai_dist.bench quality --minutes "$minutes" --one-step-minutes 0 --episodes 1024 \
            --adam-max-steps 300 --settings "linreg-paper/${settings[$i]}" --set train.device="$DEVICE" \
            --out "$scratch/q$i" > "$OUT/quality-$i.log" 2>&1 &
    done
    wait
    cat "$scratch"/q*/quality.md > "$OUT/quality.md"
    "$PY" -c 'import json, sys; print(json.dumps([json.load(open(p)) for p in sys.argv[1:]], indent=1))' \
        "$scratch"/q*/quality.json > "$OUT/quality.json"
    ;;
*)
    echo "unknown stage $stage: learner, service or quality" >&2; exit 2 ;;
esac
echo "gpu-check $stage: done; files in $OUT"
