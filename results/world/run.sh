#!/bin/sh
# The Portrait World experiment (issue 8): every method, ablation and the untrained reference row on the
# world, Table 1 with 95% bootstrap CIs, then which attributes moved. CPU (2 threads) or GPU; resumable:
# rerun the same script after a kill. Outputs copied here at the end. Run from the repository root.
set -eu
OUT=${OUT:-runs/world-exp}
S="env HF_HUB_OFFLINE=1 .venv/bin/spfbench"
$S world data --split finetune --n 4000 --out $OUT/data
$S masks --preset world --data $OUT/data --no-progress
$S world captions --n 150 --out $OUT/captions.jsonl
$S build-testset --preset world --captions $OUT/captions.jsonl --out $OUT/testset
$S run --testset $OUT/testset --data $OUT/data --out $OUT/run --config results/world/config.json \
  --method original --method naive --method lora --method adalora --method tokencompose --method magnet \
  --method spf --method spf-no-text --method spf-no-fine --method spf-no-enh --method spf-no-sfcm || true
$S world attributes $OUT/run > /dev/null
for f in results.csv results.md results.tex results.json attributes.md attributes.json run.json; do
  cp $OUT/run/$f results/world/$f
done
