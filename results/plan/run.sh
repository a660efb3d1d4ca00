#!/bin/sh
# spfbench plan against the run it planned (issue 23, item 4): the world demo (`make demo`'s commands and
# config) on this CPU. Plan first (calibration: two small runs), then the run itself, then plan-check; the
# plan, the check and the run's Table 1 are copied here. From the repository root:
#   sh results/plan/run.sh            (OUT=runs/plan-demo; resumable)
set -eu
OUT=${OUT:-runs/plan-demo}
HERE=results/plan
S="env HF_HUB_OFFLINE=1 .venv/bin/spfbench"
CFG=spfbench/configs/run/world-demo.json
M="--method original --method naive --method lora --method adalora --method spf"
$S world data --split finetune --n 2000 --out $OUT/data
$S world captions --n 50 --out $OUT/captions.jsonl
$S build-testset --preset world --captions $OUT/captions.jsonl --out $OUT/testset
start=$(date +%s)
$S plan --testset $OUT/testset --data $OUT/data --out $OUT/plan $M --config $CFG --no-progress
mid=$(date +%s)
$S run --testset $OUT/testset --data $OUT/data --out $OUT/run $M --config $CFG --no-progress > $OUT/run.log
end=$(date +%s)
$S plan-check $OUT/plan $OUT/run
mkdir -p $HERE
cp $OUT/plan/plan.json $OUT/plan/plan.md $OUT/plan/check.json $OUT/plan/check.md $HERE/
cp $OUT/run/results.md $HERE/demo-results.md
cp $OUT/run/results.json $HERE/demo-results.json
echo "{\"plan_seconds\": $((mid - start)), \"run_seconds\": $((end - mid))}" > $HERE/wall.json
